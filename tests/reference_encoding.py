"""The numpy guide renderer that nnunet_guide shipped before guides were rendered in torch: the
reference the torch renderer (``nnunet_guide.core.encoding``) is tested against.

Original docstring: render clicks into guide channels (the deterministic half of guide simulation).

Each click is drawn only inside the window where its map exceeds ``EPS``, so the cost grows
with the number and size of clicks, not with the image: a click on a 512^3 volume costs the
same as one on a patch. Distances are in mm (``spacing`` per array axis), so anisotropic voxels
give round blobs in physical space.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from nnunet_guide.core.clicks import Click, box_click

from nnunet_guide.core.encoding import (EPS, _click_encoding, _reach_mm, guide_channel_index,
                                        num_guide_channels)


def render_guides(clicks: Sequence[Click], shape: Sequence[int], spacing: Sequence[float], settings,
                  num_targets: int, slice_axis: Optional[int] = None,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """Guide channels for a list of clicks.

    Args:
        clicks: clicks with voxel positions in the array's axis order (see ``clicks.Click``).
        shape: spatial shape of the image the channels go with.
        spacing: voxel size (mm) per axis of ``shape``.
        settings: a ``GuideSettings`` (encoding, sigma_mm, ball_radius_mm, negatives, offset_half).
        num_targets: number of guided classes (the layout's targets).
        slice_axis: for a 2D model run on a 3D volume: a click only acts on its own slice along
            this axis.
        out: optional float32 array (n_channels, *shape) to render into (overwritten).
    Returns:
        float32 array (num_targets * (2 if negatives else 1), *shape); values in [0, 1], with 0 =
        no click (or [0.5, 1] with 0.5 = no click when ``settings.offset_half``).
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (ndim,):
        raise ValueError(f"spacing {tuple(spacing)} does not match the {ndim}D shape {shape}")
    n_ch = num_guide_channels(num_targets, settings.negatives)
    if out is None:
        out = np.zeros((n_ch, *shape), dtype=np.float32)
    else:
        if out.shape != (n_ch, *shape):
            raise ValueError(f"out has shape {out.shape}, expected {(n_ch, *shape)}")
        out.fill(0)
    for c in clicks:
        if not (0 <= c.target < num_targets):
            raise ValueError(f"click target {c.target} out of range for {num_targets} guided classes")
        if len(c.position) != ndim:
            raise ValueError(f"click at {c.position} has {len(c.position)} coordinates; image is {ndim}D")
        ch = guide_channel_index(c.target, c.positive, settings.negatives)
        pos = np.asarray(c.position, dtype=float)
        enc = _click_encoding(c, settings.encoding)
        if enc == "object_gaussian":
            sig_vox = np.asarray(c.sigma if c.sigma is not None else (settings.min_object_sigma,) * ndim, float)
            sig_vox = np.maximum(sig_vox, 1e-3)
            reach_vox = sig_vox * math.sqrt(2 * math.log(1 / EPS))
        else:
            reach_vox = _reach_mm(enc, settings.sigma_mm, settings.ball_radius_mm) / spacing
        windows, axes_terms = [], []
        empty = False
        for a in range(ndim):
            if slice_axis is not None and a == slice_axis:
                z = int(round(pos[a]))
                if not 0 <= z < shape[a]:
                    empty = True
                    break
                windows.append(slice(z, z + 1))
                axes_terms.append(np.zeros(1))
                continue
            lo = max(0, int(math.floor(pos[a] - reach_vox[a])))
            hi = min(shape[a], int(math.ceil(pos[a] + reach_vox[a])) + 1)
            if hi <= lo:
                empty = True
                break
            idx = np.arange(lo, hi, dtype=float) - pos[a]
            if enc == "object_gaussian":
                axes_terms.append(idx ** 2 / (2 * sig_vox[a] ** 2))
            else:
                axes_terms.append((idx * spacing[a]) ** 2)
            windows.append(slice(lo, hi))
        if empty:
            continue
        # sum of per-axis terms by broadcasting: no full-size coordinate grids
        acc = axes_terms[0].reshape((-1,) + (1,) * (ndim - 1))
        for a in range(1, ndim):
            acc = acc + axes_terms[a].reshape((1,) * a + (-1,) + (1,) * (ndim - a - 1))
        if enc == "gaussian":
            val = np.exp(-acc / (2 * settings.sigma_mm ** 2))
        elif enc == "object_gaussian":
            val = np.exp(-acc)
        elif enc == "exp_distance":
            val = np.exp(-np.sqrt(acc) / settings.sigma_mm)
        else:  # ball
            val = (acc <= settings.ball_radius_mm ** 2).astype(np.float32)
        val = np.where(val >= EPS, val, 0).astype(np.float32)
        region = out[(ch, *windows)]
        np.maximum(region, val, out=region)
    if settings.offset_half:
        out *= 0.5
        out += 0.5
    return out


def random_clicks(rng, shape, n, margin=4.0):
    """Clicks anywhere in and around the image (borders and outside included), points with and
    without their own sigma, and boxes."""
    clicks = []
    for _ in range(n):
        p = rng.uniform(-margin, np.array(shape) - 1 + margin)
        t, positive = int(rng.integers(2)), bool(rng.random() < 0.7)
        if rng.random() < 0.25:
            lo = np.floor(p - rng.uniform(1, 6, len(shape)))
            clicks.append(box_click(t, lo, lo + rng.integers(1, 9, len(shape)), positive))
        else:
            sigma = tuple(rng.uniform(0.5, 6, len(shape))) if rng.random() < 0.5 else None
            clicks.append(Click(t, tuple(float(v) for v in p), positive, sigma))
    return clicks
