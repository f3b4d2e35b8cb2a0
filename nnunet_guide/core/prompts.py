"""Viewer prompts (points, boxes, scribbles, lasso regions) as :class:`~nnunet_guide.core.clicks.Click` lists.

Every prompt a viewer sends becomes clicks, so the guide renderer, the session's undo and the
trainer's simulation all keep one carrier:

- **point**: one click of the model's encoding.
- **box** (half-open voxel bounds per axis; one axis of size 1 = a box drawn on one slice): one
  ``kind="box"`` click at the box centre with the original work's object-sized Gaussian ellipse
  (:func:`~nnunet_guide.core.clicks.box_click`).
- **scribble** (binary mask of the stroke): point clicks on the stroke's voxels. Guide channels
  combine clicks by their maximum, and every encoding is a decreasing function of the distance to
  the click, so clicks on *every* stroke voxel render exactly the encoding of the distance to the
  stroke. The stroke is subsampled on a grid of ``step_mm`` (a fraction of the guide's reach):
  each kept voxel is the stroke voxel nearest its grid cell's centre, so every stroke voxel lies
  within one cell diagonal of a kept click.
- **lasso** (binary mask of the enclosed region): the region is filled (holes closed slice by
  slice along a singleton axis, else in 3D) and covered by clicks on the same grid: a plateau of
  guide over the region, fading outside it at the encoding's rate.

Conventions: masks and positions are in one voxel grid (any axis order, the caller's), spacing in
mm per axis of that grid. Pure numpy/scipy.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .clicks import Click, box_click

PROMPT_KINDS = ("point", "bbox2d", "bbox3d", "scribble", "lasso")

#: default grid step of scribble/lasso clicks, as a fraction of the guide's sigma (mm)
STEP_PER_SIGMA = 0.5
#: most clicks one scribble or lasso becomes (the grid step grows until it fits)
MAX_PROMPT_CLICKS = 256


class PromptError(ValueError):
    """A prompt that cannot become clicks (empty mask, box outside the image, ...)."""


def check_inside(position: Sequence[float], shape: Sequence[int], what: str = "point") -> None:
    """Raise PromptError unless ``position`` (voxel coordinates) lies in an image of ``shape``."""
    try:
        p = np.asarray(position, float)
    except (TypeError, ValueError):
        raise PromptError(f"{what} {position!r} needs {len(shape)} numbers (voxel coordinates)") from None
    if p.shape != (len(shape),) or not np.all(np.isfinite(p)):
        raise PromptError(f"{what} {list(position)} needs {len(shape)} finite coordinates")
    if np.any(p < -0.5) or np.any(p > np.asarray(shape) - 0.5):
        raise PromptError(f"{what} {[float(v) for v in p]} is outside the image of shape {list(shape)}")


def point_click(target: int, position: Sequence[float], positive: bool, shape: Sequence[int],
                sigma: Optional[Sequence[float]] = None) -> Click:
    """A point prompt: one click (checked to lie inside ``shape``)."""
    check_inside(position, shape)
    return Click(int(target), tuple(float(v) for v in position), bool(positive),
                 None if sigma is None else tuple(float(s) for s in sigma))


def clip_box(bbox: Sequence[Sequence[float]], shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Half-open box ``[[lo, hi], ...]`` clipped to the image; PromptError if it misses it or is
    malformed. Returns (lower, upper) float arrays."""
    try:
        b = np.asarray(bbox, float)
    except (TypeError, ValueError):
        raise PromptError(f"box {bbox!r} must be [[lo, hi], ...] per axis") from None
    if b.shape != (len(shape), 2) or not np.all(np.isfinite(b)):
        raise PromptError(f"box {bbox!r} must be {len(shape)} finite [lo, hi] pairs (half-open voxel bounds)")
    lo, hi = b[:, 0], b[:, 1]
    if np.any(hi <= lo):
        raise PromptError(f"box {b.tolist()} is empty: every axis needs lo < hi (half-open bounds)")
    clo, chi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape, float))
    if np.any(chi <= clo):
        raise PromptError(f"box {b.tolist()} is outside the image of shape {list(shape)}")
    return clo, chi


def bbox_click(target: int, bbox: Sequence[Sequence[float]], positive: bool, shape: Sequence[int]) -> Click:
    """A box prompt (2D = one axis of size 1, or 3D), half-open voxel bounds, as a box click."""
    lo, hi = clip_box(bbox, shape)
    return box_click(target, lo, hi, positive)


def grid_subsample(coords: np.ndarray, spacing: Sequence[float], step_mm: float) -> np.ndarray:
    """Per cell of a ``step_mm`` grid, the coordinate nearest the cell's centre.

    Args:
        coords: (n, ndim) voxel coordinates.
        spacing: mm per axis.
    Returns:
        (m, ndim) subset of ``coords`` (m <= n), sorted by cell; every input coordinate lies in the
        cell of one output coordinate (within ``step_mm * sqrt(ndim)`` of it).
    """
    coords = np.asarray(coords)
    if len(coords) == 0:
        return coords.reshape(0, coords.shape[1] if coords.ndim == 2 else 0)
    mm = coords * np.asarray(spacing, float)
    cell = np.floor(mm / step_mm).astype(np.int64)
    d2 = (((mm / step_mm) - cell - 0.5) ** 2).sum(1)
    order = np.lexsort((d2, *cell.T[::-1]))
    cs = cell[order]
    first = np.ones(len(cs), bool)
    first[1:] = np.any(cs[1:] != cs[:-1], axis=1)
    return coords[order[first]]


def _mask_coords(mask: np.ndarray, offset: Sequence[int], shape: Sequence[int], what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != len(shape):
        raise PromptError(f"{what} mask is {m.ndim}D, the image is {len(shape)}D (shape {list(shape)})")
    coords = np.argwhere(m > 0) + np.asarray(offset, int)
    if len(coords) == 0:
        raise PromptError(f"{what} mask is empty (no non-zero voxel)")
    inside = np.all((coords >= 0) & (coords < np.asarray(shape)), axis=1)
    if not inside.all():
        raise PromptError(f"{what} mask reaches outside the image of shape {list(shape)} "
                          f"(voxels from {coords.min(0).tolist()} to {coords.max(0).tolist()})")
    return coords


def _subsample_capped(coords: np.ndarray, spacing, step_mm: float, max_clicks: int) -> np.ndarray:
    step = float(step_mm)
    pts = grid_subsample(coords, spacing, step)
    while len(pts) > max_clicks:
        step *= 1.25
        pts = grid_subsample(coords, spacing, step)
    return pts


def scribble_clicks(target: int, mask: np.ndarray, positive: bool, spacing: Sequence[float], step_mm: float,
                    shape: Sequence[int], offset: Sequence[int] = (0, 0, 0), max_clicks: int = MAX_PROMPT_CLICKS,
                    sigma: Optional[Sequence[float]] = None) -> List[Click]:
    """A scribble: point clicks on its stroke, subsampled on a ``step_mm`` grid (see module doc).

    Args:
        mask: the stroke (non-zero voxels), placed at ``offset`` in an image of ``shape``.
        sigma: per-axis sigma (voxels) for ``object_gaussian`` models, else None.
    """
    coords = _mask_coords(mask, offset[:np.asarray(mask).ndim], shape, "scribble")
    pts = _subsample_capped(coords, spacing, step_mm, max_clicks)
    sig = None if sigma is None else tuple(float(s) for s in sigma)
    return [Click(int(target), tuple(float(v) for v in p), bool(positive), sig) for p in pts]


def fill_region(mask: np.ndarray) -> np.ndarray:
    """The region a lasso encloses: holes filled within each slice along a singleton axis (a lasso
    drawn on one slice), else in 3D."""
    m = np.asarray(mask) > 0
    thin = [a for a, n in enumerate(m.shape) if n == 1]
    if thin and m.ndim == 3:
        a = thin[0]
        return np.expand_dims(ndimage.binary_fill_holes(np.take(m, 0, axis=a)), a)
    return ndimage.binary_fill_holes(m)


def lasso_clicks(target: int, mask: np.ndarray, positive: bool, spacing: Sequence[float], step_mm: float,
                 shape: Sequence[int], offset: Sequence[int] = (0, 0, 0), max_clicks: int = MAX_PROMPT_CLICKS,
                 sigma: Optional[Sequence[float]] = None) -> List[Click]:
    """A lasso: clicks covering the filled region on a ``step_mm`` grid (see module doc)."""
    return scribble_clicks(target, fill_region(mask), positive, spacing, step_mm, shape, offset, max_clicks, sigma)


def prompt_step_mm(settings, spacing: Sequence[float]) -> float:
    """Grid step (mm) of scribble and lasso clicks for a ``GuideSettings``: ``STEP_PER_SIGMA`` x
    the guide's scale (``sigma_mm``; ball: ``ball_radius_mm``; object Gaussian: its minimal sigma
    in voxels x the finest spacing)."""
    if settings.encoding == "ball":
        scale = settings.ball_radius_mm
    elif settings.encoding == "object_gaussian":
        scale = settings.min_object_sigma * float(np.min(spacing))
    else:
        scale = settings.sigma_mm
    return STEP_PER_SIGMA * float(scale)


# ---- training simulation ----------------------------------------------------------------------
def simulate_box(obj_mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1,
                 two_d_axis: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A user's box around one object: its tight bounding box, each side moved by up to
    ``jitter`` x the side length (at least one voxel of play); with ``two_d_axis`` a box drawn
    on one slice (the object's median slice along that axis). Returns half-open (lower, upper)."""
    idx = np.argwhere(obj_mask)
    lo, hi = idx.min(0).astype(float), idx.max(0).astype(float) + 1
    side = hi - lo
    play = np.maximum(jitter * side, 1.0)
    lo = lo + rng.uniform(-1, 1, lo.shape) * play
    hi = hi + rng.uniform(-1, 1, hi.shape) * play
    lo = np.clip(np.round(lo), 0, np.asarray(obj_mask.shape) - 1)
    hi = np.clip(np.maximum(np.round(hi), lo + 1), 1, np.asarray(obj_mask.shape))
    if two_d_axis is not None:
        z = float(np.median(idx[:, two_d_axis]).round())
        lo[two_d_axis], hi[two_d_axis] = z, z + 1
    return lo, hi


def simulate_stroke(obj_mask: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                    slice_axis: Optional[int] = 0, kind: str = "scribble") -> np.ndarray:
    """A user's stroke inside one object, on a random slice through it (along ``slice_axis``;
    None or 2D masks: the whole mask is the section).

    ``kind="scribble"``: the section's medial voxels (at least half its maximal depth inside);
    ``kind="lasso"``: the section's interior (at least one voxel inside its border), i.e. a lasso
    drawn just inside the outline. Returns a boolean mask of ``obj_mask``'s shape."""
    obj_mask = np.asarray(obj_mask, bool)
    if slice_axis is None or obj_mask.ndim == 2:
        section, sp2, idx = obj_mask, list(spacing), (slice(None),) * obj_mask.ndim
    else:
        zs = np.flatnonzero(obj_mask.any(axis=tuple(a for a in range(obj_mask.ndim) if a != slice_axis)))
        z = int(rng.choice(zs))
        section = np.take(obj_mask, z, axis=slice_axis)
        sp2 = [s for a, s in enumerate(spacing) if a != slice_axis]
        idx = tuple(z if a == slice_axis else slice(None) for a in range(obj_mask.ndim))
    depth = ndimage.distance_transform_edt(np.pad(section, 1), sampling=sp2)
    depth = depth[tuple(slice(1, -1) for _ in range(section.ndim))]
    if kind == "scribble":
        core = depth >= 0.5 * depth.max()
    elif kind == "lasso":
        core = depth > min(sp2) * 1.01 if (depth > min(sp2) * 1.01).any() else section
    else:
        raise ValueError(f"unknown stroke kind {kind!r} (scribble or lasso)")
    out = np.zeros_like(obj_mask)
    out[idx] = core
    return out


def simulate_prompt(obj_mask: np.ndarray, target: int, kind: str, spacing: Sequence[float], settings,
                    rng: np.random.Generator, slice_axis: Optional[int] = None,
                    max_clicks: int = 64) -> List[Click]:
    """The clicks of one simulated positive prompt of ``kind`` ("box" or "stroke") on one object
    (``obj_mask`` over the whole sample). ``slice_axis``: a 2D configuration's slice axis (boxes and
    strokes on that slice); in 3D, boxes are drawn on one axial slice (axis 0) in half the cases
    and strokes always are."""
    shape = obj_mask.shape
    if kind == "box":
        two_d = slice_axis if slice_axis is not None else (0 if obj_mask.ndim == 3 and rng.random() < 0.5 else None)
        lo, hi = simulate_box(obj_mask, rng, two_d_axis=two_d)
        return [box_click(target, lo, hi, True)]
    if kind == "stroke":
        sub = "scribble" if rng.random() < 0.5 else "lasso"
        axis = slice_axis if slice_axis is not None else (0 if obj_mask.ndim == 3 else None)
        stroke = simulate_stroke(obj_mask, spacing, rng, axis, sub)
        sigma = (settings.min_object_sigma,) * obj_mask.ndim if settings.encoding == "object_gaussian" else None
        return scribble_clicks(target, stroke, True, spacing, prompt_step_mm(settings, spacing), shape,
                               (0,) * obj_mask.ndim, max_clicks, sigma)
    raise ValueError(f"unknown simulated prompt kind {kind!r} (box or stroke)")
