"""Trainers, importable here and discoverable by nnU-Net after ``eval "$(nnUNetv2_guide_env)"``."""
from .guide import nnUNetTrainerGuide
from .variants import (nnUNetTrainerGuideAlways, nnUNetTrainerGuideBall, nnUNetTrainerGuideDrop80,
                       nnUNetTrainerGuideExpDistance, nnUNetTrainerGuideInterior, nnUNetTrainerGuideOriginal,
                       nnUNetTrainerGuideShort, nnUNetTrainerShort)

__all__ = [
    "nnUNetTrainerGuide", "nnUNetTrainerGuideAlways", "nnUNetTrainerGuideBall", "nnUNetTrainerGuideDrop80",
    "nnUNetTrainerGuideExpDistance", "nnUNetTrainerGuideInterior", "nnUNetTrainerGuideOriginal",
    "nnUNetTrainerGuideShort", "nnUNetTrainerShort",
]

try:  # density trainers (issue 3) live beside the guide trainers
    from .density import *  # noqa: F401,F403
    from . import density as _density
    __all__ += [n for n in dir(_density) if n.startswith("nnUNetTrainer")]
except ModuleNotFoundError as _e:  # pragma: no cover - only while density.py does not exist
    if _e.name != __name__ + ".density":
        raise
