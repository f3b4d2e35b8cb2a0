"""Trainers, importable here and discoverable by nnU-Net after ``eval "$(nnUNetv2_guide_env)"``."""
from . import density as _density
from . import study as _study
from . import variants as _variants
from .density import *  # noqa: F401,F403
from .guide import nnUNetTrainerGuide
from .study import nnUNetTrainerGuideStudy, nnUNetTrainerStudy
from .variants import *  # noqa: F401,F403

__all__ = sorted({n for m in (_variants, _density, _study) for n in dir(m)
                  if n.startswith("nnUNetTrainer") and n != "nnUNetTrainer"})
