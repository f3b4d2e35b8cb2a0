"""How much Dice a click per object can add at most, and what it added, object by object.

A click at an object's centre tells the network that the object exists and where. It can recover an
object the automatic result missed; it says little about the extent of an object the network already
found. :func:`click_headroom` splits the automatic result's errors that way and gives the Dice a
perfect response would reach:

- ``dice_missed_exact``: every reference object the automatic result missed entirely (no voxel of it
  predicted) segmented exactly, everything else as predicted. This is all that clicks on missed
  objects can add.
- ``dice_objects_exact``: every reference object exact within ``reach_mm`` of it, the prediction kept
  farther away. A click per object that fixed its object perfectly, missed or found, reaches this.
- the voxel counts behind them: missed voxels in missed objects and in found ones, false-positive voxels
  in predicted components that touch no reference voxel (``fp_detached``: a negative click's job) and
  in components that do (``fp_attached``).

Per reference object it gives its size and the share of it found without and with the clicks
(``recall_auto``, ``recall_guided``), so that a user can see which objects a click changes.

Conventions as :mod:`.metrics`: boolean masks of one class in SimpleITK axis order, spacing in mm per
array axis, ``connectivity`` as ``scipy.ndimage.generate_binary_structure`` (2 = 18-connectivity in
3D). No nnU-Net import: pure numpy/scipy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .clicks import label_objects
from .metrics import _check_spacing, check_pair, dice_masks


@dataclass
class ObjectRecall:
    """One reference object: its size and the share of it each prediction found."""
    voxels: int
    volume_mm3: float
    recall_auto: float
    recall_guided: Optional[float]

    @property
    def missed(self) -> bool:
        return self.recall_auto == 0.0


@dataclass
class Headroom:
    """One class in one case; see the module docstring. Dice values follow :func:`.metrics.dice_masks`
    (both masks empty: 1.0)."""
    dice_auto: float
    dice_guided: Optional[float]
    dice_missed_exact: float
    dice_objects_exact: float
    fn_missed: int
    fn_found: int
    fp_detached: int
    fp_attached: int
    objects: List[ObjectRecall] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        d = {k: getattr(self, k) for k in ("dice_auto", "dice_guided", "dice_missed_exact",
                                          "dice_objects_exact", "fn_missed", "fn_found", "fp_detached",
                                          "fp_attached")}
        d["objects"] = [vars(o) for o in self.objects]
        return d


def click_headroom(reference_mask: np.ndarray, auto_mask: np.ndarray, spacing: Sequence[float],
                   guided_mask: Optional[np.ndarray] = None, reach_mm: float = 5.0, connectivity: int = 2,
                   case: Optional[str] = None) -> Headroom:
    """Error split, Dice ceilings and per-object recall of one class (module docstring).

    Args:
        reference_mask, auto_mask: the reference and the automatic (no-click) prediction.
        spacing: mm per array axis (for ``reach_mm`` and the objects' volumes).
        guided_mask: the prediction with the clicks (optional; its Dice and recalls are then None).
        reach_mm: how far from a reference object a perfect click response may change the prediction.
        connectivity: of the objects and of the predicted components.
        case: case identifier for error messages.
    """
    check_pair(reference_mask, auto_mask, case)
    if guided_mask is not None:
        check_pair(reference_mask, guided_mask, case)
    sp = _check_spacing(spacing, np.shape(reference_mask), case)
    if not reach_mm >= 0:
        raise ValueError(f"{case or 'click_headroom'}: reach_mm must be >= 0, got {reach_mm!r}")
    ref = np.asarray(reference_mask, bool)
    auto = np.asarray(auto_mask, bool)
    ref_lab, n_ref = label_objects(ref, connectivity)
    sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    found_auto = np.bincount(ref_lab[auto], minlength=n_ref + 1)
    missed_ids = np.flatnonzero(found_auto[1:] == 0) + 1
    in_missed = np.zeros(n_ref + 1, bool)
    in_missed[missed_ids] = True
    missed_vox = in_missed[ref_lab]
    fn = ref & ~auto
    fn_missed = int(np.count_nonzero(fn & missed_vox))

    pred_lab, n_pred = label_objects(auto, connectivity)
    touches = np.zeros(n_pred + 1, bool)
    touches[np.unique(pred_lab[auto & ref])] = True
    fp = auto & ~ref
    fp_attached = int(np.count_nonzero(fp & touches[pred_lab]))

    if n_ref and reach_mm > 0:
        near = ndimage.distance_transform_edt(~ref, sampling=sp) <= reach_mm
    else:
        near = ref
    objects_exact = np.where(near, ref, auto)

    guided = None if guided_mask is None else np.asarray(guided_mask, bool)
    found_guided = None if guided is None else np.bincount(ref_lab[guided], minlength=n_ref + 1)
    voxel_mm3 = float(np.prod(sp))
    objects = [ObjectRecall(int(sizes[i]), float(sizes[i]) * voxel_mm3, float(found_auto[i] / sizes[i]),
                            None if found_guided is None else float(found_guided[i] / sizes[i]))
               for i in range(1, n_ref + 1)]
    return Headroom(
        dice_auto=dice_masks(ref, auto, case).dice,
        dice_guided=None if guided is None else dice_masks(ref, guided, case).dice,
        dice_missed_exact=dice_masks(ref, auto | missed_vox, case).dice,
        dice_objects_exact=dice_masks(ref, objects_exact, case).dice,
        fn_missed=fn_missed, fn_found=int(np.count_nonzero(fn)) - fn_missed,
        fp_detached=int(np.count_nonzero(fp)) - fp_attached, fp_attached=fp_attached, objects=objects)


def recall_by_size(items: Sequence[ObjectRecall], edges_mm3: Sequence[float]) -> List[Dict[str, object]]:
    """Objects pooled over cases into volume bins (mm^3; ``edges_mm3`` increasing): per bin the objects,
    those missed automatically, those of them the clicks found (any voxel), and the mean recall
    without and with clicks (None where no guided prediction was given)."""
    edges = [0.0] + [float(e) for e in edges_mm3] + [float("inf")]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges_mm3 must be positive and increasing, got {list(edges_mm3)}")
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        sel = [o for o in items if lo <= o.volume_mm3 < hi]
        guided = [o.recall_guided for o in sel if o.recall_guided is not None]
        rows.append({
            "from_mm3": lo, "to_mm3": hi, "objects": len(sel),
            "missed": sum(o.missed for o in sel),
            "missed_found_by_clicks": sum(1 for o in sel if o.missed and (o.recall_guided or 0.0) > 0),
            "recall_auto": float(np.mean([o.recall_auto for o in sel])) if sel else None,
            "recall_guided": float(np.mean(guided)) if sel and len(guided) == len(sel) else None})
    return rows
