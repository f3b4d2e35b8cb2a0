"""Torch modules that compute density and texture inputs inside a guide-aware network.

Both modules are rebuilt from a :class:`~nnunet_guide.settings.ChannelLayout` alone (its
``extra["density"]`` holds the options and the planned histograms), so training and every kind
of inference construct the same module from the model folder's plans.json. They are plugged
into :class:`~nnunet_guide.network.GuidedNetwork` as its ``feature_module``: they receive the fed
channels (B, image + guide channels, *spatial), with missing guides already filled with the
"no guide" value, and return the computed channels.

* :class:`DensityFeatures` returns spatially varying maps (prior, case, texture), which unlike
  a constant plane survive the first instance normalisation (method.md, section 4).
* :class:`FiLMConditioner` returns no channel; it turns the patch and guide histograms into a
  vector, an MLP into per-channel scales, and multiplies the outputs of the base network's
  encoder stages by them (forward hooks installed by :meth:`FiLMConditioner.attach`).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .core.density import (FAR_OUTSIDE_MARGIN, FAR_OUTSIDE_WARN_FRACTION, DensityError, DensityOptions,
                           bin_coordinates, case_tables, density_channels, histogram_vector, lookup,
                           out_of_range_fraction, prior_tables, smooth_histograms, validate_histograms,
                           weighted_histograms)
from .core.texture import texture_features
from .settings import ChannelLayout

EXTRA_KEY = "density"


def density_extra(layout: ChannelLayout) -> Dict[str, Any]:
    """``layout.extra["density"]``, checked; DensityError if the layout has none."""
    ex = layout.extra.get(EXTRA_KEY)
    if not isinstance(ex, dict) or "histograms" not in ex or "options" not in ex:
        raise DensityError(
            "this channel layout has no density histograms (extra['density']); it was not written by a "
            "density trainer, or its plans.json/guide_settings.json lost the entry")
    validate_histograms(ex["histograms"], source=ex.get("source", {}).get("plans_file", "layout extra['density']"))
    return ex


class _HistogramInputs(nn.Module):
    """Shared part: planned ranges, guide-channel bookkeeping, input checks, range warning."""

    def __init__(self, layout: ChannelLayout):
        super().__init__()
        ex = density_extra(layout)
        self.options = DensityOptions.from_dict(ex["options"])
        h = ex["histograms"]
        self.num_bins = int(h["num_bins"])
        self.num_image_channels = layout.num_image_channels
        if len(h["channels"]) != self.num_image_channels:
            raise DensityError(
                f"the planned histograms cover {len(h['channels'])} input channel(s) but the layout has "
                f"{self.num_image_channels} image channel(s)")
        self.num_fed_channels = layout.num_image_channels + len(layout.guide_channel_indices)
        self.register_buffer("lo", torch.tensor([c["range"][0] for c in h["channels"]], dtype=torch.float32))
        self.register_buffer("hi", torch.tensor([c["range"][1] for c in h["channels"]], dtype=torch.float32))
        self.labels: List[int] = [int(v) for v in h["labels"]]
        # (L, C, nb) smoothed histograms and (L,) label fractions
        raw = torch.tensor([[c["histograms"][str(v)] for c in h["channels"]] for v in self.labels],
                           dtype=torch.float64)
        self._hists = smooth_histograms(raw, self.options.sigma_bins)
        self._fractions = torch.tensor([float(h["label_fractions"][str(v)]) for v in self.labels],
                                       dtype=torch.float64)
        if layout.guide is not None:
            self.guide_targets = [(t.name, t.labels) for t in layout.targets]
            self.positive_guide_channels = [layout.guide_channel(i, True) for i in range(len(layout.targets))]
            self.no_guide_value = float(layout.guide.no_guide_value)
        else:
            self.guide_targets, self.positive_guide_channels, self.no_guide_value = [], [], 0.0
        self._warned = False

    def _rest_histograms(self, exclude: Sequence[int]) -> torch.Tensor:
        """(C, nb) fraction-weighted mixture of every planned label not in ``exclude``."""
        w = self._fractions.clone()
        for i, v in enumerate(self.labels):
            if v in exclude:
                w[i] = 0
        if float(w.sum()) <= 0:
            raise DensityError(f"no planned label outside {list(exclude)} has any voxel; cannot build a reference")
        return (w.view(-1, 1, 1) * self._hists).sum(0) / w.sum()

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim < 3 or x.shape[1] != self.num_fed_channels:
            raise DensityError(
                f"density features got input of shape {tuple(x.shape)}; expected (B, {self.num_fed_channels}, "
                f"*spatial): {self.num_image_channels} image channel(s) + "
                f"{self.num_fed_channels - self.num_image_channels} guide channel(s)")
        if not self._warned and not _compiling():
            frac = out_of_range_fraction(x[:, :self.num_image_channels].float(), self.lo, self.hi)
            worst = float(frac.max())
            if worst > FAR_OUTSIDE_WARN_FRACTION:
                self._warned = True
                c = int(frac.argmax())
                warnings.warn(
                    f"{100 * worst:.1f}% of the voxels of input channel {c} lie far outside the planned intensity "
                    f"range [{float(self.lo[c]):.3g}, {float(self.hi[c]):.3g}] (by more than "
                    f"{int(100 * FAR_OUTSIDE_MARGIN)}% of its width); they are clamped to the edge bins of the "
                    f"histograms. Is the input normalised the way nnU-Net preprocessed the training data?",
                    RuntimeWarning, stacklevel=3)

    def guide_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, *spatial) positive guide maps rescaled to [0, 1] (0 = no guide)."""
        g = x[:, self.positive_guide_channels].float()
        return ((g - self.no_guide_value) / (1.0 - self.no_guide_value)).clamp(0, 1)


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - old torch
        return False


class DensityFeatures(_HistogramInputs):
    """Density and texture maps from the fed channels.

    ``forward(x)``: x (B, n_image + n_guide, *spatial) -> (B, n_computed, *spatial) float, in the
    order of the layout's density/texture channels (see ``core.density.density_channels``);
    prior and case maps lie in [-1, 1], texture maps as documented in ``core.texture``.
    Computed without gradient (no parameters; the input needs none).
    """

    def __init__(self, layout: ChannelLayout):
        super().__init__(layout)
        ex = layout.extra[EXTRA_KEY]
        opts = self.options
        if opts.film:
            raise DensityError("DensityFeatures was given a FiLM layout; use FiLMConditioner")
        names = [c.get("name", f"input_{i}") for i, c in enumerate(layout.channels) if c["kind"] == "image"]
        expected = density_channels(opts, ex["histograms"], names,
                                    self.guide_targets if opts.case else [])
        actual = [c for c in layout.channels if c["kind"] in ("density", "texture")]
        if expected != actual:
            i = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e), min(len(actual), len(expected)))
            raise DensityError(
                f"the layout lists {len(actual)} density/texture channel(s) but its density options and "
                f"histograms give {len(expected)}; they differ from computed channel {i}: layout has "
                f"{actual[i] if i < len(actual) else 'nothing'}, expected {expected[i] if i < len(expected) else 'nothing'}")
        self.num_out = len(actual)
        h = ex["histograms"]
        fg = [i for i, v in enumerate(self.labels) if v != 0]
        self.do_prior = opts.prior and bool(fg)
        self.do_case = opts.case and bool(self.guide_targets)
        self.do_texture = opts.texture and bool(opts.texture_features)
        self.register_buffer("prior_tables", prior_tables(self._hists, self._fractions, fg, opts.clip).float())
        if self.do_case:
            ref = torch.stack([self._rest_histograms(labels) for _, labels in self.guide_targets], 0)
        else:
            ref = torch.zeros((0, self.num_image_channels, self.num_bins), dtype=torch.float64)
        self.register_buffer("case_reference", ref.float())
        self.register_buffer("tex_lo", torch.tensor([c["texture_range"][0] for c in h["channels"]], dtype=torch.float32))
        self.register_buffer("tex_hi", torch.tensor([c["texture_range"][1] for c in h["channels"]], dtype=torch.float32))
        self.texture_window = [int(k) for k in ex.get("texture_window", [])]
        self.spacing = [float(s) for s in ex["spacing"]] if ex.get("spacing") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        B = x.shape[0]
        spatial = tuple(x.shape[2:])
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            img = x[:, :self.num_image_channels].float()
            parts = []
            u = bin_coordinates(img, self.lo, self.hi, self.num_bins) if (self.do_prior or self.do_case) else None
            if self.do_prior:
                parts.append(lookup(u, self.prior_tables).reshape((B, -1) + spatial))
            if self.do_case:
                counts = weighted_histograms(u, self.guide_weights(x), self.num_bins)
                tables = case_tables(counts, self.case_reference, self.options.pseudocount,
                                     self.options.sigma_bins, self.options.clip)
                parts.append(lookup(u, tables).reshape((B, -1) + spatial))
            if self.do_texture:
                window = self.texture_window or [3] * len(spatial)
                if len(window) != len(spatial):
                    raise DensityError(
                        f"texture window {window} has {len(window)} axes but the input has {len(spatial)} "
                        f"spatial axes ({tuple(x.shape)}); was the layout made for another configuration?")
                sp = self.spacing if self.spacing is not None and len(self.spacing) == len(spatial) else None
                parts.append(texture_features(img, self.tex_lo, self.tex_hi, window, self.options.texture_levels,
                                              sp, self.options.texture_features))
            out = torch.cat(parts, 1) if parts else img.new_zeros((B, 0) + spatial)
        if out.shape[1] != self.num_out:  # pragma: no cover - guarded by the layout check
            raise DensityError(f"computed {out.shape[1]} channels, the layout lists {self.num_out}")
        return out.to(x.dtype)


class FiLMConditioner(_HistogramInputs):
    """The original density branch: histograms -> MLP -> per-channel scales of encoder stages.

    The histogram vector holds, per image channel, the histogram of the whole patch, then per
    guided class the histogram under its positive guide map (zeros without a guide, as the
    original's empty mask), each as probabilities x 20. In training, Gaussian noise
    (``film_noise``) is added, as in the original. The MLP's last layer starts at W = 0, b = 1,
    so an untrained conditioner is the identity.

    ``forward(x)`` computes the scales and returns (B, 0, *spatial); the scales are applied by
    hooks on ``encoder.stages[i]`` of the network given to :meth:`attach` (stage indices and
    widths come from ``layout.extra["density"]["film"]``).
    """

    def __init__(self, layout: ChannelLayout):
        super().__init__(layout)
        ex = layout.extra[EXTRA_KEY]
        film = ex.get("film")
        if not self.options.film or not isinstance(film, dict):
            raise DensityError("FiLMConditioner needs a layout made with film=True (extra['density']['film'])")
        if [c for c in layout.channels if c["kind"] in ("density", "texture")]:
            raise DensityError("a FiLM layout must not list density/texture channels")
        self.stages: List[int] = [int(s) for s in film["stages"]]
        self.stage_channels: List[int] = [int(c) for c in film["stage_channels"]]
        if len(self.stages) != len(self.stage_channels) or not self.stages:
            raise DensityError(f"FiLM stages {self.stages} and widths {self.stage_channels} do not match")
        n_in = (1 + len(self.guide_targets)) * self.num_image_channels * self.num_bins
        hidden = int(self.options.film_hidden)
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, sum(self.stage_channels)))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.ones_(self.mlp[-1].bias)
        self._scales: Optional[Dict[int, torch.Tensor]] = None
        self._handles: list = []

    def histogram_vector(self, x: torch.Tensor) -> torch.Tensor:
        """(B, (1 + T) * C * nb) histogram vector of the fed channels x (B, n_fed, *spatial)."""
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            img = x[:, :self.num_image_channels].float()
            u = bin_coordinates(img, self.lo, self.hi, self.num_bins)
            w = torch.ones((x.shape[0], 1) + tuple(x.shape[2:]), dtype=img.dtype, device=x.device)
            if self.guide_targets:
                w = torch.cat((w, self.guide_weights(x)), 1)
            return histogram_vector(weighted_histograms(u, w, self.num_bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if not self._handles:
            raise DensityError("FiLMConditioner is not attached to a network; call attach(base_network)")
        v = self.histogram_vector(x)
        if self.training and self.options.film_noise > 0:
            v = v + torch.randn_like(v) * self.options.film_noise
        s = self.mlp(v.to(self.mlp[0].weight.dtype))
        chunks = torch.split(s, self.stage_channels, dim=1)
        self._scales = dict(zip(self.stages, chunks))
        return x.new_zeros((x.shape[0], 0) + tuple(x.shape[2:]))

    def attach(self, network: nn.Module) -> "FiLMConditioner":
        """Install the scaling hooks on ``network.encoder.stages``; checks the stage widths."""
        stages = getattr(getattr(network, "encoder", None), "stages", None)
        if stages is None:
            raise DensityError(f"{type(network).__name__} has no encoder.stages to modulate")
        widths = list(getattr(network.encoder, "output_channels", []))
        for i, c in zip(self.stages, self.stage_channels):
            if i >= len(stages) or (widths and widths[i] != c):
                raise DensityError(
                    f"FiLM was planned for encoder stage {i} with {c} channels, but the network has "
                    f"{len(stages)} stages with widths {widths}")
        for h in self._handles:
            h.remove()
        self._handles = [stages[i].register_forward_hook(self._make_hook(i)) for i in self.stages]
        return self

    def _make_hook(self, i: int):
        last = self.stages[-1]

        def hook(module, inputs, output):
            if self._scales is None:
                raise DensityError(
                    "a FiLM-modulated encoder stage ran without scales: run the GuidedNetwork wrapper, not its "
                    "base network directly")
            s = self._scales[i]
            if i == last:
                self._scales = None  # used once per forward
            return output * s.to(output.dtype).view(s.shape + (1,) * (output.ndim - 2))
        return hook


def film_stage_plan(features_per_stage: Sequence[int], skip_first: bool = True) -> Dict[str, List[int]]:
    """Which encoder stages FiLM modulates and their widths: all but the first by default (the
    original modulated blocks 2-5 of its U-Net)."""
    start = 1 if skip_first and len(features_per_stage) > 1 else 0
    idx = list(range(start, len(features_per_stage)))
    return {"stages": idx, "stage_channels": [int(features_per_stage[i]) for i in idx]}


def density_layout_extra(options: DensityOptions, histograms: Dict[str, Any], spacing: Sequence[float],
                         source: Optional[Dict[str, Any]] = None,
                         features_per_stage: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """The ``extra["density"]`` entry of a layout.

    Args:
        options: the model's DensityOptions.
        histograms: one configuration's planned histograms (``HistogramAccumulator.finalize``).
        spacing: voxel size per spatial axis of the network's patches (mm); sets the texture
            window (``options.texture_window_mm``) and the gradient's units.
        source: where the histograms came from (plans file, configuration), for error messages.
        features_per_stage: encoder widths of the network (needed for FiLM).
    """
    from .core.texture import window_from_spacing
    validate_histograms(histograms, source=(source or {}).get("plans_file", "histograms"))
    spacing = [float(s) for s in spacing]
    extra: Dict[str, Any] = {
        "options": options.to_dict(),
        "histograms": histograms,
        "spacing": spacing,
        "texture_window": window_from_spacing(spacing, options.texture_window_mm),
        "source": dict(source or {}),
    }
    if options.film:
        if features_per_stage is None:
            raise DensityError("FiLM needs the network's features_per_stage")
        extra["film"] = film_stage_plan(features_per_stage, options.film_skip_first)
    return extra


def make_density_layout(histograms: Dict[str, Any], options: DensityOptions, spacing: Sequence[float],
                        guide=None, targets: Sequence = (), image_channel_names: Optional[Sequence[str]] = None,
                        features_per_stage: Optional[Sequence[int]] = None,
                        source: Optional[Dict[str, Any]] = None) -> ChannelLayout:
    """A complete layout (image, guide, computed channels) without a trainer: for tests,
    benchmarks and scripts. ``guide`` is a GuideSettings or None, ``targets`` GuidedTargets."""
    from .settings import build_layout
    names = list(image_channel_names) if image_channel_names is not None else \
        [c["name"] for c in histograms["channels"]]
    extra = density_layout_extra(options, histograms, spacing, source, features_per_stage)
    guided = [(t.name, t.labels) for t in targets] if guide is not None and options.case else []
    channels = density_channels(options, histograms, names, guided)
    return build_layout(len(names), list(targets) if guide is not None else [], guide, names, channels,
                        {EXTRA_KEY: extra})


def build_density_module(layout: ChannelLayout) -> Optional[nn.Module]:
    """The feature module a layout asks for: DensityFeatures, FiLMConditioner (not yet attached)
    or None when the layout has no density entry."""
    ex = layout.extra.get(EXTRA_KEY)
    if ex is None:
        return None
    if DensityOptions.from_dict(ex.get("options", {})).film:
        return FiLMConditioner(layout)
    return DensityFeatures(layout)
