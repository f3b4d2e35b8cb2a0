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
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .clicks import Click

EPS = 1e-3  # maps are cut to zero below this value
#: object_gaussian sigma of a user's click per object diameter (the original work's users dragged an
#: ellipse; its Gaussian had sigma = 0.37 x the axis length)
OBJECT_SIGMA_PER_DIAMETER = 0.37
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
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Guide channels of a batch of packed clicks.

    Args:
        packed: (B, K, 3 + 2 * ndim) clicks (:func:`pack_clicks`); rendered on its device unless
            ``out`` is given (then on ``out``'s).
        shape: spatial shape of the image the channels go with (ndim values).
        spacing: voxel size (mm) per axis of ``shape``.
        settings: a ``GuideSettings`` (encoding, sigma_mm, ball_radius_mm, negatives, offset_half,
            min_object_sigma).
        num_targets: number of guided classes (the layout's targets).
        slice_axis: for a 2D model run on a 3D volume: a click only acts on its own slice along
            this axis.
        out: optional float tensor (B, n_channels, *shape) to render into (overwritten; may be a
            view, e.g. the guide block of the network input).
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
    device = out.device if out is not None else packed.device
    target_buf = out
    if out is not None:
        if tuple(out.shape) != (B, n_ch, *shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(B, n_ch, *shape)}")
        if not out.is_contiguous() or out.dtype != torch.float32:
            out = torch.zeros((B, n_ch, *shape), dtype=torch.float32, device=device)
        else:
            out.zero_()
    else:
        out = torch.zeros((B, n_ch, *shape), dtype=torch.float32, device=device)

    packed = packed.to(device=device, dtype=torch.float32)
    b_idx, k_idx = torch.nonzero(packed[..., _TARGET] >= 0, as_tuple=True)
    if b_idx.numel():
        rows = packed[b_idx, k_idx]
        target = rows[:, _TARGET].long()
        positive = rows[:, _POSITIVE] > 0.5
        if int(target.min()) < 0 or int(target.max()) >= num_targets:
            bad = int(target[(target < 0) | (target >= num_targets)][0])
            raise ValueError(f"click target {bad} out of range for {num_targets} guided classes")
        if settings.negatives:
            channel = 2 * target + (~positive).long()
        else:
            if not bool(positive.all()):
                raise ValueError("negative click given, but the guide settings have no negative channels")
            channel = target
        pos = rows[:, _POS:_POS + ndim]
        sigma = rows[:, _POS + ndim:]
        sized = rows[:, _KIND] == CLICK_KINDS.index("box")
        if settings.encoding == "object_gaussian":
            sized = torch.ones_like(sized)
        if bool((sized & torch.isnan(sigma).any(1) & (rows[:, _KIND] == CLICK_KINDS.index("box"))).any()):
            raise ValueError("a box click has no sigma (its per-axis size in voxels)")
        sigma = torch.where(torch.isnan(sigma), torch.full_like(sigma, float(settings.min_object_sigma)), sigma)
        sigma = sigma.clamp_min(1e-3)
        flat_base = (b_idx * n_ch + channel) * math.prod(shape)
        sp = torch.tensor([float(v) for v in spacing], dtype=torch.float32, device=device)
        if bool((~sized).any()):
            m = ~sized
            reach = (_reach_mm(settings.encoding, settings.sigma_mm, settings.ball_radius_mm) / sp).expand(
                int(m.sum()), ndim)
            _splat(out, flat_base[m], pos[m], reach, shape, slice_axis,
                   lambda d, a: (d * float(spacing[a])) ** 2, _point_value(settings))
        if bool(sized.any()):
            m = sized
            s = sigma[m]
            _splat(out, flat_base[m], pos[m], s * _GAUSS_REACH, shape, slice_axis, None, None, sigma=s)
    if settings.offset_half:
        out.mul_(0.5).add_(0.5)
    if target_buf is not None and target_buf is not out:
        target_buf.copy_(out)
        return target_buf
    return out


def _point_value(settings):
    enc = settings.encoding
    if enc == "gaussian":
        return lambda acc: torch.exp(-acc / (2 * settings.sigma_mm ** 2))
    if enc == "exp_distance":
        return lambda acc: torch.exp(-torch.sqrt(acc) / settings.sigma_mm)
    if enc == "ball":
        return lambda acc: (acc <= settings.ball_radius_mm ** 2).to(acc.dtype)
    raise ValueError(f"unknown guide encoding {enc!r}")


def _splat(out: torch.Tensor, flat_base: torch.Tensor, pos: torch.Tensor, reach: torch.Tensor, shape, slice_axis,
           axis_term, value, sigma: Optional[torch.Tensor] = None) -> None:
    """Max-combine the clicks' windowed maps into ``out`` (contiguous).

    Each click's window starts at floor(pos - reach), clamped so that it stays inside the image;
    clicks are bucketed by window size (next power of two per axis, at most the image's size), so
    one large click does not enlarge every other click's window.
    """
    ndim = len(shape)
    device = pos.device
    # per click and axis: the number of voxels its map can reach
    need = torch.floor(pos + reach) - torch.floor(pos - reach) + 1
    size = torch.pow(2, torch.ceil(torch.log2(need.clamp_min(1)))).long()
    size = torch.minimum(size, torch.tensor(shape, device=device))
    if slice_axis is not None:
        size[:, slice_axis] = 1
    keys, inverse = torch.unique(size, dim=0, return_inverse=True)
    strides = [math.prod(shape[a + 1:]) for a in range(ndim)]
    flat_out = out.view(-1)
    for u in range(keys.shape[0]):
        win = [int(v) for v in keys[u]]
        idx_all = torch.nonzero(inverse == u, as_tuple=True)[0]
        chunk = max(1, _CHUNK_ELEMENTS // math.prod(win))
        for c0 in range(0, idx_all.numel(), chunk):
            sel = idx_all[c0:c0 + chunk]
            p = pos[sel]
            n = sel.numel()
            lin = flat_base[sel].view(n, *([1] * ndim))
            acc = None
            keep = None
            for a in range(ndim):
                view = [n] + [1] * ndim
                view[a + 1] = win[a]
                if slice_axis is not None and a == slice_axis:
                    z = torch.round(p[:, a]).long()
                    inside = (z >= 0) & (z < shape[a])
                    keep = inside if keep is None else keep & inside
                    lin = lin + (z.clamp(0, shape[a] - 1) * strides[a]).view(n, *([1] * ndim))
                    continue
                start = torch.floor(p[:, a] - reach[sel, a]).long().clamp(0, shape[a] - win[a])
                idx = start[:, None] + torch.arange(win[a], device=device)[None]
                d = idx.to(p.dtype) - p[:, a:a + 1]
                term = (d / sigma[sel, a:a + 1]) ** 2 / 2 if sigma is not None else axis_term(d, a)
                term = term.view(view)
                acc = term if acc is None else acc + term
                lin = lin + (idx * strides[a]).view(view)
            if acc is None:  # a 1D image that is all slice axis: the click's own slice only
                acc = torch.zeros([n] + [1] * ndim, device=device)
            val = torch.exp(-acc) if sigma is not None else value(acc)
            val = torch.where(val >= EPS, val, torch.zeros((), dtype=val.dtype, device=device))
            if keep is not None:
                val = val * keep.view(n, *([1] * ndim)).to(val.dtype)
            val, lin = torch.broadcast_tensors(val, lin)
            flat_out.scatter_reduce_(0, lin.reshape(-1), val.reshape(-1).to(out.dtype), reduce="amax")


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
