"""Which clicks: objects of a guided class and simulated clicks on them.

Conventions (for every function here):
- ``seg`` is an integer label map over the spatial axes only (no channel axis), in the array
  axis order nnU-Net uses (SimpleITK's array order: z, y, x for 3D; for 2D, the two axes).
  Negative values (nnU-Net's "outside the non-zero region") count as background.
- ``spacing`` is the voxel size in mm per array axis, same order.
- A click position is a voxel coordinate (float) per array axis, in the same order.
- Randomness comes only from the ``rng`` argument (``numpy.random.Generator``): same seed, same clicks.

No nnU-Net import: this module is pure numpy/scipy (and cc3d, an nnU-Net dependency, for labelling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cc3d
import numpy as np
from scipy import ndimage

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Click:
    """One click.

    Attributes:
        target: index of the guided class (position in the layout's ``targets``).
        position: voxel coordinate per array axis (floats allowed; rendering is sub-voxel exact).
        positive: True for "this is the class", False for "this is not the class".
        sigma: per-axis Gaussian sigma in voxels for the ``object_gaussian`` encoding and for
            boxes; None otherwise.
        kind: ``"point"`` (rendered with the model's encoding) or ``"box"`` (the original work's
            object-sized Gaussian ellipse ``exp(-sum (x - p)^2 / (2 sigma^2))``, centred at
            ``position``, whatever the encoding; ``sigma`` is required).
    """
    target: int
    position: Tuple[float, ...]
    positive: bool = True
    sigma: Optional[Tuple[float, ...]] = None
    kind: str = "point"


#: sigma of an object-sized Gaussian per object diameter or box side (the original work's users
#: dragged an ellipse over the object; its Gaussian had sigma = 0.37 x the axis length)
OBJECT_SIGMA_PER_DIAMETER = 0.37


def box_click(target: int, lower: Sequence[float], upper: Sequence[float], positive: bool = True,
              min_sigma: float = 0.5) -> Click:
    """The click a box becomes: its centre, with a Gaussian ellipse sized by the box.

    Args:
        target: index of the guided class.
        lower, upper: the box as half-open voxel bounds per array axis (``upper - lower`` is the
            side length in voxels; a side of 1 is a box drawn on one slice).
        min_sigma: lower bound of the per-axis sigma (voxels).
    """
    lo, hi = np.asarray(lower, float), np.asarray(upper, float)
    if lo.shape != hi.shape or np.any(hi <= lo) or not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)):
        raise ValueError(f"a box needs finite lower < upper per axis, got lower {tuple(lo)} and upper {tuple(hi)}")
    center = (lo + hi - 1) / 2
    sigma = np.maximum(OBJECT_SIGMA_PER_DIAMETER * (hi - lo), min_sigma)
    return Click(int(target), tuple(float(v) for v in center), bool(positive), tuple(float(v) for v in sigma), "box")


def label_objects(mask: np.ndarray, connectivity: int = 2, slice_axis: Optional[int] = None
                  ) -> Tuple[np.ndarray, int]:
    """Connected components of a boolean mask.

    Args:
        mask: boolean array (any number of spatial axes).
        connectivity: as in ``scipy.ndimage.generate_binary_structure`` (clipped to mask.ndim).
        slice_axis: if given, components are found per slice along this axis (2D configurations
            of 3D volumes): a 3D structure element without links along that axis.
    Returns:
        (labels, n): int32 label array (0 = no object, 1..n objects, numbered in raster order of
        their first voxel) and the object count.
    """
    mask = np.asarray(mask, dtype=bool)
    conn = int(min(max(connectivity, 1), mask.ndim if slice_axis is None else mask.ndim - 1))
    if slice_axis is None:
        structure = ndimage.generate_binary_structure(mask.ndim, conn)
    else:
        inner = ndimage.generate_binary_structure(mask.ndim - 1, conn)
        structure = np.expand_dims(inner, slice_axis)
        pad = [(0, 0)] * mask.ndim
        pad[slice_axis] = (1, 1)
        structure = np.pad(structure, pad)
    labels, n = ndimage.label(mask, structure=structure, output=np.int32)
    return labels, int(n)


def robust_center(coords: np.ndarray, min_sigma: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Median coordinate and 1.4826 * MAD per axis (the original work's robust centre and sigma).

    Args:
        coords: (n_voxels, ndim) voxel coordinates of one object.
    Returns:
        (center, sigma), each shape (ndim,), sigma at least ``min_sigma``.
    """
    center = np.median(coords, axis=0)
    sigma = MAD_TO_SIGMA * np.median(np.abs(coords - center), axis=0)
    return center, np.maximum(sigma, min_sigma)


def _weighted_median(values: np.ndarray, counts: np.ndarray) -> float:
    """``np.median`` of the sample holding ``counts[i]`` copies of ``values[i]`` (values sorted)."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    lo = values[np.searchsorted(cum, (n - 1) // 2, side="right")]
    hi = values[np.searchsorted(cum, n // 2, side="right")]
    return 0.5 * (float(lo) + float(hi))


def robust_center_mask(obj: np.ndarray, min_sigma: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`robust_center` of a mask's voxel coordinates, from its axis projections: the same
    numbers without listing the voxels (medians of a coordinate and of its absolute deviation only
    need how many voxels sit at each index of that axis)."""
    center, sigma = np.empty(obj.ndim), np.empty(obj.ndim)
    idx = [np.arange(n) for n in obj.shape]
    for a in range(obj.ndim):
        counts = obj.sum(axis=tuple(b for b in range(obj.ndim) if b != a))
        center[a] = _weighted_median(idx[a], counts)
        dev = np.abs(idx[a] - center[a])
        order = np.argsort(dev, kind="stable")
        sigma[a] = MAD_TO_SIGMA * _weighted_median(dev[order], counts[order])
    return center, np.maximum(sigma, min_sigma)


def _weighted_medians(counts: np.ndarray) -> np.ndarray:
    """Row-wise :func:`_weighted_median` of the values 0..S-1 held ``counts[i, j]`` times (rows
    with at least one count): (m, S) -> (m,) in half-integers."""
    cum = np.cumsum(counts, axis=1)
    n = cum[:, -1]
    lo = (cum <= ((n - 1) // 2)[:, None]).sum(axis=1)
    hi = (cum <= (n // 2)[:, None]).sum(axis=1)
    return 0.5 * (lo + hi)


def _label_slices(labels: np.ndarray, n: Optional[int] = None) -> List[Tuple[slice, ...]]:
    """``ndimage.find_objects`` of a label map with objects 1..n (n: its maximum when not given),
    without the search when it holds one object: the maps here are crops to the class's box, so
    that object's box is the whole map (and a larger box only costs time, not correctness)."""
    n = int(labels.max()) if n is None else int(n)
    if n == 1:
        return [tuple(slice(0, s) for s in labels.shape)]
    return ndimage.find_objects(labels, max_label=n)


def _axis_histograms(labels: np.ndarray, ids: Sequence[int], slices=None) -> List[np.ndarray]:
    """Per axis, (len(ids), size) voxel counts of the listed objects at each index of that axis,
    from projections of each object inside its bounding box (``slices``: :func:`_label_slices`,
    computed when not given)."""
    nd = labels.ndim
    slices = _label_slices(labels) if slices is None else slices
    counts = [np.zeros((len(ids), size), np.int64) for size in labels.shape]
    for i, oid in enumerate(ids):
        sl = slices[oid - 1]
        obj = labels[sl] == oid
        # the first axis' projection, then the others from the (smaller) sum over the first axis
        counts[0][i, sl[0]] = obj.reshape(obj.shape[0], -1).sum(axis=1)
        if nd > 1:
            rest = obj.sum(axis=0)
            for a in range(1, nd):
                counts[a][i, sl[a]] = rest.sum(axis=tuple(b for b in range(nd - 1) if b != a - 1))
    return counts


def robust_centers(labels: np.ndarray, object_ids: Sequence[int], slices=None) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`robust_center_mask` of several objects of a label map at once (no minimum sigma):
    median coordinate and 1.4826 * MAD per axis, from per-object axis histograms. The histograms are
    projections inside each object's box: on LiTS patches half the time of a bincount over the
    listed foreground voxels, with the same counts. ``slices``: the objects' boxes
    (:func:`_label_slices`), when the caller has them.

    Returns (centers, sigmas), each (len(object_ids), ndim), in ``labels``' voxel coordinates.
    """
    ids = [int(o) for o in object_ids]
    m, nd = len(ids), labels.ndim
    if m == 0:
        return np.empty((0, nd)), np.empty((0, nd))
    # every axis at once (a few numpy calls per class, not per axis): the axes' histograms as the
    # rows of one array, zero-padded to the longest axis, which moves no median
    size = max(labels.shape)
    counts = np.zeros((nd * m, size), np.int64)
    for a, hist in enumerate(_axis_histograms(labels, ids, slices)):
        counts[a * m:(a + 1) * m, :hist.shape[1]] = hist
    c = _weighted_medians(counts)
    # deviations |j - c| are multiples of 0.5: histogram them on that grid
    dev = np.rint(2 * np.abs(np.arange(size)[None, :] - c[:, None])).astype(np.int64)
    rows = np.arange(nd * m)[:, None] * (2 * size + 1)
    hist = np.bincount((rows + dev).ravel(), weights=counts.ravel(),
                       minlength=nd * m * (2 * size + 1)).reshape(nd * m, 2 * size + 1)
    sigmas = MAD_TO_SIGMA * 0.5 * _weighted_medians(hist)
    return c.reshape(nd, m).T.copy(), sigmas.reshape(nd, m).T.copy()


def interior_point(obj_mask: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, float]:
    """The object's interior-most voxel: maximum of the Euclidean distance (mm) to its outside.

    Ties (a slab, a tube) resolve to the tied voxel nearest (in mm) to the tied voxels' mean,
    so the click lands mid-object and the choice is deterministic.
    Returns (coordinate (ndim,), distance in mm).
    """
    padded = np.pad(obj_mask.astype(bool), 1)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)
    best = float(dist.max())
    ties = np.argwhere(dist >= best - 1e-6)
    if len(ties) > 1:
        sp = np.asarray(spacing, float)
        d2 = (((ties - ties.mean(axis=0)) * sp) ** 2).sum(axis=1)
        idx = ties[int(np.argmin(d2))]
    else:
        idx = ties[0]
    return (idx - 1).astype(float), best


def mask_bbox(mask: np.ndarray) -> Optional[Tuple[slice, ...]]:
    """Tightest box around the True voxels (None if there are none), from axis projections."""
    box = []
    # two passes over the mask: the first axis' projection, and the rest of the projections
    # from the (smaller) projection along the first axis
    projections = [mask.reshape(mask.shape[0], -1).any(axis=1)]
    if mask.ndim > 1:
        rest = mask.any(axis=0)
        projections += [rest.any(axis=tuple(b for b in range(rest.ndim) if b != a)) for a in range(rest.ndim)]
    for proj in projections:
        idx = np.flatnonzero(proj)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def cropped_objects(mask: np.ndarray, connectivity: int, slice_axis: Optional[int]
                    ) -> Tuple[Optional[np.ndarray], int, np.ndarray]:
    """Objects of ``mask`` labelled inside its bounding box only (labelling is the costly step);
    the numbering of the objects is arbitrary.

    Returns (labels of the crop or None, object count, offset of the crop (ndim,))."""
    box = mask_bbox(mask)
    if box is None:
        return None, 0, np.zeros(mask.ndim, int)
    crop = mask[box]
    if slice_axis is None and crop.ndim in (2, 3):
        lab, n = _cc3d_objects(crop, connectivity)
        return lab, n, np.array([b.start for b in box])  # unsigned, as find_objects takes them
    lab, n = label_objects(crop, connectivity, slice_axis)
    return lab, n, np.array([b.start for b in box])


def _cc3d_objects(image: np.ndarray, connectivity: int, uint16: bool = False) -> Tuple[np.ndarray, int]:
    """Connected components of a 2D/3D boolean mask, or of each value > 0 of a small-integer
    image (a multi-label image: voxels join when their values are equal), with cc3d
    (connected-components-3d, an nnU-Net dependency): the same objects as scipy with the structure
    of ``connectivity``, 6-7x faster on CT patches (labelling is most of what choosing training
    clicks costs); only the numbering may differ, which no caller relies on. ``uint16``: labels as uint16 where
    they fit (no conversion pass for :func:`object_map`)."""
    conn = int(min(max(connectivity, 1), image.ndim))
    neighbours = {2: {1: 4, 2: 8}, 3: {1: 6, 2: 18, 3: 26}}[image.ndim][conn]
    if uint16:  # the labels written as uint16 directly, unless cc3d's bound on the count does not fit
        try:
            lab, n = cc3d.connected_components(image, connectivity=neighbours, binary_image=image.dtype == bool,
                                               return_N=True, out_dtype=np.uint16)
            return lab, int(n)
        except ValueError:
            pass
    lab, n = cc3d.connected_components(image, connectivity=neighbours, binary_image=image.dtype == bool,
                                       return_N=True)
    return lab, int(n)


#: most objects :func:`object_map` numbers in one label map (it writes int16)
MAX_MAPPED_OBJECTS = int(np.iinfo(np.int16).max)
#: the value of every voxel of the object map of a sample whose guides were dropped (``p_drop``):
#: the loader does not label it, and the step gives it no click
DROPPED_OBJECTS = -1


def _labelled_as_is(seg: np.ndarray, values: Sequence[int], ignore_label: Optional[int]) -> bool:
    """Whether cc3d can label ``seg`` itself, as a multi-label image, for :func:`object_map`: an
    integer map whose non-zero values (``1..max``, checked with two reductions) are all guided
    single-value classes, none the ignore label."""
    if seg.dtype.kind not in "iub" or seg.dtype.itemsize > 8 or seg.size == 0:
        return False
    low, high = int(seg.min()), int(seg.max())
    return low >= 0 and set(range(1, high + 1)) <= set(values) and \
        (ignore_label is None or not 1 <= int(ignore_label) <= high)


def object_map(seg: np.ndarray, targets: Sequence[Sequence[int]], connectivity: int = 2,
               ignore_label: Optional[int] = None) -> np.ndarray:
    """The objects of every guided class of a 2D or 3D label map in one int16 map: 0 outside
    them, 1..n inside (ids unique across classes, in no particular order).

    The labelling half of :func:`sample_training_clicks`, for a data loader that leaves the rest
    (which objects, where, how many clicks) to the training device: the same objects (within each
    class, ``connectivity`` as there), in 2 bytes per voxel. All classes are labelled in one cc3d
    pass over their common bounding box (the classes as the values of one small-integer image:
    on LiTS patches a quarter less time than a pass per class). When every non-zero value of the map
    is a guided class of one label value (nnU-Net's default of guiding every class), cc3d labels
    the map as it is, with no class mask, box or copy: half the time again. The classes' label
    values must not overlap (label-based datasets). Raises ValueError above
    :data:`MAX_MAPPED_OBJECTS` objects.
    """
    seg = np.asarray(seg)
    if seg.ndim not in (2, 3):
        raise ValueError(f"object_map takes a 2D or 3D label map, got shape {seg.shape}")
    values = [int(v) for labels in targets for v in labels]
    if len(set(values)) != len(values):
        raise ValueError(f"the guided classes share label values ({values}); an object map needs disjoint classes")
    if all(len(labels) == 1 for labels in targets) and _labelled_as_is(seg, values, ignore_label):
        lab, n = _cc3d_objects(seg, connectivity, uint16=True)
        out, box = None, None
    else:
        if len(targets) == 1:
            work = target_mask(seg, targets[0])
        else:
            work = np.zeros(seg.shape, np.uint8 if len(targets) < 255 else np.uint16)
            for t, labels in enumerate(targets):
                np.copyto(work, work.dtype.type(t + 1), where=target_mask(seg, labels))
        if ignore_label is not None and int(ignore_label) in values:
            work[seg == ignore_label] = 0
        out = np.zeros(seg.shape, np.int16)
        box = mask_bbox(work)
        if box is None:
            return out
        lab, n = _cc3d_objects(work[box], connectivity)
    if n > MAX_MAPPED_OBJECTS:
        raise ValueError(f"the label map holds {n} objects of its guided classes, more than the "
                         f"{MAX_MAPPED_OBJECTS} an object map holds; choose training clicks in the data loader")
    if out is None:  # labelled as it is
        return lab.view(np.int16) if lab.dtype == np.uint16 else lab.astype(np.int16)
    out[box] = lab
    return out


def object_clicks(labels: np.ndarray, object_ids: Sequence[int], target: int, spacing: Sequence[float],
                  policy: str, rng: Optional[np.random.Generator] = None, perturb: bool = False,
                  min_sigma: float = 2.0, slices=None, offset: Optional[np.ndarray] = None,
                  shape: Optional[Sequence[int]] = None) -> List[Click]:
    """One positive click per listed object (ids of ``labels``), placed by ``policy``.

    ``center``: median coordinate (with the original perturbation if ``perturb``);
    ``interior``: distance-transform maximum; ``random``: uniform object voxel (needs ``rng``).
    Each click carries the object's robust sigma (voxels) for the ``object_gaussian`` encoding.
    ``labels`` may be a crop of the image: ``offset`` is its position and ``shape`` the image's.
    """
    base = np.zeros(labels.ndim, int) if offset is None else np.asarray(offset)
    shape = np.array(labels.shape if shape is None else shape)
    object_ids = [int(o) for o in object_ids]
    if not object_ids:
        return []
    if slices is None:
        slices = _label_slices(labels)
    centers, raw_sigmas = robust_centers(labels, object_ids, slices)
    sigmas = np.maximum(raw_sigmas, min_sigma)
    if policy == "center":
        positions = centers
        if perturb:
            if rng is None:
                raise ValueError("perturb=True needs an rng")
            # per object, as rng.uniform(-0.2, 0.2, ndim) then rng.uniform(1 / 1.4, 1.4, ndim) would
            # draw them (the same numbers): low + (high - low) * u
            u = rng.random((len(object_ids), 2, labels.ndim))
            positions = centers + np.maximum(raw_sigmas, 0.5) * (-0.2 + (0.2 - -0.2) * u[:, 0])
            sigmas = np.maximum(sigmas * (1 / 1.4 + (1.4 - 1 / 1.4) * u[:, 1]), min_sigma)
        positions = np.clip(positions + base, 0, shape - 1)
    elif policy in ("interior", "random"):
        positions = np.empty_like(centers)
        for i, oid in enumerate(object_ids):
            sl = slices[oid - 1]
            obj = labels[sl] == oid
            if policy == "interior":
                pos, _ = interior_point(obj, spacing)
            else:
                if rng is None:
                    raise ValueError("policy 'random' needs an rng")
                coords = np.argwhere(obj)
                pos = coords[rng.integers(len(coords))].astype(float)
            positions[i] = np.clip(pos + np.array([v.start for v in sl]) + base, 0, shape - 1)
    else:
        raise ValueError(f"unknown click policy {policy!r}")
    return [Click(target, tuple(pos), True, tuple(sig)) for pos, sig in zip(positions.tolist(), sigmas.tolist())]


def target_mask(seg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Voxels belonging to a guided class (one label, or a region's set of labels): one comparison
    per label (for the few labels of a region 20x faster than ``np.isin``'s sort on a CT patch)."""
    seg = np.asarray(seg)
    mask = seg == labels[0]
    for v in labels[1:]:
        mask |= seg == v
    return mask


def _uniform_voxel(pool: np.ndarray, rng: np.random.Generator, tries: int = 16) -> int:
    """Flat index of a uniformly random True voxel of ``pool`` (which has one): rejection
    sampling first (a pool is usually a large share of the patch), the full list only if that
    keeps missing."""
    flat = pool.reshape(-1)
    drawn = rng.integers(0, flat.size, size=tries)
    hit = flat[drawn]
    if hit.any():
        return int(drawn[int(hit.argmax())])  # the first hit
    candidates = np.flatnonzero(flat)
    return int(candidates[rng.integers(len(candidates))])


def _prompt_kinds(n: int, settings, rng: np.random.Generator) -> List[str]:
    """Per clicked object: "point", "box" (probability ``p_box``) or "stroke" (``p_scribble``).
    Settings without boxes and strokes draw no random number (their click streams stay as they were)."""
    pb, ps = float(getattr(settings, "p_box", 0.0)), float(getattr(settings, "p_scribble", 0.0))
    if pb <= 0 and ps <= 0:
        return ["point"] * n
    u = rng.random(n)
    return ["box" if v < pb else "stroke" if v < pb + ps else "point" for v in u]


def _object_prompt(lab: np.ndarray, oid: int, offset: np.ndarray, shape, target: int, kind: str,
                   spacing, settings, rng: np.random.Generator, slice_axis: Optional[int]) -> List[Click]:
    """A simulated box or stroke on object ``oid`` of the crop ``lab`` (placed at ``offset`` in
    an array of ``shape``), in the full array's coordinates."""
    from .prompts import simulate_prompt  # prompts builds on this module
    sl = ndimage.find_objects(lab, max_label=int(oid))[int(oid) - 1]
    obj = lab[sl] == oid
    local = simulate_prompt(obj, target, kind, spacing, settings, rng, slice_axis)
    shift = np.array([s.start for s in sl]) + np.asarray(offset)
    out = []
    for c in local:
        pos = tuple(float(p + o) for p, o in zip(c.position, shift))
        out.append(Click(c.target, pos, c.positive, c.sigma, c.kind))
    return out


def _extra_object_clicks(lab: np.ndarray, object_ids: Sequence[int], first: Sequence[Click], offset: np.ndarray,
                         max_clicks: int, rng: np.random.Generator, slices) -> List[Click]:
    """U{0..max_clicks-1} more positive clicks per object (``first[i]`` is object ``object_ids[i]``'s
    click), each at a uniformly random voxel of the object, with the first click's sigma
    (``slices``: the objects' boxes, :func:`_label_slices`)."""
    out: List[Click] = []
    for oid, c in zip(object_ids, first):
        n = int(rng.integers(0, max_clicks))
        if n == 0:
            continue
        sl = slices[int(oid) - 1]
        obj = lab[sl] == oid
        shift = [int(s.start) + int(o) for s, o in zip(sl, offset)]
        for _ in range(n):  # uniform voxels of the object, by rejection inside its box (no voxel list)
            idx = np.unravel_index(_uniform_voxel(obj, rng), obj.shape)
            out.append(Click(c.target, tuple(float(i + o) for i, o in zip(idx, shift)), True, c.sigma))
    return out


def _near_negative(mask: np.ndarray, valid: Optional[np.ndarray], spacing: Sequence[float], band_mm: float,
                   rng: np.random.Generator, tries: int = 8) -> Optional[Tuple[int, ...]]:
    """A voxel just outside ``mask`` (which has a voxel): from a uniformly random voxel of the
    mask, along a uniformly random direction (in mm), the ray's first voxel outside the mask, then
    U(0, ``band_mm``) mm further. Rays that leave the array, or land on an invalid voxel, are
    drawn again (``tries`` in all); None when every try failed."""
    sp = np.asarray(spacing, float)
    shape = np.array(mask.shape)
    step = 0.5 * float(sp.min())  # mm per march step: at most half a voxel along every axis
    n_steps = int(np.ceil(np.linalg.norm(shape * sp) / step))
    chunk = np.arange(1, 33) * step  # march 32 steps at a time: most rays leave an object early
    for _ in range(tries):
        start = np.array(np.unravel_index(_uniform_voxel(mask, rng), mask.shape), float)
        d = rng.normal(size=mask.ndim)
        d_vox = d / max(float(np.linalg.norm(d)), 1e-12) / sp
        extra = float(rng.uniform(0.0, band_mm))
        exit_t = None
        for first in range(0, n_steps, len(chunk)):
            t = first * step + chunk
            ray = np.rint(start + t[:, None] * d_vox).astype(np.intp)
            inside = np.all((ray >= 0) & (ray < shape), axis=1)
            out = ~inside
            out[inside] = ~mask[tuple(ray[inside].T)]
            if out.any():
                k = int(np.argmax(out))
                exit_t = float(t[k]) if inside[k] else None  # None: it left the array first
                break
        if exit_t is None:
            continue
        pos = np.rint(start + (exit_t + extra) * d_vox).astype(np.intp)
        if np.any(pos < 0) or np.any(pos >= shape):
            continue
        pos = tuple(int(v) for v in pos)
        if mask[pos] or (valid is not None and not valid[pos]):
            continue
        return pos
    return None


def sample_training_clicks(seg: np.ndarray, targets: Sequence[Sequence[int]], spacing: Sequence[float],
                           settings, rng: np.random.Generator, ignore_label: Optional[int] = None,
                           slice_axis: Optional[int] = None) -> List[Click]:
    """Simulate the clicks of one training sample (the random half of guide simulation).

    With probability ``settings.p_drop`` there is no guide at all (empty list: automatic mode).
    Otherwise, per guided class with objects, a random subset of k ~ U{1..n} objects gets one
    positive click each (``settings.click_policy``; centre perturbed as in the original work), and
    with probability ``settings.p_negative`` U{1..max_negative_clicks} negative clicks land on
    other foreground classes (confusable, probability ``p_confusable``) or on background, or, with
    probability ``p_near_negative``, just outside the class (:func:`_near_negative`).
    A clicked object gets U{1..``settings.max_object_clicks``} positive clicks (the extra ones at
    random voxels of the object). A clicked object's positive prompt is a box with probability
    ``settings.p_box`` and a scribble or lasso with probability ``settings.p_scribble``
    (:func:`nnunet_guide.core.prompts.simulate_prompt`): the prompts the interactive server
    accepts, all as clicks.

    Args:
        seg: label map (spatial axes only); values < 0 count as background.
        targets: per guided class, its label value(s).
        settings: a ``GuideSettings``.
        ignore_label: voxels with this value are never clicked and never part of an object.
    """
    if rng.random() < settings.p_drop:
        return []
    seg = np.asarray(seg)
    valid = None if ignore_label is None else seg != ignore_label
    clicks: List[Click] = []
    for t, labels in enumerate(targets):
        mask = target_mask(seg, labels)
        if valid is not None:
            mask &= valid
        lab, n, offset = cropped_objects(mask, settings.connectivity, slice_axis)
        if n:
            k = int(rng.integers(1, n + 1))
            # (choosing the one object of one draws no random number: the shortcut keeps the stream)
            chosen = np.ones(1, np.int64) if n == 1 else np.sort(rng.choice(np.arange(1, n + 1), size=k,
                                                                            replace=False))
            kinds = _prompt_kinds(len(chosen), settings, rng)
            points = [oid for oid, kind in zip(chosen, kinds) if kind == "point"]
            slices = _label_slices(lab, n) if points else None
            first = object_clicks(lab, points, t, spacing, settings.click_policy, rng,
                                  perturb=settings.perturb_center, min_sigma=settings.min_object_sigma,
                                  slices=slices, offset=offset, shape=seg.shape) if points else []
            clicks += first
            if points and int(getattr(settings, "max_object_clicks", 1)) > 1:
                clicks += _extra_object_clicks(lab, points, first, offset, settings.max_object_clicks, rng, slices)
            for oid, kind in zip(chosen, kinds):
                if kind != "point":
                    clicks += _object_prompt(lab, oid, offset, seg.shape, t, kind, spacing, settings, rng, slice_axis)
        if settings.negatives and settings.max_negative_clicks > 0 and rng.random() < settings.p_negative:
            n_neg = int(rng.integers(1, settings.max_negative_clicks + 1))
            confusable = (seg > 0) & ~mask
            background = seg <= 0
            if valid is not None:
                confusable &= valid
                background &= valid
            near = float(getattr(settings, "p_near_negative", 0.0))
            class_here = near > 0 and bool(mask.any())  # once per class, not per click
            for _ in range(n_neg):
                if near > 0 and rng.random() < near and class_here:
                    pos = _near_negative(mask, valid, spacing, settings.near_negative_mm, rng)
                    if pos is not None:
                        clicks.append(Click(t, tuple(float(p) for p in pos), False,
                                            (settings.min_object_sigma,) * seg.ndim))
                        continue
                pool = confusable if (rng.random() < settings.p_confusable and confusable.any()) else background
                if not pool.any():
                    pool = confusable
                if not pool.any():
                    break
                pos = np.unravel_index(_uniform_voxel(pool, rng), seg.shape)
                clicks.append(Click(t, tuple(float(p) for p in pos), False,
                                    (settings.min_object_sigma,) * seg.ndim))
    return clicks


def validation_clicks(seg: np.ndarray, targets: Sequence[Sequence[int]], spacing: Sequence[float],
                      settings, seed: int, ignore_label: Optional[int] = None,
                      slice_axis: Optional[int] = None) -> List[Click]:
    """The simulated user of guided validation: one positive click on every object of every
    guided class, at the place ``settings.click_policy`` chooses, without perturbation.

    Deterministic for a given (seg, seed): the seed only matters for the ``random`` policy.
    """
    rng = np.random.default_rng(seed)
    seg = np.asarray(seg)
    clicks: List[Click] = []
    for t, labels in enumerate(targets):
        mask = target_mask(seg, labels)
        if ignore_label is not None:
            mask &= seg != ignore_label
        lab, n, offset = cropped_objects(mask, settings.connectivity, slice_axis)
        clicks += object_clicks(lab, range(1, n + 1), t, spacing, settings.click_policy, rng, perturb=False,
                                min_sigma=settings.min_object_sigma, offset=offset, shape=seg.shape) if n else []
    return clicks
