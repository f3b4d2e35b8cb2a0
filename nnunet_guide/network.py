"""The network wrapper that gives an nnU-Net network its extra input channels.

Data fed to the network holds the dataset's image channels, optionally followed by the guide
channels (in layout order; a model without guides has none). Missing guide channels mean "no guide" (automatic mode),
which is how stock ``nnUNetv2_predict`` and nnU-Net's own validation drive the model. Channels
computed from the image (density, texture) are produced here by ``feature_module``, so training
and inference compute them with the same code on the same tensors.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .core.consistency import samples_with_guides
from .settings import ChannelLayout, GuideSettingsError


class StageGuides(nn.Module):
    """The guide channels entering every encoder stage, not only the input (``guide_entry =
    "every_stage"``): each stage's output gets a 1x1 convolution of the guides, max-pooled to the
    stage's grid (a click's peak survives the pooling), added to it. The convolutions start at
    zero, so an untrained model computes exactly what the input-only network computes, and
    automatic mode (guides at their no-click value) adds only a learned constant per channel.

    Args:
        num_guide_channels: the layout's guide channels.
        stage_channels: output channels of each encoder stage.
        conv_op: the encoder's convolution (``nn.Conv2d`` or ``nn.Conv3d``).
    """

    def __init__(self, num_guide_channels: int, stage_channels: List[int], conv_op):
        super().__init__()
        self.proj = nn.ModuleList(conv_op(num_guide_channels, c, kernel_size=1) for c in stage_channels)
        for p in self.proj:
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def forward(self, i: int, features: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
        """Stage ``i``'s features plus its projection of ``guides`` (full-resolution guide channels)."""
        if guides.shape[2:] != features.shape[2:]:
            pool = F.adaptive_max_pool3d if guides.ndim == 5 else F.adaptive_max_pool2d
            guides = pool(guides, features.shape[2:])
        return features + self.proj[i](guides.to(features.dtype))


def build_stage_guides(base: nn.Module, layout: ChannelLayout) -> Optional[StageGuides]:
    """``StageGuides`` for ``base``'s encoder when the layout's guides enter every stage, else None.
    The encoder must be dynamic_network_architectures' (``stages``, ``output_channels``,
    ``conv_op``, skips returned), as nnU-Net's plain and residual U-Nets are."""
    if layout.guide is None or layout.guide.guide_entry != "every_stage" or not layout.guide_channel_indices:
        return None
    enc = getattr(base, "encoder", None)
    stages, widths = getattr(enc, "stages", None), getattr(enc, "output_channels", None)
    if stages is None or widths is None or not getattr(enc, "return_skips", False) or \
            len(stages) != len(widths) or not hasattr(base, "decoder"):
        raise GuideSettingsError(
            f"guide_entry 'every_stage' needs an nnU-Net U-Net whose encoder has stages, output_channels "
            f"and returns its skips (PlainConvUNet, ResidualEncoderUNet); {type(base).__name__} does not. "
            f"Use guide_entry 'input' for this architecture.")
    return StageGuides(len(layout.guide_channel_indices), list(widths), enc.conv_op)


class AutomaticNormStatistics:
    """Instance normalisation with the statistics of automatic mode (``norm_statistics =
    "automatic"``): forward hooks on every instance norm of a network. In a ``record`` pass (the
    samples with their guides removed; with gradient in training, so the statistics stay in the
    graph as an instance norm's do) each norm's per-sample, per-channel mean and
    variance are kept; in the ``apply`` pass that follows (the same samples with their guides,
    among others) the samples listed in ``rows`` are normalised with the kept statistics instead of
    their own, the others as nnU-Net normalises. Norms that track running statistics are left alone.
    Outside the two passes the hooks do nothing.

    The automatic statistics of a window do not depend on its clicks, so an interactive session
    keeps them (``cache``, a dict it owns, with :meth:`begin_window` naming the window before it
    is predicted): a click then costs one pass, not two. Calls within one window (folds, mirrors)
    are told apart by their order, which nnU-Net's predictor keeps fixed.

    The automatic pass of a training step is also the automatic output of its clicked samples:
    :meth:`automatic_output` hands it on (to the consistency term), and :meth:`automatic_prediction`
    with its graph (to the automatic-mode loss), so it is not computed twice."""

    def __init__(self, network: nn.Module):
        self.norms = [m for m in network.modules()
                      if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats]
        self.mode: Optional[str] = None
        self.stats: List = []
        self.index = 0
        self.rows: Optional[torch.Tensor] = None
        self.cache: Optional[dict] = None
        self.window = None
        self.calls = 0
        self.recorded = 0  # automatic passes run (not taken from the cache)
        self._automatic = None  # (rows, output, with its graph) of the last automatic pass run with gradient
        for m in self.norms:
            m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.mode is None:
            return None
        x = inputs[0]
        if self.mode == "record":
            xf = x.float()
            dims = tuple(range(2, x.ndim))
            self.stats.append((xf.mean(dims), xf.var(dims, unbiased=False)))
            return None
        if self.index >= len(self.stats):
            raise RuntimeError("automatic norm statistics: the guided pass ran more instance norms than the "
                               "automatic pass recorded")
        mean, var = self.stats[self.index]
        self.index += 1
        xr = x[self.rows].float()
        r, c = xr.shape[:2]
        if mean.requires_grad:  # training: the statistics are part of the graph, as an instance norm's are
            shape = (r, c) + (1,) * (xr.ndim - 2)
            y = (xr - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
            if module.affine:
                y = y * module.weight.float().view(1, c, *shape[2:]) + module.bias.float().view(1, c, *shape[2:])
        else:  # the clicked rows, normalised with the kept statistics by one fused batch norm over (row, channel)
            weight = module.weight.float().repeat(r) if module.affine else None
            bias = module.bias.float().repeat(r) if module.affine else None
            y = F.batch_norm(xr.reshape(1, r * c, *xr.shape[2:]), mean.reshape(-1), var.reshape(-1), weight, bias,
                             training=False, eps=module.eps).reshape(xr.shape)
        return output.index_put((self.rows,), y.to(output.dtype))

    def run(self, network_pass, automatic, guided: torch.Tensor, rows: torch.Tensor):
        """Run ``network_pass(guided)``, normalising the samples ``rows`` with the statistics of
        ``network_pass(automatic())`` (their input without guides; built only when the statistics of
        this call are not kept already)."""
        key = None
        if self.cache is not None and self.window is not None:
            key, self.calls = (self.window, self.calls, tuple(rows.tolist())), self.calls + 1
        self.stats, self.index, self.rows, self._automatic = [], 0, rows, None
        try:
            if key is not None and key in self.cache:
                self.stats = self.cache[key]
            else:
                # with gradient where the guided pass has one (training): the statistics then scale with
                # the weights as an instance norm's do, so the loss stays invariant to a layer's scale.
                # Kept apart from the graph, they let the weights before each norm grow unchecked, and in
                # a LiTS training without the click term the tumour class never came alive.
                self.mode = "record"
                out = network_pass(automatic())
                self.recorded += 1
                if torch.is_grad_enabled():
                    self._automatic = (rows, out)
                if key is not None:
                    self.cache[key] = self.stats
            self.mode = "apply"
            out = network_pass(guided)
            if self.index != len(self.stats):
                raise RuntimeError(f"automatic norm statistics: the automatic pass ran {len(self.stats)} instance "
                                   f"norms, the guided pass {self.index}")
            return out
        finally:
            self.mode, self.stats, self.rows = None, [], None

    def automatic_output(self, rows: torch.Tensor) -> torch.Tensor:
        """The full-resolution output (no gradient) of the last automatic pass run with gradient
        (a training step's), which must have been of the samples ``rows``."""
        out = self.automatic_prediction(rows)
        return (out[0] if isinstance(out, (list, tuple)) else out).detach()

    def automatic_prediction(self, rows: torch.Tensor):
        """The whole output (every deep-supervision scale, with its graph) of the last automatic
        pass run with gradient (a training step's), which must have been of the samples ``rows``."""
        if self._automatic is None:
            raise RuntimeError("automatic norm statistics: no automatic pass with gradient has run (the automatic "
                               "output is kept from a training step's forward pass only)")
        kept, out = self._automatic
        if not torch.equal(kept.cpu(), rows.cpu()):
            raise RuntimeError(f"automatic norm statistics: the automatic pass ran samples {kept.tolist()}, "
                               f"asked for {rows.tolist()}")
        return out

    def release(self) -> None:
        """Drop the kept automatic pass (a training step calls this when its loss is computed)."""
        self._automatic = None

    def begin_window(self, window) -> None:
        """Name the window the next network calls predict (a hashable key; None: no caching)."""
        self.window, self.calls = window, 0


def automatic_norm_statistics(network: nn.Module) -> Optional[AutomaticNormStatistics]:
    """The :class:`AutomaticNormStatistics` of a wrapped network, possibly compiled
    (``_orig_mod``) or in DDP (``module``); None if it has none."""
    for _ in range(3):
        if network is None or getattr(network, "_norm_statistics", None) is not None:
            break
        network = getattr(network, "_orig_mod", None) or getattr(network, "module", None)
    return getattr(network, "_norm_statistics", None)


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
    network's, so nnU-Net's deep-supervision switch keeps working. With ``guide_entry =
    "every_stage"`` the wrapper runs the base encoder's stages itself and adds ``stage_guides``
    to each stage's output before the decoder (see :class:`StageGuides`). With ``norm_statistics
    = "automatic"`` the samples with clicks are normalised with the statistics of their automatic
    pass (:class:`AutomaticNormStatistics`).
    """

    def __init__(self, base: nn.Module, layout: ChannelLayout, feature_module: Optional[nn.Module] = None):
        super().__init__()
        self.base = base
        self.feature_module = feature_module
        self.num_image_channels = layout.num_image_channels
        self.num_guide_channels = len(layout.guide_channel_indices)
        self.no_guide_value = layout.guide.no_guide_value if layout.guide is not None else 0.0
        self.num_channels = layout.num_channels
        self.stage_guides = build_stage_guides(base, layout)
        automatic = (layout.guide is not None and self.num_guide_channels
                     and getattr(layout.guide, "norm_statistics", "with_guides") == "automatic")
        self._norm_statistics = AutomaticNormStatistics(self) if automatic else None

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
        if self._norm_statistics is not None and x.shape[1] == self.num_fed_channels:
            guides = x[:, self.num_image_channels:self.num_fed_channels]
            rows = samples_with_guides(guides, self.no_guide_value)
            if rows.numel():
                def automatic():
                    with torch.no_grad():
                        return self.complete_input(x[rows][:, :self.num_image_channels])
                return self._norm_statistics.run(self._run, automatic, self.complete_input(x), rows)
        return self._run(self.complete_input(x))

    def _run(self, x: torch.Tensor):
        """The base network (with the stage guides, if any) on all its input channels."""
        if self.stage_guides is None:
            return self.base(x)
        guides = x[:, self.num_image_channels:self.num_fed_channels]
        enc = self.base.encoder
        h = enc.stem(x) if getattr(enc, "stem", None) is not None else x
        skips = []
        for i, stage in enumerate(enc.stages):
            h = self.stage_guides(i, stage(h), guides)
            skips.append(h)
        return self.base.decoder(skips)


#: former name (it also wraps models without guides); checkpoints store weights only, so both work
GuidedNetwork = ExtraChannelNetwork
