"""Render clicks into guide channels (the deterministic half of guide simulation), in torch.

One renderer serves training (on the training device, inside the trainer's step), validation,
prediction and the interactive session, so they cannot drift apart.

Clicks travel as coordinates: a sample's clicks are packed into a small float tensor
(:func:`pack_clicks`, one row per click, padded), which nnU-Net's data loader collates into a
(B, K, F) batch like any other tensor. :func:`render_guide_batch` turns such a batch into dense
guide channels wherever the tensor lives (CPU or GPU). Each click is computed only inside its
window, the box around it where its map can exceed ``EPS``: the cost grows with the number and
reach of the clicks, not with the number of voxels times clicks. Distances are in mm (``spacing``
per array axis), so anisotropic voxels give round blobs in physical space.

No nnU-Net import.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from .clicks import OBJECT_SIGMA_PER_DIAMETER, Click  # noqa: F401  (re-exported: click files, evaluation)

EPS = 1e-3  # maps are cut to zero below this value
CLICK_KINDS = ("point", "box")
#: the reach of an object-sized Gaussian in sigmas: exp(-r^2 / 2) = EPS
_GAUSS_REACH = math.sqrt(2 * math.log(1 / EPS))
#: most window values computed at once (bounds the renderer's scratch memory: 4 bytes each)
_CHUNK_ELEMENTS = 1 << 24

# packed click rows: target (-1 = padding), positive (0/1), kind (index in CLICK_KINDS), then the
# position (ndim voxel coordinates), then sigma (ndim voxels; NaN = none)
_TARGET, _POSITIVE, _KIND, _POS = 0, 1, 2, 3


def num_guide_channels(num_targets: int, negatives: bool) -> int:
    return num_targets * (2 if negatives else 1)


def guide_channel_index(target: int, positive: bool, negatives: bool) -> int:
    """Channel (within the guide block) of a target's positive or negative clicks."""
    if negatives:
        return 2 * target + (0 if positive else 1)
    if not positive:
        raise ValueError("negative click given, but the guide settings have no negative channels")
    return target


def _reach_mm(encoding: str, sigma_mm: float, radius_mm: float) -> float:
    if encoding == "gaussian":
        return sigma_mm * _GAUSS_REACH
    if encoding == "exp_distance":
        return sigma_mm * math.log(1 / EPS)
    if encoding == "ball":
        return radius_mm
    raise ValueError(f"unknown guide encoding {encoding!r}")


def guide_reach_mm(settings) -> Optional[float]:
    """Distance (mm) from a point click beyond which its guide map is 0 (cut below ``EPS``);
    None for the ``object_gaussian`` encoding, whose reach depends on each click's sigma."""
    if settings.encoding == "object_gaussian":
        return None
    return float(_reach_mm(settings.encoding, settings.sigma_mm, settings.ball_radius_mm))


def click_reach_voxels(click: Click, spacing: Sequence[float], settings) -> np.ndarray:
    """Per-axis semi-axes (voxels) of the ellipsoid outside which a click's guide map is 0, as
    the renderer draws it: :func:`guide_reach_mm` for point clicks of the mm encodings,
    ``sigma * sqrt(2 ln(1/EPS))`` per axis for boxes and ``object_gaussian`` clicks
    (``settings.min_object_sigma`` where the click has no sigma)."""
    sp = np.asarray(spacing, float)
    reach = None if click.kind == "box" else guide_reach_mm(settings)
    if reach is not None:
        return reach / sp
    sigma = click.sigma if click.sigma is not None else (settings.min_object_sigma,) * len(sp)
    return np.maximum(np.asarray(sigma, float), 1e-3) * _GAUSS_REACH


def _click_encoding(click: Click, encoding: str) -> str:
    if click.kind == "point":
        return encoding
    if click.kind == "box":
        if click.sigma is None:
            raise ValueError(f"box click at {click.position} has no sigma (its per-axis size in voxels)")
        return "object_gaussian"
    raise ValueError(f"unknown click kind {click.kind!r}; expected one of {', '.join(CLICK_KINDS)}")


# --------------------------------------------------------------------------------------------
# Clicks as coordinates


def packed_width(ndim: int) -> int:
    """Values per packed click row of an ``ndim``-D image."""
    return _POS + 2 * ndim


def pack_clicks(clicks: Sequence[Click], ndim: int, capacity: Optional[int] = None) -> torch.Tensor:
    """One sample's clicks as a float32 tensor (capacity, 3 + 2 * ndim), padded with rows whose
    target is -1 (``capacity`` defaults to ``len(clicks)``).

    Rows: target index, positive (1/0), kind (index in ``CLICK_KINDS``), position (voxels, array
    axis order), sigma (voxels; NaN where the click has none). Raises ValueError for a click of
    the wrong dimension, an unknown kind or more clicks than ``capacity``.
    """
    n = len(clicks)
    capacity = n if capacity is None else int(capacity)
    if n > capacity:
        raise ValueError(f"{n} clicks do not fit the {capacity} click rows of a sample")
    rows = np.full((capacity, packed_width(ndim)), np.nan, dtype=np.float32)
    rows[:, _TARGET] = -1
    for i, c in enumerate(clicks):
        if len(c.position) != ndim:
            raise ValueError(f"click at {c.position} has {len(c.position)} coordinates; image is {ndim}D")
        _click_encoding(c, "gaussian")  # validates the kind
        rows[i, _TARGET] = c.target
        rows[i, _POSITIVE] = 1.0 if c.positive else 0.0
        rows[i, _KIND] = CLICK_KINDS.index(c.kind)
        rows[i, _POS:_POS + ndim] = c.position
        if c.sigma is not None:
            if len(c.sigma) != ndim:
                raise ValueError(f"click at {c.position} has {len(c.sigma)} sigma values; image is {ndim}D")
            rows[i, _POS + ndim:] = c.sigma
    return torch.from_numpy(rows)


def pack_click_batch(clicks_per_sample: Sequence[Sequence[Click]], ndim: int,
                     capacity: Optional[int] = None) -> torch.Tensor:
    """Clicks of several samples as (B, K, 3 + 2 * ndim), K = ``capacity`` or the largest count."""
    k = max([len(c) for c in clicks_per_sample] + [0]) if capacity is None else capacity
    if not clicks_per_sample:
        return torch.full((0, k, packed_width(ndim)), -1.0)
    return torch.stack([pack_clicks(c, ndim, k) for c in clicks_per_sample])


def unpack_clicks(packed: torch.Tensor) -> List[Click]:
    """The clicks of one packed sample (K, F), padding dropped (inverse of :func:`pack_clicks`)."""
    rows = packed.detach().cpu().numpy().astype(float)
    ndim = (rows.shape[1] - _POS) // 2
    out = []
    for r in rows[rows[:, _TARGET] >= 0]:
        sigma = r[_POS + ndim:]
        out.append(Click(int(r[_TARGET]), tuple(float(v) for v in r[_POS:_POS + ndim]), bool(r[_POSITIVE] > 0.5),
                         None if np.isnan(sigma).any() else tuple(float(v) for v in sigma),
                         CLICK_KINDS[int(r[_KIND])]))
    return out


def click_counts(packed: torch.Tensor) -> torch.Tensor:
    """Number of clicks per sample of a packed batch (B, K, F) -> (B,)."""
    return (packed[..., _TARGET] >= 0).sum(-1)


def append_clicks(packed: torch.Tensor, sample: int, clicks: Sequence[Click]) -> torch.Tensor:
    """``packed`` (B, K, F) with ``clicks`` added to one sample's free rows; grows K if needed
    (returns a new tensor then)."""
    if not clicks:
        return packed
    ndim = (packed.shape[-1] - _POS) // 2
    n = int(click_counts(packed[sample:sample + 1])[0])
    need = n + len(clicks) - packed.shape[1]
    if need > 0:
        pad = torch.full((packed.shape[0], need, packed.shape[2]), float("nan"), dtype=packed.dtype,
                         device=packed.device)
        pad[..., _TARGET] = -1
        packed = torch.cat((packed, pad), dim=1)
    packed[sample, n:n + len(clicks)] = pack_clicks(clicks, ndim).to(packed.device)
    return packed


# --------------------------------------------------------------------------------------------
# Rendering


def render_guide_batch(packed: torch.Tensor, shape: Sequence[int], spacing: Sequence[float], settings,
                       num_targets: int, slice_axis: Optional[int] = None,
                       out: Optional[torch.Tensor] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """Guide channels of a batch of packed clicks.

    Args:
        packed: (B, K, 3 + 2 * ndim) clicks (:func:`pack_clicks`). Best kept on the CPU: the
            per-click bookkeeping (windows, buckets, validation) runs there in numpy, so the
            device only sees a few kernels per window size and no host-device synchronisation.
        shape: spatial shape of the image the channels go with (ndim values).
        spacing: voxel size (mm) per axis of ``shape``.
        settings: a ``GuideSettings`` (encoding, sigma_mm, ball_radius_mm, negatives, offset_half,
            min_object_sigma).
        num_targets: number of guided classes (the layout's targets).
        slice_axis: for a 2D model run on a 3D volume: a click only acts on its own slice along
            this axis.
        out: optional float tensor (B, n_channels, *shape) to render into (overwritten; may be a
            view, e.g. the guide block of the network input); rendering happens on its device.
        device: where to render when ``out`` is not given (default: ``packed``'s device).
    Returns:
        float32 (B, num_targets * (2 if negatives else 1), *shape); values in [0, 1], 0 = no click
        ([0.5, 1] with 0.5 = no click when ``settings.offset_half``). Clicks of one channel combine
        by maximum.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match the {ndim}D shape {shape}")
    if packed.ndim != 3 or packed.shape[-1] != packed_width(ndim):
        raise ValueError(f"packed clicks have shape {tuple(packed.shape)}; a {ndim}D image needs "
                         f"(B, K, {packed_width(ndim)})")
    n_ch = num_guide_channels(num_targets, settings.negatives)
    B = packed.shape[0]
    if out is not None:
        device = out.device
        if tuple(out.shape) != (B, n_ch, *shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(B, n_ch, *shape)}")
    device = torch.device(device) if device is not None else packed.device
    work = out if out is not None and out.is_contiguous() and out.dtype == torch.float32 else \
        torch.empty((B, n_ch, *shape), dtype=torch.float32, device=device)
    work.zero_()
    plan = _render_plan(packed.detach().to("cpu", torch.float32).numpy(), shape, spacing, settings, num_targets,
                        slice_axis)
    if plan is not None:
        _splat(work, plan, shape, settings)
    if settings.offset_half:
        work.mul_(0.5).add_(0.5)
    if out is not None and work is not out:
        out.copy_(work)
        return out
    return work


def _render_plan(packed: np.ndarray, shape, spacing, settings, num_targets: int, slice_axis: Optional[int]):
    """Per-click bookkeeping on the CPU: validation, channels, windows, sorted into buckets of one
    window size. Returns None when nothing is to be drawn."""
    ndim = len(shape)
    b_idx, k_idx = np.nonzero(packed[..., _TARGET] >= 0)
    if b_idx.size == 0:
        return None
    rows = packed[b_idx, k_idx].astype(np.float64)
    target = rows[:, _TARGET].astype(np.int64)
    positive = rows[:, _POSITIVE] > 0.5
    if target.max() >= num_targets:
        raise ValueError(f"click target {int(target.max())} out of range for {num_targets} guided classes")
    if settings.negatives:
        channel = 2 * target + (~positive)
    else:
        if not positive.all():
            raise ValueError("negative click given, but the guide settings have no negative channels")
        channel = target
    kind = rows[:, _KIND].astype(np.int64)
    if kind.min() < 0 or kind.max() >= len(CLICK_KINDS):
        raise ValueError(f"unknown click kind index {int(kind.max())}; expected 0..{len(CLICK_KINDS) - 1}")
    pos = rows[:, _POS:_POS + ndim]
    sigma = rows[:, _POS + ndim:]
    box = kind == CLICK_KINDS.index("box")
    if np.isnan(sigma[box]).any():
        raise ValueError("a box click has no sigma (its per-axis size in voxels)")
    sized = box | (settings.encoding == "object_gaussian")
    sigma = np.maximum(np.where(np.isnan(sigma), float(settings.min_object_sigma), sigma), 1e-3)
    sp = np.asarray(spacing, np.float64)
    point_reach = _reach_mm(settings.encoding, settings.sigma_mm, settings.ball_radius_mm) if (~sized).any() else 0.0
    reach = np.where(sized[:, None], sigma * _GAUSS_REACH, point_reach / sp[None])
    # a window of width ceil(2 r) + 1 covers every voxel within reach, wherever the click sits
    need = np.ceil(2 * reach).astype(np.int64) + 1
    size = np.minimum(2 ** np.ceil(np.log2(need)).astype(np.int64), np.asarray(shape)[None])
    start = np.clip(np.floor(pos - reach).astype(np.int64), 0, np.asarray(shape)[None] - size)
    # per-axis factor of the distance term: (d * scale)^2, mm for points, 1 / (sqrt(2) sigma) for sized clicks
    scale = np.where(sized[:, None], 1.0 / (math.sqrt(2.0) * sigma), sp[None])
    keep = np.ones(len(rows), bool)
    if slice_axis is not None:
        z = np.round(pos[:, slice_axis]).astype(np.int64)
        keep = (z >= 0) & (z < shape[slice_axis])
        size[:, slice_axis], start[:, slice_axis], scale[:, slice_axis] = 1, np.clip(z, 0, shape[slice_axis] - 1), 0.0
    flat_base = (b_idx * (num_guide_channels(num_targets, settings.negatives)) + channel) * math.prod(shape)
    # buckets: one window size and one value function each, contiguous after sorting
    key = np.concatenate((sized[:, None].astype(np.int64), size), axis=1)[keep]
    if key.shape[0] == 0:
        return None
    keys, inverse = np.unique(key, axis=0, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.searchsorted(inverse.reshape(-1)[order], np.arange(len(keys) + 1))
    sel = np.flatnonzero(keep)[order]
    ints = np.concatenate((flat_base[sel, None], start[sel]), axis=1)
    floats = np.concatenate((pos[sel], scale[sel]), axis=1).astype(np.float32)
    return {"ints": ints, "floats": floats, "keys": keys, "bounds": bounds}


def _splat(out: torch.Tensor, plan: dict, shape, settings) -> None:
    """Max-combine the planned clicks' windowed maps into ``out`` (contiguous float32): two
    host-to-device copies, then a few kernels per bucket of one window size."""
    ndim = len(shape)
    device = out.device
    ints = torch.from_numpy(plan["ints"]).to(device, non_blocking=True)
    floats = torch.from_numpy(plan["floats"]).to(device, non_blocking=True)
    strides = [math.prod(shape[a + 1:]) for a in range(ndim)]
    flat_out = out.view(-1)
    point_value = _point_value(settings)
    bounds = plan["bounds"]
    for u, key in enumerate(plan["keys"]):
        sized, win = bool(key[0]), [int(v) for v in key[1:]]
        chunk = max(1, _CHUNK_ELEMENTS // math.prod(win))
        for c0 in range(int(bounds[u]), int(bounds[u + 1]), chunk):
            c1 = min(c0 + chunk, int(bounds[u + 1]))
            n = c1 - c0
            lin = ints[c0:c1, 0].view(n, *([1] * ndim))
            acc = torch.zeros([n] + [1] * ndim, device=device)
            for a in range(ndim):
                view = [n] + [1] * ndim
                view[a + 1] = win[a]
                idx = ints[c0:c1, 1 + a:2 + a] + torch.arange(win[a], device=device)[None]
                d = (idx.to(torch.float32) - floats[c0:c1, a:a + 1]) * floats[c0:c1, ndim + a:ndim + a + 1]
                acc = acc + (d * d).view(view)
                lin = lin + (idx * strides[a]).view(view)
            val = torch.exp(-acc) if sized else point_value(acc)
            val = torch.where(val >= EPS, val, torch.zeros((), dtype=val.dtype, device=device))
            val, lin = torch.broadcast_tensors(val, lin)
            flat_out.scatter_reduce_(0, lin.reshape(-1), val.reshape(-1), reduce="amax")


def _point_value(settings):
    enc = settings.encoding
    if enc == "gaussian":
        return lambda acc: torch.exp(-acc / (2 * settings.sigma_mm ** 2))
    if enc == "exp_distance":
        return lambda acc: torch.exp(-torch.sqrt(acc) / settings.sigma_mm)
    if enc == "ball":
        return lambda acc: (acc <= settings.ball_radius_mm ** 2).to(acc.dtype)
    if enc == "object_gaussian":  # every click is sized: never called
        return None
    raise ValueError(f"unknown guide encoding {enc!r}")


def render_guides(clicks: Sequence[Click], shape: Sequence[int], spacing: Sequence[float], settings,
                  num_targets: int, slice_axis: Optional[int] = None,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """Guide channels of one image's clicks, as a float32 numpy array (n_channels, *shape):
    :func:`render_guide_batch` on the CPU for a list of :class:`Click` (``out``, if given, is
    overwritten)."""
    ndim = len(tuple(shape))
    packed = pack_clicks(list(clicks), ndim)[None]
    if out is not None:
        n_ch = num_guide_channels(num_targets, settings.negatives)
        if out.shape != (n_ch, *tuple(int(s) for s in shape)):
            raise ValueError(f"out has shape {out.shape}, expected {(n_ch, *tuple(shape))}")
        render_guide_batch(packed, shape, spacing, settings, num_targets, slice_axis, out=torch.from_numpy(out)[None])
        return out
    return render_guide_batch(packed, shape, spacing, settings, num_targets, slice_axis)[0].numpy()
