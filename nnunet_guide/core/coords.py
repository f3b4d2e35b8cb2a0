"""Map points between the four coordinate systems a click passes through on its way into nnU-Net.

1. **physical**: millimetres in the patient frame as SimpleITK reports it (ITK/LPS: x grows to the
   patient's left, y to posterior, z to superior), i.e. what ``image.TransformIndexToPhysicalPoint``
   returns. A point has as many coordinates as the image has dimensions (3, or 2 for 2D images).
2. **ITK index** ``(i, j, k)``: continuous voxel index in ITK order (fastest-varying axis first), as
   ``image.TransformPhysicalPointToContinuousIndex`` returns; integer values are voxel centres.
3. **raw array index** ``(z, y, x)``: index into the array nnU-Net's reader returns
   (``sitk.GetArrayFromImage``: the ITK index reversed). nnU-Net always works with 3 spatial axes:
   a 2D image becomes an array of shape ``(1, y, x)``, so its raw index is ``(0, j, i)``.
4. **preprocessed** ``(a0, a1, a2)``: index into the spatial axes of nnU-Net's preprocessed array
   (``data.shape[1:]``) after ``transpose_forward``, cropping to the non-zero bounding box and
   resampling to the target spacing.

The resampling step follows the convention of every resampling function nnU-Net ships
(``skimage.transform.resize``, the separate-z ``map_coordinates`` path, and
``torch.nn.functional.interpolate(align_corners=False)``): voxel *centres* are matched with
half-voxel offsets, so output voxel ``o`` samples input position ``(o + 0.5) * old / new - 0.5``.
The forward map is the exact inverse of that, hence physical -> preprocessed -> physical is the
identity up to floating point, and a point lands on the preprocessed voxel whose centre is within
half a voxel of it.

All functions take and return float arrays of shape ``(n_points, ndim)`` (a single point of shape
``(ndim,)`` is accepted and returned as such). No nnU-Net import: geometry comes from the
``properties`` dict nnU-Net's preprocessing returns and the plans' ``transpose_forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

# LPS <-> RAS: negate x and y
_LPS_RAS = np.array([-1.0, -1.0, 1.0])


class CoordinateError(ValueError):
    """A point or a geometry that cannot be mapped; the message says which value and why."""


def _as_points(points, ndim: Optional[int] = None) -> Tuple[np.ndarray, bool]:
    p = np.asarray(points, dtype=float)
    single = p.ndim == 1
    if single:
        p = p[None]
    if p.ndim != 2:
        raise CoordinateError(f"points must have shape (n, ndim) or (ndim,), got shape {np.shape(points)}")
    if ndim is not None and p.shape[1] != ndim:
        raise CoordinateError(f"points have {p.shape[1]} coordinates, expected {ndim}: {p.tolist()}")
    if not np.all(np.isfinite(p)):
        raise CoordinateError(f"points must be finite numbers, got {p.tolist()}")
    return p, single


def _ret(p: np.ndarray, single: bool) -> np.ndarray:
    return p[0] if single else p


def lps_to_ras(points) -> np.ndarray:
    """Flip x and y of 3D physical points (LPS <-> RAS; the map is its own inverse)."""
    p, single = _as_points(points)
    if p.shape[1] != 3:
        raise CoordinateError(f"LPS/RAS conversion needs 3D points, got {p.shape[1]} coordinates")
    return _ret(p * _LPS_RAS, single)


ras_to_lps = lps_to_ras


@dataclass(frozen=True)
class ImageGeometry:
    """An image grid in physical space: ``physical = matrix @ itk_index + origin``.

    Attributes:
        matrix: (ndim, ndim) direction matrix times diag(spacing), in ITK axis order (LPS mm per
            voxel step of i, j, k).
        origin: (ndim,) physical position (LPS mm) of voxel index 0.
        size: ITK-order size (i, j, k) of the image, or None when unknown.
    """
    matrix: np.ndarray
    origin: np.ndarray
    size: Optional[Tuple[int, ...]] = None

    @property
    def ndim(self) -> int:
        return int(self.origin.shape[0])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (mm) per ITK axis."""
        return np.linalg.norm(self.matrix, axis=0)

    @classmethod
    def from_sitk_params(cls, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float],
                         size: Optional[Sequence[int]] = None) -> "ImageGeometry":
        """From SimpleITK's ``GetSpacing()``, ``GetOrigin()``, ``GetDirection()`` (row-major, ndim*ndim)."""
        spacing = np.asarray(spacing, float)
        nd = spacing.shape[0]
        d = np.asarray(direction, float)
        if d.size != nd * nd:
            raise CoordinateError(f"direction has {d.size} entries; a {nd}D image needs {nd * nd}")
        if np.any(spacing <= 0):
            raise CoordinateError(f"spacing must be positive, got {spacing.tolist()}")
        m = d.reshape(nd, nd) @ np.diag(spacing)
        if abs(np.linalg.det(m)) < 1e-12:
            raise CoordinateError(f"direction {d.tolist()} with spacing {spacing.tolist()} is singular")
        return cls(m, np.asarray(origin, float), None if size is None else tuple(int(s) for s in size))

    @classmethod
    def from_sitk_image(cls, image) -> "ImageGeometry":
        return cls.from_sitk_params(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetSize())

    @classmethod
    def from_ras_affine(cls, affine, size: Optional[Sequence[int]] = None) -> "ImageGeometry":
        """From a NIfTI (nibabel) 4x4 affine, which maps voxel (i, j, k) to RAS mm."""
        a = np.asarray(affine, float)
        if a.shape != (4, 4):
            raise CoordinateError(f"affine must be 4x4, got shape {a.shape}")
        flip = np.diag(_LPS_RAS)
        return cls(flip @ a[:3, :3], flip @ a[:3, 3], None if size is None else tuple(int(s) for s in size))

    @classmethod
    def from_properties(cls, properties: Mapping, raw_shape: Optional[Sequence[int]] = None) -> "ImageGeometry":
        """From the properties dict nnU-Net's readers return (``sitk_stuff`` of SimpleITKIO, or
        ``nibabel_stuff`` of NibabelIO / NibabelIOWithReorient).

        Args:
            raw_shape: spatial shape of the raw array (z, y, x); when given, ``size`` is filled in.
        """
        size = None
        if "sitk_stuff" in properties:
            s = properties["sitk_stuff"]
            if raw_shape is not None:
                size = tuple(int(v) for v in raw_shape[::-1][:len(s["spacing"])])
            return cls.from_sitk_params(s["spacing"], s["origin"], s["direction"], size)
        if "nibabel_stuff" in properties:
            s = properties["nibabel_stuff"]
            aff = s.get("reoriented_affine", s.get("original_affine"))
            if raw_shape is not None:
                size = tuple(int(v) for v in raw_shape[::-1])
            return cls.from_ras_affine(aff, size)
        raise CoordinateError(
            "the image properties carry no geometry ('sitk_stuff' or 'nibabel_stuff'); physical "
            "coordinates need an image read by SimpleITKIO or NibabelIO. Give clicks in voxel space instead.")

    def physical_to_index(self, points) -> np.ndarray:
        """Physical (LPS mm) -> continuous ITK index, shape preserved."""
        p, single = _as_points(points, self.ndim)
        idx = np.linalg.solve(self.matrix, (p - self.origin).T).T
        return _ret(idx, single)

    def index_to_physical(self, index) -> np.ndarray:
        """Continuous ITK index -> physical (LPS mm), shape preserved."""
        p, single = _as_points(index, self.ndim)
        return _ret(p @ self.matrix.T + self.origin, single)


_POSITIVE, _NEGATIVE = "LPS", "RAI"  # DICOM letters: where an axis points in LPS world space


def orientation_code(geometry: ImageGeometry) -> str:
    """The DICOM orientation string of a 3D grid (SimpleITK's
    ``DICOMOrientImageFilter_GetOrientationFromDirectionCosines``): per ITK axis, the letter of
    the world direction it mostly points to (identity direction = "LPS")."""
    cols = geometry.matrix / geometry.spacing
    out = []
    for a in range(geometry.ndim):
        k = int(np.argmax(np.abs(cols[:, a])))
        out.append(_POSITIVE[k] if cols[k, a] > 0 else _NEGATIVE[k])
    return "".join(out)


def original_geometry(geometry: ImageGeometry, original_orientation: str) -> ImageGeometry:
    """The grid of a file before a reorienting reader (nnU-Net's ``SimpleITKIOWithReorient``,
    which records ``original_orientation``) permuted and flipped its axes into ``geometry``: the
    same voxels and physical space, the file's own axis order and directions. Needs
    ``geometry.size``."""
    if geometry.size is None:
        raise CoordinateError("the reoriented image's size is needed to undo its reorientation")
    orient = str(original_orientation).upper()
    current = orientation_code(geometry)
    if len(orient) != geometry.ndim or sorted(orient.translate(str.maketrans("RAI", "LPS"))) != sorted("LPS"):
        raise CoordinateError(f"original orientation {original_orientation!r} is not a 3-letter DICOM code "
                              f"such as 'LPS' or 'RAI'")
    matrix = np.empty_like(geometry.matrix)
    size, corner = [], np.zeros(geometry.ndim)
    for a, letter in enumerate(orient):
        world = _POSITIVE.find(letter) if letter in _POSITIVE else _NEGATIVE.find(letter)
        b = next(b for b, c in enumerate(current)
                 if (_POSITIVE.find(c) if c in _POSITIVE else _NEGATIVE.find(c)) == world)
        sign = 1.0 if current[b] == letter else -1.0
        matrix[:, a] = sign * geometry.matrix[:, b]
        size.append(geometry.size[b])
        if sign < 0:
            corner[b] = geometry.size[b] - 1  # the file's first voxel is the reoriented grid's last
    return ImageGeometry(matrix, geometry.index_to_physical(corner), tuple(size))


def itk_index_to_array(index, ndim_array: int = 3) -> np.ndarray:
    """ITK index (i, j[, k]) -> raw array index (z, y, x). A 2D ITK index maps to (0, j, i).

    Args:
        index: (n, d) or (d,) with d = 2 or 3.
        ndim_array: spatial dimensions of nnU-Net's raw array (3 for nnU-Net's readers).
    """
    p, single = _as_points(index)
    rev = p[:, ::-1]
    missing = ndim_array - rev.shape[1]
    if missing < 0:
        raise CoordinateError(f"index has {p.shape[1]} coordinates, the array only {ndim_array} axes")
    if missing:
        rev = np.concatenate([np.zeros((rev.shape[0], missing)), rev], axis=1)
    return _ret(rev, single)


def array_to_itk_index(index, ndim_image: int = 3) -> np.ndarray:
    """Raw array index (z, y, x) -> ITK index (i, j[, k]) of an ``ndim_image``-D image (inverse of
    :func:`itk_index_to_array`; leading singleton axes of 2D images are dropped)."""
    p, single = _as_points(index)
    extra = p.shape[1] - ndim_image
    if extra < 0:
        raise CoordinateError(f"array index has {p.shape[1]} coordinates, image has {ndim_image} dimensions")
    return _ret(p[:, extra:][:, ::-1], single)


@dataclass(frozen=True)
class PreprocessedGeometry:
    """How nnU-Net's preprocessing moved a raw array index: transpose, crop, resample.

    Attributes:
        transpose_forward: the plans' ``transpose_forward`` (raw axis feeding each transposed axis).
        bbox_start: crop start per transposed axis (``properties['bbox_used_for_cropping']``).
        shape_after_cropping: ``properties['shape_after_cropping_and_before_resampling']``.
        preprocessed_shape: spatial shape of the preprocessed array (``data.shape[1:]``).
        shape_before_cropping: ``properties['shape_before_cropping']`` (transposed raw shape).
    """
    transpose_forward: Tuple[int, ...]
    bbox_start: Tuple[int, ...]
    shape_after_cropping: Tuple[int, ...]
    preprocessed_shape: Tuple[int, ...]
    shape_before_cropping: Tuple[int, ...]

    @classmethod
    def from_properties(cls, properties: Mapping, transpose_forward: Sequence[int],
                        preprocessed_shape: Sequence[int]) -> "PreprocessedGeometry":
        try:
            bbox = properties["bbox_used_for_cropping"]
            after = properties["shape_after_cropping_and_before_resampling"]
            before = properties["shape_before_cropping"]
        except KeyError as e:
            raise CoordinateError(
                f"properties lack {e.args[0]!r}: pass the properties returned by nnU-Net's preprocessing "
                f"(DefaultPreprocessor.run_case / run_case_npy), not the reader's") from e
        g = cls(tuple(int(t) for t in transpose_forward), tuple(int(b[0]) for b in bbox),
                tuple(int(s) for s in after), tuple(int(s) for s in preprocessed_shape),
                tuple(int(s) for s in before))
        if not (len(g.transpose_forward) == len(g.bbox_start) == len(g.shape_after_cropping)
                == len(g.preprocessed_shape) == len(g.shape_before_cropping)):
            raise CoordinateError(f"inconsistent dimensions in preprocessing geometry {g}")
        return g

    @property
    def ndim(self) -> int:
        return len(self.transpose_forward)

    @property
    def transpose_backward(self) -> Tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.transpose_forward))

    @property
    def raw_shape(self) -> Tuple[int, ...]:
        """Spatial shape of the raw (untransposed) array."""
        return tuple(self.shape_before_cropping[i] for i in self.transpose_backward)

    @property
    def scale(self) -> np.ndarray:
        """Preprocessed voxels per cropped voxel, per transposed axis."""
        return np.asarray(self.preprocessed_shape, float) / np.asarray(self.shape_after_cropping, float)

    @property
    def preprocessed_voxel_size(self) -> np.ndarray:
        """Size of a preprocessed voxel in raw voxels, per preprocessed axis."""
        return 1.0 / self.scale

    def raw_to_preprocessed(self, points) -> np.ndarray:
        """Raw array index (z, y, x) -> continuous preprocessed index. Points outside the crop box
        map outside ``[-0.5, preprocessed_shape - 0.5]``; use :meth:`inside` to check."""
        p, single = _as_points(points, self.ndim)
        q = p[:, list(self.transpose_forward)] - np.asarray(self.bbox_start, float)
        return _ret((q + 0.5) * self.scale - 0.5, single)

    def preprocessed_to_raw(self, points) -> np.ndarray:
        """Continuous preprocessed index -> raw array index (z, y, x) (exact inverse)."""
        p, single = _as_points(points, self.ndim)
        q = (p + 0.5) / self.scale - 0.5 + np.asarray(self.bbox_start, float)
        return _ret(q[:, list(self.transpose_backward)], single)

    def inside(self, points) -> np.ndarray:
        """Which continuous preprocessed points lie in a preprocessed voxel (bool, shape (n,))."""
        p, _ = _as_points(points, self.ndim)
        return np.all((p >= -0.5) & (p < np.asarray(self.preprocessed_shape) - 0.5), axis=1)


def raw_inside(points, raw_shape: Sequence[int]) -> np.ndarray:
    """Which continuous raw array indices lie in a voxel of an array of ``raw_shape`` (bool (n,))."""
    p, _ = _as_points(points, len(raw_shape))
    return np.all((p >= -0.5) & (p < np.asarray(raw_shape) - 0.5), axis=1)


def physical_to_raw(points, geometry: ImageGeometry, ndim_array: int = 3) -> np.ndarray:
    """Physical (LPS mm) -> raw array index (z, y, x)."""
    return itk_index_to_array(geometry.physical_to_index(points), ndim_array)


def raw_to_physical(points, geometry: ImageGeometry) -> np.ndarray:
    """Raw array index (z, y, x) -> physical (LPS mm)."""
    return geometry.index_to_physical(array_to_itk_index(points, geometry.ndim))


def physical_to_preprocessed(points, geometry: ImageGeometry, pre: PreprocessedGeometry) -> np.ndarray:
    """Physical (LPS mm) -> continuous preprocessed index."""
    return pre.raw_to_preprocessed(physical_to_raw(points, geometry, pre.ndim))


def preprocessed_to_physical(points, geometry: ImageGeometry, pre: PreprocessedGeometry) -> np.ndarray:
    """Continuous preprocessed index -> physical (LPS mm)."""
    return raw_to_physical(pre.preprocessed_to_raw(points), geometry)
