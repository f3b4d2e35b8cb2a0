"""Trainers, importable here and discoverable by nnU-Net after ``eval "$(nnUNetv2_guide_env)"``.

``base``: the neutral extra-channels trainer; ``guide``: guide channels; ``density``: the density
mixin and its trainers; ``short``: the short-schedule mixin; ``variants``: one-choice guide
variants. nnU-Net finds a trainer by class name, so every name in ``__all__`` is a ``-tr`` value.
"""
from . import base as _base
from . import density as _density
from . import guide as _guide
from . import short as _short
from . import study as _study
from . import variants as _variants
from .base import nnUNetTrainerExtraChannels
from .density import *  # noqa: F401,F403
from .density import DensityChannels
from .guide import nnUNetTrainerGuide
from .short import ShortSchedule, nnUNetTrainerShort
from .study import nnUNetTrainerGuideDensityStudy, nnUNetTrainerGuideStudy, nnUNetTrainerStudy
from .variants import *  # noqa: F401,F403

__all__ = sorted({n for m in (_base, _guide, _short, _study, _variants, _density) for n in dir(m)
                  if n.startswith("nnUNetTrainer") and n != "nnUNetTrainer"})
