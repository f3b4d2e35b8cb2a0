"""A generated liver + tumour CT phantom: the demo's fallback when the real LiTS case can't be had.

Not anatomy, but CT-like numbers, so intensity normalisation and the density channels see what
they would see on a real liver scan:
- air outside the body (-1000 HU), subcutaneous fat (about -100 HU), soft tissue/muscle
  (about 40 HU), a spine-like bone column (about 500 HU);
- a liver (about 119 HU, the LiTS-117 median) made of a few overlapping ellipsoids;
- hypodense tumours (about 69 HU) of radii 2-9 mm inside the liver, spread along z so that
  every slab of a slab dataset holds some;
- smooth low-frequency texture and Gaussian noise (about 12 HU) everywhere.

Arrays are in SimpleITK order (z, y, x). Deterministic for a given seed.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

LIVER_HU = 119.0
TUMOUR_HU = 69.0
FAT_HU = -100.0
TISSUE_HU = 40.0
BONE_HU = 500.0
AIR_HU = -1000.0


def _ellipsoid(grid: Tuple[np.ndarray, ...], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    acc = 0.0
    for g, c, r in zip(grid, center, radii):
        acc = acc + ((g - c) / r) ** 2
    return acc <= 1.0


def make_liver_phantom(shape: Sequence[int] = (128, 128, 128), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       n_tumours: int = 24, noise_hu: float = 12.0, seed: int = 0
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Generate one phantom volume.

    Args:
        shape: (z, y, x) voxels.
        spacing: mm per array axis (z, y, x); sizes below are in mm, so anisotropic grids
            give the same physical phantom.
        n_tumours: tumours to place (some may merge).
        noise_hu: standard deviation of the additive noise.
        seed: random seed.
    Returns:
        (image, label): float32 HU and uint8 labels (0 background, 1 liver, 2 tumour), both
        of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3D with at least 8 voxels per axis, got {shape}")
    spacing = np.asarray(spacing, float)
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * spacing
    grid = tuple(np.arange(n) * s + s / 2 for n, s in zip(shape, spacing))
    zz, yy, xx = np.meshgrid(*grid, indexing="ij")
    g = (zz, yy, xx)
    mid = extent / 2

    body = _ellipsoid((yy, xx), mid[1:], extent[1:] * np.array([0.46, 0.48]))
    inner = _ellipsoid((yy, xx), mid[1:], extent[1:] * np.array([0.41, 0.43]))
    spine = _ellipsoid((yy, xx), (mid[1] + 0.30 * extent[1], mid[2]), extent[1:] * 0.06)

    liver = np.zeros(shape, bool)
    lobes = [((0.5, 0.47, 0.42), (0.47, 0.30, 0.30)),
             ((0.45, 0.42, 0.62), (0.40, 0.22, 0.20)),
             ((0.6, 0.55, 0.35), (0.38, 0.22, 0.22))]
    for c, r in lobes:
        liver |= _ellipsoid(g, extent * np.array(c), extent * np.array(r))
    liver &= inner & ~spine

    label = np.zeros(shape, np.uint8)
    label[liver] = 1
    # tumours: centres drawn among liver voxels, spread along z by stratifying on z
    liver_idx = np.argwhere(ndimage.binary_erosion(liver, iterations=2))
    if liver_idx.size and n_tumours > 0:
        order = np.argsort(liver_idx[:, 0], kind="stable")
        strata = np.array_split(order, n_tumours)
        for stratum in strata:
            if stratum.size == 0:
                continue
            centre_vox = liver_idx[stratum[rng.integers(stratum.size)]]
            centre = (centre_vox + 0.5) * spacing
            radius = rng.uniform(2.0, 9.0) * rng.uniform(0.8, 1.25, size=3)
            lo = np.maximum(((centre - radius) / spacing).astype(int) - 1, 0)
            hi = np.minimum(((centre + radius) / spacing).astype(int) + 2, shape)
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            blob = _ellipsoid(tuple(x[sl] for x in g), centre, radius) & liver[sl]
            label[sl][blob] = 2

    image = np.full(shape, AIR_HU, np.float32)
    image[np.broadcast_to(body, shape)] = FAT_HU
    image[np.broadcast_to(inner, shape)] = TISSUE_HU
    image[np.broadcast_to(spine, shape)] = BONE_HU
    image[label == 1] = LIVER_HU
    image[label == 2] = TUMOUR_HU
    # soft edges (partial volume), a low-frequency texture, then noise
    image = ndimage.gaussian_filter(image, sigma=0.7)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=4.0 / spacing)
    texture *= 8.0 / max(float(texture.std()), 1e-6)
    inside = np.broadcast_to(body, shape)
    image = image + np.where(inside, texture, 0) + rng.normal(0.0, noise_hu, size=shape)
    return image.astype(np.float32), label
