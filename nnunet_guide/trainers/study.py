"""Trainers for training studies (``benchmarks/click_study.py``): one trainer name whose guide
settings, foreground oversampling and checkpoint interval come from the environment, so a sweep
trains many variants without a class per variant. Not meant for production models: the model
folder keeps the settings (``guide_settings.json``, ``plans.json``), but the name does not say them.

Environment:
    NNUNET_GUIDE_STUDY: JSON object, optional keys ``settings`` (``GuideSettings`` fields, checked
        strictly), ``oversample`` (nnU-Net's ``oversample_foreground_percent``), ``click_selection``
        (``nnUNetTrainerGuide.click_selection``: where training clicks are chosen).
    NNUNET_GUIDE_SAVE_EVERY: also save ``checkpoint_epoch{N}.pth`` every N epochs (click gain
        against training length).
    NNUNET_GUIDE_EPOCHS / _ITERS / _VAL_ITERS: the short schedule (``ShortSchedule``).

``nnUNetTrainerGuideDensityStudy`` is the same with the density and texture channels of
``nnUNetTrainerGuideDensity`` (train it with the density plans ``nnUNetv2_guide_plan`` writes).
"""
import json
import os
from os.path import join

import torch

from ..settings import GuideSettings, GuideSettingsError
from .density import DensityChannels
from .guide import CLICK_SELECTIONS, nnUNetTrainerGuide
from .short import ShortSchedule, nnUNetTrainerShort

STUDY_ENV = "NNUNET_GUIDE_STUDY"
SAVE_EVERY_ENV = "NNUNET_GUIDE_SAVE_EVERY"


def study_options() -> dict:
    text = os.environ.get(STUDY_ENV, "") or "{}"
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise GuideSettingsError(f"${STUDY_ENV} is not valid JSON ({e}): {text[:200]!r}") from e
    if not isinstance(options, dict) or set(options) - {"settings", "oversample", "click_selection"}:
        raise GuideSettingsError(f"${STUDY_ENV} must be a JSON object with keys 'settings', 'oversample' and/or "
                                 f"'click_selection', got {text[:200]!r}")
    if "click_selection" in options and options["click_selection"] not in CLICK_SELECTIONS:
        raise GuideSettingsError(f"${STUDY_ENV}: 'click_selection' must be one of {', '.join(CLICK_SELECTIONS)}, "
                                 f"got {options['click_selection']!r}")
    return options


class _StudyCheckpoints:
    """Saves ``checkpoint_epoch{N}.pth`` every $NNUNET_GUIDE_SAVE_EVERY epochs (besides nnU-Net's own)."""

    def on_epoch_end(self):
        super().on_epoch_end()  # nnU-Net counts the epoch here
        every = int(os.environ.get(SAVE_EVERY_ENV, "0") or 0)
        if every > 0 and self.current_epoch % every == 0 and self.current_epoch < self.num_epochs \
                and self.local_rank == 0:
            self.save_checkpoint(join(self.output_folder, f"checkpoint_epoch{self.current_epoch}.pth"))


def _apply_oversampling(trainer, options: dict) -> None:
    if "oversample" in options:
        v = options["oversample"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise GuideSettingsError(f"${STUDY_ENV}: 'oversample' must be a number in [0, 1], got {v!r}")
        trainer.oversample_foreground_percent = float(v)


class nnUNetTrainerGuideStudy(_StudyCheckpoints, ShortSchedule, nnUNetTrainerGuide):
    """nnUNetTrainerGuide with the short schedule and settings from $NNUNET_GUIDE_STUDY."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        options = study_options()
        self.guide_settings = GuideSettings.from_dict(options.get("settings", {}), source=f"${STUDY_ENV}",
                                                      field_prefix="settings.")
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_oversampling(self, options)
        self.click_selection = options.get("click_selection", self.click_selection)


class nnUNetTrainerStudy(_StudyCheckpoints, nnUNetTrainerShort):
    """Plain nnU-Net (the baseline of a study): the short schedule, $NNUNET_GUIDE_STUDY's
    ``oversample`` and the same extra checkpoints."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_oversampling(self, study_options())


class nnUNetTrainerGuideDensityStudy(DensityChannels, nnUNetTrainerGuideStudy):
    """nnUNetTrainerGuideStudy with nnUNetTrainerGuideDensity's prior, case-specific and texture maps."""
