"""nnUNetTrainerExtraChannels: nnU-Net's trainer with a network that takes extra input channels.

The neutral base of every trainer here. It knows the model's channel layout (image channels,
then guide channels, then channels computed inside the network) but none of its kinds:

- the layout is resolved against the dataset in ``__init__`` and stored in the trainer's copy of
  the plans (key ``nnunet_guide``), so the model folder's plans.json lets stock
  ``nnUNetv2_predict`` rebuild the network, and written to ``guide_settings.json``;
- ``build_network_architecture`` wraps nnU-Net's network in an :class:`ExtraChannelNetwork`.

Guide channels come from :class:`~nnunet_guide.trainers.guide.nnUNetTrainerGuide` (which
overrides :meth:`guided_targets` and the data pipeline), computed channels from the
:class:`~nnunet_guide.trainers.density.DensityChannels` mixin (which overrides
:meth:`feature_channels` and :meth:`build_feature_module`).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from ..network import ExtraChannelNetwork
from ..settings import (PLANS_KEY, ChannelLayout, GuidedTarget, GuideSettings, GuideSettingsError, build_layout,
                        layout_from_plans, save_layout)


class nnUNetTrainerExtraChannels(nnUNetTrainer):
    """nnU-Net's trainer whose network takes the channel layout's extra input channels; with
    nothing overridden the layout holds the image channels only."""

    #: guide settings of the layout; None: no guide channels
    guide_settings: Optional[GuideSettings] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net keeps the dict it is given as its plans (and edits it); the layout is added to the
        # trainer's own copy, so the caller's plans stay as they were. That copy travels into the
        # model folder (plans.json) and the checkpoint; nnU-Net's plans file is never written.
        super().__init__(copy.deepcopy(plans), configuration, fold, dataset_json, device)
        self.layout = self.make_layout()
        self.plans_manager.plans[PLANS_KEY] = self.layout.to_dict()

    # ---- layout -------------------------------------------------------------------------
    def guided_targets(self) -> List[GuidedTarget]:
        """The classes that get guide channels, in channel order; none here."""
        return []

    def make_layout(self) -> ChannelLayout:
        n_img = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
        names = list(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})).values())
        names += [f"cascade_{l}" for l in self.label_manager.foreground_labels][:max(0, n_img - len(names))]
        channels, extra = self.feature_channels()
        return build_layout(n_img, self.guided_targets(), self.guide_settings, names, channels, extra)

    def feature_channels(self) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
        """Channels computed inside the network (density, texture) and their data; none here."""
        return [], {}

    @staticmethod
    def build_feature_module(layout: ChannelLayout) -> Optional[nn.Module]:
        """Module computing the layout's computed channels from the fed ones; none here."""
        return None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        layout = layout_from_plans(plans_manager.plans)
        if layout is None:
            raise GuideSettingsError(
                f"{cls.__name__}: the plans have no {PLANS_KEY!r} entry. A guide-aware network is rebuilt "
                f"from the plans.json its trainer wrote into the model folder; this one was not written by an "
                f"nnunet_guide trainer.")
        if layout.num_image_channels != num_input_channels:
            raise GuideSettingsError(
                f"{cls.__name__}: dataset.json gives {num_input_channels} input channels but the model was "
                f"trained with {layout.num_image_channels} image channels ({PLANS_KEY} in plans.json)")
        base = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, layout.num_channels,
                                                        num_output_channels, enable_deep_supervision)
        return ExtraChannelNetwork(base, layout, cls.build_feature_module(layout))

    # ---- bookkeeping --------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            save_layout(self.layout, self.output_folder_base)
