"""Writing images: one atomic writer for arrays and SimpleITK images."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .settings import write_atomic


def to_sitk(array: np.ndarray, spacing_zyx: Sequence[float], origin: Optional[Sequence[float]] = None,
            direction: Optional[Sequence[float]] = None):
    """A SimpleITK image of a (z, y, x) array, spacing given in array order (mm)."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in tuple(spacing_zyx)[::-1]))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    return img


def write_image(path: str, image: Union[np.ndarray, "object"], spacing_zyx: Optional[Sequence[float]] = None,
                origin: Optional[Sequence[float]] = None, direction: Optional[Sequence[float]] = None) -> None:
    """Write an image atomically (a temporary file beside ``path`` renamed into place, so readers
    never see half a file), compressed where the format allows.

    Args:
        image: a SimpleITK image, or a (z, y, x) array with ``spacing_zyx`` (mm per array axis)
            and optional ITK ``origin`` / ``direction``.
    """
    import SimpleITK as sitk
    if not isinstance(image, sitk.Image):
        if spacing_zyx is None:
            raise ValueError(f"{path}: an image array needs its spacing (z, y, x)")
        image = to_sitk(np.asarray(image), spacing_zyx, origin, direction)
    write_atomic(path, lambda tmp: sitk.WriteImage(image, tmp, True))
