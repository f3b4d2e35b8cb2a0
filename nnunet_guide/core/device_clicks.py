"""Training clicks chosen on the training device (torch): the same simulated user as
:func:`nnunet_guide.core.clicks.sample_training_clicks`, for a whole batch of label maps at once.

Choosing clicks needs the objects of each guided class: the connected components of the
augmented label map. On the CPU that labelling is what made guides cost 10-45% of nnU-Net's data
loader on CT (many tumour components per patch). Here it runs where the batch already is, as
iterated neighbourhood maxima with pointer jumping (:func:`label_components`), and the object
statistics (median centre, 1.4826 x MAD sigma) come from segment-wise sorts, so the loader ships
nothing but nnU-Net's own image and label map. Or the loader labels the objects (cc3d, the cheap
half of choosing on the CPU) and ships them as one int16 map, and only the rest runs here
(``objects``: the torch labelling is launch-bound on a GPU).

Same distribution as the CPU version, not the same draws: randomness comes from a
``torch.Generator``. Conventions as in :mod:`nnunet_guide.core.clicks`: label maps (B, *spatial)
in array axis order, values < 0 count as background, ``spacing`` in mm per axis, click positions
in voxels. Policies ``center`` and ``random``; ``interior`` needs a distance transform and stays
on the CPU (``select_training_clicks`` raises for it).

No nnU-Net import.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .clicks import DROPPED_OBJECTS, MAD_TO_SIGMA
from .encoding import CLICK_KINDS, _TARGET, packed_width

DEVICE_POLICIES = ("center", "random")


def _diagonal_kernels(ndim: int, connectivity: int):
    """Max-pool kernel sizes that add the diagonal links of ``connectivity`` (as in
    ``scipy.ndimage.generate_binary_structure``) to the face links the runs already follow: none
    for faces only; the union of the three axis-aligned 3x3 squares for faces and edges in 3D; the
    full 3^ndim cube for full connectivity."""
    conn = int(min(max(connectivity, 1), ndim))
    if conn == 1:
        return []
    if conn == ndim:
        return [(3,) * ndim]
    return [tuple(1 if a == b else 3 for b in range(ndim)) for a in range(ndim)]  # 3D, connectivity 2


def _run_max(labels: torch.Tensor, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """Every masked voxel gets the largest label of its run along ``axis`` (a run: consecutive
    masked voxels of one line), in one pass: runs get ids by a cumulative sum of run starts, and a
    segment maximum (scatter) is gathered back."""
    lab = labels.movedim(axis, -1).contiguous()
    m = mask.movedim(axis, -1).contiguous()
    prev = torch.zeros_like(m)
    prev[..., 1:] = m[..., :-1]
    run = torch.cumsum((m & ~prev).view(-1), 0)  # a line's first voxel always starts a run
    runmax = torch.zeros(int(run[-1]) + 1 if run.numel() else 1, dtype=lab.dtype, device=lab.device)
    runmax.scatter_reduce_(0, run, lab.view(-1), reduce="amax")
    out = torch.where(m.reshape(-1), runmax[run], torch.zeros((), dtype=lab.dtype, device=lab.device))
    return out.view(lab.shape).movedim(-1, axis)


def label_components(mask: torch.Tensor, connectivity: int = 2, max_rounds: int = 100_000) -> torch.Tensor:
    """Connected components of a batch of boolean masks (B, *spatial), 2D or 3D.

    Returns int64 labels of the same shape: 0 outside the mask; inside, the flat index + 1 of one
    voxel of the component (the one with the largest index), so labels are unique across the
    whole batch and a component never spans two samples. The partition equals
    ``scipy.ndimage.label`` with the structure of ``connectivity``.

    Each round every voxel takes the largest label of its run along each axis (a whole line
    segment at once), then the largest label in its diagonal neighbourhood (max-pooling, for
    connectivity above 1), then the label of the voxel its label names (pointer jumping). A
    convex object converges in a couple of rounds; a winding one in about as many rounds as it
    has turns.
    """
    ndim = mask.ndim - 1
    if ndim not in (2, 3):
        raise ValueError(f"label_components takes (B, *spatial) masks with 2 or 3 spatial axes, got {tuple(mask.shape)}")
    pool = F.max_pool3d if ndim == 3 else F.max_pool2d
    dtype = torch.float32 if mask.numel() < (1 << 24) else torch.float64  # exact integers for max-pooling
    zero = torch.zeros((), dtype=torch.long, device=mask.device)
    labels = torch.where(mask, torch.arange(1, mask.numel() + 1, device=mask.device).view(mask.shape), zero)
    kernels = _diagonal_kernels(ndim, connectivity)
    for _ in range(max_rounds):
        before = labels
        for a in range(1, ndim + 1):
            labels = _run_max(labels, mask, a)
        for k in kernels:
            pooled = pool(labels[:, None].to(dtype), kernel_size=k, stride=1, padding=tuple(s // 2 for s in k))
            labels = torch.where(mask, torch.maximum(labels, pooled[:, 0].long()), zero)
        jump = labels.view(-1)[(labels.view(-1) - 1).clamp_min(0)].view(labels.shape)
        labels = torch.where(mask, torch.maximum(labels, jump), zero)
        if torch.equal(labels, before):
            return labels
    raise RuntimeError(f"connected-component labelling did not converge in {max_rounds} rounds")


def _segment_median(values: torch.Tensor, segment: torch.Tensor, n_segments: int, scale: int):
    """Median (``numpy.median`` convention) of ``values`` (integers or half-integers >= 0, below
    ``scale``) within each segment id 0..n_segments-1 (every segment non-empty).

    From a histogram of half-unit bins per segment (one bincount, a cumulative sum and a search:
    linear in the values) where it is not much larger than the values, else from one sort."""
    halves = torch.round(values * 2).long()
    bins = 2 * scale + 1
    if n_segments * bins <= 4 * values.numel() + 65536:
        cum = torch.bincount(segment * bins + halves, minlength=n_segments * bins).view(n_segments, bins).cumsum(1)
        counts = cum[:, -1]
        ranks = torch.stack(((counts - 1) // 2, counts // 2), 1)  # the two middle ranks (0-based) of each segment
        at = torch.searchsorted(cum, ranks, right=True)  # the first bin holding more than ``rank`` values
        return at.sum(1).float() / 4
    counts = torch.bincount(segment, minlength=n_segments)
    ordered = values[torch.argsort(segment * bins + halves)]
    start = torch.cumsum(counts, 0) - counts
    return 0.5 * (ordered[start + (counts - 1) // 2] + ordered[start + counts // 2])


def select_training_clicks(seg: torch.Tensor, targets: Sequence[Sequence[int]], settings,
                           generator: Optional[torch.Generator] = None, ignore_label: Optional[int] = None,
                           capacity: Optional[int] = None, spacing: Optional[Sequence[float]] = None,
                           objects: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Simulate the clicks of a batch of training samples, on the label maps' device.

    Per sample: no guide with probability ``settings.p_drop``; otherwise, per guided class with
    objects, k ~ U{1..n} of its n objects get one positive click each (``click_policy``
    ``center``: the robust centre, perturbed as in the original work when ``perturb_center``;
    ``random``: a uniform voxel of the object), and with probability ``p_negative``
    U{1..max_negative_clicks} negative clicks land on a uniform voxel of the other foreground
    classes (probability ``p_confusable``, if there are any) or of the background, or, with
    probability ``p_near_negative``, just outside the class (the CPU version's rays, all at once).

    Args:
        seg: integer label maps (B, *spatial), 2D or 3D.
        targets: per guided class, its label value(s).
        settings: a ``GuideSettings``.
        generator: torch generator on ``seg``'s device (all randomness comes from it).
        ignore_label: never clicked, never part of an object.
        capacity: click rows per sample of the result (default: the largest count).
        spacing: mm per axis (default 1): the rays of near-boundary negatives are in mm.
        objects: the guided classes' objects, labelled already (B, *spatial) on ``seg``'s device,
            numbered as :func:`nnunet_guide.core.clicks.object_map` numbers them (the data loader's
            ``click_selection = "split"``); None: labelled here (:func:`label_components`). With
            ``objects`` the loader dropped the guides already (``p_drop``): a sample whose map is
            :data:`nnunet_guide.core.clicks.DROPPED_OBJECTS` gets no click, the others all get theirs.
    Returns:
        packed clicks (B, K, 3 + 2 * ndim) on the CPU, as :func:`nnunet_guide.core.encoding.pack_click_batch`.
    """
    if settings.click_policy not in DEVICE_POLICIES:
        raise ValueError(f"click policy {settings.click_policy!r} cannot be simulated on the training device "
                         f"(it needs a distance transform); choose clicks in the data loader instead")
    device = seg.device
    B, shape = seg.shape[0], tuple(seg.shape[1:])
    ndim = len(shape)
    gen = generator

    def rand(*size):
        return torch.rand(size, generator=gen, device=device)

    if objects is None:
        guided = rand(B) >= settings.p_drop
    else:  # dropped in the loader: the map of a dropped sample is DROPPED_OBJECTS everywhere
        guided = objects.reshape(B, -1)[:, 0] != DROPPED_OBJECTS
    valid = torch.ones_like(seg, dtype=torch.bool) if ignore_label is None else seg != ignore_label
    sample_view = (B,) + (1,) * ndim
    masks = [_class_mask(seg, labels) & valid & guided.view(sample_view) for labels in targets]
    rows = _positive_rows(masks, settings, rand, objects, shape)  # (n, F) float tensors, the sample index in front
    if settings.negatives and settings.max_negative_clicks > 0:
        for t, mask in enumerate(masks):
            rows += _negative_rows(seg, mask, valid, guided, t, settings, rand, spacing)
    K = capacity
    if not rows:
        out = torch.full((B, K or 0, packed_width(ndim)), float("nan"))
        out[..., _TARGET] = -1
        return out
    allrows = torch.cat(rows).cpu()
    sample = allrows[:, 0].long()
    counts = torch.bincount(sample, minlength=B)
    K = int(counts.max()) if K is None else K
    if int(counts.max()) > K:
        raise ValueError(f"a training sample got {int(counts.max())} simulated clicks, more than the {K} click rows "
                         f"per sample; raise the trainer's max_clicks_per_sample")
    out = torch.full((B, K, packed_width(ndim)), float("nan"))
    out[..., _TARGET] = -1
    order = torch.argsort(sample, stable=True)
    slot = torch.arange(allrows.shape[0]) - (torch.cumsum(counts, 0) - counts)[sample[order]]
    out[sample[order], slot] = allrows[order, 1:]
    return out


def _class_mask(seg: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Voxels whose label is one of ``labels`` (one comparison for one label: isin is 10x slower on the CPU)."""
    labels = [int(v) for v in labels]
    if len(labels) == 1:
        return seg == labels[0]
    return torch.isin(seg, torch.as_tensor(labels, device=seg.device))


def _positive_rows(masks, settings, rand, objects, shape):
    """The positive clicks of every guided class at once (few, large operations: a GPU pays per
    launch). Per sample and class with objects, k ~ U{1..n} of its n objects, each with its robust
    centre (medians and MADs of all axes and objects, two segment medians), perturbed for the
    ``center`` policy or replaced by a uniform object voxel for ``random``, and U{0..max-1} more
    clicks at uniform voxels of it. ``masks``: per class, its guided voxels (B, *spatial)."""
    B, ndim, C = masks[0].shape[0], len(shape), len(masks)
    device = masks[0].device
    # every class voxel with its object id; ids unique per (sample, class) group within ``span``
    span = (1 << 16) if objects is not None else masks[0].numel() + 1
    coords, comp, cls = [], [], []
    for t, mask in enumerate(masks):
        coords.append(torch.nonzero(mask))  # (V, 1 + ndim): sample, then voxel index per axis
        if objects is None:
            comp.append(label_components(mask, settings.connectivity)[mask])
        else:  # the loader's numbers
            ids = objects[mask].long()
            if bool((ids <= 0).any()):
                raise RuntimeError(f"guided class {t}: the object map holds no object at a voxel of the class; "
                                   f"it was not labelled from this label map")
            comp.append(ids)
        cls.append(torch.full_like(comp[-1], t))
    coords = torch.cat(coords)
    if not coords.shape[0]:
        return []
    key = (coords[:, 0] * C + torch.cat(cls)) * span + torch.cat(comp)
    keys, inverse = torch.unique(key, return_inverse=True)
    n_comp = keys.numel()
    comp_group = keys // span  # (sample, class) of each object: sample * C + class
    per_group = torch.bincount(comp_group, minlength=B * C)
    k = torch.floor(rand(B * C) * per_group).long() + 1  # k ~ U{1..n} per sample and class
    # a uniformly random subset of k objects: rank the group's objects by a random key
    order = torch.argsort(comp_group.double() * 2 + rand(n_comp).double())
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_comp, device=device)
    first = torch.cumsum(per_group, 0) - per_group
    chosen = (rank - first[comp_group]) < k[comp_group]
    keep = chosen[inverse]
    vc = coords[keep]
    remap = torch.full((n_comp,), -1, dtype=torch.long, device=device)
    n_sel = int(chosen.sum())
    remap[chosen] = torch.arange(n_sel, device=device)
    vcomp = remap[inverse[keep]]
    sel_group = comp_group[chosen]
    sel_sample, sel_class = sel_group // C, sel_group % C
    # robust centre and sigma of every chosen object and axis: segment (axis, object) medians
    values = vc[:, 1:].t().float().reshape(-1)  # axis-major
    segment = (torch.arange(ndim, device=device)[:, None] * n_sel + vcomp[None]).reshape(-1)
    med = _segment_median(values, segment, ndim * n_sel, max(shape))
    mad = _segment_median((values - med[segment]).abs(), segment, ndim * n_sel, max(shape))
    pos, raw_sigma = med.view(ndim, n_sel).t(), MAD_TO_SIGMA * mad.view(ndim, n_sel).t()
    sigma = raw_sigma.clamp_min(settings.min_object_sigma)
    if settings.click_policy == "center" and settings.perturb_center:
        pos = pos + raw_sigma.clamp_min(0.5) * (rand(n_sel, ndim) * 0.4 - 0.2)
        factor = torch.exp((rand(n_sel, ndim) * 2 - 1) * math.log(1.4))
        sigma = (sigma * factor).clamp_min(settings.min_object_sigma)
    elif settings.click_policy == "random":
        pos = _uniform_object_voxels(vc, vcomp, n_sel, pos, rand)
    shape_t = torch.tensor(shape, device=device, dtype=torch.float32)
    pos = torch.minimum(pos.clamp_min(0), shape_t - 1)
    rows = [_rows(sel_sample, sel_class, True, pos, sigma)]
    extra_max = int(getattr(settings, "max_object_clicks", 1))
    if extra_max > 1:  # U{0..max-1} more clicks per object, at uniform voxels of it
        n_extra = torch.floor(rand(n_sel) * extra_max).long()
        for r in range(1, extra_max):
            more = _uniform_object_voxels(vc, vcomp, n_sel, pos, rand)
            keep_r = n_extra >= r
            rows.append(_rows(sel_sample[keep_r], sel_class[keep_r], True, more[keep_r], sigma[keep_r]))
    return rows


def _uniform_object_voxels(vc, vcomp, n_sel, pos, rand):
    """A uniform voxel of each selected object (the voxel with the largest random key); ``pos``
    (n_sel, ndim) gives the shape and stays unchanged."""
    key = rand(vcomp.numel())
    best = torch.full((n_sel,), -1.0, device=pos.device).scatter_reduce(0, vcomp, key, reduce="amax")
    hit = torch.nonzero(key == best[vcomp])[:, 0]
    out = pos.clone()
    out[vcomp[hit]] = vc[hit, 1:].float()
    return out


def _rows(sample: torch.Tensor, target, positive: bool, pos: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Click rows (sample, target, sign, kind, position, sigma); ``target`` one class for all rows or one per row."""
    n = sample.numel()
    target = target.float() if torch.is_tensor(target) else torch.full((n,), float(target), device=pos.device)
    head = torch.stack((sample.float(), target,
                        torch.full((n,), 1.0 if positive else 0.0, device=pos.device),
                        torch.full((n,), float(CLICK_KINDS.index("point")), device=pos.device)), 1)
    return torch.cat((head, pos.float(), sigma.float()), 1)


def _near_negatives(mask, valid, band_mm, spacing, rand, m):
    """For every sample and each of ``m`` clicks, one ray as in
    :func:`nnunet_guide.core.clicks._near_negative` (from a uniform voxel of the sample's class
    mask, a uniform direction in mm, the first voxel outside, then U(0, ``band_mm``) mm further):
    positions (B, m, ndim) in voxels and whether the ray gave a valid voxel outside the class."""
    B, shape = mask.shape[0], tuple(mask.shape[1:])
    ndim, device = len(shape), mask.device
    sp = torch.tensor([1.0] * ndim if spacing is None else [float(s) for s in spacing], device=device)
    shape_t = torch.tensor(shape, device=device)
    flat_mask = mask.reshape(B, -1)
    cum = torch.cumsum(flat_mask.int(), 1)
    size = cum[:, -1]
    draw = (torch.floor(rand(B, m) * size[:, None]).long() + 1).clamp_max(size[:, None].clamp_min(1))
    idx = torch.searchsorted(cum, draw)
    start = _unravel(idx, shape).float()
    d = _normal(rand, (B, m, ndim))
    d_vox = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) / sp
    extra = rand(B, m) * band_mm
    step = 0.5 * float(sp.min())
    n_steps = int(math.ceil(float((shape_t.float() * sp).norm()) / step))
    t = torch.arange(1, n_steps + 1, device=device).float() * step  # (S,)
    ray = torch.round(start[:, :, None] + t[None, None, :, None] * d_vox[:, :, None]).long()  # (B, m, S, nd)
    inside = ((ray >= 0) & (ray < shape_t)).all(-1)
    flat = _ravel_clamped(ray, shape)
    hit = torch.gather(flat_mask, 1, flat.reshape(B, -1)).reshape(flat.shape) & inside
    out = ~hit
    first = torch.argmax(out.int(), -1)  # the first step outside the class (or the array)
    left_inside = torch.gather(inside, -1, first[..., None])[..., 0] & torch.gather(out, -1, first[..., None])[..., 0]
    t_exit = t[first]
    pos = torch.round(start + (t_exit + extra)[..., None] * d_vox)
    ok = left_inside & (size > 0)[:, None] & ((pos >= 0) & (pos < shape_t)).all(-1)
    lin = _ravel_clamped(pos.long(), shape)
    ok &= ~torch.gather(flat_mask, 1, lin) & torch.gather(valid.reshape(B, -1), 1, lin)
    return pos, ok


def _unravel(idx: torch.Tensor, shape) -> torch.Tensor:
    """Flat indices (any shape) -> voxel coordinates in a trailing axis (row-major ``shape``)."""
    return torch.stack([(idx // math.prod(shape[a + 1:])) % shape[a] for a in range(len(shape))], -1)


def _ravel_clamped(coords: torch.Tensor, shape) -> torch.Tensor:
    """Voxel coordinates in a trailing axis -> flat indices, each coordinate clamped into ``shape``
    (callers mask the out-of-array ones themselves)."""
    flat = torch.zeros(coords.shape[:-1], dtype=torch.long, device=coords.device)
    for a, n in enumerate(shape):
        flat = flat * n + coords[..., a].clamp(0, n - 1)
    return flat


def _normal(rand, size):
    """Standard normal draws from the uniform generator (Box-Muller), so every draw comes from
    the one ``torch.Generator`` of the batch."""
    u1, u2 = rand(*size).clamp_min(1e-12), rand(*size)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _negative_rows(seg, mask, valid, guided, t, settings, rand, spacing=None):
    """Negative clicks of guided class ``t``: per guided sample with probability ``p_negative``,
    U{1..max} clicks, each on a uniform voxel of the confusable pool (other foreground) with
    probability ``p_confusable`` (if not empty) or else of the background (if not empty); with
    probability ``p_near_negative`` a click goes just outside the class instead, where the first of
    its rays that gives a voxel lands (:func:`_near_negatives`; the pools above when none does)."""
    B, shape = seg.shape[0], tuple(seg.shape[1:])
    ndim = len(shape)
    device = seg.device
    has = guided & (rand(B) < settings.p_negative)
    n_neg = torch.floor(rand(B) * settings.max_negative_clicks).long() + 1
    n_neg = torch.where(has, n_neg, torch.zeros_like(n_neg))
    m = settings.max_negative_clicks
    if not bool(has.any()):
        return []
    pools = [((seg > 0) & ~mask & valid).view(B, -1), ((seg <= 0) & valid).view(B, -1)]
    cums = [torch.cumsum(p.int(), 1) for p in pools]
    sizes = [c[:, -1] for c in cums]
    want_conf = rand(B, m) < settings.p_confusable
    use_conf = (want_conf & (sizes[0] > 0)[:, None]) | (sizes[1] == 0)[:, None]
    size = torch.where(use_conf, sizes[0][:, None], sizes[1][:, None])
    draw = torch.floor(rand(B, m) * size).long() + 1  # the draw-th voxel of the pool (1-based)
    flat = torch.where(use_conf, torch.searchsorted(cums[0], draw.clamp_max(sizes[0][:, None].clamp_min(1))),
                       torch.searchsorted(cums[1], draw.clamp_max(sizes[1][:, None].clamp_min(1))))
    take = (torch.arange(m, device=device)[None] < n_neg[:, None]) & (size > 0)
    b, j = torch.nonzero(take, as_tuple=True)
    idx = flat[b, j]
    pos = _unravel(idx, shape).float()
    near = float(getattr(settings, "p_near_negative", 0.0))
    if near > 0:
        want = rand(B, m) < near
        tries = 8  # as the CPU version
        ray_pos, ray_ok = _near_negatives(mask, valid, settings.near_negative_mm, spacing, rand, m * tries)
        ray_pos, ray_ok = ray_pos.view(B, m, tries, ndim), ray_ok.view(B, m, tries)
        first = torch.argmax(ray_ok.int(), -1)  # the first ray that gave a voxel
        near_pos = torch.gather(ray_pos, 2, first[..., None, None].expand(B, m, 1, ndim))[:, :, 0]
        ok = ray_ok.any(-1)
        use = (want & ok)[b, j]
        pos = torch.where(use[:, None], near_pos[b, j], pos)
        extra = (torch.arange(m, device=device)[None] < n_neg[:, None]) & (size == 0) & want & ok
        if bool(extra.any()):  # no pool, but a ray: the click still happens
            eb, ej = torch.nonzero(extra, as_tuple=True)
            b, pos = torch.cat((b, eb)), torch.cat((pos, near_pos[eb, ej]))
    sigma = torch.full((b.numel(), ndim), float(settings.min_object_sigma), device=device)
    return [_rows(b, t, False, pos, sigma)]
