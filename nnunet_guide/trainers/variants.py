"""Small variants of nnUNetTrainerGuide, one choice each (pick by name with ``-tr``)."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..settings import GuideSettings
from .guide import nnUNetTrainerGuide


# ---- encodings ----------------------------------------------------------------------------
class nnUNetTrainerGuideExpDistance(nnUNetTrainerGuide):
    """exp(-d / 3 mm) click maps (distance encodings beat Gaussians in nnU-Net click forks)."""
    guide_settings = GuideSettings(encoding="exp_distance")


class nnUNetTrainerGuideBall(nnUNetTrainerGuide):
    """Clicks as balls of 4 mm radius (nnInteractive-style points)."""
    guide_settings = GuideSettings(encoding="ball")


class nnUNetTrainerGuideOriginal(nnUNetTrainerGuide):
    """The original work's guide: Gaussian sized by the object (1.4826 * MAD), 0.5 + G/2, robust
    perturbed centre, no negative channel."""
    guide_settings = GuideSettings(encoding="object_gaussian", offset_half=True, negatives=False,
                                   click_policy="center", perturb_center=True)


class nnUNetTrainerGuideInterior(nnUNetTrainerGuide):
    """Clicks at random interior voxels instead of object centres (closer to real users)."""
    guide_settings = GuideSettings(click_policy="random")


# ---- drop probability ---------------------------------------------------------------------
class nnUNetTrainerGuideAlways(nnUNetTrainerGuide):
    """Guides never dropped: best with clicks, not meant for automatic use."""
    guide_settings = GuideSettings(p_drop=0.0)


class nnUNetTrainerGuideDrop80(nnUNetTrainerGuide):
    """Guides dropped in 80% of samples: favours automatic mode."""
    guide_settings = GuideSettings(p_drop=0.8)


# ---- correction clicks (iterative click simulation) ----------------------------------------
CORRECTION = dict(p_correction=0.5, correction_rounds=2)


class nnUNetTrainerGuideCorrection(nnUNetTrainerGuide):
    """Half of the samples also get 1-2 rounds of correction clicks at the current model's
    largest errors (positive on misses, negative on false positives), as in DeepEdit/RITM."""
    guide_settings = GuideSettings(**CORRECTION)


# ---- lesion datasets (a class named "tumor": LiTS, KiTS, ...) -------------------------------
TUMOR = dict(guided_labels=("tumor",), encoding="exp_distance", sigma_mm=5.0)


class nnUNetTrainerGuideTumor(nnUNetTrainerGuide):
    """Clicks on the class named "tumor" only, as exp(-d / 5 mm) maps (the organ is segmented
    automatically; negative tumour clicks on the organ teach "this is not tumour")."""
    guide_settings = GuideSettings(**TUMOR)


class nnUNetTrainerGuideTumorCorrection(nnUNetTrainerGuide):
    """nnUNetTrainerGuideTumor with correction clicks (see nnUNetTrainerGuideCorrection)."""
    guide_settings = GuideSettings(**TUMOR, **CORRECTION)


# ---- viewer prompts: boxes, scribbles, lasso (what nnUNetv2_guide_server accepts) ---------
PROMPTS = dict(p_box=0.25, p_scribble=0.25)


class nnUNetTrainerGuidePrompts(nnUNetTrainerGuide):
    """A clicked object's prompt is a box in 25% of the cases and a scribble or lasso in 25%
    (clicks otherwise): the network sees every prompt the interactive server accepts."""
    guide_settings = GuideSettings(**PROMPTS)


class nnUNetTrainerGuideTumorPrompts(nnUNetTrainerGuide):
    """nnUNetTrainerGuideTumor with boxes, scribbles and lasso (see nnUNetTrainerGuidePrompts)."""
    guide_settings = GuideSettings(**TUMOR, **PROMPTS)


# ---- short runs (CPU tests, demos, benchmarks) ---------------------------------------------
def _short_schedule(trainer: nnUNetTrainer) -> None:
    """Few epochs and iterations, read from NNUNET_GUIDE_EPOCHS / _ITERS / _VAL_ITERS."""
    trainer.num_epochs = int(os.environ.get("NNUNET_GUIDE_EPOCHS", 2))
    trainer.num_iterations_per_epoch = int(os.environ.get("NNUNET_GUIDE_ITERS", 20))
    trainer.num_val_iterations_per_epoch = int(os.environ.get("NNUNET_GUIDE_VAL_ITERS", 5))


class nnUNetTrainerGuideShort(nnUNetTrainerGuide):
    """nnUNetTrainerGuide with a short schedule (default 2 epochs x 20 iterations; set
    NNUNET_GUIDE_EPOCHS, NNUNET_GUIDE_ITERS, NNUNET_GUIDE_VAL_ITERS to change it)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _short_schedule(self)


class nnUNetTrainerShort(nnUNetTrainer):
    """Plain nnUNetTrainer with the same short schedule as nnUNetTrainerGuideShort (the baseline)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _short_schedule(self)


class nnUNetTrainerGuideCorrectionShort(nnUNetTrainerGuideShort):
    """nnUNetTrainerGuideCorrection with the short schedule."""
    guide_settings = nnUNetTrainerGuideCorrection.guide_settings


class nnUNetTrainerGuideTumorShort(nnUNetTrainerGuideShort):
    """nnUNetTrainerGuideTumor with the short schedule (the LiTS demo's guide trainer)."""
    guide_settings = nnUNetTrainerGuideTumor.guide_settings


class nnUNetTrainerGuideTumorCorrectionShort(nnUNetTrainerGuideShort):
    """nnUNetTrainerGuideTumorCorrection with the short schedule."""
    guide_settings = nnUNetTrainerGuideTumorCorrection.guide_settings


class nnUNetTrainerGuideTumorPromptsShort(nnUNetTrainerGuideShort):
    """nnUNetTrainerGuideTumorPrompts with the short schedule."""
    guide_settings = nnUNetTrainerGuideTumorPrompts.guide_settings
