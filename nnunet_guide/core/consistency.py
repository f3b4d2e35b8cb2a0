"""Training terms on the response to guides. Pure torch.

- The guide consistency term: a click changes the segmentation near it only. For a guided training
  sample, the output beyond the reach of every guide (where all guide channels hold their no-click
  value, as the windowed renderer leaves them) must equal the network's own automatic output of the
  same sample with its guides removed.
- The click-following term: at the voxel of every point click, the output must agree with the click
  (the clicked class there for a positive click, not there for a negative one).
- The clicked-object term: around every positive click (and, optionally, every negative one), over
  the box its object spans, the clicked class's soft Dice with the reference, so a click is answered
  with the object's extent, not only at its voxel.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .encoding import _KIND, _POS, _POSITIVE, _TARGET, CLICK_KINDS


def far_from_guides(guides: torch.Tensor, no_guide_value: float) -> torch.Tensor:
    """(B, G, *spatial) guide channels -> (B, *spatial) bool: voxels no guide reaches."""
    return (guides == no_guide_value).all(1)


def samples_with_guides(guides: torch.Tensor, no_guide_value: float) -> torch.Tensor:
    """(B, G, *spatial) guide channels -> indices of the samples with a guide voxel anywhere (the
    samples automatic norm statistics and the consistency term treat as clicked)."""
    return torch.nonzero((guides != no_guide_value).flatten(1).any(1)).flatten()


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


#: half side of a clicked object's box, in the click's sigma (1.4826 x MAD of the object's
#: coordinates per axis): an object spans about +-1.35 sigma around its centre, so 3 sigma around
#: any of its voxels (extra clicks land anywhere on the object) holds all of it
OBJECT_BOX_SIGMAS = 3.0


def clicked_object_boxes(packed: torch.Tensor, spatial: Sequence[int], num_classes: int,
                         min_sigma: float = 2.0, box_sigmas: float = OBJECT_BOX_SIGMAS,
                         device=None, negatives: bool = False) -> torch.Tensor:
    """(B, T, *spatial) bool on ``device``: per sample and guided class, the union of the boxes of
    +-``box_sigmas`` x sigma (voxels, per axis) around its positive clicks (points and boxes; a click
    without sigma, as the device user's correction clicks, or with a smaller one gets ``min_sigma``),
    and around its negative clicks too with ``negatives``, clipped to the patch. The boxes are
    planned on the host; the device gets one fill per click."""
    rows = packed.detach().to("cpu", torch.float64)
    ndim = len(spatial)
    boxes = torch.zeros((packed.shape[0], num_classes, *spatial), dtype=torch.bool, device=device)
    chosen = rows[..., _TARGET] >= 0
    if not negatives:
        chosen &= rows[..., _POSITIVE] > 0.5
    b_idx, k_idx = torch.nonzero(chosen, as_tuple=True)
    if b_idx.numel() == 0:
        return boxes
    r = rows[b_idx, k_idx]
    pos, sigma = r[:, _POS:_POS + ndim], r[:, _POS + ndim:_POS + 2 * ndim]
    half = box_sigmas * torch.nan_to_num(sigma, nan=min_sigma).clamp_min(min_sigma)
    size = torch.tensor(spatial, dtype=torch.float64)
    lo = torch.floor(pos - half).clamp(0, None).long()
    hi = (torch.ceil(pos + half) + 1).minimum(size).long()
    for b, t, l, h in zip(b_idx.tolist(), r[:, _TARGET].long().tolist(), lo.tolist(), hi.tolist()):
        boxes[(b, t, *(slice(a, z) for a, z in zip(l, h)))] = True
    return boxes


def clicked_object_penalty(logits: torch.Tensor, reference: torch.Tensor, packed: torch.Tensor,
                           class_channels: Sequence[Sequence[int]], regions: bool = False, ignore_label=None,
                           min_sigma: float = 2.0, negatives: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Mean over (sample, guided class) pairs with a positive click (or any click, ``negatives``) of
    ``1 - soft Dice`` of the class inside :func:`clicked_object_boxes`: its probability (the sum over
    ``class_channels``, or the region's sigmoid) against the reference. Pairs whose boxes hold no
    voxel of the class have no overlap to measure and count nowhere (a positive click's box always
    holds its object; a negative click's box holds the class where the click is near it, as on a
    false-positive rim).

    Args:
        logits: (B, C, *spatial) network output at full resolution (with gradient).
        reference: nnU-Net's full-resolution target: (B, 1, *spatial) label map, or (B, R, *spatial)
            region maps (``regions``; with an ignore label, nnU-Net appends the ignore mask as a last
            channel).
        packed: (B, K, F) clicks of the batch (:func:`nnunet_guide.core.encoding.pack_click_batch`).
        class_channels: per guided class, its output channels, as for :func:`click_following_penalty`
            (for a label map these are its label values).
        ignore_label: voxels of the label map with this value count nowhere; with ``regions``, any
            value other than None means the last reference channel is the ignore mask.
    Returns 0 (with gradient) when no pair counts.
    """
    spatial = tuple(logits.shape[2:])
    boxes = clicked_object_boxes(packed, spatial, len(class_channels), min_sigma, device=logits.device,
                                 negatives=negatives)
    pairs = boxes.flatten(2).any(-1)
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    b_idx, t_idx = torch.nonzero(pairs, as_tuple=True)
    p = output_probabilities(logits, regions)
    reference = reference.to(logits.device)
    terms, counts = [], []
    for b, t in zip(b_idx.tolist(), t_idx.tolist()):
        inside = boxes[b, t]
        if regions:
            q = p[b, class_channels[t][0]]
            g = reference[b, class_channels[t][0]] > 0.5
            if ignore_label is not None:  # nnU-Net's region targets then end with the ignore mask
                inside = inside & (reference[b, -1] < 0.5)
        else:
            q = p[b, list(class_channels[t])].sum(0)
            labels = reference[b, 0].round().long()
            g = torch.zeros_like(inside)
            for v in class_channels[t]:
                g |= labels == int(v)
            if ignore_label is not None:
                inside = inside & (labels != int(ignore_label))
        w = inside.to(q.dtype)
        gw = (g & inside).to(q.dtype)
        terms.append(1.0 - (2.0 * (q * gw).sum() + eps) / ((q * w).sum() + gw.sum() + eps))
        counts.append(gw.sum() > 0)
    terms = torch.stack(terms)
    counts = torch.stack(counts).to(terms.dtype)
    return (terms * counts).sum() / counts.sum().clamp_min(1.0)
