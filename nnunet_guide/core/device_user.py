"""Correction clicks chosen on the training device: a simulated user for the training loop whose
cost is a fixed few dozen kernels per round, whatever the errors look like.

The evaluation's user (:func:`nnunet_guide.core.user_sim.largest_error`) labels the error
components and takes a Euclidean distance transform of the largest one: exact, but on the CPU,
after the label maps are copied off the device. On an H100 that made one correction round cost
4 to 21 forward passes. This user reads the same errors where the prediction already is:

- the errors of a class are its false negatives and false positives (ignore label excluded), as
  for the evaluation's user;
- every error voxel gets a score: the share of its own kind of error (missed or false) in boxes
  centred on it, of sides half, once, twice and four times the guide's reach
  (:func:`nnunet_guide.core.encoding.guide_reach_mm`: where a click's map falls to zero), the
  larger boxes weighted more (:func:`error_scores`). A box that runs past the image border counts
  the outside as no error, as the distance transform counts the border as outside;
- the click goes to the highest score: positive on a miss, negative on a false positive (ties:
  false negatives first, then the lowest flat index). No error, no click.

The best-scoring voxel lies deep inside a large error region. Where one error dominates, that is
where the evaluation's user clicks; otherwise the click is nearby. On plain nnU-Net's predictions
of 236 held-out hippocampus cases both users clicked the same error component for 88% of 472
clicks, with a median distance of 2.2 mm between the two clicks (``benchmarks/correction_users.py``).

Cost: one cumulative sum and one difference per axis and box size, for all samples and classes
at once, inside the box around all errors (the scores there are the same as over the whole
patch), and two small copies to the host (that box, and the clicks). Clicks carry no sigma: the
``object_gaussian`` encoding needs the error's extent, so it keeps the evaluation's user
(:func:`uses_device_user`).

Conventions as in :mod:`nnunet_guide.core.clicks`: label maps (B, *spatial) in array axis order,
``spacing`` in mm per axis, click positions in voxels; clicks come back packed
(:func:`nnunet_guide.core.encoding.pack_clicks`). No nnU-Net import.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .device_clicks import _class_mask, _unravel
from .encoding import guide_reach_mm, _KIND, _POS, _POSITIVE, _TARGET, CLICK_KINDS, packed_width

SCALES = (0.5, 1.0, 2.0, 4.0)  # the boxes' sides, in units of the guide's reach


def uses_device_user(settings) -> bool:
    """Whether correction clicks of these settings come from :func:`densest_error_clicks`."""
    return settings.correction_user == "densest_error" and settings.encoding != "object_gaussian"


def box_widths(side_mm: float, spacing: Sequence[float]) -> tuple:
    """Odd box widths (voxels, at least 1) closest to ``side_mm`` along each axis."""
    return tuple(2 * int(side_mm / float(s) / 2.0) + 1 for s in spacing)


def box_sums(x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Sum of ``x`` (N, *spatial), 0/1 or integer, over the box of ``widths`` voxels centred on
    every voxel, outside the image counted as 0: exact integers (int32; int64 for tensors of 2^31
    voxels or more), from one cumulative sum per axis, padded, and one difference of two views."""
    dtype = torch.int32 if x.numel() < (1 << 31) else torch.int64  # a line's sums stay below numel
    out = x.to(dtype)
    for axis, w in enumerate(widths, start=1):
        if w <= 1:
            continue
        n, half = out.shape[axis], w // 2
        csum = torch.cumsum(out, axis, dtype=dtype)
        # padded[j] = sum of x[:j - half] (0 before the image, the whole line after it), so the
        # box [i - half, i + half] sums to padded[i + w] - padded[i]
        before, after = csum.shape[:axis], csum.shape[axis + 1:]
        front = torch.zeros_like(csum.narrow(axis, 0, 1)).expand(*before, half + 1, *after)
        back = csum.narrow(axis, n - 1, 1).expand(*before, half, *after)
        padded = torch.cat((front, csum, back), axis)
        out = padded.narrow(axis, w, n) - padded.narrow(axis, 0, n)
    return out


def error_scores(errors: torch.Tensor, spacing: Sequence[float], reach_mm: float) -> torch.Tensor:
    """The user's score of every voxel of ``errors`` (N, *spatial), boolean: the share of error
    voxels in boxes centred on it, of sides s = ``SCALES`` x ``reach_mm``, weighted by
    (s / ``reach_mm``)^2 and summed (float64: the same sum on every device); -1 outside the errors.
    The larger boxes rank a large error above a small one and a region's centre above its rim; the
    weights make them count as the size of the largest component counts for the evaluation's user.
    On plain nnU-Net's errors on 236 hippocampus cases, weights 1, s and s^2 picked the evaluation
    user's component for 80%, 84% and 88% of the clicks (s^3: 89%, but further from its voxel);
    boxes beyond 4 x the reach added 0.2%."""
    score = torch.zeros(errors.shape, dtype=torch.float64, device=errors.device)
    for k in SCALES:
        widths = box_widths(k * reach_mm, spacing)
        score += box_sums(errors, widths).double() * (k ** 2 / math.prod(widths))
    return torch.where(errors, score, torch.full((), -1.0, dtype=torch.float64, device=errors.device))


def densest_error_clicks(prediction: torch.Tensor, reference: torch.Tensor, targets: Sequence[Sequence[int]],
                         spacing: Sequence[float], settings, ignore_label: Optional[int] = None) -> torch.Tensor:
    """The next click per guided class of every sample, chosen where the batch is.

    Args:
        prediction, reference: label maps (B, *spatial), integer, on one device.
        targets: label value(s) per guided class, in layout order.
        spacing: mm per spatial axis.
        settings: the model's ``GuideSettings`` (``negatives``; the encoding's reach sets the
            boxes' sizes; not ``object_gaussian``, whose reach is per click).
        ignore_label: reference value that is neither an error nor clicked.
    Returns:
        packed clicks (B, len(targets), 3 + 2 * ndim) on the same device: row t of a sample is its
        click on class t, or padding (target -1) when the class has no error left.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ in shape")
    ndim = prediction.ndim - 1
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values; the label maps have {ndim} spatial axes")
    reach = guide_reach_mm(settings)
    if reach is None:
        raise ValueError("the densest-error user needs a point encoding with a fixed reach; object_gaussian clicks "
                         "need the error's extent (use the largest-error user, core.user_sim)")
    B, dev, T = prediction.shape[0], prediction.device, len(targets)
    kinds = 2 if settings.negatives else 1
    rows = torch.full((B, T, packed_width(ndim)), float("nan"), device=dev)
    rows[..., _TARGET] = -1
    if T == 0 or B == 0:
        return rows
    valid = None if ignore_label is None else reference != ignore_label
    errors = []
    for labels in targets:
        ref, pred = _class_mask(reference, labels), _class_mask(prediction, labels)
        if valid is not None:
            ref, pred = ref & valid, pred & valid
        errors += [ref & ~pred, pred & ~ref][:kinds]
    errors = torch.stack(errors, 1).flatten(0, 1)  # every class and kind of every sample: (B * T * kinds, *spatial)
    # Scored inside the box around all errors only: there is no error outside it, so every box sum, and
    # so the click, is the same as over the whole patch (the raster order of voxels too). One host sync.
    box = _error_box(errors)
    if box is None:
        return rows
    errors = errors[(slice(None), *box)]
    shape = tuple(errors.shape[1:])
    n_vox = math.prod(shape)
    score = error_scores(errors, spacing, reach).view(B, T, -1)
    best, flat = score.max(2)  # the first maximum: false negatives before false positives
    found = best > 0
    position = _unravel(flat % n_vox, shape) + torch.tensor([b.start for b in box], device=dev)
    rows[..., _TARGET] = torch.where(found, torch.arange(T, device=dev).float(), -1.0)
    rows[..., _POSITIVE] = torch.where(found, (flat < n_vox).float(), float("nan"))  # kind 0: a miss
    rows[..., _KIND] = torch.where(found, float(CLICK_KINDS.index("point")), float("nan"))
    rows[..., _POS:_POS + ndim] = torch.where(found[..., None], position.float(), float("nan"))
    return rows


def _error_box(errors: torch.Tensor) -> Optional[tuple]:
    """Slices of the spatial box around every error of ``errors`` (N, *spatial), or None without
    an error; the per-axis projections come to the host in one copy."""
    anywhere = errors.any(0)
    dims = range(anywhere.ndim)
    projections = torch.cat([anywhere.any(dim=tuple(d for d in dims if d != a)) if anywhere.ndim > 1 else anywhere
                             for a in dims]).cpu()
    box, start = [], 0
    for n in anywhere.shape:
        idx = torch.nonzero(projections[start:start + n]).flatten()
        start += n
        if idx.numel() == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)
