"""Local texture features as torch tensors, computed with separable box filters.

Every feature is a map of the same spatial size as the image, so it survives instance
normalisation (unlike a constant plane) and can be computed on any patch. All filters are
separable (one 1-D average pool per axis) with "valid voxels only" averaging at the borders
(``count_include_pad=False``), so a feature at the border averages only voxels inside the
patch. The first axis after (B, C) is the first spatial axis; 2D (B, C, H, W) and 3D
(B, C, D, H, W) inputs are accepted.

Features, per input channel, in the order of ``TEXTURE_FEATURES``:

* ``mean``: local mean of the intensity.
* ``std``: local standard deviation.
* ``entropy``: local Shannon entropy of the quantised image (``levels`` grey levels over
  ``[lo, hi]``, values outside clamped), divided by ``log(levels)`` so it lies in [0, 1].
* ``gradient``: gradient magnitude by central differences (one-sided at the borders), per voxel
  unit (or per mm when ``spacing`` is given).
* ``contrast``: grey-level co-occurrence contrast, ``E[(q(x) - q(x + e_a))^2]`` over the window
  for unit offsets e_a along every spatial axis (the pairs of all axes pooled), divided by
  ``(levels - 1)^2`` (so in [0, 1]). Pairs leaving the patch are not counted.
* ``homogeneity``: co-occurrence homogeneity ``E[1 / (1 + |q(x) - q(x + e_a)|)]``, same pairs.

These are the GLCM statistics computed locally: the GLCM of a window is the distribution of
(q(x), q(x + e)) pairs in it, and contrast/homogeneity are expectations over that distribution,
so they equal box-filtered per-pair terms.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

TEXTURE_FEATURES = ("mean", "std", "entropy", "gradient", "contrast", "homogeneity")


def box_filter(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Separable moving average.

    Args:
        x: (B, C, *spatial), floating point.
        size: odd window length per spatial axis (1 = no smoothing along that axis).
    Returns:
        (B, C, *spatial): mean over the window's voxels that lie inside the array.

    Implemented as sums of shifted slices (no padding copy), divided once by the number of
    in-array voxels of each window (a separable product): several times faster than average
    pooling on a CPU, and exact at the borders.
    """
    nd = x.ndim - 2
    if len(size) != nd:
        raise ValueError(f"box_filter: {len(size)} window sizes for {nd} spatial axes")
    count = None
    for a, k in enumerate(size):
        k = int(k)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"box_filter: window sizes must be odd and >= 1, got {list(size)}")
        d, r, n = a + 2, k // 2, x.shape[a + 2]
        r = min(r, n - 1)
        if r <= 0:
            continue
        acc = x.clone()
        for i in range(1, r + 1):
            acc.narrow(d, i, n - i).add_(x.narrow(d, 0, n - i))
            acc.narrow(d, 0, n - i).add_(x.narrow(d, i, n - i))
        x = acc
        idx = torch.arange(n, device=x.device)
        c = (torch.clamp(idx + r, max=n - 1) - torch.clamp(idx - r, min=0) + 1).to(x.dtype)
        c = c.view((n,) + (1,) * (nd - 1 - a))
        count = c if count is None else count * c
    return x if count is None else x / count


def quantise(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """Grey levels 0..levels-1 of ``x`` (B, C, *spatial) over ``[lo, hi]`` (C,) per channel;
    values outside the range go to the edge levels. Returns a long tensor of ``x``'s shape."""
    view = (1, -1) + (1,) * (x.ndim - 2)
    u = (x - lo.view(view)) / (hi - lo).view(view) * levels
    return u.floor().clamp(0, levels - 1).long()


def texture_features(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, window: Sequence[int],
                     levels: int = 8, spacing: Optional[Sequence[float]] = None,
                     features: Sequence[str] = TEXTURE_FEATURES) -> torch.Tensor:
    """Texture maps of every channel.

    Args:
        x: (B, C, *spatial) intensities (the network's normalised input).
        lo, hi: (C,) quantisation range per channel (for entropy and co-occurrence features).
        window: odd window size per spatial axis (voxels).
        levels: grey levels of the quantised image (>= 2).
        spacing: voxel size per spatial axis for the gradient (None = voxel units).
        features: subset of ``TEXTURE_FEATURES`` to compute, in the returned order.
    Returns:
        (B, C * len(features), *spatial): channel ``c * len(features) + f`` is feature f of input
        channel c. Float32 (or x's floating dtype).
    """
    unknown = [f for f in features if f not in TEXTURE_FEATURES]
    if unknown:
        raise ValueError(f"unknown texture feature(s) {unknown}; known: {list(TEXTURE_FEATURES)}")
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    x = x if x.is_floating_point() else x.float()
    B, C = x.shape[:2]
    spatial = tuple(x.shape[2:])
    nd = len(spatial)
    need = set(features)
    out = torch.empty((B, C, len(features)) + spatial, dtype=x.dtype, device=x.device)
    slot = {f: i for i, f in enumerate(features)}
    # everything that needs a window average is stacked and filtered in one call
    to_filter, names = [], []
    if need & {"mean", "std"}:
        # centred per sample and channel, so E[x^2] - E[x]^2 does not cancel catastrophically
        mu = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        xc = x - mu
        to_filter.append(xc)
        names.append(("x", C))
        if "std" in need:
            to_filter.append(xc * xc)
            names.append(("x2", C))
    q = quantise(x, lo, hi, levels) if need & {"entropy", "contrast", "homogeneity"} else None
    if "entropy" in need:
        lv = torch.arange(levels, device=x.device).view((1, 1, levels) + (1,) * nd)
        to_filter.append((q.unsqueeze(2) == lv).to(x.dtype).reshape((B, C * levels) + spatial))
        names.append(("onehot", C * levels))
    num = None
    if need & {"contrast", "homogeneity"}:
        # each pair (x, x + e_a) is counted at its first voxel; pairs leaving the array are absent
        qf = q.to(x.dtype)
        con = torch.zeros_like(x)
        hom = torch.zeros_like(x)
        num = torch.zeros((1, 1) + spatial, dtype=x.dtype, device=x.device)
        for a in range(nd):
            d, n = a + 2, spatial[a]
            if n < 2:
                continue
            diff = (qf.narrow(d, 1, n - 1) - qf.narrow(d, 0, n - 1)).abs_()
            hom.narrow(d, 0, n - 1).add_(1.0 / (1.0 + diff))
            con.narrow(d, 0, n - 1).add_(diff.mul_(diff))
            num.narrow(d, 0, n - 1).add_(1.0)
        to_filter += [con, hom]
        names += [("con", C), ("hom", C)]
    if to_filter:
        filtered = box_filter(torch.cat(to_filter, 1) if len(to_filter) > 1 else to_filter[0], window)
        parts = dict(zip([n for n, _ in names], torch.split(filtered, [k for _, k in names], 1)))
        if "mean" in need:
            out[:, :, slot["mean"]] = parts["x"] + mu
        if "std" in need:
            out[:, :, slot["std"]] = (parts["x2"] - parts["x"] ** 2).clamp_min(0).sqrt()
        if "entropy" in need:
            p = parts["onehot"].reshape((B, C, levels) + spatial)
            out[:, :, slot["entropy"]] = -torch.special.xlogy(p, p).sum(2) / math.log(levels)
        if num is not None:
            # ratio of two window averages = ratio of window sums: the mean over the window's pairs
            num_s = box_filter(num, window).clamp_min(1e-12)
            if "contrast" in need:
                out[:, :, slot["contrast"]] = parts["con"] / num_s / float((levels - 1) ** 2)
            if "homogeneity" in need:
                out[:, :, slot["homogeneity"]] = parts["hom"] / num_s
    if "gradient" in need:
        g2 = torch.zeros_like(x)
        for a in range(nd):
            if spatial[a] < 2:
                continue
            step = float(spacing[a]) if spacing is not None else 1.0
            ga = torch.gradient(x, dim=a + 2, spacing=step)[0]
            g2.addcmul_(ga, ga)
        out[:, :, slot["gradient"]] = g2.sqrt_()
    return out.reshape((B, C * len(features)) + spatial)


def window_from_spacing(spacing: Sequence[float], window_mm: float, max_voxels: int = 15) -> list:
    """Odd window size per axis covering about ``window_mm`` (at least 1, at most ``max_voxels``),
    so anisotropic data get physically similar windows (a 5 mm slice axis gets size 1)."""
    sizes = []
    for s in spacing:
        k = int(round(window_mm / float(s)))
        k = max(1, min(int(max_voxels), k))
        if k % 2 == 0:
            k += 1 if k + 1 <= max_voxels else -1
        sizes.append(max(1, k))
    return sizes
