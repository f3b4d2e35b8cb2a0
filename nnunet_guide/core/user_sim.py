"""The simulated user of the evaluation, and the click-and-re-predict loop around a model.

The user looks at the current prediction of each guided class and clicks once per class:
- errors are the false negatives (reference and not predicted) and the false positives
  (predicted and not reference) of that class;
- the click goes to the largest error component (most voxels; ties: the one with the deeper
  interior, then false negatives before false positives, then the lower component index, as
  :func:`nnunet_guide.core.clicks.cropped_objects` numbers them);
- inside it, at the interior-most voxel: the maximum of the Euclidean distance transform in mm
  (``spacing``), so anisotropic voxels are handled, and the image border counts as outside;
- a missed region gives a positive click ("this is the class"), a false region a negative click
  ("this is not the class");
- no error (or only components smaller than ``min_error_voxels``) means no click: the user stops
  for that class. The user stops altogether when no guided class has an error left.

With ``start="box"`` (the CVPR 2025 interactive protocol: one box, then N clicks) the first step
instead gives one 3D box per reference object of every guided class, the object's tight box; with
``start="scribble"`` one scribble per reference object, on its largest axial cross-section; with
``start="points"`` one positive click at the interior-most voxel of every reference object, as a
reader who marks each lesion once (and as guided validation clicks), so clicks on objects the model
already finds, and on tiny ones, are measured too.

Every step records what it did to each clicked class (:class:`StepEffect`): Dice before and after,
lesions lost, the Dice beyond the guide's reach of every prompt so far, and for point clicks whether
the output followed each click at its own voxel.

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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .clicks import (Click, box_click, cropped_objects, interior_point, label_objects, mask_bbox, object_clicks,
                     robust_center_mask)
from .prompts import scribble_clicks, simulate_stroke
from .metrics import (HARM_TOLERANCE, ClickEffect, DiceResult, LesionDetection, MetricsInputError,
                      SurfaceDiceResult, check_pair, class_mask, click_effect, dice_masks, far_from_clicks,
                      lesion_detection, surface_dice)


@dataclass(frozen=True)
class ErrorRegion:
    """The error component the user clicks on: its click, size (voxels) and depth (mm)."""
    click: Click
    size: int
    depth_mm: float
    false_negative: bool


def checked_spacing(spacing: Sequence[float], reference: np.ndarray, case: Optional[str] = None) -> Tuple[float, ...]:
    """``spacing`` as floats, one per axis of ``reference``; else a :class:`MetricsInputError` naming the case."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != np.ndim(reference):
        raise MetricsInputError(
            f"{'case ' + repr(case) + ': ' if case else ''}spacing {spacing} has {len(spacing)} values; "
            f"the label maps are {np.ndim(reference)}D with shape {np.shape(reference)}")
    return spacing


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
    spacing = checked_spacing(spacing, reference, case)
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
        # labelled in the mask's bounding box (cc3d in 2D/3D: same components as scipy)
        lab, n, crop_offset = cropped_objects(mask, connectivity, None)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        big = np.flatnonzero(sizes >= max(int(min_error_voxels), 1)) + 1
        if big.size == 0:
            continue
        # only the largest components can win: boxes and depth are computed for the size ties only
        top = sizes[big - 1].max()
        for oid in big[sizes[big - 1] == top]:
            sl = mask_bbox(lab == oid)
            obj = lab[sl] == oid
            pos, depth = interior_point(obj, spacing)
            offset = np.array([s.start for s in sl], float) + crop_offset
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
ReachFn = Callable[[Click], Sequence[float]]

START_MODES = ("clicks", "box", "scribble", "points")
PROMPT_STARTS = ("box", "scribble", "points")  # a start whose step 1 is a prompt of that kind per reference object
POINT_KINDS = ("point", "points")  # effect kinds made of point clicks: whether each was followed is recorded


def _reference_labels(reference: np.ndarray, labels: Sequence[int], connectivity: int,
                      ignore_label: Optional[int]) -> Tuple[np.ndarray, int]:
    """The connected components of one class in the reference (ignore label excluded): labels, count."""
    reference = np.asarray(reference)
    mask = class_mask(reference, labels)
    if ignore_label is not None:
        mask &= reference != ignore_label
    return label_objects(mask, connectivity)


def reference_objects(reference: np.ndarray, labels: Sequence[int], connectivity: int = 2,
                      ignore_label: Optional[int] = None) -> Iterator[Tuple[Tuple[slice, ...], np.ndarray]]:
    """The reference objects (connected components) of one class, ignore label excluded, in label
    order: each as its bounding box (slices of the reference array) and its mask within that box."""
    lab, n = _reference_labels(reference, labels, connectivity, ignore_label)
    for i, sl in enumerate(ndimage.find_objects(lab, max_label=n), start=1):
        if sl is not None:
            yield sl, lab[sl] == i


def object_boxes(reference: np.ndarray, labels: Sequence[int], target: int, connectivity: int = 2,
                 ignore_label: Optional[int] = None) -> List[Click]:
    """The box prompts of the CVPR 2025 interactive protocol for one guided class: one 3D box per
    reference object (connected component), each the object's tightest half-open voxel box
    (:func:`nnunet_guide.core.clicks.box_click`), positive, in the reference's array order."""
    return [box_click(target, [s.start for s in sl], [s.stop for s in sl], True)
            for sl, _ in reference_objects(reference, labels, connectivity, ignore_label)]


def object_scribbles(reference: np.ndarray, labels: Sequence[int], target: int, spacing: Sequence[float],
                     step_mm: float, connectivity: int = 2, ignore_label: Optional[int] = None) -> List[Click]:
    """The scribble start for one guided class: one positive scribble per reference object, drawn
    on the object's largest cross-section along the first array axis (axial in SimpleITK's z, y, x
    order; 2D: the whole object): the section's medial voxels, as the training simulation draws a
    scribble (:func:`nnunet_guide.core.prompts.simulate_stroke`), given as point clicks on a
    ``step_mm`` grid as the server renders one (:func:`nnunet_guide.core.prompts.scribble_clicks`)."""
    shape = np.shape(reference)
    out: List[Click] = []
    for sl, obj in reference_objects(reference, labels, connectivity, ignore_label):
        axis = 0 if obj.ndim == 3 else None
        if axis is not None:  # the largest section only: the stroke's slice is then fixed
            z = int(np.argmax(obj.sum(axis=(1, 2))))
            section = np.zeros_like(obj)
            section[z] = obj[z]
            obj = section
        stroke = simulate_stroke(obj, spacing, np.random.default_rng(0), axis, "scribble")
        out += scribble_clicks(target, stroke, True, spacing, step_mm, shape, [s.start for s in sl])
    return out


def object_points(reference: np.ndarray, labels: Sequence[int], target: int, spacing: Sequence[float],
                  connectivity: int = 2, ignore_label: Optional[int] = None, min_sigma: float = 2.0) -> List[Click]:
    """The points start for one guided class: one positive click per reference object (connected
    component, in label order), at its interior-most voxel in mm (``object_clicks``' ``interior``
    policy, as the simulated user clicks an error region), with the object's robust sigma (for the
    ``object_gaussian`` encoding), in the reference's array order."""
    lab, n = _reference_labels(reference, labels, connectivity, ignore_label)
    return object_clicks(lab, range(1, n + 1), int(target), tuple(float(s) for s in spacing), "interior",
                         min_sigma=min_sigma)


@dataclass
class ClassTrace:
    """Metrics of one evaluated class after 0..N steps (index = number of prompt steps).

    ``surface`` holds the normalised surface Dice per step (empty when it was not computed).
    """
    dice: List[DiceResult] = field(default_factory=list)
    detection: List[LesionDetection] = field(default_factory=list)
    surface: List[SurfaceDiceResult] = field(default_factory=list)

    @property
    def dice_curve(self) -> List[float]:
        return [d.dice for d in self.dice]


@dataclass(frozen=True)
class StepEffect:
    """What one prompt step did to one guided class: ``step`` (1-based), ``target`` (index into
    the guided classes), ``kind`` ("point": a click step; "box", "scribble" or "points": the start's
    prompts), the step's prompt positions on that class,
    the :class:`~nnunet_guide.core.metrics.ClickEffect`, and ``positive``: whether the step's prompts on the
    class were positive (True), negative (False) or both (None)."""
    step: int
    target: int
    kind: str
    positions: Tuple[Tuple[float, ...], ...]
    effect: ClickEffect
    positive: Optional[bool] = None


@dataclass
class SessionResult:
    """Everything one simulated session on one case produced.

    Attributes:
        case_id: the case.
        n_steps: the number of prompt steps (N click steps, plus the box step when the session
            starts from a box); every trace has ``n_steps + 1`` entries.
        stopped_at: step after which the user had nothing left to click (None: used all steps).
            Steps after it repeat the last metrics (the prediction does not change without a
            new click).
        clicks: ``(step, Click)`` for every prompt given (boxes are ``kind="box"`` clicks); step 1
            is the first.
        traces: evaluated class name -> :class:`ClassTrace`.
        first_prediction, last_prediction: label maps after 0 and after all steps.
        effects: per step and clicked guided class, what the step did (:class:`StepEffect`).
        step_kinds: per step 1..n_steps, the start's kind (``"box"``, ``"scribble"``, ``"points"``) or ``"click"``.
    """
    case_id: str
    n_steps: int
    stopped_at: Optional[int]
    clicks: List[Tuple[int, Click]]
    traces: Dict[str, ClassTrace]
    first_prediction: np.ndarray
    last_prediction: np.ndarray
    effects: List[StepEffect] = field(default_factory=list)
    step_kinds: List[str] = field(default_factory=list)


def simulate_session(case_id: str, predict: PredictFn, reference: np.ndarray, spacing: Sequence[float],
                     guided: Sequence[Sequence[int]], classes: Dict[str, Sequence[int]], n_clicks: int,
                     connectivity: int = 2, allow_negative: bool = True, ignore_label: Optional[int] = None,
                     min_error_voxels: int = 1, detection_min_dice: float = 0.0,
                     min_sigma: float = 2.0, start: str = "clicks", nsd_tolerance_mm: Optional[float] = 2.0,
                     reach: Optional[ReachFn] = None, slice_axis: Optional[int] = None,
                     harm_tolerance: float = HARM_TOLERANCE, prompt_step_mm: Optional[float] = None) -> SessionResult:
    """Run the simulated user on one case: predict with no click, then N times add one click
    per guided class at its largest error and predict again.

    Args:
        case_id: passed to ``predict`` and used in error messages.
        predict: ``predict(case_id, clicks) -> label map`` in the reference's voxel grid; clicks
            are all clicks so far (voxel indices of the reference array, ``Click.target`` =
            index into ``guided``). Called N + 1 times at most (N + 2 with a box start).
        reference: reference label map.
        spacing: mm per array axis of ``reference``.
        guided: label value(s) of each guided class, in the model's target order.
        classes: evaluated classes, name -> label value(s) (guided or not).
        n_clicks: N, the number of click steps (>= 0).
        connectivity, allow_negative, ignore_label, min_error_voxels, min_sigma: see
            :func:`largest_error`; ``connectivity`` also defines lesions of the detection.
        detection_min_dice: see :func:`nnunet_guide.core.metrics.lesion_detection`.
        start: ``"clicks"`` (default) or ``"box"``: step 1 gives one box per reference object of
            every guided class (:func:`object_boxes`, the CVPR 2025 interactive protocol), then
            the N click steps follow; ``"scribble"``: step 1 gives one scribble per reference
            object (:func:`object_scribbles`, clicks every ``prompt_step_mm``), then the clicks;
            ``"points"``: step 1 gives one positive click per reference object
            (:func:`object_points`), then the clicks.
        nsd_tolerance_mm: tolerance of the normalised surface Dice measured per step (None: skip).
        reach: per-axis reach (voxels of the reference array) of a prompt's guide map
            (e.g. :func:`nnunet_guide.core.metrics.click_reach_voxels`); with it, each step's
            effect includes the Dice beyond the reach of every prompt so far. None: skipped.
        slice_axis: for 2D models: prompts reach only their own slice along this axis.
        harm_tolerance: a step is harmful to its class when its Dice falls by more than this.
        prompt_step_mm: grid step of a scribble's clicks (needed with ``start="scribble"``; e.g.
            :func:`nnunet_guide.core.prompts.prompt_step_mm` of the model's guide settings).
    """
    if n_clicks < 0:
        raise ValueError(f"n_clicks must be >= 0, got {n_clicks}")
    if start not in START_MODES:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    if start == "scribble" and not (prompt_step_mm and prompt_step_mm > 0):
        raise ValueError(f"start='scribble' needs a positive prompt_step_mm, got {prompt_step_mm!r}")
    spacing = checked_spacing(spacing, reference, case_id)  # every start, even with no click step after it
    reference = np.asarray(reference)
    traces = {name: ClassTrace() for name in classes}
    keep = None if ignore_label is None else reference != ignore_label
    n_steps = n_clicks + (1 if start in PROMPT_STARTS else 0)

    def masks(pred: np.ndarray, vals: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        r, p = class_mask(reference, vals), class_mask(pred, vals)
        return (r, p) if keep is None else (r & keep, p & keep)

    def measure(pred: np.ndarray) -> None:
        for name, vals in classes.items():
            r, p = masks(pred, vals)
            traces[name].dice.append(dice_masks(r, p, case_id))
            traces[name].detection.append(lesion_detection(r, p, connectivity, detection_min_dice, case_id))
            if nsd_tolerance_mm is not None:
                traces[name].surface.append(surface_dice(r, p, spacing, nsd_tolerance_mm, case_id))

    def repeat_last() -> None:
        for tr in traces.values():
            tr.dice.append(tr.dice[-1])
            tr.detection.append(tr.detection[-1])
            if tr.surface:
                tr.surface.append(tr.surface[-1])

    def run(clicks: List[Click]) -> np.ndarray:
        pred = np.asarray(predict(case_id, list(clicks)))
        try:
            check_pair(reference, pred, case_id)
        except MetricsInputError as e:
            raise MetricsInputError(f"{e} (prediction after {len(clicks)} click(s))") from None
        return pred

    # a guided class that is also an evaluated class (same labels) reuses its lesion detection
    same = {t: next((n for n, v in classes.items() if tuple(v) == tuple(labels)), None)
            for t, labels in enumerate(guided)}
    effects: List[StepEffect] = []

    def record_effects(step: int, new: List[Click], all_clicks: List[Click], before: np.ndarray,
                       after: np.ndarray, kind: str) -> None:
        far = None
        if reach is not None:
            far = far_from_clicks(reference.shape, [c.position for c in all_clicks],
                                  [reach(c) for c in all_clicks], slice_axis)
        for t in sorted({c.target for c in new}):
            mine = [c for c in new if c.target == t]
            r, p0 = masks(before, guided[t])
            _, p1 = masks(after, guided[t])
            name = same[t]
            det = (traces[name].detection[-2], traces[name].detection[-1]) if name else (None, None)
            eff = click_effect(r, p0, p1, [c.position for c in mine], far, connectivity, detection_min_dice,
                               harm_tolerance, case_id, *det,
                               click_signs=[bool(c.positive) for c in mine] if kind in POINT_KINDS else ())
            signs = {bool(c.positive) for c in mine}
            effects.append(StepEffect(step, t, kind, tuple(tuple(c.position) for c in mine), eff,
                                      signs.pop() if len(signs) == 1 else None))

    pred = run([])
    first = pred
    measure(pred)
    clicks: List[Click] = []
    log: List[Tuple[int, Click]] = []
    kinds: List[str] = []
    stopped_at = None
    for step in range(1, n_steps + 1):
        if start in PROMPT_STARTS and step == 1:
            kinds.append(start)
            if start == "box":
                new = [b for t, labels in enumerate(guided)
                       for b in object_boxes(reference, labels, t, connectivity, ignore_label)]
            elif start == "points":
                new = [c for t, labels in enumerate(guided)
                       for c in object_points(reference, labels, t, spacing, connectivity, ignore_label, min_sigma)]
            else:
                new = [c for t, labels in enumerate(guided)
                       for c in object_scribbles(reference, labels, t, spacing, prompt_step_mm, connectivity,
                                                 ignore_label)]
            if not new:  # no object to prompt: the prediction stays
                repeat_last()
                continue
        else:
            kinds.append("click")
            new = next_clicks(pred, reference, guided, spacing, connectivity=connectivity,
                              allow_negative=allow_negative, ignore_label=ignore_label,
                              min_error_voxels=min_error_voxels, min_sigma=min_sigma, case=case_id)
            if not new:
                stopped_at = step - 1
                kinds += ["click"] * (n_steps - step)
                for _ in range(step, n_steps + 1):
                    repeat_last()
                break
        clicks += new
        log += [(step, c) for c in new]
        before, pred = pred, run(clicks)
        measure(pred)
        record_effects(step, new, clicks, before, pred, kinds[-1] if kinds[-1] in PROMPT_STARTS else "point")
    return SessionResult(case_id, n_steps, stopped_at, log, traces, first, pred, effects, kinds)
