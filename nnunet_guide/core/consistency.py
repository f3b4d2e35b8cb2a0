"""The guide consistency term: a click changes the segmentation near it only.

For a guided training sample, the output beyond the reach of every guide (where all guide channels
hold their no-click value, as the windowed renderer leaves them) must equal the network's own
automatic output of the same sample with its guides removed. Pure torch.
"""
from __future__ import annotations

import torch


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
