"""Density trainers: intensity-histogram and texture inputs, with or without guide channels.

All of them read the class-conditional histograms that ``nnUNetv2_guide_plan`` wrote into a
derived plans file (train with ``-p nnUNetPlans_density``) and record them, with the density
options, in the model's channel layout (plans.json key ``nnunet_guide`` and
guide_settings.json). The network computes the channels itself from the image (and guide)
channels it receives (see :mod:`nnunet_guide.density_network`), so training, nnU-Net's
validation, stock ``nnUNetv2_predict`` and guided prediction compute them identically.

The channels come from one mixin, :class:`DensityChannels`, on top of the neutral
:class:`~nnunet_guide.trainers.base.nnUNetTrainerExtraChannels` (no guides) or of
:class:`~nnunet_guide.trainers.guide.nnUNetTrainerGuide`:

* ``nnUNetTrainerDensity``: density maps (dataset prior) + texture maps, no guides.
* ``nnUNetTrainerGuideDensity``: guides + dataset prior + case-specific maps + texture.
* ``nnUNetTrainerGuideDensityFiLM``: guides + the original FiLM conditioning (histogram vector
  -> MLP -> encoder-stage scales), no density maps.
* ``nnUNetTrainerDensityFiLM``: FiLM from the patch histogram only, no guides.
* ``...Short`` variants: the short CPU schedule (:class:`~nnunet_guide.trainers.short.ShortSchedule`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from ..core.density import DensityError, DensityOptions, density_channels, validate_histograms
from ..density_network import EXTRA_KEY, FiLMConditioner, build_density_module, density_layout_extra
from ..preprocessing.density_plans import PLANS_DENSITY_KEY
from ..settings import ChannelLayout
from .base import nnUNetTrainerExtraChannels
from .guide import nnUNetTrainerGuide
from .short import ShortSchedule

def planned_histograms(plans: dict, configuration: str, plans_file: str) -> Dict[str, Any]:
    """The histograms planned for ``configuration`` (or for another configuration with the same
    preprocessed data), checked. DensityError naming ``plans_file`` if there are none."""
    entry = plans.get(PLANS_DENSITY_KEY)
    hint = (f"run `nnUNetv2_guide_plan -d {plans.get('dataset_name', 'DATASET')} -c {configuration} "
            f"-p nnUNetPlans` after nnU-Net's planning and preprocessing, then train with "
            f"`-p nnUNetPlans_density`")
    if not isinstance(entry, dict) or not isinstance(entry.get("configurations"), dict):
        raise DensityError(
            f"{plans_file} (plans {plans.get('plans_name')!r}) has no planned density histograms (key "
            f"{PLANS_DENSITY_KEY!r}); density trainers need them: {hint}")
    cfgs = entry["configurations"]
    h = cfgs.get(configuration)
    if h is None:
        ident = plans.get("configurations", {}).get(configuration, {}).get("data_identifier")
        h = next((v for v in cfgs.values() if ident is not None and v.get("data_identifier") == ident), None)
    if h is None:
        raise DensityError(
            f"{plans_file}: density histograms were planned for configuration(s) {sorted(cfgs)}, not for "
            f"{configuration!r}: {hint}")
    validate_histograms(h, source=f"{plans_file} [{PLANS_DENSITY_KEY}][{configuration}]")
    return h


class DensityChannels:
    """Mixin (put it first) for an :class:`nnUNetTrainerExtraChannels`: the density and texture
    channels of ``density_options``, computed inside the network from the fed channels; the
    case-specific maps follow the trainer's guided classes (none without guides)."""

    density_options: DensityOptions = DensityOptions()

    # ---- layout ---------------------------------------------------------------------------
    def _plans_file(self) -> str:
        folder = self.preprocessed_dataset_folder_base or os.path.join("$nnUNet_preprocessed",
                                                                       self.plans_manager.dataset_name)
        return os.path.join(folder, self.plans_manager.plans_name + ".json")

    def feature_channels(self) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        plans_file = self._plans_file()
        hist = planned_histograms(self.plans_manager.plans, self.configuration_name, plans_file)
        if self.configuration_manager.previous_stage_name is not None:
            raise DensityError(
                f"{type(self).__name__}: configuration {self.configuration_name!r} is a cascade stage; density "
                f"channels are only planned for the dataset's own image channels (use a non-cascade configuration)")
        n_img = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        names = [str(v) for v in self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})).values()]
        if n_img != len(hist["channels"]):
            raise DensityError(
                f"{plans_file}: histograms were planned for {len(hist['channels'])} input channel(s) "
                f"({[c['name'] for c in hist['channels']]}), but dataset.json gives {n_img} ({names}); "
                f"re-run nnUNetv2_guide_plan on this dataset")
        opts = self.density_options
        targets = [(t.name, t.labels) for t in self.guided_targets()] if opts.case else []
        patch = list(self.configuration_manager.patch_size)
        spacing = [float(s) for s in self.configuration_manager.spacing][-len(patch):]
        extra = density_layout_extra(
            opts, hist, spacing,
            source={"plans_name": self.plans_manager.plans_name, "plans_file": plans_file,
                    "configuration": self.configuration_name},
            features_per_stage=self.configuration_manager.network_arch_init_kwargs.get("features_per_stage"))
        return density_channels(opts, hist, names, targets), {EXTRA_KEY: extra}

    @staticmethod
    def build_feature_module(layout: ChannelLayout) -> Optional[nn.Module]:
        return build_density_module(layout)

    def do_split(self):
        """nnU-Net's split, refused when the histograms were planned for one fold
        (``nnUNetv2_guide_plan --fold``) and this fold's held-out cases are among their cases:
        the held-out cases' class intensities would be in the network's prior."""
        tr_keys, val_keys = super().do_split()
        planned = self.layout.extra.get(EXTRA_KEY, {}).get("histograms", {}).get("training_cases")
        if planned is not None:
            held_out = sorted(set(planned) - set(tr_keys))
            if held_out:
                hist = self.layout.extra[EXTRA_KEY]["histograms"]
                raise DensityError(
                    f"{self._plans_file()}: its density histograms were planned from fold {hist.get('fold')}'s "
                    f"training cases, and {len(held_out)} of them are not training cases of fold {self.fold} (e.g. "
                    f"{held_out[:3]}): train fold {hist.get('fold')} with these plans, or plan fold {self.fold}: "
                    f"`nnUNetv2_guide_plan -d {self.plans_manager.dataset_name} -c {self.configuration_name} "
                    f"-p {self.plans_manager.plans.get(PLANS_DENSITY_KEY, {}).get('source_plans', 'nnUNetPlans')} "
                    f"--fold {self.fold}`")
        return tr_keys, val_keys

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        net = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                 num_output_channels, enable_deep_supervision)
        if isinstance(net.feature_module, FiLMConditioner):
            net.feature_module.attach(net.base)
        return net

    def _do_i_compile(self):
        # FiLM works through forward hooks and per-forward state, which torch.compile does not trace
        if self.density_options.film:
            return False
        return super()._do_i_compile()


class nnUNetTrainerDensity(DensityChannels, nnUNetTrainerExtraChannels):
    """Dataset-prior density maps and texture maps as extra input channels; no guide channels."""


class nnUNetTrainerGuideDensity(DensityChannels, nnUNetTrainerGuide):
    """Guide channels (nnUNetTrainerGuide's defaults) + prior, case-specific and texture maps."""


class nnUNetTrainerGuideDensityFiLM(DensityChannels, nnUNetTrainerGuide):
    """Guide channels + the original FiLM density branch (patch and guide histograms -> MLP ->
    per-channel scales of encoder stages 2..n, starting as identity); no density maps."""
    density_options = DensityOptions(film=True, prior=False, case=False, texture=False)


class nnUNetTrainerDensityFiLM(nnUNetTrainerDensity):
    """FiLM conditioning by the patch histogram only; no guides, no density maps."""
    density_options = DensityOptions(film=True, prior=False, case=False, texture=False)


class nnUNetTrainerDensityNoTexture(nnUNetTrainerDensity):
    """Dataset-prior maps only (ablation: is texture needed?)."""
    density_options = DensityOptions(texture=False)


class nnUNetTrainerGuideDensityNoTexture(nnUNetTrainerGuideDensity):
    """Guides + prior and case maps, no texture (ablation)."""
    density_options = DensityOptions(texture=False)


# ---- short schedules (CPU tests, benchmarks) --------------------------------------------------
class nnUNetTrainerDensityShort(ShortSchedule, nnUNetTrainerDensity):
    """nnUNetTrainerDensity with the short schedule (NNUNET_GUIDE_EPOCHS / _ITERS / _VAL_ITERS)."""


class nnUNetTrainerGuideDensityShort(ShortSchedule, nnUNetTrainerGuideDensity):
    """nnUNetTrainerGuideDensity with the short schedule."""


class nnUNetTrainerGuideDensityFiLMShort(ShortSchedule, nnUNetTrainerGuideDensityFiLM):
    """nnUNetTrainerGuideDensityFiLM with the short schedule."""


__all__ = [
    "PLANS_DENSITY_KEY", "planned_histograms", "DensityChannels",
    "nnUNetTrainerDensity", "nnUNetTrainerGuideDensity", "nnUNetTrainerGuideDensityFiLM",
    "nnUNetTrainerDensityFiLM", "nnUNetTrainerDensityNoTexture", "nnUNetTrainerGuideDensityNoTexture",
    "nnUNetTrainerDensityShort", "nnUNetTrainerGuideDensityShort", "nnUNetTrainerGuideDensityFiLMShort",
]
