"""The one settings object of a guide-aware model, and the channel layout derived from it.

A trainer class carries a :class:`GuideSettings`; at training time it is resolved against the
dataset's labels into a :class:`ChannelLayout` that says what every input channel of the
network is. The layout is written twice into the model folder: inside the trainer's own copy of
``plans.json`` (key ``"nnunet_guide"``, so stock ``nnUNetv2_predict`` rebuilds the network with
the right number of channels) and as ``guide_settings.json`` (the file users and our predictor
read). Both are checked against each other and against the checkpoint before predicting.

This module has no nnU-Net import: datasets are described by plain dicts.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

SETTINGS_FILE = "guide_settings.json"
PLANS_KEY = "nnunet_guide"
FORMAT_VERSION = 1

ENCODINGS = ("gaussian", "object_gaussian", "exp_distance", "ball")
CLICK_POLICIES = ("center", "interior", "random")
CORRECTION_USERS = ("densest_error", "largest_error")
GUIDE_ENTRIES = ("input", "every_stage")
NORM_STATISTICS = ("with_guides", "automatic")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def label_value(text: str) -> Optional[int]:
    """The label value a class written as text stands for: ``"2"`` -> 2; None for anything that is
    not plain ASCII decimal digits (``"2.9"``, ``"²"``, ``"tumor"`` are names, never values)."""
    return int(text) if isinstance(text, str) and text.isascii() and text.isdigit() else None


def _value_matches(label: Any, labels: Tuple[int, ...]) -> bool:
    """Whether a class given as an integer or as decimal text is the single label ``labels``."""
    if isinstance(label, str):
        v = label_value(label)
        return v is not None and labels == (v,)
    return isinstance(label, numbers.Integral) and not isinstance(label, bool) and labels == (int(label),)


def _json_type_check(default: Any, v: Any) -> Optional[str]:
    """None if ``v`` has the JSON type of ``default`` (bool, int, float or str), else what it must
    be. Fields with any other default are not checked here."""
    if isinstance(default, bool):
        return None if isinstance(v, bool) else "true or false"
    if isinstance(default, int):
        return None if _is_int(v) else "an integer (not a bool)"
    if isinstance(default, float):
        return None if _is_number(v) else "a finite number (not a bool)"
    if isinstance(default, str):
        return None if isinstance(v, str) else "a string"
    return None


class GuideSettingsError(ValueError):
    """A settings value or a settings file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class GuideSettings:
    """How guides are simulated during training and rendered into input channels.

    Attributes:
        guided_labels: which classes get guide channels, by name (``"tumor"``) or label value
            (``2``) as in dataset.json; ``None`` means every foreground label (or every region of
            a region-based dataset).
        encoding: how a click becomes a map, one of ``ENCODINGS``:
            ``gaussian``: ``exp(-d^2 / (2 sigma_mm^2))``, d the Euclidean distance in mm;
            ``object_gaussian``: the original work's anisotropic Gaussian whose per-axis sigma is
            1.4826 * MAD of the object's coordinates (voxels), at least ``min_object_sigma``;
            ``exp_distance``: ``exp(-d / sigma_mm)``; ``ball``: 1 within ``ball_radius_mm``.
            Several clicks of one channel combine by maximum. Values lie in [0, 1].
        sigma_mm: scale of ``gaussian`` and ``exp_distance`` (mm, so anisotropic spacing is
            respected).
        ball_radius_mm: radius of ``ball`` (mm).
        offset_half: map g to ``0.5 + g / 2`` (the original work's encoding; "no guide" = 0.5).
        negatives: add a negative channel per guided class (clicks saying "not this class").
        click_policy: where a simulated click goes in its object: ``center`` (median coordinate,
            the original robust centre), ``interior`` (maximum of the distance transform, the
            interior-most voxel), ``random`` (a uniformly random voxel of the object).
        perturb_center: apply the original perturbation of centre and sigma in training
            (c + sigma * U(-0.2, 0.2), sigma * U(1/1.4, 1.4)).
        p_drop: probability that a training sample gets no guide at all (automatic mode). Half
            of all samples by default, so the model stays a full automatic segmenter.
        p_negative: probability that a guided training sample also gets negative clicks.
        max_negative_clicks: negative clicks per guided class are drawn from U{1..max}.
        p_confusable: probability that a negative click is placed on another foreground class
            (e.g. liver when guiding tumour) rather than on background.
        p_near_negative: probability that a negative click is placed instead just outside the
            class, at most ``near_negative_mm`` beyond its boundary (along a random ray from a
            random voxel of the class): where a model's false positives are, and where the
            evaluation's simulated user puts most of its negative clicks. 0 (default) keeps the
            negatives above only, and the click streams of older settings unchanged.
        near_negative_mm: how far beyond the class's boundary such a click may land (mm).
        connectivity: connectivity of objects as in ``scipy.ndimage.generate_binary_structure``
            (1 = faces only; ndim = full). Default 2 = 18-connectivity in 3D, as the original.
        min_object_sigma: lower bound of the object Gaussian's sigma in voxels (original: 2 px).
        validation_seed: seed of the simulated clicks of guided validation.
        p_correction: probability that a training sample also gets correction clicks from the
            model itself (the iterative click simulation of DeepEdit/RITM-style training): the
            network predicts the batch with its current guides, and a simulated user
            (``correction_user``) clicks the largest error of each guided class: positive on a
            miss, negative on a false positive. This is what
            teaches negative clicks to remove false positives: ground-truth negatives land where
            the model is already right. Costs one extra forward pass per round for batches that
            have such a sample. 0 (default) switches it off. Samples without guides are chosen
            too (the user's clicks after the automatic result), so only ``p_drop * (1 -
            p_correction)`` of the samples stay automatic: 0.25 with 0.5 and 0.5; p_drop 0.67 with
            p_correction 0.25 keeps half.
        correction_rounds: at most this many correction rounds per batch (U{1..max}).
        correction_user: who places the correction clicks, one of ``CORRECTION_USERS``:
            ``densest_error`` (default): on the training device, at the error voxel whose
            surroundings (boxes from half the guide's reach up to the patch) hold the most error
            of its kind (:mod:`nnunet_guide.core.device_user`): a fixed few kernels, and no label
            map copied off the device.
            ``largest_error``: the evaluation's user itself, on the CPU (interior-most voxel of the
            largest error component), as correction training ran before 2026-11-27. The
            ``object_gaussian`` encoding always uses ``largest_error``: its clicks need the error's
            extent.
        p_box: probability that a clicked object's positive prompt is a box instead of a click
            (its jittered bounding box, drawn on one slice in half of the cases), rendered as the
            box-sized Gaussian ellipse (``Click.kind == "box"``); what the server's box prompts are.
        p_scribble: probability that it is a stroke instead: in half of the cases a scribble
            (the medial voxels of one cross-section), else a lasso (the cross-section's interior),
            as clicks on a grid of half the guide's sigma (:mod:`nnunet_guide.core.prompts`).
            Both default to 0: settings files without them load and train as before.
        max_object_clicks: a clicked object's positive clicks are drawn from U{1..max}: the first
            where ``click_policy`` puts it, the others at uniformly random voxels of the object,
            as a user adds clicks to an object already clicked (the evaluation's second and
            third click steps on a structure). Default 3: on 236 held-out hippocampus cases it
            halved the harmful clicks against one click per object (docs/click-study.md). Settings
            files written before the field existed load with this default; 1 gives the older
            click streams exactly.
        consistency_weight: weight of the consistency term of guided training samples: beyond
            the reach of every guide (where all guide channels hold their no-click value) the
            softmax output with guides must equal the network's own automatic output of the same
            sample (guides removed, no gradient), as a mean squared difference. It teaches that a
            click changes the segmentation near it only, so a click on one lesion cannot lose
            another. Costs one extra forward pass (no backward) of the guided samples per step.
            0 (default) switches it off.
        click_weight: weight of the click-following term: at the voxel of every point click of a
            training sample (simulated and correction clicks), the cross-entropy between the output
            and the click (the clicked class there for a positive click, not there for a negative
            one). nnU-Net's loss counts a click's voxel like any other of the patch's; this term
            asks that the output at least agree with the user where they clicked. No extra forward
            pass. 0 (default) switches it off.
        object_weight: weight of the clicked-object term: per training sample and guided class with
            a positive click, ``1 -`` the class's soft Dice inside the box of +-3 sigma around each of
            its positive clicks (sigma: the clicked object's robust sigma the click carries, at least
            ``min_object_sigma``), so a click on part of a lesion is answered with the whole lesion.
            nnU-Net's loss weighs a clicked lesion by its share of the patch; this term weighs every
            clicked object alike. No extra forward pass. 0 (default) switches it off.
        object_negatives: the clicked-object term also takes the box around every negative click
            (+-3 sigma; a negative click's sigma is ``min_object_sigma`` unless the correction user
            gave it the error's), where the box holds voxels of the class: a negative click on a
            false-positive rim must remove the rim and keep the structure beside it. Default False.
        guide_entry: where the guide channels enter the network. ``"input"`` (default): as input
            channels only, as in the original work. ``"every_stage"``: also into every encoder
            stage, as a zero-initialised 1x1 convolution of the guides max-pooled to the stage's
            grid, added to its output (:class:`nnunet_guide.network.StageGuides`), so a click
            reaches the deep, coarse stages directly instead of through the first convolutions
            only. Settings files without the field load as ``"input"``.
        norm_statistics: where the network's instance normalisations take their mean and variance
            in a sample with clicks. ``"with_guides"`` (default): from the features as they are,
            clicks included, as nnU-Net normalises. A click then shifts every feature map's mean
            and variance, so it moves the output everywhere in the patch, not only within its
            reach; a model trained to follow clicks strongly learns to use this, and a click on
            one lesion lowers the probability of lesions far from it (docs/click-study.md).
            ``"automatic"``: from the same sample with its guides removed (an extra pass of the
            samples with clicks only; in training the statistics keep their gradient), so the
            statistics, and with them everything beyond a click's receptive field, are those of
            automatic mode. Samples
            without clicks normalise as nnU-Net does. But nothing then damps a click: on the LiTS
            slabs each clicked lesion, the smallest included, came out about as large as the
            guide's reach. Settings files without the field load as ``"with_guides"``.
        automatic_weight: with ``norm_statistics = "automatic"``, x nnU-Net's own loss on the
            automatic pass of the samples with clicks (the pass that records their statistics, so no
            extra pass): automatic mode is then supervised on every sample, not only on the share
            ``p_drop`` leaves without clicks. 0 (default) switches it off; it needs automatic norm
            statistics.
    """

    guided_labels: Optional[Tuple[Union[str, int], ...]] = None
    encoding: str = "gaussian"
    sigma_mm: float = 3.0
    ball_radius_mm: float = 4.0
    offset_half: bool = False
    negatives: bool = True
    click_policy: str = "center"
    perturb_center: bool = True
    p_drop: float = 0.5
    p_negative: float = 0.3
    max_negative_clicks: int = 3
    p_confusable: float = 0.5
    p_near_negative: float = 0.0
    near_negative_mm: float = 3.0
    connectivity: int = 2
    min_object_sigma: float = 2.0
    validation_seed: int = 12345
    p_correction: float = 0.0
    correction_rounds: int = 1
    correction_user: str = "densest_error"
    p_box: float = 0.0
    p_scribble: float = 0.0
    max_object_clicks: int = 3
    consistency_weight: float = 0.0
    guide_entry: str = "input"
    click_weight: float = 0.0
    object_weight: float = 0.0
    object_negatives: bool = False
    norm_statistics: str = "with_guides"
    automatic_weight: float = 0.0

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise GuideSettingsError(
                f"unknown guide encoding {self.encoding!r}; expected one of {', '.join(ENCODINGS)}")
        if self.click_policy not in CLICK_POLICIES:
            raise GuideSettingsError(
                f"unknown click policy {self.click_policy!r}; expected one of {', '.join(CLICK_POLICIES)}")
        if self.correction_user not in CORRECTION_USERS:
            raise GuideSettingsError(f"unknown correction user {self.correction_user!r}; expected one of "
                                     f"{', '.join(CORRECTION_USERS)}")
        if self.norm_statistics not in NORM_STATISTICS:
            raise GuideSettingsError(f"unknown norm_statistics {self.norm_statistics!r}; expected one of "
                                     f"{', '.join(NORM_STATISTICS)}")
        if self.guide_entry not in GUIDE_ENTRIES:
            raise GuideSettingsError(f"unknown guide entry {self.guide_entry!r}; expected one of "
                                     f"{', '.join(GUIDE_ENTRIES)}")
        for name in ("p_drop", "p_negative", "p_confusable", "p_near_negative", "p_correction", "p_box",
                     "p_scribble"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise GuideSettingsError(f"{name} must be a probability in [0, 1], got {v!r}")
        for name in ("sigma_mm", "ball_radius_mm", "min_object_sigma", "near_negative_mm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise GuideSettingsError(f"{name} must be a positive number of mm/voxels, got {v!r}")
        for name in ("consistency_weight", "click_weight", "object_weight", "automatic_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise GuideSettingsError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.automatic_weight > 0 and self.norm_statistics != "automatic":
            raise GuideSettingsError(f"automatic_weight {self.automatic_weight} needs norm_statistics 'automatic' (it "
                                     f"supervises that setting's automatic pass), got {self.norm_statistics!r}")
        if self.p_box + self.p_scribble > 1.0:
            raise GuideSettingsError(f"p_box + p_scribble must be at most 1 (they split the positive prompts), got "
                                     f"{self.p_box} + {self.p_scribble}")
        if self.connectivity < 1:
            raise GuideSettingsError(f"connectivity must be >= 1, got {self.connectivity!r}")
        if self.correction_rounds < 1:
            raise GuideSettingsError(f"correction_rounds must be >= 1, got {self.correction_rounds!r}")
        if self.max_object_clicks < 1:
            raise GuideSettingsError(f"max_object_clicks must be >= 1, got {self.max_object_clicks!r}")
        if self.max_negative_clicks < 0:
            raise GuideSettingsError(f"max_negative_clicks must be >= 0, got {self.max_negative_clicks!r}")
        if self.guided_labels is not None:
            object.__setattr__(self, "guided_labels", tuple(self.guided_labels))

    @property
    def no_guide_value(self) -> float:
        """Value of a guide channel without any click."""
        return 0.5 if self.offset_half else 0.0

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["guided_labels"] is not None:
            d["guided_labels"] = list(d["guided_labels"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: Optional[str] = None, field_prefix: str = "") -> "GuideSettings":
        """Settings from their JSON form, type-checked strictly: a field whose default is a bool
        must be a JSON bool, an int field an integer (not a bool), a float field a finite number
        (not a bool), a str field a string; ``guided_labels`` is null or a list of names/values.
        Errors name ``source`` (a file) and the field (``field_prefix`` + name)."""
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise GuideSettingsError(f"{where}field {field_prefix.rstrip('.') or 'guide'!r} must be an object, "
                                     f"got {type(d).__name__} {_short(d)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GuideSettingsError(f"{where}unknown guide setting(s) {[field_prefix + u for u in unknown]}; "
                                     f"known: {sorted(known)}")
        for f in fields(cls):
            if f.name not in d:
                continue
            v, name = d[f.name], field_prefix + f.name
            if f.name == "guided_labels":
                if v is not None and not (isinstance(v, list) and all(
                        isinstance(g, str) or _is_int(g) for g in v)):
                    raise GuideSettingsError(f"{where}field {name!r} must be null or a list of class names "
                                             f"(strings) or label values (integers), got {_short(v)}")
                continue
            expected = _json_type_check(f.default, v)
            if expected is not None:
                raise GuideSettingsError(f"{where}field {name!r} must be {expected}, got {_short(v)}")
        try:
            return cls(**d)
        except GuideSettingsError as e:
            raise GuideSettingsError(f"{where}{field_prefix.rstrip('.') or 'guide'}: {e}") from e

    def replace(self, **changes) -> "GuideSettings":
        return replace(self, **changes)


@dataclass(frozen=True)
class GuidedTarget:
    """One guided class: its name and the label values it covers (one value, or a region's set)."""
    name: str
    labels: Tuple[int, ...]


def resolve_targets(dataset_json: dict, guided_labels: Optional[Sequence[Union[str, int]]],
                    ignore_label: Optional[int] = None) -> List[GuidedTarget]:
    """Map a settings' ``guided_labels`` onto the dataset's labels (or regions).

    ``dataset_json["labels"]`` maps names to an int (label-based) or to a list of ints (a region
    of a region-based dataset). ``background`` and the ignore label are never guided.
    Raises GuideSettingsError naming the missing class and the dataset's classes.
    """
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise GuideSettingsError("dataset.json has no 'labels' dictionary; cannot resolve guided classes")
    candidates: List[GuidedTarget] = []
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        vals = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if ignore_label is not None and vals == (int(ignore_label),):
            continue
        if vals == (0,):
            continue
        candidates.append(GuidedTarget(name, vals))
    if guided_labels is None:
        return candidates
    chosen: List[GuidedTarget] = []
    for g in guided_labels:
        match = [t for t in candidates if t.name == g or _value_matches(g, t.labels)]
        if not match:
            raise GuideSettingsError(
                f"guided class {g!r} is not a foreground class of this dataset; "
                f"dataset.json labels are {dict((t.name, list(t.labels)) for t in candidates)}")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


@dataclass
class ChannelLayout:
    """What each input channel of a guide-aware network is.

    ``channels`` lists one dict per channel, in order: ``{"kind": "image", "name": ...}`` for the
    dataset's own inputs (and ``"cascade"`` channels of a cascade), then ``{"kind": "guide",
    "target": name, "sign": "+" or "-"}``, then any ``"density"``/``"texture"`` channels.
    """
    num_image_channels: int
    targets: List[GuidedTarget]
    guide: Optional[GuideSettings]
    channels: List[Dict[str, Any]]
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. density settings and histograms

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def num_extra_channels(self) -> int:
        return self.num_channels - self.num_image_channels

    def indices(self, kind: str) -> List[int]:
        return [i for i, c in enumerate(self.channels) if c["kind"] == kind]

    @property
    def guide_channel_indices(self) -> List[int]:
        return self.indices("guide")

    def guide_channel(self, target_index: int, positive: bool) -> int:
        """Index of the guide channel of target ``target_index`` (position in ``targets``)."""
        name = self.targets[target_index].name
        sign = "+" if positive else "-"
        for i, c in enumerate(self.channels):
            if c["kind"] == "guide" and c["target"] == name and c["sign"] == sign:
                return i
        raise GuideSettingsError(
            f"this model has no {'positive' if positive else 'negative'} guide channel for {name!r}")

    def target_index(self, label: Union[str, int]) -> int:
        """Position in ``targets`` of a class given by name or label value."""
        for i, t in enumerate(self.targets):
            if t.name == label or _value_matches(label, t.labels):
                return i
        raise GuideSettingsError(
            f"label {label!r} is not a guided class of this model; guided classes: "
            f"{[t.name for t in self.targets]} (values {[list(t.labels) for t in self.targets]})")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "num_image_channels": self.num_image_channels,
            "num_channels": self.num_channels,
            "targets": [{"name": t.name, "labels": list(t.labels)} for t in self.targets],
            "guide": self.guide.to_dict() if self.guide is not None else None,
            "channels": [dict(c) for c in self.channels],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "settings") -> "ChannelLayout":
        """A layout from its JSON form (``to_dict``), checked strictly, then rebuilt.

        Every field is type-checked (integers are integers and not bools, numbers are finite,
        bools are bools, every channel has a known ``kind``); then the channel list is rebuilt
        from ``num_image_channels``, ``targets``, ``guide`` and (for density models)
        ``extra["density"]`` with :func:`build_layout` and must equal the stored one, so a
        deleted, added or reordered channel is refused. Errors are GuideSettingsError naming
        ``source`` (the file) and the field.
        """
        def bad(field_name: str, why: str) -> GuideSettingsError:
            return GuideSettingsError(f"{source}: field {field_name!r} {why}")

        if not isinstance(d, dict):
            raise GuideSettingsError(f"{source}: malformed nnunet_guide settings: expected an object, "
                                     f"got {type(d).__name__} {_short(d)}")
        unknown = sorted(set(d) - _LAYOUT_KEYS)
        if unknown:
            raise GuideSettingsError(f"{source}: unknown field(s) {unknown}; known: {sorted(_LAYOUT_KEYS)}")
        if not _is_int(d.get("format_version")) or d["format_version"] != FORMAT_VERSION:
            raise GuideSettingsError(
                f"{source}: format_version {d.get('format_version')!r}, this nnunet_guide reads {FORMAT_VERSION}")
        missing = [k for k in ("num_image_channels", "targets", "channels") if k not in d]
        if missing:
            raise GuideSettingsError(f"{source}: malformed nnunet_guide settings: missing field(s) {missing}")
        n_img = d["num_image_channels"]
        if not _is_int(n_img) or n_img < 1:
            raise bad("num_image_channels", f"must be an integer >= 1, got {_short(n_img)}")
        if not isinstance(d["targets"], list):
            raise bad("targets", f"must be a list, got {_short(d['targets'])}")
        targets: List[GuidedTarget] = []
        for i, t in enumerate(d["targets"]):
            f = f"targets[{i}]"
            if not isinstance(t, dict) or set(t) != {"name", "labels"}:
                raise bad(f, f"must be an object with exactly 'name' and 'labels', got {_short(t)}")
            if not isinstance(t["name"], str) or not t["name"]:
                raise bad(f + ".name", f"must be a non-empty string, got {_short(t['name'])}")
            if not (isinstance(t["labels"], list) and t["labels"] and all(_is_int(v) for v in t["labels"])):
                raise bad(f + ".labels", f"must be a non-empty list of integers, got {_short(t['labels'])}")
            if t["name"] in [x.name for x in targets]:
                raise bad(f + ".name", f"repeats target {t['name']!r}")
            targets.append(GuidedTarget(t["name"], tuple(t["labels"])))
        guide = None
        if d.get("guide") is not None:
            guide = GuideSettings.from_dict(d["guide"], source=source, field_prefix="guide.")
        extra = d.get("extra")
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise bad("extra", f"must be an object, got {_short(extra)}")
        channels = d["channels"]
        if not isinstance(channels, list):
            raise bad("channels", f"must be a list, got {_short(channels)}")
        names = [t.name for t in targets]
        for i, c in enumerate(channels):
            f = f"channels[{i}]"
            if not isinstance(c, dict):
                raise bad(f, f"must be an object, got {_short(c)}")
            if "kind" not in c:
                raise bad(f, f"has no 'kind' (one of {list(CHANNEL_KINDS)}): {_short(c)}")
            if c["kind"] not in CHANNEL_KINDS:
                raise bad(f + ".kind", f"must be one of {list(CHANNEL_KINDS)}, got {_short(c['kind'])}")
            if c["kind"] == "image" and not isinstance(c.get("name"), str):
                raise bad(f + ".name", f"must be a string (image channel name), got {_short(c.get('name'))}")
            if c["kind"] == "guide":
                if c.get("target") not in names:
                    raise bad(f + ".target", f"must name one of the targets {names}, got {_short(c.get('target'))}")
                if c.get("sign") not in ("+", "-"):
                    raise bad(f + ".sign", f"must be '+' or '-', got {_short(c.get('sign'))}")
        n_listed = sum(1 for c in channels if c["kind"] == "image")
        if n_listed != n_img:
            raise bad("num_image_channels", f"is {n_img} but the channel list has {n_listed} image channel(s)")
        if "num_channels" in d and (not _is_int(d["num_channels"]) or d["num_channels"] != len(channels)):
            raise bad("num_channels", f"is {_short(d['num_channels'])} but {len(channels)} channels are listed")
        computed = [dict(c) for c in channels if c["kind"] in ("density", "texture")]
        rebuilt = build_layout(n_img, targets, guide, [c["name"] for c in channels[:n_img]],
                               computed, extra)
        _compare_channels(channels, rebuilt.channels, source,
                          "num_image_channels, targets and guide (negatives) give")
        if computed or "density" in extra:
            _check_density_channels(rebuilt, computed, source)
        return rebuilt


_LAYOUT_KEYS = frozenset(("format_version", "num_image_channels", "num_channels", "targets", "guide",
                          "channels", "extra"))
#: kinds of input channel a layout may list
CHANNEL_KINDS = ("image", "guide", "density", "texture")


def _compare_channels(stored: List[Dict[str, Any]], expected: List[Dict[str, Any]], source: str,
                      what: str) -> None:
    if stored == expected:
        return
    i = next((i for i, (a, b) in enumerate(zip(stored, expected)) if a != b), min(len(stored), len(expected)))
    raise GuideSettingsError(
        f"{source}: field 'channels[{i}]' is {stored[i] if i < len(stored) else 'missing'}, but {what} "
        f"{expected[i] if i < len(expected) else 'no such channel'} ({len(stored)} channels stored, "
        f"{len(expected)} expected). The channel list no longer matches the settings; restore the file "
        f"written at training time.")


def _check_density_channels(layout: "ChannelLayout", computed: List[Dict[str, Any]], source: str) -> None:
    """Rebuild the density/texture channels from ``extra["density"]`` (options, histograms)."""
    ex = layout.extra.get("density")
    if not isinstance(ex, dict):
        raise GuideSettingsError(f"{source}: field 'extra.density' is missing or not an object, but the channel "
                                 f"list has {len(computed)} density/texture channel(s)")
    from .core.density import DensityError, DensityOptions, density_channels  # torch; only for density models
    try:
        opts = DensityOptions.from_dict(ex.get("options", {}))
        names = [c["name"] for c in layout.channels[:layout.num_image_channels]]
        guided = [(t.name, t.labels) for t in layout.targets] if layout.guide is not None and opts.case else []
        expected = density_channels(opts, ex["histograms"], names, guided)
    except (DensityError, KeyError, TypeError, ValueError) as e:
        raise GuideSettingsError(f"{source}: field 'extra.density' cannot be used "
                                 f"({type(e).__name__}: {e})") from e
    n_fed = layout.num_channels - len(computed)
    _compare_channels(layout.channels, layout.channels[:n_fed] + expected, source,
                      "the density options and histograms (extra.density) give")


def build_layout(num_image_channels: int, targets: Sequence[GuidedTarget], guide: Optional[GuideSettings],
                 image_channel_names: Optional[Sequence[str]] = None,
                 extra_channels: Sequence[Dict[str, Any]] = (), extra: Optional[Dict[str, Any]] = None
                 ) -> ChannelLayout:
    """Channel layout: image channels, then (+, -) guide channels per target, then ``extra_channels``."""
    names = list(image_channel_names) if image_channel_names is not None else []
    names += [f"input_{i}" for i in range(len(names), num_image_channels)]
    channels: List[Dict[str, Any]] = [{"kind": "image", "name": str(n)} for n in names[:num_image_channels]]
    if guide is not None:
        for t in targets:
            channels.append({"kind": "guide", "target": t.name, "sign": "+"})
            if guide.negatives:
                channels.append({"kind": "guide", "target": t.name, "sign": "-"})
    channels += [dict(c) for c in extra_channels]
    return ChannelLayout(num_image_channels, list(targets), guide, channels, dict(extra or {}))


def current_umask() -> int:
    """The process's umask (read from /proc on Linux, so no other thread sees it change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(prefix: str, dir: str) -> str:
    """``tempfile.mkdtemp`` with the mode a plain ``os.mkdir`` would give (0777 minus the umask)
    instead of mkdtemp's 0700, for staging folders that are renamed into place and must stay
    readable by the people sharing them."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    os.chmod(path, 0o777 & ~current_umask())
    return path


def write_atomic(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same file ending, so writers that
    choose the format by name still work) and rename it into place: a reader never sees half a
    file, and a failed write leaves nothing behind. The file gets the mode a plain ``open()``
    would give (0666 minus the umask), not mkstemp's 0600, so others sharing the folder can
    read it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    ext = ".nii.gz" if base.endswith(".nii.gz") else os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=ext, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def write_json_atomic(obj: Any, path: str) -> None:
    """Write JSON next to ``path`` and rename it into place, so a reader never sees half a file."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=False), path)


def save_layout(layout: ChannelLayout, model_folder: str) -> str:
    path = os.path.join(model_folder, SETTINGS_FILE)
    write_json_atomic(layout.to_dict(), path)
    return path


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise GuideSettingsError(f"{path} is not valid JSON: {type(e).__name__}: {e}") from e


def load_layout(model_folder: str) -> ChannelLayout:
    """Read ``guide_settings.json`` of a model folder, check it strictly (``ChannelLayout.from_dict``)
    and cross-check it with the folder's plans.json (key ``"nnunet_guide"``)."""
    path = os.path.join(model_folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise GuideSettingsError(
            f"{path} does not exist: {model_folder} was not trained with an nnunet_guide trainer "
            f"(no guide or density channels to feed)")
    layout = ChannelLayout.from_dict(_read_json(path), source=path)
    plans_path = os.path.join(model_folder, "plans.json")
    if os.path.isfile(plans_path):
        plans = _read_json(plans_path)
        if not isinstance(plans, dict):
            raise GuideSettingsError(f"{plans_path}: expected a JSON object, got {type(plans).__name__}")
        in_plans = plans.get(PLANS_KEY)
        if in_plans is not None:
            other = ChannelLayout.from_dict(in_plans, source=f"{plans_path} (key {PLANS_KEY!r})")
            if other.to_dict() != layout.to_dict():
                raise GuideSettingsError(
                    f"{path} does not match the layout the model was trained with ({plans_path}, key "
                    f"{PLANS_KEY!r}): {layout.num_channels} vs {other.num_channels} channels. Restore the "
                    f"settings file written at training time.")
    return layout


def layout_from_plans(plans: dict, source: str = "plans.json") -> Optional[ChannelLayout]:
    """The layout stored in a plans dict (key ``"nnunet_guide"``), checked as in ``from_dict``;
    ``source`` names the plans file in errors."""
    d = plans.get(PLANS_KEY)
    return None if d is None else ChannelLayout.from_dict(d, source=f"{source} (key {PLANS_KEY!r})")
