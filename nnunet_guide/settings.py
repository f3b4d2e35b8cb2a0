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
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

SETTINGS_FILE = "guide_settings.json"
PLANS_KEY = "nnunet_guide"
FORMAT_VERSION = 1

ENCODINGS = ("gaussian", "object_gaussian", "exp_distance", "ball")
CLICK_POLICIES = ("center", "interior", "random")


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
        connectivity: connectivity of objects as in ``scipy.ndimage.generate_binary_structure``
            (1 = faces only; ndim = full). Default 2 = 18-connectivity in 3D, as the original.
        min_object_sigma: lower bound of the object Gaussian's sigma in voxels (original: 2 px).
        validation_seed: seed of the simulated clicks of guided validation.
        p_correction: probability that a training sample also gets correction clicks from the
            model itself (the iterative click simulation of DeepEdit/RITM-style training): the
            network predicts the batch with its current guides, and the evaluation's simulated
            user (:mod:`nnunet_guide.core.user_sim`) clicks the interior-most voxel of the largest
            error per guided class: positive on a miss, negative on a false positive. This is what
            teaches negative clicks to remove false positives: ground-truth negatives land where
            the model is already right. Costs one extra forward pass per round for batches that
            have such a sample. 0 (default) switches it off.
        correction_rounds: at most this many correction rounds per batch (U{1..max}).
        p_box: probability that a clicked object's positive prompt is a box instead of a click
            (its jittered bounding box, drawn on one slice in half of the cases), rendered as the
            box-sized Gaussian ellipse (``Click.kind == "box"``); what the server's box prompts are.
        p_scribble: probability that it is a stroke instead: in half of the cases a scribble
            (the medial voxels of one cross-section), else a lasso (the cross-section's interior),
            as clicks on a grid of half the guide's sigma (:mod:`nnunet_guide.core.prompts`).
            Both default to 0: settings files without them load and train as before.
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
    connectivity: int = 2
    min_object_sigma: float = 2.0
    validation_seed: int = 12345
    p_correction: float = 0.0
    correction_rounds: int = 1
    p_box: float = 0.0
    p_scribble: float = 0.0

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise GuideSettingsError(
                f"unknown guide encoding {self.encoding!r}; expected one of {', '.join(ENCODINGS)}")
        if self.click_policy not in CLICK_POLICIES:
            raise GuideSettingsError(
                f"unknown click policy {self.click_policy!r}; expected one of {', '.join(CLICK_POLICIES)}")
        for name in ("p_drop", "p_negative", "p_confusable", "p_correction", "p_box", "p_scribble"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise GuideSettingsError(f"{name} must be a probability in [0, 1], got {v!r}")
        for name in ("sigma_mm", "ball_radius_mm", "min_object_sigma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise GuideSettingsError(f"{name} must be a positive number of mm/voxels, got {v!r}")
        if self.p_box + self.p_scribble > 1.0:
            raise GuideSettingsError(f"p_box + p_scribble must be at most 1 (they split the positive prompts), got "
                                     f"{self.p_box} + {self.p_scribble}")
        if self.connectivity < 1:
            raise GuideSettingsError(f"connectivity must be >= 1, got {self.connectivity!r}")
        if self.correction_rounds < 1:
            raise GuideSettingsError(f"correction_rounds must be >= 1, got {self.correction_rounds!r}")
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
    def from_dict(cls, d: Dict[str, Any]) -> "GuideSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GuideSettingsError(f"unknown guide setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

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
        match = [t for t in candidates if t.name == g or (
            not isinstance(g, str) and t.labels == (int(g),)) or (isinstance(g, str) and g.isdigit() and t.labels == (int(g),))]
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
            if t.name == label or (not isinstance(label, str) and t.labels == (int(label),)) or (
                    isinstance(label, str) and label.isdigit() and t.labels == (int(label),)):
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
        try:
            if d.get("format_version") != FORMAT_VERSION:
                raise GuideSettingsError(
                    f"{source}: format_version {d.get('format_version')!r}, this nnunet_guide reads {FORMAT_VERSION}")
            layout = cls(
                num_image_channels=int(d["num_image_channels"]),
                targets=[GuidedTarget(t["name"], tuple(int(v) for v in t["labels"])) for t in d["targets"]],
                guide=GuideSettings.from_dict(d["guide"]) if d.get("guide") is not None else None,
                channels=[dict(c) for c in d["channels"]],
                extra=dict(d.get("extra") or {}),
            )
        except GuideSettingsError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise GuideSettingsError(f"{source}: malformed nnunet_guide settings ({type(e).__name__}: {e})") from e
        if "num_channels" in d and int(d["num_channels"]) != layout.num_channels:
            raise GuideSettingsError(
                f"{source}: num_channels is {d['num_channels']} but {layout.num_channels} channels are listed")
        return layout


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


def write_atomic(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same file ending, so writers that
    choose the format by name still work) and rename it into place: a reader never sees half a
    file, and a failed write leaves nothing behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    ext = ".nii.gz" if base.endswith(".nii.gz") else os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=ext, dir=folder)
    os.close(fd)
    try:
        write(tmp)
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


def load_layout(model_folder: str) -> ChannelLayout:
    """Read ``guide_settings.json`` of a model folder; cross-check it with the folder's plans.json."""
    path = os.path.join(model_folder, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise GuideSettingsError(
            f"{path} does not exist: {model_folder} was not trained with an nnunet_guide trainer "
            f"(no guide or density channels to feed)")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise GuideSettingsError(f"{path} is not valid JSON: {e}") from e
    layout = ChannelLayout.from_dict(d, source=path)
    plans_path = os.path.join(model_folder, "plans.json")
    if os.path.isfile(plans_path):
        with open(plans_path) as f:
            plans = json.load(f)
        in_plans = plans.get(PLANS_KEY)
        if in_plans is not None:
            other = ChannelLayout.from_dict(in_plans, source=plans_path)
            if other.to_dict() != layout.to_dict():
                raise GuideSettingsError(
                    f"{path} does not match the layout the model was trained with ({plans_path}, key "
                    f"{PLANS_KEY!r}): {layout.num_channels} vs {other.num_channels} channels. Restore the "
                    f"settings file written at training time.")
    return layout


def layout_from_plans(plans: dict) -> Optional[ChannelLayout]:
    d = plans.get(PLANS_KEY)
    return None if d is None else ChannelLayout.from_dict(d, source="plans.json")
