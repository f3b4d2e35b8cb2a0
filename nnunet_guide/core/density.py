"""Class-conditional intensity histograms and the per-voxel density maps derived from them.

Two halves, both free of nnU-Net:

* planning (numpy): :class:`HistogramAccumulator` collects stratified voxel samples per label from
  preprocessed cases (intensities already normalised the way the network sees them) and turns
  them into one probability histogram per input channel and label, plus each label's share of
  all voxels. The result is a plain JSON-able dict (:func:`HistogramAccumulator.finalize`).
* runtime (torch): lookup tables over the same bins, read per voxel with linear interpolation
  between bin centres. Everything is a function of tensors, so the network wrapper can compute
  it on any patch, at training and at inference alike.

Conventions:
  * A histogram covers ``[lo, hi]`` of one input channel with ``num_bins`` equal bins. Values
    outside are clamped into the edge bins, both when planning and at runtime (the edge bins
    mean "at or beyond the edge"); see :func:`out_of_range_fraction` for the warning rule.
  * Histograms are probabilities (each sums to 1 over its bins).
  * Log-likelihood ratios are natural logs, clipped to ``[-clip, clip]`` and divided by ``clip``,
    so every density map lies in ``[-1, 1]`` and 0 means "no evidence either way".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FORMAT_VERSION = 1
DEFAULT_NUM_BINS = 64
RANGE_QUANTILES = (0.001, 0.999)      # planned range of a channel: union of per-label ranges
TEXTURE_QUANTILES = (0.01, 0.99)      # quantisation range of texture features, over foreground
FAR_OUTSIDE_MARGIN = 0.25             # "far outside": beyond the range by > 25% of its width
FAR_OUTSIDE_WARN_FRACTION = 0.01      # ... for more than 1% of the voxels of a batch


class DensityError(ValueError):
    """Histograms or inputs that cannot be used; the message names what and what was expected."""


# ----------------------------------------------------------------------------------------------
# planning (numpy)
# ----------------------------------------------------------------------------------------------

def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    if cw[-1] <= 0:
        raise DensityError("all sample weights are zero")
    return float(v[min(np.searchsorted(cw, q * cw[-1], side="left"), len(v) - 1)])


class HistogramAccumulator:
    """Stratified voxel samples per label, gathered case by case, turned into histograms.

    Sampling keeps at most ``max_samples_per_label`` voxels of every label of every case; each
    sample carries the weight ``voxels_of_label / samples_of_label`` so the pooled histograms and
    label fractions estimate the full data, while small labels (tumours) still get many samples.

    Args:
        num_channels: input channels of the network (C).
        labels: the integer label values to histogram (background 0 included; the ignore label
            and the -1 "outside the nonzero mask" value of nnU-Net's preprocessing excluded).
        max_samples_per_label: per case and label.
        seed: seeds the sampling, so planning twice gives the same file.
    """

    def __init__(self, num_channels: int, labels: Sequence[int], max_samples_per_label: int = 20000,
                 seed: int = 0):
        if num_channels < 1:
            raise DensityError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = int(num_channels)
        self.labels = [int(v) for v in labels]
        if len(set(self.labels)) != len(self.labels) or not self.labels:
            raise DensityError(f"labels must be distinct and non-empty, got {list(labels)}")
        self.max_samples = int(max_samples_per_label)
        self.rng = np.random.default_rng(seed)
        self._values: Dict[int, List[np.ndarray]] = {v: [] for v in self.labels}
        self._weights: Dict[int, List[np.ndarray]] = {v: [] for v in self.labels}
        self.voxel_counts: Dict[int, int] = {v: 0 for v in self.labels}
        self.num_cases = 0

    def add_case(self, image: np.ndarray, seg: np.ndarray, case: str = "?") -> None:
        """Add one case.

        Args:
            image: (C, *spatial) float, normalised intensities (nnU-Net preprocessed data).
            seg: (*spatial) or (1, *spatial) integer labels of the same spatial shape; values not
                in ``labels`` (e.g. -1, the ignore label) are skipped.
            case: identifier used in error messages.
        """
        image = np.asarray(image)
        seg = np.asarray(seg)
        if seg.ndim == image.ndim and seg.shape[0] == 1:
            seg = seg[0]
        if image.ndim < 2 or image.shape[0] != self.num_channels:
            raise DensityError(
                f"case {case}: image has shape {image.shape}, expected ({self.num_channels}, *spatial)")
        if seg.shape != image.shape[1:]:
            raise DensityError(
                f"case {case}: segmentation shape {seg.shape} does not match image shape {image.shape[1:]}")
        flat_img = image.reshape(self.num_channels, -1)
        flat_seg = seg.reshape(-1)
        for v in self.labels:
            idx = np.flatnonzero(flat_seg == v)
            n = idx.size
            if n == 0:
                continue
            if n > self.max_samples:
                idx = self.rng.choice(idx, self.max_samples, replace=False)
            vals = flat_img[:, idx].astype(np.float64)
            if not np.all(np.isfinite(vals)):
                raise DensityError(f"case {case}: non-finite intensities under label {v}")
            self._values[v].append(vals)
            self._weights[v].append(np.full(idx.size, n / idx.size))
            self.voxel_counts[v] += int(n)
        self.num_cases += 1

    def finalize(self, num_bins: int = DEFAULT_NUM_BINS, channel_names: Optional[Sequence[str]] = None
                 ) -> Dict:
        """Histograms of everything added so far.

        Returns a JSON-able dict::

            {"format_version": 1, "num_bins": B, "num_cases": n,
             "labels": [0, 1, 2], "label_fractions": {"0": f0, ...}, "voxel_counts": {...},
             "channels": [{"name": ..., "range": [lo, hi], "texture_range": [tlo, thi],
                           "histograms": {"0": [B floats], "1": [...], ...}}, ...]}

        ``range`` is the union over labels of each label's 0.1%-99.9% quantile range (so rare
        labels fit); ``texture_range`` spans the
        1%-99% quantiles of the foreground labels (all labels if there is no foreground). A
        label never seen gets a uniform histogram and fraction 0.
        """
        if num_bins < 2:
            raise DensityError(f"num_bins must be >= 2, got {num_bins}")
        seen = [v for v in self.labels if self._values[v]]
        if not seen:
            raise DensityError(f"no voxel of any label {self.labels} was found in {self.num_cases} case(s)")
        vals = {v: np.concatenate(self._values[v], axis=1) for v in seen}
        wts = {v: np.concatenate(self._weights[v]) for v in seen}
        total = float(sum(self.voxel_counts.values()))
        names = list(channel_names) if channel_names is not None else []
        names += [f"input_{c}" for c in range(len(names), self.num_channels)]
        fg = [v for v in seen if v != 0] or seen
        channels = []
        for c in range(self.num_channels):
            # every label's own bulk must fit, however rare the label (a tumour may be 0.01% of
            # the voxels): the range is the union of per-label quantile ranges
            lo = min(_weighted_quantile(vals[v][c], wts[v], RANGE_QUANTILES[0]) for v in seen)
            hi = max(_weighted_quantile(vals[v][c], wts[v], RANGE_QUANTILES[1]) for v in seen)
            lo, hi = _widen(lo, hi)
            fg_v = np.concatenate([vals[v][c] for v in fg])
            fg_w = np.concatenate([wts[v] for v in fg])
            tlo, thi = _widen(_weighted_quantile(fg_v, fg_w, TEXTURE_QUANTILES[0]),
                              _weighted_quantile(fg_v, fg_w, TEXTURE_QUANTILES[1]))
            hists = {}
            for v in self.labels:
                if v in vals:
                    x = np.clip(vals[v][c], lo, hi)
                    h, _ = np.histogram(x, bins=num_bins, range=(lo, hi), weights=wts[v])
                    h = h / h.sum()
                else:
                    h = np.full(num_bins, 1.0 / num_bins)
                hists[str(v)] = [float(round(p, 8)) for p in h]
            channels.append({"name": str(names[c]), "range": [lo, hi], "texture_range": [tlo, thi],
                             "histograms": hists})
        return {
            "format_version": FORMAT_VERSION,
            "num_bins": int(num_bins),
            "num_cases": int(self.num_cases),
            "labels": list(self.labels),
            "label_fractions": {str(v): self.voxel_counts[v] / total for v in self.labels},
            "voxel_counts": {str(v): int(self.voxel_counts[v]) for v in self.labels},
            "channels": channels,
        }


def _widen(lo: float, hi: float) -> Tuple[float, float]:
    """Make a degenerate range usable (constant channel): at least 1e-3 wide."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DensityError(f"non-finite intensity range [{lo}, {hi}]")
    if hi - lo < 1e-3:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - 0.5, mid + 0.5
    return float(lo), float(hi)


def validate_histograms(h: Mapping, source: str = "histograms") -> None:
    """Raise DensityError naming ``source`` if ``h`` is not a dict written by ``finalize``."""
    try:
        if h.get("format_version") != FORMAT_VERSION:
            raise DensityError(
                f"{source}: format_version {h.get('format_version')!r}, this nnunet_guide reads {FORMAT_VERSION}")
        nb = int(h["num_bins"])
        labels = [int(v) for v in h["labels"]]
        for c, ch in enumerate(h["channels"]):
            lo, hi = ch["range"]
            if not hi > lo:
                raise DensityError(f"{source}: channel {c} has an empty range [{lo}, {hi}]")
            for v in labels:
                if len(ch["histograms"][str(v)]) != nb:
                    raise DensityError(f"{source}: channel {c} label {v}: expected {nb} bins, "
                                       f"got {len(ch['histograms'][str(v)])}")
        for v in labels:
            float(h["label_fractions"][str(v)])
    except DensityError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise DensityError(f"{source}: malformed density histograms ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# runtime (torch)
# ----------------------------------------------------------------------------------------------

def smooth_histograms(h: torch.Tensor, sigma_bins: float, floor: float = 1e-6) -> torch.Tensor:
    """Gaussian-smooth histograms along the last axis, add a floor, renormalise.

    Args:
        h: (..., nb) non-negative.
        sigma_bins: Gaussian sigma in bins (0 = no smoothing).
        floor: added to every bin before renormalising, so log ratios stay finite.
    Returns:
        (..., nb) probabilities (sum 1 along the last axis). Mass reaching past an edge is
        reflected back (replicate-free), so the edge bins are not drained.
    """
    shape = h.shape
    nb = shape[-1]
    x = h.reshape(-1, 1, nb).to(torch.float64)
    if sigma_bins > 0:
        r = max(1, int(math.ceil(3 * sigma_bins)))
        t = torch.arange(-r, r + 1, dtype=torch.float64, device=h.device)
        k = torch.exp(-0.5 * (t / sigma_bins) ** 2)
        k = (k / k.sum()).view(1, 1, -1)
        pad = min(r, nb - 1)
        xp = F.pad(x, (pad, pad), mode="reflect") if pad > 0 else x
        if pad < r:
            xp = F.pad(xp, (r - pad, r - pad))
        x = F.conv1d(xp, k)
    x = x.clamp_min(0) + floor
    x = x / x.sum(-1, keepdim=True)
    return x.reshape(shape).to(h.dtype if h.is_floating_point() else torch.float32)


def log_ratio_table(p: torch.Tensor, q: torch.Tensor, clip: float) -> torch.Tensor:
    """``clamp(log(p / q), -clip, clip) / clip`` bin by bin; p, q (..., nb) positive."""
    return (torch.log(p) - torch.log(q)).clamp(-clip, clip) / clip


def prior_tables(hists: torch.Tensor, fractions: torch.Tensor, fg_index: Sequence[int], clip: float
                 ) -> torch.Tensor:
    """Dataset-prior lookup tables: each foreground label against the rest.

    Args:
        hists: (L, C, nb) smoothed probability histograms, one per label (in ``labels`` order)
            and input channel.
        fractions: (L,) share of all voxels of each label.
        fg_index: positions (in the L axis) of the foreground labels to make tables for.
        clip: see module docstring.
    Returns:
        (len(fg_index), C, nb) tables in [-1, 1]: ``log p(x | label) / p(x | not label)`` where
        the "rest" histogram is the fraction-weighted mixture of every other label.
    """
    tables = []
    f = fractions.clamp_min(0)
    for i in fg_index:
        w = f.clone()
        w[i] = 0
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
            w[i] = 0
        rest = (w.view(-1, 1, 1) * hists).sum(0) / w.sum()
        tables.append(log_ratio_table(hists[i], rest, clip))
    return torch.stack(tables, 0) if tables else hists.new_zeros((0,) + tuple(hists.shape[1:]))


def bin_coordinates(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Continuous bin coordinate of every value: 0 at the first bin centre, nb-1 at the last.

    Args:
        x: (B, C, *spatial) intensities.
        lo, hi: (C,) planned range per channel.
    Returns:
        (B, C, *spatial) float in [0, nb-1] (values outside the range are clamped to the edges).
    """
    view = (1, -1) + (1,) * (x.ndim - 2)
    u = (x - lo.view(view)) / (hi - lo).view(view) * num_bins - 0.5
    return u.clamp(0, num_bins - 1)


def lookup(u: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Read tables at continuous bin coordinates with linear interpolation.

    Args:
        u: (B, C, *spatial) bin coordinates from :func:`bin_coordinates`.
        tables: (K, C, nb) shared by the batch, or (B, K, C, nb) one set per sample.
    Returns:
        (B, K, C, *spatial): map k of channel c reads table (k, c) at u[:, c].
    """
    B, C = u.shape[:2]
    spatial = u.shape[2:]
    nb = tables.shape[-1]
    if tables.ndim == 3:
        tables = tables.unsqueeze(0).expand(B, -1, -1, -1)
    K = tables.shape[1]
    i0 = u.floor().clamp(0, nb - 1)
    frac = (u - i0).reshape(B, 1, C, -1)
    i0 = i0.long().reshape(B, 1, C, -1).expand(B, K, C, -1)
    i1 = (i0 + 1).clamp_max(nb - 1)
    t0 = torch.gather(tables, 3, i0)
    t1 = torch.gather(tables, 3, i1)
    return (t0 + (t1 - t0) * frac).reshape((B, K, C) + tuple(spatial))


def weighted_histograms(u: torch.Tensor, w: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Soft (linearly binned) weighted histograms of every sample.

    Args:
        u: (B, C, *spatial) bin coordinates (:func:`bin_coordinates`).
        w: (B, T, *spatial) non-negative weights, one map per target (e.g. a positive guide map).
    Returns:
        (B, T, C, nb) unnormalised weighted counts; ``counts.sum(-1)`` is the total weight of the
        map, the same for every channel.
    """
    B, C = u.shape[:2]
    T = w.shape[1]
    uf = u.reshape(B, 1, C, -1)
    wf = w.reshape(B, T, 1, -1).to(u.dtype)
    i0 = uf.floor().clamp(0, num_bins - 1)
    frac = uf - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp_max(num_bins - 1)
    out = u.new_zeros((B, T, C, num_bins))
    n = uf.shape[-1]
    out.scatter_add_(3, i0.expand(B, T, C, n), (wf * (1 - frac)).expand(B, T, C, n))
    out.scatter_add_(3, i1.expand(B, T, C, n), (wf * frac).expand(B, T, C, n))
    return out


def case_tables(counts: torch.Tensor, reference: torch.Tensor, pseudocount: float, sigma_bins: float,
                clip: float) -> torch.Tensor:
    """Case-specific lookup tables from guide-weighted counts, shrunk towards a reference.

    ``p_case = (smooth(counts) + a * ref) / (W + a)`` with W the total weight and a the
    pseudocount; the table is ``log p_case / ref`` (clipped, scaled). With no guide (W = 0) the
    table is exactly 0 everywhere, so the case channel vanishes with the guides.

    Args:
        counts: (B, T, C, nb) from :func:`weighted_histograms`.
        reference: (T, C, nb) reference probabilities (here: the dataset histogram of everything
            that is not the guided class).
    Returns:
        (B, T, C, nb) tables in [-1, 1].
    """
    W = counts.sum(-1, keepdim=True)
    if sigma_bins > 0:
        shape = counts.shape
        nb = shape[-1]
        r = max(1, int(math.ceil(3 * sigma_bins)))
        t = torch.arange(-r, r + 1, dtype=counts.dtype, device=counts.device)
        k = torch.exp(-0.5 * (t / sigma_bins) ** 2)
        k = (k / k.sum()).view(1, 1, -1)
        pad = min(r, nb - 1)
        xp = F.pad(counts.reshape(-1, 1, nb), (pad, pad), mode="reflect")
        if pad < r:
            xp = F.pad(xp, (r - pad, r - pad))
        counts = F.conv1d(xp, k).reshape(shape).clamp_min(0)
        counts = counts * (W / counts.sum(-1, keepdim=True).clamp_min(1e-12))
    ref = reference.unsqueeze(0)
    p = (counts + pseudocount * ref) / (W + pseudocount)
    return log_ratio_table(p, ref.expand_as(p), clip)


def out_of_range_fraction(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                          margin: float = FAR_OUTSIDE_MARGIN) -> torch.Tensor:
    """Share of values (per channel, over the batch) beyond ``[lo, hi]`` by more than ``margin``
    times the range width. Returns (C,). Such values are far outside what the histograms were
    planned on (e.g. raw HU fed to a model that expects normalised input); they are clamped into
    the edge bins, and the caller warns when the share exceeds ``FAR_OUTSIDE_WARN_FRACTION``."""
    view = (1, -1) + (1,) * (x.ndim - 2)
    width = (hi - lo).view(view)
    far = (x < lo.view(view) - margin * width) | (x > hi.view(view) + margin * width)
    dims = [0] + list(range(2, x.ndim))
    return far.to(torch.float32).mean(dim=dims)


def histogram_vector(counts: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Histograms as a feature vector in the original work's convention (FiLM input).

    Args:
        counts: (B, T, C, nb) weighted counts.
        scale: the original multiplied probability histograms by 20.
    Returns:
        (B, T * C * nb): per (t, c) the counts divided by their total, times ``scale``; all zeros
        where the total weight is below 1e-6 (an empty mask, as in the original).
    """
    W = counts.sum(-1, keepdim=True)
    p = torch.where(W > 1e-6, counts / W.clamp_min(1e-6), torch.zeros_like(counts))
    return (p * scale).reshape(counts.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# options and channel list (what a trainer variant chooses; recorded in the layout)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DensityOptions:
    """Which computed channels a model gets and how they are made.

    Attributes:
        prior: dataset-prior maps, one per (foreground label, image channel): ``log p(x | label)
            / p(x | not label)`` of the voxel's intensity under the planned histograms.
        case: case-specific maps, one per (guided class, image channel): the histogram of the
            intensities under the class's positive guide map (weights = guide value), shrunk
            towards the dataset's "not this class" histogram by ``pseudocount`` voxels, read per
            voxel as a log ratio against that reference. Exactly 0 without a guide. Only made
            when the model has guide channels.
        texture: texture maps per image channel (``texture_features``).
        sigma_bins: Gaussian smoothing of every histogram, in bins.
        clip: log ratios are clipped to [-clip, clip] and divided by clip (maps in [-1, 1]).
        pseudocount: weight (in voxels) of the reference in the case histogram.
        texture_levels: grey levels of the quantised image (entropy, co-occurrence).
        texture_window_mm: window of the local texture statistics, converted to odd voxel
            counts per axis from the configuration's spacing.
        texture_features: subset of ``core.texture.TEXTURE_FEATURES``.
        film: FiLM conditioning of the encoder stages by a histogram vector (the original work's
            density branch) instead of density maps.
        film_hidden: hidden units of the FiLM MLP.
        film_noise: std of the Gaussian noise added to the histogram vector in training.
        film_skip_first: leave the first encoder stage unmodulated (the original modulated
            blocks 2-5).
    """
    prior: bool = True
    case: bool = True
    texture: bool = True
    sigma_bins: float = 1.0
    clip: float = 5.0
    pseudocount: float = 20.0
    texture_levels: int = 8
    texture_window_mm: float = 5.0
    texture_features: Tuple[str, ...] = ("mean", "std", "entropy", "gradient", "contrast", "homogeneity")
    film: bool = False
    film_hidden: int = 128
    film_noise: float = 0.02
    film_skip_first: bool = True

    def __post_init__(self):
        from .texture import TEXTURE_FEATURES
        object.__setattr__(self, "texture_features", tuple(self.texture_features))
        bad = [f for f in self.texture_features if f not in TEXTURE_FEATURES]
        if bad:
            raise DensityError(f"unknown texture feature(s) {bad}; known: {list(TEXTURE_FEATURES)}")
        if not (self.clip > 0 and self.pseudocount > 0 and self.sigma_bins >= 0):
            raise DensityError(f"clip and pseudocount must be > 0 and sigma_bins >= 0, got clip={self.clip}, "
                               f"pseudocount={self.pseudocount}, sigma_bins={self.sigma_bins}")
        if self.texture_levels < 2:
            raise DensityError(f"texture_levels must be >= 2, got {self.texture_levels}")

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["texture_features"] = list(self.texture_features)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "DensityOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DensityError(f"unknown density option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def density_channels(options: DensityOptions, histograms: Mapping, image_channel_names: Sequence[str],
                     guided_targets: Sequence[Tuple[str, Sequence[int]]]) -> List[Dict]:
    """The computed channels, in the order the feature module produces them.

    Order: prior maps (label-major, then image channel), case maps (target-major, then image
    channel), texture maps (image-channel-major, then feature). Each is a dict for the layout:
    ``{"kind": "density", "source": "prior", "label": 2, "image_channel": 0}``,
    ``{"kind": "density", "source": "case", "target": "tumor", "image_channel": 0}``,
    ``{"kind": "texture", "feature": "entropy", "image_channel": 0}``. FiLM models get none.
    """
    if options.film:
        return []
    nc = len(histograms["channels"])
    if len(image_channel_names) != nc:
        raise DensityError(
            f"the planned histograms cover {nc} input channel(s) "
            f"({[c['name'] for c in histograms['channels']]}), but the network gets "
            f"{len(image_channel_names)} image channel(s) ({list(image_channel_names)})")
    out: List[Dict] = []
    if options.prior:
        for v in histograms["labels"]:
            if int(v) == 0:
                continue
            for c in range(nc):
                out.append({"kind": "density", "source": "prior", "label": int(v), "image_channel": c})
    if options.case:
        for name, _ in guided_targets:
            for c in range(nc):
                out.append({"kind": "density", "source": "case", "target": str(name), "image_channel": c})
    if options.texture:
        for c in range(nc):
            for f in options.texture_features:
                out.append({"kind": "texture", "feature": f, "image_channel": c})
    return out
