"""The network wrapper that gives an nnU-Net network its extra input channels.

Data fed to the network holds the dataset's image channels, optionally followed by the guide
channels (in layout order; a model without guides has none). Missing guide channels mean "no guide" (automatic mode),
which is how stock ``nnUNetv2_predict`` and nnU-Net's own validation drive the model. Channels
computed from the image (density, texture) are produced here by ``feature_module``, so training
and inference compute them with the same code on the same tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .settings import ChannelLayout


class ExtraChannelNetwork(nn.Module):
    """Wraps an nnU-Net network built for ``layout.num_channels`` input channels: the image
    channels, the layout's guide channels (if any) and its computed channels (if any).

    Args:
        base: the nnU-Net network (e.g. ``PlainConvUNet``) taking all layout channels.
        layout: the model's channel layout.
        feature_module: optional module mapping the fed channels (image + guides, shape
            (B, n_fed, *spatial)) to computed channels (B, n_computed, *spatial).

    ``forward`` accepts (B, num_image_channels, *spatial) or (B, num_image_channels + n_guide,
    *spatial) and returns what ``base`` returns. ``decoder`` and ``encoder`` are the base
    network's, so nnU-Net's deep-supervision switch keeps working.
    """

    def __init__(self, base: nn.Module, layout: ChannelLayout, feature_module: Optional[nn.Module] = None):
        super().__init__()
        self.base = base
        self.feature_module = feature_module
        self.num_image_channels = layout.num_image_channels
        self.num_guide_channels = len(layout.guide_channel_indices)
        self.no_guide_value = layout.guide.no_guide_value if layout.guide is not None else 0.0
        self.num_channels = layout.num_channels

    @property
    def decoder(self):
        return self.base.decoder

    @property
    def encoder(self):
        return self.base.encoder

    @property
    def num_fed_channels(self) -> int:
        return self.num_image_channels + self.num_guide_channels

    def complete_input(self, x: torch.Tensor) -> torch.Tensor:
        """Image (+ guide) channels -> all channels the base network takes."""
        c = x.shape[1]
        if c == self.num_image_channels and self.num_guide_channels:
            fill = torch.full((x.shape[0], self.num_guide_channels, *x.shape[2:]), self.no_guide_value,
                              dtype=x.dtype, device=x.device)
            x = torch.cat((x, fill), dim=1)
        elif c != self.num_fed_channels:
            raise ValueError(
                f"guide-aware network got {c} input channels; it takes {self.num_image_channels} image channels "
                f"(automatic mode) or {self.num_fed_channels} (image + {self.num_guide_channels} guide channels)")
        if self.feature_module is not None:
            x = torch.cat((x, self.feature_module(x)), dim=1)
        return x

    def forward(self, x: torch.Tensor):
        return self.base(self.complete_input(x))


#: former name (it also wraps models without guides); checkpoints store weights only, so both work
GuidedNetwork = ExtraChannelNetwork
