"""Segmentation metrics of the evaluation: Dice, surface Dice, error volumes, lesion-wise detection,
Dice-vs-clicks summaries, and the harm a click does.

Conventions (for every function here):
- ``reference`` and ``prediction`` are integer label maps over the spatial axes only (no channel
  axis), in the array axis order of SimpleITK (z, y, x for 3D). A *mask* is a boolean array of
  the same kind. Both arrays of a pair must have the same shape; when spacings are given
  (mm per array axis) they must agree too, otherwise :class:`MetricsInputError` is raised naming
  the case and both values.
- A class is given by its label values: ``(2,)`` for one label, ``(1, 2)`` for a region (a union
  of labels, e.g. LiTS' "liver" = liver + tumour).
- Empty masks never produce a silent NaN:
  * Dice with an empty reference *and* an empty prediction is 1.0 and flagged ``both_empty``;
    an empty reference with a non-empty prediction is 0.0 and flagged ``empty_reference``.
  * Lesion recall is ``None`` when the reference has no lesion, precision is ``None`` when the
    prediction has none (JSON ``null``: undefined, not zero); counts are always reported so
    that they can be summed over cases.
  * Normalised surface Dice follows the Dice rule: both empty 1.0 (``both_empty``), exactly one
    empty 0.0. False-positive / false-negative volumes are always defined (0 when empty).
- Distances and volumes are in mm / mm^3 from ``spacing`` (anisotropic voxels allowed).
- Dice-vs-clicks curves are sequences ``d[0..N]``: Dice after 0 (automatic), 1, ..., N clicks.

No nnU-Net import: pure numpy/scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .clicks import label_objects, mask_bbox, target_mask
from .encoding import click_reach_voxels, guide_reach_mm  # noqa: F401  (the reach is the renderer's)


class MetricsInputError(ValueError):
    """Arrays that cannot be compared; the message names the case and the offending values."""


def _case_prefix(case: Optional[str]) -> str:
    return f"case {case!r}: " if case is not None else ""


def check_pair(reference: np.ndarray, prediction: np.ndarray, case: Optional[str] = None,
               reference_spacing: Optional[Sequence[float]] = None,
               prediction_spacing: Optional[Sequence[float]] = None, rtol: float = 1e-3) -> None:
    """Raise :class:`MetricsInputError` unless the two arrays (and spacings, if given) agree.

    Args:
        reference, prediction: arrays of the same spatial shape.
        case: case identifier used in the message.
        reference_spacing, prediction_spacing: mm per array axis; compared with relative
            tolerance ``rtol`` (resampling round-off is tolerated, a different grid is not).
    """
    ref_shape, pred_shape = tuple(np.shape(reference)), tuple(np.shape(prediction))
    if ref_shape != pred_shape:
        raise MetricsInputError(
            f"{_case_prefix(case)}reference has shape {ref_shape} but prediction has shape {pred_shape}; "
            f"they must be on the same voxel grid (resample the prediction to the reference image)")
    if reference_spacing is not None and prediction_spacing is not None:
        rs = np.asarray(reference_spacing, float)
        ps = np.asarray(prediction_spacing, float)
        if rs.shape != ps.shape or not np.allclose(rs, ps, rtol=rtol, atol=0):
            raise MetricsInputError(
                f"{_case_prefix(case)}reference spacing {tuple(float(s) for s in rs)} differs from "
                f"prediction spacing {tuple(float(s) for s in ps)} (mm per array axis)")
        if rs.shape != (len(ref_shape),):
            raise MetricsInputError(
                f"{_case_prefix(case)}spacing {tuple(float(s) for s in rs)} has {rs.size} values; "
                f"the arrays are {len(ref_shape)}D with shape {ref_shape}")


def class_mask(seg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Boolean mask of a class: ``seg == labels[0]`` or, for a region, any of its labels."""
    return target_mask(seg, tuple(int(v) for v in labels))


def check_label_values(seg: np.ndarray, allowed: Sequence[int], case: Optional[str] = None,
                       what: str = "reference") -> None:
    """Raise if ``seg`` holds values outside ``allowed`` (e.g. a label dataset.json doesn't declare)."""
    present = np.unique(seg)
    extra = sorted(set(int(v) for v in present) - set(int(v) for v in allowed))
    if extra:
        raise MetricsInputError(
            f"{_case_prefix(case)}{what} contains label value(s) {extra} that are not declared; "
            f"expected only {sorted(int(v) for v in allowed)}")


# --------------------------------------------------------------------------------------------
# Dice


@dataclass(frozen=True)
class DiceResult:
    """Dice of one class in one case, with the voxel counts it came from.

    ``dice`` is never NaN: both masks empty gives 1.0 with ``both_empty`` set; an empty reference
    with a non-empty prediction gives 0.0 with ``empty_reference`` set.
    """
    dice: float
    tp: int
    fp: int
    fn: int
    both_empty: bool = False
    empty_reference: bool = False

    def to_dict(self) -> Dict[str, object]:
        return {"dice": self.dice, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "both_empty": self.both_empty, "empty_reference": self.empty_reference}


def dice_from_counts(tp: int, fp: int, fn: int) -> DiceResult:
    """Dice = 2 TP / (2 TP + FP + FN), with the empty cases handled as documented above."""
    tp, fp, fn = int(tp), int(fp), int(fn)
    if tp < 0 or fp < 0 or fn < 0:
        raise ValueError(f"voxel counts must be >= 0, got tp={tp}, fp={fp}, fn={fn}")
    denom = 2 * tp + fp + fn
    if denom == 0:
        return DiceResult(1.0, 0, 0, 0, both_empty=True, empty_reference=True)
    return DiceResult(2.0 * tp / denom, tp, fp, fn, both_empty=False, empty_reference=(tp + fn == 0))


def dice_masks(reference_mask: np.ndarray, prediction_mask: np.ndarray, case: Optional[str] = None
               ) -> DiceResult:
    """Dice of two boolean masks of the same shape."""
    check_pair(reference_mask, prediction_mask, case)
    r = np.asarray(reference_mask, bool)
    p = np.asarray(prediction_mask, bool)
    tp = int(np.count_nonzero(r & p))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(r)) - tp
    return dice_from_counts(tp, fp, fn)


def dice_per_class(reference: np.ndarray, prediction: np.ndarray, classes: Dict[str, Sequence[int]],
                   case: Optional[str] = None, reference_spacing: Optional[Sequence[float]] = None,
                   prediction_spacing: Optional[Sequence[float]] = None) -> Dict[str, DiceResult]:
    """Dice of each class of a case.

    Args:
        reference, prediction: label maps (same shape).
        classes: class name -> label value(s), e.g. ``{"liver": (1,), "tumor": (2,)}``.
        case: case identifier for error messages.
        reference_spacing, prediction_spacing: optional, checked for equality.
    Returns:
        class name -> :class:`DiceResult`.
    """
    check_pair(reference, prediction, case, reference_spacing, prediction_spacing)
    return {name: dice_masks(class_mask(reference, vals), class_mask(prediction, vals), case)
            for name, vals in classes.items()}


def global_dice(results: Sequence[DiceResult]) -> DiceResult:
    """Dice of the summed TP/FP/FN over cases (LiTS' "Dice global"): large cases weigh more.

    No cases, or all masks empty, gives 1.0 flagged ``both_empty``.
    """
    tp = sum(r.tp for r in results)
    fp = sum(r.fp for r in results)
    fn = sum(r.fn for r in results)
    return dice_from_counts(tp, fp, fn)


@dataclass(frozen=True)
class MeanDice:
    """Per-case mean Dice (LiTS' "Dice per case") and how empty cases were treated.

    ``value`` is None only when no case was left to average (``n_cases == 0``).
    """
    value: Optional[float]
    n_cases: int
    n_both_empty: int
    n_empty_reference: int
    empty_reference_policy: str

    def to_dict(self) -> Dict[str, object]:
        return {"value": self.value, "n_cases": self.n_cases, "n_both_empty": self.n_both_empty,
                "n_empty_reference": self.n_empty_reference,
                "empty_reference_policy": self.empty_reference_policy}


def mean_dice(results: Sequence[DiceResult], empty_reference: str = "include") -> MeanDice:
    """Mean of the per-case Dice values.

    Args:
        results: one :class:`DiceResult` per case.
        empty_reference: ``"include"`` (default): cases whose reference is empty count with their
            documented Dice (1.0 if the prediction is empty too, else 0.0);
            ``"exclude"``: such cases are left out of the mean (their number is still reported).
    """
    if empty_reference not in ("include", "exclude"):
        raise ValueError(f"empty_reference must be 'include' or 'exclude', got {empty_reference!r}")
    n_both = sum(1 for r in results if r.both_empty)
    n_empty = sum(1 for r in results if r.empty_reference)
    kept = [r.dice for r in results if empty_reference == "include" or not r.empty_reference]
    value = float(np.mean(kept)) if kept else None
    return MeanDice(value, len(kept), n_both, n_empty, empty_reference)


# --------------------------------------------------------------------------------------------
# Lesion-wise detection


@dataclass
class LesionDetection:
    """Lesion-wise detection of one class in one case (or summed over cases).

    A lesion is a connected component. A reference lesion is *detected* when the predicted
    components that touch it (at least one voxel of overlap) reach a Dice with it greater than
    ``min_dice`` (default 0.0: any overlap detects). Symmetrically a predicted component is a
    *true positive* when the reference lesions it touches reach a Dice with it greater than
    ``min_dice``; otherwise it is a false positive.

    Attributes:
        n_reference, n_prediction: numbers of components.
        n_detected: reference lesions detected (recall numerator).
        n_true_positive_predictions: predicted components that are true positives (precision
            numerator).
        lesion_dice: per reference lesion (in label order of ``label_objects``), the Dice between
            it and the union of the predicted components touching it (0.0 if none touches).
        lesion_size: voxels per reference lesion.
    """
    n_reference: int
    n_prediction: int
    n_detected: int
    n_true_positive_predictions: int
    min_dice: float = 0.0
    lesion_dice: List[float] = field(default_factory=list)
    lesion_size: List[int] = field(default_factory=list)

    @property
    def recall(self) -> Optional[float]:
        """Detected / reference lesions; None when the reference has no lesion."""
        return self.n_detected / self.n_reference if self.n_reference else None

    @property
    def precision(self) -> Optional[float]:
        """True-positive / predicted components; None when nothing is predicted."""
        return self.n_true_positive_predictions / self.n_prediction if self.n_prediction else None

    def to_dict(self, with_lesions: bool = True) -> Dict[str, object]:
        d: Dict[str, object] = {
            "n_reference": self.n_reference, "n_prediction": self.n_prediction,
            "n_detected": self.n_detected, "n_true_positive_predictions": self.n_true_positive_predictions,
            "recall": self.recall, "precision": self.precision, "min_dice": self.min_dice}
        if with_lesions:
            d["lesion_dice"] = list(self.lesion_dice)
            d["lesion_size"] = list(self.lesion_size)
        return d


def _pair_overlaps(a_lab: np.ndarray, b_lab: np.ndarray) -> Dict[Tuple[int, int], int]:
    """Voxel overlap of every (component of a, component of b) pair that touches."""
    both = (a_lab > 0) & (b_lab > 0)
    if not both.any():
        return {}
    # one int64 key per pair: a 1D unique is much faster than a row-wise unique of (a, b) pairs
    a, b = a_lab[both].astype(np.int64), b_lab[both].astype(np.int64)
    base = int(b.max()) + 1
    keys, counts = np.unique(a * base + b, return_counts=True)
    return {(int(k // base), int(k % base)): int(c) for k, c in zip(keys, counts)}


def _matched_dice(n_a: int, sizes_a: np.ndarray, sizes_b: np.ndarray,
                  overlaps: Dict[Tuple[int, int], int], swap: bool) -> np.ndarray:
    """Per component i of one side: Dice with the union of the touching components of the other.

    Components of one labelling are disjoint, so the union's size is the sum of the sizes and the
    intersection is the sum of the pairwise overlaps.
    """
    inter = np.zeros(n_a + 1, np.int64)
    other = np.zeros(n_a + 1, np.int64)
    for (a, b), c in overlaps.items():
        i, j = (b, a) if swap else (a, b)
        inter[i] += c
        other[i] += sizes_b[j]
    denom = sizes_a + other
    out = np.zeros(n_a + 1, float)
    nz = denom > 0
    out[nz] = 2.0 * inter[nz] / denom[nz]
    return out[1:]


def lesion_detection(reference_mask: np.ndarray, prediction_mask: np.ndarray, connectivity: int = 2,
                     min_dice: float = 0.0, case: Optional[str] = None) -> LesionDetection:
    """Lesion-wise detection and per-lesion Dice of one class.

    Args:
        reference_mask, prediction_mask: boolean masks (same shape).
        connectivity: of connected components, as ``scipy.ndimage.generate_binary_structure``
            (2 = 18-connectivity in 3D, as the original work).
        min_dice: detection threshold on the matched Dice (strictly greater); 0.0 = any overlap.
            LiTS-style evaluations sometimes use a stricter value (e.g. 0.1 or 0.5).
        case: case identifier for error messages.
    """
    check_pair(reference_mask, prediction_mask, case)
    if not 0.0 <= min_dice < 1.0:
        raise ValueError(f"min_dice must be in [0, 1), got {min_dice!r}")
    ref_lab, n_ref = label_objects(np.asarray(reference_mask, bool), connectivity)
    pred_lab, n_pred = label_objects(np.asarray(prediction_mask, bool), connectivity)
    ref_sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1).astype(np.int64)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1).astype(np.int64)
    ref_sizes[0] = 0
    pred_sizes[0] = 0
    overlaps = _pair_overlaps(ref_lab, pred_lab)
    ref_dice = _matched_dice(n_ref, ref_sizes, pred_sizes, overlaps, swap=False)
    pred_dice = _matched_dice(n_pred, pred_sizes, ref_sizes, overlaps, swap=True)
    touched_ref = np.zeros(n_ref + 1, bool)
    touched_pred = np.zeros(n_pred + 1, bool)
    for a, b in overlaps:
        touched_ref[a] = True
        touched_pred[b] = True
    detected = touched_ref[1:] & (ref_dice > min_dice)
    tp_pred = touched_pred[1:] & (pred_dice > min_dice)
    return LesionDetection(n_ref, n_pred, int(detected.sum()), int(tp_pred.sum()), float(min_dice),
                           [float(v) for v in ref_dice], [int(s) for s in ref_sizes[1:]])


def sum_detections(items: Sequence[LesionDetection]) -> LesionDetection:
    """Detection counts summed over cases (recall/precision over all lesions of a dataset)."""
    min_dice = items[0].min_dice if items else 0.0
    return LesionDetection(sum(d.n_reference for d in items), sum(d.n_prediction for d in items),
                           sum(d.n_detected for d in items), sum(d.n_true_positive_predictions for d in items),
                           min_dice)


# --------------------------------------------------------------------------------------------
# Dice-vs-clicks summaries


def _check_curve(curve: Sequence[float], what: str = "Dice curve") -> np.ndarray:
    c = np.asarray(curve, dtype=float)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"{what} must be a non-empty 1D sequence (Dice after 0..N clicks), got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{what} contains non-finite values at clicks {np.flatnonzero(~np.isfinite(c)).tolist()}: {c.tolist()}")
    if np.any((c < 0) | (c > 1)):
        raise ValueError(f"{what} has values outside [0, 1]: {c.tolist()}")
    return c


def dice_auc(curve: Sequence[float]) -> float:
    """Area under the Dice-vs-clicks curve over clicks 0..N, normalised to [0, 1].

    Trapezoidal rule with unit steps, divided by N: a constant curve d gives d, and perfect
    Dice from click 0 gives 1. With N = 0 (one point) the value is that point.
    """
    c = _check_curve(curve)
    n = c.size - 1
    if n == 0:
        return float(c[0])
    return float((c[:-1] + c[1:]).sum() / 2.0 / n)


@dataclass(frozen=True)
class ClicksToReach:
    """NoC@threshold of one curve: the first click count k with Dice >= threshold.

    When the threshold is never reached, ``clicks`` is capped at N (the curve's last index) and
    ``reached`` is False: the case counts as a failure with N clicks.
    """
    clicks: int
    reached: bool


def clicks_to_reach(curve: Sequence[float], threshold: float) -> ClicksToReach:
    """Number of clicks to reach ``threshold`` Dice (0 if the automatic result already does)."""
    c = _check_curve(curve)
    hit = np.flatnonzero(c >= threshold)
    if hit.size:
        return ClicksToReach(int(hit[0]), True)
    return ClicksToReach(int(c.size - 1), False)


@dataclass(frozen=True)
class NoCSummary:
    """Mean NoC@threshold over curves (failures counted with the cap N) and the failure count."""
    threshold: float
    mean_clicks: Optional[float]
    n_failed: int
    n_curves: int
    max_clicks: int

    def to_dict(self) -> Dict[str, object]:
        return {"threshold": self.threshold, "mean_clicks": self.mean_clicks, "n_failed": self.n_failed,
                "n_curves": self.n_curves, "max_clicks": self.max_clicks}


def noc_summary(curves: Sequence[Sequence[float]], threshold: float) -> NoCSummary:
    """NoC@threshold over many curves of the same length N + 1. No curves -> mean None."""
    results = [clicks_to_reach(c, threshold) for c in curves]
    lengths = {len(c) for c in curves}
    if len(lengths) > 1:
        raise ValueError(f"curves have different lengths {sorted(lengths)}; expected all N + 1")
    n = (lengths.pop() - 1) if lengths else 0
    mean = float(np.mean([r.clicks for r in results])) if results else None
    return NoCSummary(float(threshold), mean, sum(1 for r in results if not r.reached), len(results), n)


def mean_curve(curves: Sequence[Sequence[float]]) -> Optional[List[float]]:
    """Mean Dice after each click count over curves of equal length; None without curves."""
    if not curves:
        return None
    arr = np.asarray([_check_curve(c) for c in curves], float)
    return [float(v) for v in arr.mean(axis=0)]


def proportion_ci(k: int, n: int, z: float = 1.96) -> Optional[Tuple[float, float]]:
    """Wilson score interval of a proportion ``k`` of ``n`` (95% with the default ``z``); None
    when ``n`` is 0. Unlike the normal approximation it stays inside [0, 1] and is not empty at
    k = 0: 0 of 15 harmful clicks gives [0, 0.204], so 15 clicks cannot show a 5% rate."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n, got k = {k}, n = {n}")
    if n == 0:
        return None
    p, z2 = k / n, z * z
    den = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def format_float(v: Optional[float], digits: int = 3) -> str:
    """Human-readable number for tables: ``-`` for None (undefined), never ``nan``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Surface Dice and error volumes (the CVPR 2025 interactive and autoPET IV metrics)


def _check_spacing(spacing: Sequence[float], shape: Tuple[int, ...], case: Optional[str]) -> np.ndarray:
    sp = np.asarray(spacing, float)
    if sp.shape != (len(shape),) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise MetricsInputError(
            f"{_case_prefix(case)}spacing {tuple(float(s) for s in np.ravel(sp))} must be {len(shape)} positive "
            f"mm values, one per array axis of shape {shape}")
    return sp


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Border voxels of a mask: mask voxels with at least one face neighbour outside it (the image
    border counts as outside)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask.copy()
    inner = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~inner


@dataclass(frozen=True)
class SurfaceDiceResult:
    """Normalised surface Dice (NSD) of one class in one case at a tolerance in mm.

    ``nsd = (|S_p within tol of S_r| + |S_r within tol of S_p|) / (|S_p| + |S_r|)``, S the border
    voxels (:func:`surface_voxels`) of prediction and reference, distances in mm between voxel
    centres. Never NaN: both masks empty gives 1.0 (``both_empty``); exactly one empty gives 0.0
    (``empty_reference`` set when it is the reference).
    """
    nsd: float
    tolerance_mm: float
    n_reference_surface: int
    n_prediction_surface: int
    n_reference_close: int
    n_prediction_close: int
    both_empty: bool = False
    empty_reference: bool = False

    def to_dict(self) -> Dict[str, object]:
        return dict(vars(self))


def surface_dice(reference_mask: np.ndarray, prediction_mask: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float = 2.0, case: Optional[str] = None) -> SurfaceDiceResult:
    """Normalised surface Dice at ``tolerance_mm`` (default 2 mm, as the CVPR 2025 interactive
    challenge), see :class:`SurfaceDiceResult`.

    Args:
        reference_mask, prediction_mask: boolean masks of the same shape (array axis order).
        spacing: mm per array axis (anisotropic allowed: distances are Euclidean in mm).
        tolerance_mm: a border voxel counts as close when the other border is at most this far.
    """
    check_pair(reference_mask, prediction_mask, case)
    r = np.asarray(reference_mask, bool)
    p = np.asarray(prediction_mask, bool)
    sp = _check_spacing(spacing, r.shape, case)
    tol = float(tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    has_r, has_p = bool(r.any()), bool(p.any())
    if not has_r and not has_p:
        return SurfaceDiceResult(1.0, tol, 0, 0, 0, 0, both_empty=True, empty_reference=True)
    if not has_r or not has_p:
        n_r = int(surface_voxels(r).sum()) if has_r else 0
        n_p = int(surface_voxels(p).sum()) if has_p else 0
        return SurfaceDiceResult(0.0, tol, n_r, n_p, 0, 0, empty_reference=not has_r)
    # distances only matter inside the box of both masks (+1 voxel: the crop's rim is outside both,
    # so borders and nearest-border distances are those of the whole image)
    box = mask_bbox(r | p)
    box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, r.shape))
    r, p = r[box], p[box]
    # nearest-border distances between border voxel centres (mm): a k-d tree over the border voxels
    # only, much cheaper than distance transforms of the whole box for large organs
    from scipy.spatial import cKDTree
    pts_r = np.argwhere(surface_voxels(r)) * sp
    pts_p = np.argwhere(surface_voxels(p)) * sp
    bound = tol + 1e-9 * max(1.0, tol)
    d_p, _ = cKDTree(pts_r).query(pts_p, k=1, distance_upper_bound=bound)
    d_r, _ = cKDTree(pts_p).query(pts_r, k=1, distance_upper_bound=bound)
    close_p, close_r = int(np.count_nonzero(d_p <= bound)), int(np.count_nonzero(d_r <= bound))
    n_r, n_p = len(pts_r), len(pts_p)
    return SurfaceDiceResult((close_p + close_r) / (n_r + n_p), tol, n_r, n_p, close_r, close_p)


@dataclass(frozen=True)
class ErrorVolumes:
    """False-positive and false-negative volume of one class in one case (autoPET's FPV / FNV,
    here voxel-wise: predicted-not-reference and reference-not-predicted voxels)."""
    fp_voxels: int
    fn_voxels: int
    fp_mm3: float
    fn_mm3: float

    def to_dict(self) -> Dict[str, object]:
        return dict(vars(self))


def error_volumes_from_counts(fp: int, fn: int, spacing: Sequence[float]) -> ErrorVolumes:
    """:class:`ErrorVolumes` from voxel counts and the voxel size (mm per array axis)."""
    if int(fp) < 0 or int(fn) < 0:
        raise ValueError(f"voxel counts must be >= 0, got fp={fp}, fn={fn}")
    voxel = float(np.prod(np.asarray(spacing, float)))
    return ErrorVolumes(int(fp), int(fn), int(fp) * voxel, int(fn) * voxel)


def error_volumes(reference_mask: np.ndarray, prediction_mask: np.ndarray, spacing: Sequence[float],
                  case: Optional[str] = None) -> ErrorVolumes:
    """False-positive / false-negative voxels and their volume in mm^3."""
    d = dice_masks(reference_mask, prediction_mask, case)
    _check_spacing(spacing, np.shape(reference_mask), case)
    return error_volumes_from_counts(d.fp, d.fn, spacing)


# --------------------------------------------------------------------------------------------
# Where a click can act: the guide's reach


def far_from_clicks(shape: Sequence[int], positions: Sequence[Sequence[float]],
                    reaches: Sequence[Sequence[float]], slice_axis: Optional[int] = None) -> np.ndarray:
    """Voxels beyond the reach of every click: True where no click's guide map is non-zero.

    Args:
        shape: array shape (array axis order).
        positions: click positions, voxel coordinates per axis.
        reaches: per click, the semi-axes (voxels) of its reach ellipsoid (:func:`click_reach_voxels`).
        slice_axis: for 2D models run on a volume: a click reaches only its own slice
            (``round(position)``) along this axis.
    Returns:
        bool array of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    far = np.ones(shape, bool)
    for pos, reach in zip(positions, reaches):
        pos, reach = np.asarray(pos, float), np.maximum(np.asarray(reach, float), 1e-6)
        windows, terms = [], []
        for a, n in enumerate(shape):
            if slice_axis is not None and a == slice_axis:
                z = int(round(pos[a]))
                lo, hi, term = z, z + 1, np.zeros(1)
            else:
                lo = max(0, int(math.floor(pos[a] - reach[a])))
                hi = min(n, int(math.ceil(pos[a] + reach[a])) + 1)
                term = ((np.arange(lo, hi) - pos[a]) / reach[a]) ** 2
            if not (0 <= lo < hi <= n):
                windows = None
                break
            windows.append(slice(lo, hi))
            terms.append(term.reshape((1,) * a + (-1,) + (1,) * (len(shape) - a - 1)))
        if windows is None:
            continue
        acc = sum(terms[1:], terms[0])
        far[tuple(windows)] &= ~(acc <= 1.0)
    return far


# --------------------------------------------------------------------------------------------
# Did a click help or harm?

#: a click is harmful when its class's Dice falls by more than this
HARM_TOLERANCE = 0.005


@dataclass(frozen=True)
class ClickEffect:
    """What one click step did to the clicked class (the step's click(s) of that class).

    Attributes:
        dice_before, dice_after: the class's Dice before and after the click.
        harmful: Dice fell by more than the tolerance (:data:`HARM_TOLERANCE`).
        lesions_detected_before: reference lesions (connected components) detected before.
        lesions_lost: indices (``label_objects`` order, 0-based) of reference lesions detected
            before the click and not after it.
        clicked_lesions: indices of the reference lesions the click(s) lie in (empty: the click
            lies outside every lesion, e.g. a negative click on a false positive).
        far_dice_before, far_dice_after: the class's Dice restricted to the far region: voxels
            beyond the guide's reach from every click so far, less the objects reaching into it
            (see ``exclude_connected`` of :func:`click_effect`); None when no far region was given;
            both empty there gives 1.0, as everywhere.
        far_changed_voxels: far voxels whose membership of the class changed.
        n_far_voxels: size of the far region.
        followed: for point clicks with their signs given, whether the output now agrees with every
            click at its own voxel (a positive click's voxel in the class, a negative one's outside
            it); False is a click the user sees do nothing where they clicked. None without signs.
    """
    dice_before: float
    dice_after: float
    harmful: bool
    lesions_detected_before: int
    lesions_lost: Tuple[int, ...]
    clicked_lesions: Tuple[int, ...]
    far_dice_before: Optional[float] = None
    far_dice_after: Optional[float] = None
    far_changed_voxels: Optional[int] = None
    n_far_voxels: Optional[int] = None
    followed: Optional[bool] = None

    @property
    def change(self) -> float:
        return self.dice_after - self.dice_before

    @property
    def lesions_lost_elsewhere(self) -> Tuple[int, ...]:
        """Lost lesions other than the clicked one(s): harm done to other objects."""
        return tuple(j for j in self.lesions_lost if j not in self.clicked_lesions)

    def to_dict(self) -> Dict[str, object]:
        d = dict(vars(self))
        d["lesions_lost"] = list(self.lesions_lost)
        d["clicked_lesions"] = list(self.clicked_lesions)
        d["lesions_lost_elsewhere"] = list(self.lesions_lost_elsewhere)
        d["change"] = self.change
        return d


def detected_lesions(det: LesionDetection) -> np.ndarray:
    """Bool per reference lesion of a :class:`LesionDetection`: detected (matched Dice > min_dice)."""
    return np.asarray(det.lesion_dice, float) > det.min_dice


def click_effect(reference_mask: np.ndarray, before_mask: np.ndarray, after_mask: np.ndarray,
                 click_positions: Sequence[Sequence[float]] = (), far_mask: Optional[np.ndarray] = None,
                 connectivity: int = 2, min_dice: float = 0.0, harm_tolerance: float = HARM_TOLERANCE,
                 case: Optional[str] = None, detection_before: Optional[LesionDetection] = None,
                 detection_after: Optional[LesionDetection] = None, exclude_connected: bool = True,
                 click_signs: Sequence[bool] = ()) -> ClickEffect:
    """The effect of one click step on the clicked class.

    Args:
        reference_mask, before_mask, after_mask: boolean masks of the class (same shape): the
            reference and the predictions before and after the click.
        click_positions: voxel positions of the step's click(s) on this class (array axis order).
        far_mask: voxels beyond the guide's reach from every click so far (:func:`far_from_clicks`),
            or None to skip the far Dice.
        connectivity, min_dice: lesion definition and detection rule (:func:`lesion_detection`).
        harm_tolerance: a fall of Dice larger than this makes the click harmful.
        detection_before, detection_after: the :func:`lesion_detection` results, if already
            computed with the same connectivity and min_dice.
        exclude_connected: also leave out of the far region every connected component of
            (reference | before | after) that reaches into the guide's reach: a clicked object
            larger than the reach may rightly change beyond it; what stays is what no click
            touches, not even through the object it lies in.
        click_signs: the point clicks' signs (True = positive), one per position, to tell whether
            the output followed them (``ClickEffect.followed``); empty to skip.
    """
    ref = np.asarray(reference_mask, bool)
    before, after = np.asarray(before_mask, bool), np.asarray(after_mask, bool)
    check_pair(ref, before, case)
    check_pair(ref, after, case)
    d0, d1 = dice_masks(ref, before).dice, dice_masks(ref, after).dice
    det0 = detection_before or lesion_detection(ref, before, connectivity, min_dice, case)
    det1 = detection_after or lesion_detection(ref, after, connectivity, min_dice, case)
    hit0, hit1 = detected_lesions(det0), detected_lesions(det1)
    if hit0.shape != hit1.shape:
        raise ValueError(f"{_case_prefix(case)}lesion counts differ before/after ({hit0.size} vs {hit1.size}); "
                         f"the detections must come from the same reference")
    lost = tuple(int(j) for j in np.flatnonzero(hit0 & ~hit1))
    if len(click_signs) and len(click_signs) != len(click_positions):
        raise ValueError(f"{_case_prefix(case)}{len(click_signs)} click signs for {len(click_positions)} clicks")
    voxels = [tuple(int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(pos, ref.shape)) for pos in click_positions]
    clicked: List[int] = []
    if voxels:
        lab, _ = label_objects(ref, connectivity)
        for idx in voxels:
            if lab[idx] and int(lab[idx]) - 1 not in clicked:
                clicked.append(int(lab[idx]) - 1)
    followed = (all(bool(after[idx]) == bool(sign) for idx, sign in zip(voxels, click_signs))
                if len(click_signs) else None)
    far = {}
    if far_mask is not None:
        fm = np.asarray(far_mask, bool)
        check_pair(ref, fm, case)
        if exclude_connected:
            lab, n = label_objects(ref | before | after, connectivity)
            if n:
                touched = np.unique(lab[~fm])
                fm = fm & ~np.isin(lab, touched[touched > 0])
        far = dict(far_dice_before=dice_masks(ref[fm], before[fm]).dice,
                   far_dice_after=dice_masks(ref[fm], after[fm]).dice,
                   far_changed_voxels=int(np.count_nonzero(before[fm] != after[fm])),
                   n_far_voxels=int(fm.sum()))
    return ClickEffect(float(d0), float(d1), bool(d0 - d1 > harm_tolerance), int(hit0.sum()), lost,
                       tuple(sorted(clicked)), **far, followed=followed)
