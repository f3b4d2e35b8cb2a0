"""The simulated user of the evaluation, and the click-and-re-predict loop around a model.

The user looks at the current prediction of each guided class and clicks once per class:
- errors are the false negatives (reference and not predicted) and the false positives
  (predicted and not reference) of that class;
- the click goes to the largest error component (most voxels; ties: the one with the deeper
  interior, then false negatives before false positives, then the lower component index);
- inside it, at the interior-most voxel: the maximum of the Euclidean distance transform in mm
  (``spacing``), so anisotropic voxels are handled, and the image border counts as outside;
- a missed region gives a positive click ("this is the class"), a false region a negative click
  ("this is not the class");
- no error (or only components smaller than ``min_error_voxels``) means no click: the user stops
  for that class. The user stops altogether when no guided class has an error left.

The user is deterministic: the same prediction and reference give the same click, so no seed
is needed here; evaluation runs are repeatable as long as the model's prediction is.

Conventions: label maps are integer arrays over the spatial axes (z, y, x for 3D, SimpleITK's
array order); ``spacing`` is mm per array axis in the same order; click positions are voxel
indices in that order (:class:`nnunet_guide.core.clicks.Click`). Reference voxels equal to
``ignore_label`` are neither errors nor clicked.

No nnU-Net import: pure numpy/scipy. The model enters :func:`simulate_session` as one function
``predict(case_id, clicks) -> label map``, so the loop runs on constructed arrays in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .clicks import Click, interior_point, label_objects, robust_center_mask
from .metrics import (DiceResult, LesionDetection, MetricsInputError, check_pair, class_mask, dice_masks,
                      lesion_detection)


@dataclass(frozen=True)
class ErrorRegion:
    """The error component the user clicks on: its click, size (voxels) and depth (mm)."""
    click: Click
    size: int
    depth_mm: float
    false_negative: bool


def largest_error(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int], target: int,
                  spacing: Sequence[float], connectivity: int = 2, allow_negative: bool = True,
                  ignore_label: Optional[int] = None, min_error_voxels: int = 1, min_sigma: float = 2.0,
                  case: Optional[str] = None) -> Optional[ErrorRegion]:
    """The error region of one guided class the simulated user clicks on, or None (stop).

    Args:
        prediction, reference: label maps of the same shape.
        labels: label value(s) of the class (a region's several values allowed).
        target: index of the class among the model's guided classes (goes into the Click).
        spacing: mm per array axis.
        connectivity: of error components (``scipy.ndimage.generate_binary_structure``).
        allow_negative: False for models without negative guide channels: only missed regions
            are clicked.
        ignore_label: reference value excluded from errors.
        min_error_voxels: components smaller than this are not worth a click.
        min_sigma: lower bound (voxels) of the click's robust sigma (``object_gaussian`` encoding).
        case: case identifier for error messages.
    Returns:
        :class:`ErrorRegion` with a :class:`Click` at the interior-most voxel of the largest
        error component, or None when no component is left to click.
    """
    check_pair(reference, prediction, case)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != np.ndim(reference):
        raise MetricsInputError(
            f"{'case ' + repr(case) + ': ' if case else ''}spacing {spacing} has {len(spacing)} values; "
            f"the label maps are {np.ndim(reference)}D with shape {np.shape(reference)}")
    ref = class_mask(reference, labels)
    pred = class_mask(prediction, labels)
    valid = None if ignore_label is None else np.asarray(reference) != ignore_label
    fn = ref & ~pred
    fp = pred & ~ref
    if valid is not None:
        fn &= valid
        fp &= valid
    candidates = []  # (size, depth_mm, is_fn, component id, position, component mask crop)
    kinds = [(fn, True)] + ([(fp, False)] if allow_negative else [])
    for mask, is_fn in kinds:
        if not mask.any():
            continue
        lab, n = label_objects(mask, connectivity)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        big = np.flatnonzero(sizes >= max(int(min_error_voxels), 1)) + 1
        if big.size == 0:
            continue
        # only the largest components can win: depth is computed for the size ties only
        top = sizes[big - 1].max()
        finds = ndimage.find_objects(lab, max_label=n)
        for oid in big[sizes[big - 1] == top]:
            sl = finds[oid - 1]
            obj = lab[sl] == oid
            pos, depth = interior_point(obj, spacing)
            offset = np.array([s.start for s in sl], float)
            candidates.append((int(top), depth, is_fn, int(oid), pos + offset, obj))
    if not candidates:
        return None
    # largest, then deepest, then false negative first, then lowest component id
    candidates.sort(key=lambda c: (-c[0], -c[1], not c[2], c[3]))
    size, depth, is_fn, _, pos, obj = candidates[0]
    _, sigma = robust_center_mask(obj, min_sigma)
    click = Click(int(target), tuple(float(p) for p in pos), bool(is_fn), tuple(float(s) for s in sigma))
    return ErrorRegion(click, size, float(depth), is_fn)


def next_click(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int], target: int,
               spacing: Sequence[float], **kwargs) -> Optional[Click]:
    """The simulated user's next click for one guided class (None: no error left, stop).

    Same arguments as :func:`largest_error`; positive click on a missed region, negative on a
    false one.
    """
    region = largest_error(prediction, reference, labels, target, spacing, **kwargs)
    return None if region is None else region.click


def next_clicks(prediction: np.ndarray, reference: np.ndarray, targets: Sequence[Sequence[int]],
                spacing: Sequence[float], **kwargs) -> List[Click]:
    """One click per guided class that still has an error (``targets[i]`` = label values of
    class i; the Click's ``target`` is i). Empty list: the user stops."""
    clicks = []
    for t, labels in enumerate(targets):
        c = next_click(prediction, reference, labels, t, spacing, **kwargs)
        if c is not None:
            clicks.append(c)
    return clicks


def correction_clicks(prediction: np.ndarray, reference: np.ndarray, targets: Sequence[Sequence[int]],
                      spacing: Sequence[float], settings, ignore_label: Optional[int] = None) -> List[Click]:
    """Training-time correction clicks: the simulated user's next click per guided class, with
    the model's guide settings (the caller renders them with the rest of the sample's clicks).

    Args:
        prediction, reference: label maps (*shape) of the model's current output and the truth.
        targets: label value(s) per guided class, in layout order.
        spacing: mm per axis of ``shape``.
        settings: the model's ``GuideSettings`` (negatives, connectivity, sigma bound).
        ignore_label: reference value neither clicked nor counted as an error.
    Returns:
        the clicks (empty where the prediction has no error left).
    """
    return next_clicks(prediction, reference, targets, spacing, connectivity=settings.connectivity,
                       allow_negative=settings.negatives, ignore_label=ignore_label,
                       min_sigma=settings.min_object_sigma)


# --------------------------------------------------------------------------------------------
# The loop: predict, click at the largest error, re-predict


PredictFn = Callable[[str, List[Click]], np.ndarray]


@dataclass
class ClassTrace:
    """Metrics of one evaluated class after 0..N clicks (index = number of click steps)."""
    dice: List[DiceResult] = field(default_factory=list)
    detection: List[LesionDetection] = field(default_factory=list)

    @property
    def dice_curve(self) -> List[float]:
        return [d.dice for d in self.dice]


@dataclass
class SessionResult:
    """Everything one simulated session on one case produced.

    Attributes:
        case_id: the case.
        n_steps: N, the number of click steps asked for; every trace has N + 1 entries.
        stopped_at: step after which the user had nothing left to click (None: used all N).
            Steps after it repeat the last metrics (the prediction does not change without a
            new click).
        clicks: ``(step, Click)`` for every click given; step 1 is the first click.
        traces: evaluated class name -> :class:`ClassTrace`.
        first_prediction, last_prediction: label maps after 0 and after all clicks.
    """
    case_id: str
    n_steps: int
    stopped_at: Optional[int]
    clicks: List[Tuple[int, Click]]
    traces: Dict[str, ClassTrace]
    first_prediction: np.ndarray
    last_prediction: np.ndarray


def simulate_session(case_id: str, predict: PredictFn, reference: np.ndarray, spacing: Sequence[float],
                     guided: Sequence[Sequence[int]], classes: Dict[str, Sequence[int]], n_clicks: int,
                     connectivity: int = 2, allow_negative: bool = True, ignore_label: Optional[int] = None,
                     min_error_voxels: int = 1, detection_min_dice: float = 0.0,
                     min_sigma: float = 2.0) -> SessionResult:
    """Run the simulated user on one case: predict with no click, then N times add one click
    per guided class at its largest error and predict again.

    Args:
        case_id: passed to ``predict`` and used in error messages.
        predict: ``predict(case_id, clicks) -> label map`` in the reference's voxel grid; clicks
            are all clicks so far (voxel indices of the reference array, ``Click.target`` =
            index into ``guided``). Called N + 1 times at most.
        reference: reference label map.
        spacing: mm per array axis of ``reference``.
        guided: label value(s) of each guided class, in the model's target order.
        classes: evaluated classes, name -> label value(s) (guided or not).
        n_clicks: N, the number of click steps (>= 0).
        connectivity, allow_negative, ignore_label, min_error_voxels, min_sigma: see
            :func:`largest_error`; ``connectivity`` also defines lesions of the detection.
        detection_min_dice: see :func:`nnunet_guide.core.metrics.lesion_detection`.
    """
    if n_clicks < 0:
        raise ValueError(f"n_clicks must be >= 0, got {n_clicks}")
    reference = np.asarray(reference)
    traces = {name: ClassTrace() for name in classes}

    def measure(pred: np.ndarray) -> None:
        for name, vals in classes.items():
            r, p = class_mask(reference, vals), class_mask(pred, vals)
            if ignore_label is not None:
                keep = reference != ignore_label
                r, p = r & keep, p & keep
            traces[name].dice.append(dice_masks(r, p, case_id))
            traces[name].detection.append(lesion_detection(r, p, connectivity, detection_min_dice, case_id))

    def run(clicks: List[Click]) -> np.ndarray:
        pred = np.asarray(predict(case_id, list(clicks)))
        try:
            check_pair(reference, pred, case_id)
        except MetricsInputError as e:
            raise MetricsInputError(f"{e} (prediction after {len(clicks)} click(s))") from None
        return pred

    pred = run([])
    first = pred
    measure(pred)
    clicks: List[Click] = []
    log: List[Tuple[int, Click]] = []
    stopped_at = None
    for step in range(1, n_clicks + 1):
        new = next_clicks(pred, reference, guided, spacing, connectivity=connectivity,
                          allow_negative=allow_negative, ignore_label=ignore_label,
                          min_error_voxels=min_error_voxels, min_sigma=min_sigma, case=case_id)
        if not new:
            stopped_at = step - 1
            for tr in traces.values():
                for _ in range(step, n_clicks + 1):
                    tr.dice.append(tr.dice[-1])
                    tr.detection.append(tr.detection[-1])
            break
        clicks += new
        log += [(step, c) for c in new]
        pred = run(clicks)
        measure(pred)
    return SessionResult(case_id, n_clicks, stopped_at, log, traces, first, pred)
