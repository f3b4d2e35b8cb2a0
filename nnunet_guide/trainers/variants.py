"""Small variants of nnUNetTrainerGuide, one choice each (pick by name with ``-tr``)."""
from ..settings import GuideSettings
from .guide import nnUNetTrainerGuide
from .short import ShortSchedule, nnUNetTrainerShort  # noqa: F401 (nnUNetTrainerShort: former home)


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
    """Clicks at the interior-most voxel of each object (farthest from its border) instead of its
    centre (the centre of a curved object may lie outside it).

    Until the package's restructuring (issue 11) this name used the ``random`` policy (now
    :class:`nnUNetTrainerGuideRandomClick`). Models trained then still predict as before: their
    model folder records the policy they were trained with (``guide_settings.json``), and the
    policy only decides where training clicks go. Continue training such a model
    (``nnUNetv2_train --c``) with the ``random`` policy by subclassing this trainer with
    ``guide_settings = nnUNetTrainerGuideRandomClick.guide_settings``."""
    guide_settings = GuideSettings(click_policy="interior")


class nnUNetTrainerGuideRandomClick(nnUNetTrainerGuide):
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
    largest errors (positive on misses, negative on false positives), as in DeepEdit/RITM.
    On 236 held-out hippocampus cases, trained for 1500 iterations (three folds), three click
    steps added three times the base trainer's Dice at the same automatic Dice, and 5-9% of the
    clicks harmed (base trainer: 1-3%); trained for 3000 iterations (two folds), 0.8-2.3% harmed
    with the same gain (docs/click-study.md)."""
    guide_settings = GuideSettings(**CORRECTION)


# ---- lesion datasets (a class named "tumor": LiTS, KiTS, ...) -------------------------------
TUMOR = dict(guided_labels=("tumor",), encoding="exp_distance", sigma_mm=5.0)


class nnUNetTrainerGuideTumor(nnUNetTrainerGuide):
    """Clicks on the class named "tumor" only, as exp(-d / 5 mm) maps (the organ is segmented
    automatically; negative tumour clicks on the organ teach "this is not tumour")."""
    guide_settings = GuideSettings(**TUMOR)


class nnUNetTrainerGuideTumorCorrection(nnUNetTrainerGuide):
    """nnUNetTrainerGuideTumor with correction clicks (see nnUNetTrainerGuideCorrection). On the LiTS
    slabs trained for 3000 iterations (two folds) its automatic tumour Dice was nnUNetTrainerGuideTumor's
    and its clicks added more, but liver Dice (never clicked) was 0.04 lower on both folds; with half
    of the samples automatic (p_drop 0.67, p_correction 0.25) one fold's liver came back, the other's
    did not (docs/click-study.md)."""
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


class nnUNetTrainerGuidePromptsCorrection(nnUNetTrainerGuide):
    """Boxes, scribbles and lasso (nnUNetTrainerGuidePrompts) and correction clicks
    (nnUNetTrainerGuideCorrection): the recipe for a model that people click, box and scribble.
    On 236 held-out hippocampus cases 4.4% (anterior) and 7.6% (posterior) of its clicks harmed,
    among the fewest of the variants studied, with the second-largest gain after three click steps
    (one training; docs/click-study.md). Not for lesion datasets yet: its tumour twin lost 3 lesions
    to clicks on other lesions on the LiTS slabs, where the tumour trainers lost none."""
    guide_settings = GuideSettings(**PROMPTS, **CORRECTION)


# ---- short runs (CPU tests, demos, benchmarks) ---------------------------------------------
class nnUNetTrainerGuideShort(ShortSchedule, nnUNetTrainerGuide):
    """nnUNetTrainerGuide with a short schedule (default 2 epochs x 20 iterations; set
    NNUNET_GUIDE_EPOCHS, NNUNET_GUIDE_ITERS, NNUNET_GUIDE_VAL_ITERS to change it)."""


class nnUNetTrainerGuideCorrectionShort(ShortSchedule, nnUNetTrainerGuideCorrection):
    """nnUNetTrainerGuideCorrection with the short schedule."""


class nnUNetTrainerGuideTumorShort(ShortSchedule, nnUNetTrainerGuideTumor):
    """nnUNetTrainerGuideTumor with the short schedule (the LiTS demo's guide trainer)."""


class nnUNetTrainerGuideTumorCorrectionShort(ShortSchedule, nnUNetTrainerGuideTumorCorrection):
    """nnUNetTrainerGuideTumorCorrection with the short schedule."""


class nnUNetTrainerGuideTumorPromptsShort(ShortSchedule, nnUNetTrainerGuideTumorPrompts):
    """nnUNetTrainerGuideTumorPrompts with the short schedule."""
