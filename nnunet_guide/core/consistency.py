"""Training terms on the response to guides. Pure torch.

- The guide consistency term: a click changes the segmentation near it only. For a guided training
  sample, the output beyond the reach of every guide (where all guide channels hold their no-click
  value, as the windowed renderer leaves them) must equal the network's own automatic output of the
  same sample with its guides removed.
- The click-following term: at the voxel of every point click, the output must agree with the click
  (the clicked class there for a positive click, not there for a negative one).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .encoding import _KIND, _POS, _POSITIVE, _TARGET, CLICK_KINDS


def far_from_guides(guides: torch.Tensor, no_guide_value: float) -> torch.Tensor:
    """(B, G, *spatial) guide channels -> (B, *spatial) bool: voxels no guide reaches."""
    return (guides == no_guide_value).all(1)


def output_probabilities(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """Class probabilities as nnU-Net reads them: softmax over channels, or per-region sigmoid."""
    logits = logits.float()
    return torch.sigmoid(logits) if regions else torch.softmax(logits, 1)


def consistency_penalty(logits: torch.Tensor, reference_logits: torch.Tensor, far: torch.Tensor,
                        regions: bool = False) -> torch.Tensor:
    """Mean over the ``far`` voxels of the squared difference (summed over channels) between the
    probabilities of ``logits`` (B, C, *spatial; with gradient) and of ``reference_logits`` (the
    automatic output, treated as a constant). 0 when no voxel is far."""
    p = output_probabilities(logits, regions)
    q = output_probabilities(reference_logits.detach(), regions)
    d = ((p - q) ** 2).sum(1)
    w = far.to(d.dtype)
    return (d * w).sum() / w.sum().clamp_min(1.0)


def click_following_penalty(logits: torch.Tensor, packed: torch.Tensor, class_channels: Sequence[Sequence[int]],
                            regions: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Mean over the point clicks of a packed batch of the cross-entropy between the output at the
    clicked voxel and the click: ``-log q`` for a positive click, ``-log(1 - q)`` for a negative
    one, where ``q`` is the probability of the click's class at its voxel.

    Args:
        logits: (B, C, *spatial) network output at full resolution (with gradient).
        packed: (B, K, F) clicks of the batch (:func:`nnunet_guide.core.encoding.pack_click_batch`);
            padding rows and boxes are skipped; positions round to the nearest voxel, clamped to
            the patch.
        class_channels: per guided class (the clicks' target index), the output channels whose
            probabilities add up to the class: its label values for a softmax output, or the one
            channel of its region (``regions``: per-channel sigmoid).
    Returns 0 (with gradient) when the batch has no point click.
    """
    rows = packed.to(logits.device).reshape(-1, packed.shape[-1])
    sample = torch.arange(packed.shape[0], device=logits.device).repeat_interleave(packed.shape[1])
    keep = (rows[:, _TARGET] >= 0) & (rows[:, _KIND] == CLICK_KINDS.index("point"))
    if not bool(keep.any()):
        return logits.sum() * 0.0
    rows, sample = rows[keep], sample[keep]
    spatial = logits.shape[2:]
    pos = rows[:, _POS:_POS + len(spatial)].round().long()
    pos = torch.minimum(pos.clamp_min(0), torch.tensor(spatial, device=logits.device) - 1)
    at = logits.movedim(1, -1)[(sample, *pos.unbind(1))].float()  # (N, C): the output at each click
    prob = torch.sigmoid(at) if regions else torch.softmax(at, -1)
    member = torch.zeros((len(class_channels), logits.shape[1]), dtype=prob.dtype, device=logits.device)
    for t, channels in enumerate(class_channels):
        member[t, list(channels)] = 1.0
    q = (prob * member[rows[:, _TARGET].long()]).sum(-1).clamp(eps, 1.0 - eps)
    positive = rows[:, _POSITIVE] > 0.5
    return -torch.where(positive, q.log(), (1.0 - q).log()).mean()
