"""Turn simulated-user sessions into numbers and files: JSON, CSV, PNG plots, a Markdown report.

Two halves:
- :func:`case_record` / :func:`plain_record` / :func:`summarize`: plain dicts (JSON-ready) with
  every metric of :mod:`nnunet_guide.core.metrics`, per case and over the cases.
- :func:`write_report`: ``results.json``, ``per_case.csv``, ``dice_vs_clicks.csv``,
  ``summary.csv``, ``dice_vs_clicks.png``, ``overlays/<case>.png`` and ``report.md``.

Undefined values (recall without reference lesions, a mean over no cases) are ``null`` in JSON,
empty in CSV and ``-`` in Markdown, never NaN. Curves are indexed by the number of click steps
0..N (one click per guided class per step).
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..core.clicks import Click
from ..core.metrics import (HARM_TOLERANCE, LesionDetection, class_mask, clicks_to_reach, dice_auc,
                            dice_from_counts, dice_masks, error_volumes_from_counts, format_float, global_dice,
                            lesion_detection, mean_dice, noc_summary, proportion_ci, sum_detections,
                            surface_dice)
from ..core.user_sim import PROMPT_STARTS, SessionResult
from ..settings import write_atomic, write_json_atomic, write_text_atomic

DEFAULT_THRESHOLDS = (0.85, 0.90)


def _tkey(t: float) -> str:
    return f"{int(round(t * 100))}"


# --------------------------------------------------------------------------------------------
# records


def case_record(session: SessionResult, classes: Mapping[str, Sequence[int]], guided_names: Sequence[str],
                spacing: Sequence[float], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[str, Any]:
    """JSON-ready metrics of one simulated session.

    Per class: the Dice curve (N + 1 values) with its voxel counts and empty flags, its area
    under the curve, NoC per threshold, lesion detection per step, and per reference lesion its
    Dice curve and NoC (lesions = connected components of the reference).
    """
    rec: Dict[str, Any] = {
        "case": session.case_id,
        "spacing": [float(s) for s in spacing],
        "n_clicks": session.n_steps,
        "stopped_at": session.stopped_at,
        "start": session.step_kinds[0] if session.step_kinds[:1] and session.step_kinds[0] in PROMPT_STARTS
        else "clicks",
        "step_kinds": list(session.step_kinds),
        "clicks": [_click_dict(step, c, guided_names) for step, c in session.clicks],
        "effects": [{"step": e.step, "class": guided_names[e.target], "kind": e.kind, "positive": e.positive,
                     "positions": [[float(v) for v in p] for p in e.positions], **e.effect.to_dict()}
                    for e in session.effects],
        "classes": {},
    }
    for name in classes:
        tr = session.traces[name]
        curve = tr.dice_curve
        lesion_curves = np.array([d.lesion_dice for d in tr.detection], float)  # (steps, lesions)
        n_lesions = lesion_curves.shape[1] if lesion_curves.ndim == 2 else 0
        c: Dict[str, Any] = {
            "guided": name in guided_names,
            "dice": curve,
            "counts": [[d.tp, d.fp, d.fn] for d in tr.dice],
            "empty_reference": bool(tr.dice[0].empty_reference),
            "both_empty": [bool(d.both_empty) for d in tr.dice],
            "auc": dice_auc(curve),
            "nsd": [d.nsd for d in tr.surface],
            "nsd_tolerance_mm": tr.surface[0].tolerance_mm if tr.surface else None,
            "fp_mm3": [error_volumes_from_counts(d.fp, d.fn, spacing).fp_mm3 for d in tr.dice],
            "fn_mm3": [error_volumes_from_counts(d.fp, d.fn, spacing).fn_mm3 for d in tr.dice],
            "noc": {_tkey(t): vars(clicks_to_reach(curve, t)) for t in thresholds},
            "detection": [d.to_dict(with_lesions=False) for d in tr.detection],
            "lesions": {
                "size": list(tr.detection[0].lesion_size),
                "dice": [[float(v) for v in lesion_curves[:, j]] for j in range(n_lesions)],
                "noc": {_tkey(t): [vars(clicks_to_reach(lesion_curves[:, j], t)) for j in range(n_lesions)]
                        for t in thresholds},
            },
        }
        c["nsd_auc"] = dice_auc(c["nsd"]) if c["nsd"] else None
        if rec["start"] in PROMPT_STARTS:  # the CVPR 2025 protocol's AUCs: over the prompt and the N clicks
            c[f"auc_from_{rec['start']}"] = dice_auc(curve[1:])
            c[f"nsd_auc_from_{rec['start']}"] = dice_auc(c["nsd"][1:]) if c["nsd"] else None
        rec["classes"][name] = c
    return rec


def _click_dict(step: int, c: Click, guided_names: Sequence[str]) -> Dict[str, Any]:
    d: Dict[str, Any] = {"step": step, "target": guided_names[c.target], "position": [float(p) for p in c.position],
                         "positive": bool(c.positive)}
    if c.kind != "point":  # points are the default kind
        d["kind"] = c.kind
        d["sigma"] = [float(v) for v in c.sigma] if c.sigma is not None else None
    return d


def plain_record(case_id: str, reference: np.ndarray, prediction: np.ndarray, classes: Mapping[str, Sequence[int]],
                 connectivity: int = 2, detection_min_dice: float = 0.0,
                 ignore_label: Optional[int] = None, spacing: Optional[Sequence[float]] = None,
                 nsd_tolerance_mm: Optional[float] = 2.0) -> Dict[str, Any]:
    """Metrics of an automatic prediction (a plain nnU-Net result) of one case; with ``spacing``
    also its surface Dice (``nsd``) and FP/FN volumes (``fp_mm3``, ``fn_mm3``)."""
    out: Dict[str, Any] = {}
    for name, vals in classes.items():
        r, p = class_mask(reference, vals), class_mask(prediction, vals)
        if ignore_label is not None:
            keep = reference != ignore_label
            r, p = r & keep, p & keep
        d = dice_masks(r, p, case_id)
        det = lesion_detection(r, p, connectivity, detection_min_dice, case_id)
        out[name] = {**d.to_dict(), "detection": det.to_dict(with_lesions=False)}
        if spacing is not None:
            v = error_volumes_from_counts(d.fp, d.fn, spacing)
            out[name].update(fp_mm3=v.fp_mm3, fn_mm3=v.fn_mm3,
                             nsd=surface_dice(r, p, spacing, nsd_tolerance_mm, case_id).nsd
                             if nsd_tolerance_mm is not None else None)
    return out


def _det_from_dict(d: Mapping[str, Any]) -> LesionDetection:
    return LesionDetection(d["n_reference"], d["n_prediction"], d["n_detected"], d["n_true_positive_predictions"],
                           d.get("min_dice", 0.0))


def summarize(records: Sequence[Mapping[str, Any]], plain: Optional[Mapping[str, Mapping[str, Any]]] = None,
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[str, Any]:
    """Dataset-level figures of the guided sessions (and of plain predictions, if given).

    Args:
        records: :func:`case_record` outputs (same N and classes for all).
        plain: case id -> :func:`plain_record` output, for the cases that have one.
    Returns:
        ``{"n_cases", "n_clicks", "guided": {class: {...}}, "plain": {class: {...}} or None}`` where
        a guided class has per step ``mean_dice`` (per-case mean, empty references included as
        documented in metrics), ``global_dice`` (summed counts), ``recall``/``precision`` (lesions
        summed over cases), and ``mean_auc``, ``noc`` (per case) and ``lesion_noc`` (per lesion)
        per threshold.
    """
    if not records:
        return {"n_cases": 0, "n_clicks": None, "guided": {}, "plain": None}
    n_steps = {len(next(iter(r["classes"].values()))["dice"]) for r in records}
    if len(n_steps) != 1:
        raise ValueError(f"cases were evaluated with different numbers of clicks: {sorted(s - 1 for s in n_steps)}")
    steps = n_steps.pop()
    names = list(records[0]["classes"])
    guided: Dict[str, Any] = {}
    for name in names:
        cs = [r["classes"][name] for r in records]
        mean_d, glob_d, rec_, prec_ = [], [], [], []
        for k in range(steps):
            results = [dice_from_counts(*c["counts"][k]) for c in cs]
            md = mean_dice(results)
            mean_d.append(md.value)
            glob_d.append(global_dice(results).dice)
            det = sum_detections([_det_from_dict(c["detection"][k]) for c in cs])
            rec_.append(det.recall)
            prec_.append(det.precision)
        lesion_curves = [lc for c in cs for lc in c["lesions"]["dice"]]
        effects = [e for r in records for e in r.get("effects", ()) if e["class"] == name]
        guided[name] = {
            "guided": bool(cs[0]["guided"]),
            "mean_dice": mean_d,
            "global_dice": glob_d,
            "recall": rec_,
            "precision": prec_,
            "mean_auc": float(np.mean([c["auc"] for c in cs])),
            "n_empty_reference": sum(1 for c in cs if c["empty_reference"]),
            "n_lesions": len(lesion_curves),
            "noc": {_tkey(t): noc_summary([c["dice"] for c in cs], t).to_dict() for t in thresholds},
            "lesion_noc": {_tkey(t): noc_summary(lesion_curves, t).to_dict() for t in thresholds},
            "mean_nsd": _step_means(cs, "nsd", steps),
            "mean_fp_mm3": _step_means(cs, "fp_mm3", steps),
            "mean_fn_mm3": _step_means(cs, "fn_mm3", steps),
            "harm": harm_summary([e for e in effects if e["kind"] == "point"], steps - 1),
        }
        for kind in PROMPT_STARTS:  # box_effect, scribble_effect: the prompt step apart from the clicks
            if any(e["kind"] == kind for e in effects):
                guided[name][f"{kind}_effect"] = harm_summary([e for e in effects if e["kind"] == kind], steps - 1)
        guided[name]["mean_nsd_auc"] = _mean([c.get("nsd_auc") for c in cs])
        for kind in PROMPT_STARTS:
            if cs and all(f"auc_from_{kind}" in c for c in cs):
                guided[name][f"mean_auc_from_{kind}"] = float(np.mean([c[f"auc_from_{kind}"] for c in cs]))
                guided[name][f"mean_nsd_auc_from_{kind}"] = _mean([c.get(f"nsd_auc_from_{kind}") for c in cs])
    plain_sum = None
    if plain:
        plain_sum = {}
        for name in names:
            rows = [plain[r["case"]][name] for r in records if r["case"] in plain]
            results = [dice_from_counts(p["tp"], p["fp"], p["fn"]) for p in rows]
            det = sum_detections([_det_from_dict(p["detection"]) for p in rows])
            plain_sum[name] = {"n_cases": len(rows), "mean_dice": mean_dice(results).value if rows else None,
                               "global_dice": global_dice(results).dice if rows else None,
                               "recall": det.recall, "precision": det.precision,
                               **{f"mean_{k}": _mean([p.get(k) for p in rows]) for k in ("nsd", "fp_mm3", "fn_mm3")}}
    starts = {r.get("start", "clicks") for r in records}
    if len(starts) != 1:
        raise ValueError(f"cases were evaluated with different starts: {sorted(starts)}")
    start = starts.pop()
    tols = [c.get("nsd_tolerance_mm") for r in records for c in r["classes"].values()]
    return {"n_cases": len(records), "n_clicks": steps - 1, "start": start,
            "nsd_tolerance_mm": next((t for t in tols if t is not None), None),
            "step_labels": [step_label(k, start) for k in range(steps)], "guided": guided, "plain": plain_sum}


def step_label(k: int, start: str = "clicks") -> str:
    """How step k is called in tables: "0 clicks", "3 click steps", or with a box (scribble) start
    "box", "box + 2 click steps"."""
    if start in PROMPT_STARTS and k >= 1:
        return start if k == 1 else f"{start} + {k - 1} click step{'s' if k > 2 else ''}"
    return "0 clicks" if k == 0 else f"{k} click step{'s' if k > 1 else ''}"


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _step_means(cs: Sequence[Mapping[str, Any]], key: str, steps: int) -> Optional[List[Optional[float]]]:
    """Per step, the mean over cases of a per-step list (None where no case has it)."""
    if not all(len(c.get(key) or ()) == steps for c in cs):
        return None
    return [_mean([c[key][k] for c in cs]) for k in range(steps)]


def harm_summary(effects: Sequence[Mapping[str, Any]], n_steps: int) -> Dict[str, Any]:
    """What the clicks of one class did, over all cases (``effects``: the records' ``effects``
    entries of that class).

    Returns ``n_clicks``; ``n_harmful`` and ``harmful_fraction`` (Dice fell by more than the
    tolerance) with ``harmful_ci95``, its Wilson 95% interval ([low, high], None without clicks);
    ``largest_fall`` (largest Dice decrease, 0 when none fell); ``mean_gain`` (mean Dice change per
    click); ``lesions_lost`` (detected before a click, missed after it) and
    ``lesions_lost_elsewhere`` (of those, not the clicked lesion), their rate per click and their
    count per step (``lesions_lost_per_step``, index = step, 0 for the automatic result);
    ``far_dice_change_mean`` / ``far_dice_change_largest`` (signed change of largest magnitude) of
    the Dice beyond the guide's reach, and ``far_changed_voxels``; ``n_not_followed`` and
    ``not_followed_fraction`` (with ``not_followed_ci95``): clicks after which the output still
    disagreed with the click at its own voxel, of the clicks that record it (``followed``; an older
    results.json has none: 0 and None); ``by_sign``: ``n_clicks``, ``n_harmful``,
    ``harmful_fraction``, ``n_not_followed`` and ``mean_gain`` of the positive and of the negative
    clicks apart (a user's click on a miss, or on a false positive). Fractions and means over no
    clicks are None.
    """
    n = len(effects)
    per_step = [0] * (n_steps + 1)
    for e in effects:
        per_step[e["step"]] += len(e["lesions_lost"])
    far = [e["far_dice_after"] - e["far_dice_before"] for e in effects if e.get("far_dice_before") is not None]
    lost = sum(len(e["lesions_lost"]) for e in effects)
    harmful = sum(1 for e in effects if e["harmful"])
    ci = proportion_ci(harmful, n)
    known = [e["followed"] for e in effects if e.get("followed") is not None]
    ignored = known.count(False)
    ci_ignored = proportion_ci(ignored, len(known))
    return {
        "n_clicks": n,
        "n_harmful": harmful,
        "harmful_fraction": (harmful / n) if n else None,
        "harmful_ci95": list(ci) if ci else None,
        "largest_fall": max([0.0] + [e["dice_before"] - e["dice_after"] for e in effects]) if n else None,
        "mean_gain": _mean([e["dice_after"] - e["dice_before"] for e in effects]),
        "lesions_lost": lost,
        "lesions_lost_elsewhere": sum(len(e["lesions_lost_elsewhere"]) for e in effects),
        "lesions_lost_per_click": lost / n if n else None,
        "lesions_lost_per_step": per_step,
        "far_dice_change_mean": _mean(far),
        "far_dice_change_largest": max(far, key=abs) if far else None,
        "far_changed_voxels": sum(e["far_changed_voxels"] for e in effects if e.get("far_changed_voxels") is not None)
        if far else None,
        "n_not_followed": ignored,
        "not_followed_fraction": ignored / len(known) if known else None,
        "not_followed_ci95": list(ci_ignored) if ci_ignored else None,
        "by_sign": {name: _sign_summary([e for e in effects if e.get("positive") is sign])
                    for name, sign in (("positive", True), ("negative", False))},
    }


def _signs(harm: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The positive and the negative clicks' summaries of a :func:`harm_summary` (of an older
    results.json too, which has none: zero counts)."""
    by = harm.get("by_sign") or {}
    return [by.get(k) or {"n_clicks": 0, "n_harmful": 0, "n_not_followed": 0} for k in ("positive", "negative")]


def _not_followed(harm: Mapping[str, Any]) -> str:
    """'k of n' per sign, of a :func:`harm_summary` ('-' where no click recorded it)."""
    if harm.get("not_followed_fraction") is None:
        return "-"
    return " / ".join(f"{s.get('n_not_followed', 0)} of {s['n_clicks']}" for s in _signs(harm))


def _sign_summary(effects: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    n, harmful = len(effects), sum(1 for e in effects if e["harmful"])
    return {"n_clicks": n, "n_harmful": harmful, "harmful_fraction": harmful / n if n else None,
            "n_not_followed": sum(1 for e in effects if e.get("followed") is False),
            "mean_gain": _mean([e["dice_after"] - e["dice_before"] for e in effects])}


# --------------------------------------------------------------------------------------------
# files


def _csv_atomic(rows: List[List[Any]], path: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    write_text_atomic(buf.getvalue(), path)


def write_csvs(out_dir: str, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
               plain: Optional[Mapping[str, Mapping[str, Any]]] = None,
               thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> List[str]:
    """per_case.csv, dice_vs_clicks.csv (per class and step), clicks.csv (per click step and clicked
    class: what the click did) and summary.csv; returns the paths."""
    paths = []
    n = summary["n_clicks"] or 0
    head = ["case", "class", "guided"] + [f"dice_{k}" for k in range(n + 1)] + ["auc"]
    for t in thresholds:
        head += [f"noc{_tkey(t)}", f"noc{_tkey(t)}_reached"]
    head += ["n_lesions", "recall_0", "precision_0", f"recall_{n}", f"precision_{n}",
             "plain_dice", "plain_recall", "plain_precision",
             "nsd_0", f"nsd_{n}", "fp_mm3_0", "fn_mm3_0", f"fp_mm3_{n}", f"fn_mm3_{n}",
             "clicks", "harmful_clicks", "largest_fall", "lesions_lost", "lesions_lost_elsewhere",
             "far_dice_change_largest", "plain_nsd", "plain_fp_mm3", "plain_fn_mm3", "clicks_not_followed"]
    rows: List[List[Any]] = [head]
    for r in records:
        for name, c in r["classes"].items():
            row = [r["case"], name, int(c["guided"])] + list(c["dice"]) + [c["auc"]]
            for t in thresholds:
                nc = c["noc"][_tkey(t)]
                row += [nc["clicks"], int(nc["reached"])]
            d0, dn = c["detection"][0], c["detection"][-1]
            row += [d0["n_reference"], d0["recall"], d0["precision"], dn["recall"], dn["precision"]]
            p = (plain or {}).get(r["case"], {}).get(name)
            row += [p["dice"], p["detection"]["recall"], p["detection"]["precision"]] if p else [None] * 3
            ends = lambda key: [c[key][0], c[key][-1]] if c.get(key) else [None, None]  # noqa: E731
            row += ends("nsd") + [ends("fp_mm3")[0], ends("fn_mm3")[0], ends("fp_mm3")[1], ends("fn_mm3")[1]]
            h = harm_summary([e for e in r.get("effects", ()) if e["class"] == name and e["kind"] == "point"], n)
            row += [h["n_clicks"], h["n_harmful"], h["largest_fall"], h["lesions_lost"], h["lesions_lost_elsewhere"],
                    h["far_dice_change_largest"]]
            row += [p.get("nsd"), p.get("fp_mm3"), p.get("fn_mm3")] if p else [None] * 3
            row += [h["n_not_followed"]]
            rows.append(row)
    paths.append(os.path.join(out_dir, "per_case.csv"))
    _csv_atomic(rows, paths[-1])

    rows = [["class", "clicks", "mean_dice", "global_dice", "lesion_recall", "lesion_precision", "step",
             "mean_nsd", "mean_fp_mm3", "mean_fn_mm3", "prompts", "harmful_prompts", "lesions_lost",
             "lesions_lost_elsewhere", "mean_far_dice_change"]]
    effects = [e for r in records for e in r.get("effects", ())]
    for name, g in summary["guided"].items():
        for k in range(n + 1):
            mine = [e for e in effects if e["class"] == name and e["step"] == k]
            far = [e["far_dice_after"] - e["far_dice_before"] for e in mine if e.get("far_dice_before") is not None]
            at = lambda key: g[key][k] if g.get(key) else None  # noqa: E731
            rows.append([name, k, g["mean_dice"][k], g["global_dice"][k], g["recall"][k], g["precision"][k],
                         summary.get("step_labels", [None] * (n + 1))[k], at("mean_nsd"), at("mean_fp_mm3"),
                         at("mean_fn_mm3"), len(mine), sum(1 for e in mine if e["harmful"]),
                         sum(len(e["lesions_lost"]) for e in mine), sum(len(e["lesions_lost_elsewhere"]) for e in mine),
                         float(np.mean(far)) if far else None])
    paths.append(os.path.join(out_dir, "dice_vs_clicks.csv"))
    _csv_atomic(rows, paths[-1])

    rows = [["case", "step", "class", "kind", "positive", "positions", "dice_before", "dice_after", "change", "harmful",
             "lesions_detected_before", "lesions_lost", "lesions_lost_elsewhere", "clicked_lesions",
             "far_dice_before", "far_dice_after", "far_changed_voxels", "n_far_voxels", "followed"]]
    for r in records:
        for e in r.get("effects", ()):
            sign = e.get("positive")
            rows.append([r["case"], e["step"], e["class"], e["kind"], "" if sign is None else int(sign),
                         " ".join("(" + ",".join(f"{v:g}" for v in p) + ")" for p in e["positions"]),
                         e["dice_before"], e["dice_after"], e["change"], int(e["harmful"]),
                         e["lesions_detected_before"], len(e["lesions_lost"]), len(e["lesions_lost_elsewhere"]),
                         " ".join(str(j) for j in e["clicked_lesions"]), e.get("far_dice_before"),
                         e.get("far_dice_after"), e.get("far_changed_voxels"), e.get("n_far_voxels"),
                         None if e.get("followed") is None else int(e["followed"])])
    paths.append(os.path.join(out_dir, "clicks.csv"))
    _csv_atomic(rows, paths[-1])

    harm_keys = ["harmful_fraction", "largest_fall", "mean_gain", "lesions_lost_per_click", "far_dice_change_mean",
                 "not_followed_fraction"]
    rows = [["class", "method", "mean_dice", "global_dice", "lesion_recall", "lesion_precision", "dice_auc"]
            + [f"noc{_tkey(t)}_mean" for t in thresholds] + [f"noc{_tkey(t)}_failed" for t in thresholds]
            + ["mean_nsd", "mean_fp_mm3", "mean_fn_mm3", "clicks"] + harm_keys]
    labels = summary.get("step_labels") or [step_label(k) for k in range(n + 1)]
    for name, g in summary["guided"].items():
        if summary.get("plain"):
            p = summary["plain"][name]
            rows.append([name, "plain nnU-Net", p["mean_dice"], p["global_dice"], p["recall"], p["precision"], None]
                        + [None] * (2 * len(thresholds))
                        + [p.get("mean_nsd"), p.get("mean_fp_mm3"), p.get("mean_fn_mm3")]
                        + [None] * (1 + len(harm_keys)))
        curve_figures = [g["mean_auc"]] + [g["noc"][_tkey(t)]["mean_clicks"] for t in thresholds] + \
            [g["noc"][_tkey(t)]["n_failed"] for t in thresholds]
        h = g.get("harm") or {}
        harm_figures = [h.get("n_clicks")] + [h.get(k) for k in harm_keys]
        steps = [(0, f"guide model, {labels[0]}")] + ([(n, f"guide model, {labels[n]}")] if n > 0 else [])
        for k, label in steps:
            extra = curve_figures if k == n else [None] * len(curve_figures)
            at = lambda key: g[key][k] if g.get(key) else None  # noqa: E731
            rows.append([name, label, g["mean_dice"][k], g["global_dice"][k], g["recall"][k], g["precision"][k]]
                        + extra + [at("mean_nsd"), at("mean_fp_mm3"), at("mean_fn_mm3")]
                        + (harm_figures if k == n else [None] * len(harm_figures)))
    paths.append(os.path.join(out_dir, "summary.csv"))
    _csv_atomic(rows, paths[-1])
    return paths


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path: str) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def plot_curves(path: str, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Dice vs clicks: one panel per class, per-case curves thin, per-case mean and global Dice
    bold, the plain nnU-Net result (if any) as a horizontal line."""
    plt = _plt()
    names = list(summary["guided"])
    n = summary["n_clicks"] or 0
    x = np.arange(n + 1)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        g = summary["guided"][name]
        for r in records:
            ax.plot(x, r["classes"][name]["dice"], color="0.75", lw=0.8, zorder=1)
        ax.plot(x, g["mean_dice"], "o-", color="C0", lw=2, label="guide model, mean per case", zorder=3)
        ax.plot(x, g["global_dice"], "s--", color="C1", lw=1.5, label="guide model, global", zorder=3)
        p = (summary.get("plain") or {}).get(name)
        if p and p["mean_dice"] is not None:
            ax.axhline(p["mean_dice"], color="C3", ls=":", lw=1.8, label="plain nnU-Net, mean per case")
        ax.set_title(f"{name}{'' if g['guided'] else ' (not guided)'}")
        ax.set_xlabel("click steps")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(x if n <= 12 else np.linspace(0, n, 7).round().astype(int))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def choose_slice(reference: np.ndarray, classes: Mapping[str, Sequence[int]]) -> int:
    """Axis-0 slice with the most reference voxels of the last listed class that is present
    (usually the smallest structure, e.g. tumour), else of any foreground."""
    for vals in list(classes.values())[::-1]:
        m = class_mask(reference, vals)
        if m.any():
            return int(np.argmax(m.reshape(m.shape[0], -1).sum(1)))
    fg = reference > 0
    return int(np.argmax(fg.reshape(fg.shape[0], -1).sum(1))) if fg.any() else reference.shape[0] // 2


def plot_overlay(path: str, case_id: str, image: np.ndarray, reference: np.ndarray,
                 predictions: Sequence[Tuple[str, np.ndarray, int]], classes: Mapping[str, Sequence[int]],
                 clicks: Sequence[Tuple[int, Click]] = (), slice_index: Optional[int] = None) -> str:
    """One axis-0 slice of a case: the image with the reference as contours and the prediction
    as translucent fill, one colour per class and one panel per prediction; clicks within 1 slice are marked (+ positive,
    x negative).

    Args:
        image: (z, y, x) intensities (first channel), or (y, x).
        reference: label map of the same shape.
        predictions: (panel title, label map, k): the panel shows the clicks of steps 1..k.
        clicks: (step, Click) with voxel positions in the same array.
    """
    plt = _plt()
    if image.ndim == 2:
        image, reference = image[None], reference[None]
        predictions = [(t, p[None], k) for t, p, k in predictions]
        clicks = [(s, Click(c.target, (0.0, *c.position), c.positive, c.sigma)) for s, c in clicks]
    z = choose_slice(reference, classes) if slice_index is None else int(slice_index)
    img = image[z].astype(float)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
    fig, axes = plt.subplots(1, max(len(predictions), 1), figsize=(3.6 * max(len(predictions), 1), 3.9),
                             squeeze=False)
    from matplotlib.colors import to_rgba
    colours = ["lime", "red", "cyan", "yellow", "magenta", "orange"]
    for ax, (title, pred, shown) in zip(axes[0], predictions):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        for i, (name, vals) in enumerate(classes.items()):
            col = colours[i % len(colours)]
            p = class_mask(pred[z], vals)
            if p.any():  # prediction: translucent fill
                rgba = np.zeros(p.shape + (4,))
                rgba[p] = to_rgba(col, 0.35)
                ax.imshow(rgba, interpolation="nearest")
            r = class_mask(reference[z], vals)
            if r.any() and not r.all():  # reference: contour
                ax.contour(r.astype(float), levels=[0.5], colors=[col], linewidths=1.3)
        for step, c in clicks:
            if abs(c.position[0] - z) <= 1 and step <= shown:
                ax.plot(c.position[2], c.position[1], "+" if c.positive else "x", ms=9, mew=2,
                        color="yellow" if c.positive else "magenta")
        d = "  ".join(f"{n}: {dice_masks(class_mask(reference, v), class_mask(pred, v)).dice:.2f}"
                      for n, v in classes.items())
        ax.set_title(f"{title}\ncase Dice {d}", fontsize=8)
        ax.axis("off")
    names = ", ".join(f"{n} {colours[i % len(colours)]}" for i, n in enumerate(classes))
    fig.suptitle(f"{case_id}, slice {z}: reference = contour, prediction = fill ({names})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save_fig(fig, path)
    plt.close(fig)
    return path


def click_effect_lines(summary: Mapping[str, Any], negligible: float = 0.01) -> List[str]:
    """One sentence per guided class: Dice at 0 and N click steps, the change, and a plain
    statement when the change is below ``negligible`` (the model hardly uses its clicks)."""
    n = summary["n_clicks"] or 0
    lines = []
    for name, g in summary["guided"].items():
        if not g["guided"]:
            continue
        d0, dn = g["mean_dice"][0], g["mean_dice"][n]
        if d0 is None or dn is None:
            continue
        line = f"{name}: {d0:.3f} -> {dn:.3f} ({dn - d0:+.3f})"
        if abs(dn - d0) < negligible:
            line += (": the clicks made no real difference, i.e. this model hardly uses its guide channels "
                     "(typical of a very short training)")
        lines.append(line)
    return lines


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if isinstance(v, float) or v is None:
            return format_float(v)
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], title: str,
                    context: Sequence[str] = (), images: Sequence[str] = (),
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> str:
    """The report as Markdown: context lines, the summary table, the curve, per-case figures."""
    n = summary["n_clicks"] or 0
    start = summary.get("start", "clicks")
    labels = summary.get("step_labels") or [step_label(k) for k in range(n + 1)]
    out = [f"# {title}", ""]
    out += [f"- {c}" for c in context]
    box = {"box": "Step 1 is a box: one 3D box around each reference object of every guided class (the CVPR 2025 "
                  "interactive protocol: a box, then clicks). Then the",
           "scribble": "Step 1 is a scribble: one per reference object of every guided class, along the medial "
                       "voxels of its largest axial cross-section. Then the",
           "points": "Step 1 is one positive click at the interior-most point of every reference object of every "
                     "guided class (a reader who marks each lesion once). Then the"}.get(start, "The")
    out += ["", "## Summary", "",
            f"{summary['n_cases']} case(s). {box} simulated user adds one click per guided class per step at the "
            f"interior-most point of the largest error region (positive on a missed region, negative on a false "
            f"one), up to {n} step(s). Mean = per-case mean Dice; global = Dice of the voxel counts summed over "
            f"cases (as LiTS reports). NoC = steps to reach the Dice threshold, failures counted as {n}.", ""]
    header = ["class", "method", "mean Dice", "global Dice", "lesion recall", "lesion precision", "Dice AUC"] + \
             [f"NoC@{_tkey(t)} (failed)" for t in thresholds]
    rows = []
    for name, g in summary["guided"].items():
        if summary.get("plain"):
            p = summary["plain"][name]
            rows.append([name, "plain nnU-Net", p["mean_dice"], p["global_dice"], p["recall"], p["precision"], None]
                        + ["-"] * len(thresholds))
        rows.append([name, f"guide model, {labels[0]}", g["mean_dice"][0], g["global_dice"][0], g["recall"][0],
                     g["precision"][0], None] + ["-"] * len(thresholds))
        if n > 0:
            rows.append([name, f"guide model, {labels[n]}", g["mean_dice"][n], g["global_dice"][n],
                         g["recall"][n], g["precision"][n], g["mean_auc"]]
                        + [f"{format_float(g['noc'][_tkey(t)]['mean_clicks'], 2)} "
                           f"({g['noc'][_tkey(t)]['n_failed']}/{g['noc'][_tkey(t)]['n_curves']})"
                           if g["guided"] else "-" for t in thresholds])
    out.append(_md_table(header, rows))
    if n > 0:
        out += ["", "What the clicks changed (per-case mean Dice, 0 clicks -> N click steps):", ""]
        out += [f"- {line}" for line in click_effect_lines(summary)]
    out += ["", "Per lesion (connected components of the reference):", ""]
    lrows = [[name, g["n_lesions"], g["recall"][0], g["recall"][n]]
             + [f"{format_float(g['lesion_noc'][_tkey(t)]['mean_clicks'], 2)} "
                f"({g['lesion_noc'][_tkey(t)]['n_failed']}/{g['lesion_noc'][_tkey(t)]['n_curves']})"
                for t in thresholds]
             for name, g in summary["guided"].items() if g["guided"]]
    out.append(_md_table(["class", "lesions", "recall, 0 clicks", f"recall, {n} steps"]
                         + [f"lesion NoC@{_tkey(t)} (failed)" for t in thresholds], lrows))
    if start in PROMPT_STARTS:
        brows = [[name, g.get(f"mean_auc_from_{start}"), g.get(f"mean_nsd_auc_from_{start}"), g["mean_dice"][1],
                  g["mean_dice"][n], (g.get("mean_nsd") or [None] * (n + 1))[n]]
                 for name, g in summary["guided"].items() if g["guided"]]
        out += ["", f"{start.capitalize()} start (AUC over the {start} and the clicks that follow, without the "
                "automatic step, as the CVPR 2025 protocol scores its box start):", "",
                _md_table(["class", f"Dice AUC, {start} + clicks", f"NSD AUC, {start} + clicks",
                           f"Dice after the {start}", f"Dice after {labels[n]}", "final NSD"], brows)]
    out += harm_section(summary)
    out += ["", "## Dice vs clicks", "", "![Dice vs clicks](dice_vs_clicks.png)", "",
            "Per step (per-case mean / global):", ""]
    crow = []
    for name, g in summary["guided"].items():
        crow.append([name] + [f"{format_float(a)} / {format_float(b)}" for a, b in zip(g["mean_dice"], g["global_dice"])])
    out.append(_md_table(["class"] + [str(k) for k in range(n + 1)], crow))
    out += ["", "## Cases", ""]
    prow = []
    for r in records:
        for name, c in r["classes"].items():
            prow.append([r["case"], name, c["dice"][0], c["dice"][-1], c["auc"]]
                        + [f"{c['noc'][_tkey(t)]['clicks']}{'' if c['noc'][_tkey(t)]['reached'] else ' (failed)'}"
                           for t in thresholds]
                        + [len(c["lesions"]["size"]), r["stopped_at"] if r["stopped_at"] is not None else "-"])
    out.append(_md_table(["case", "class", "Dice 0", f"Dice {n}", "AUC"]
                         + [f"NoC@{_tkey(t)}" for t in thresholds] + ["lesions", "user stopped after"], prow))
    if images:
        out += ["", "## Overlays", ""]
        out += [f"![{os.path.basename(p)}]({p})" for p in images]
    out += ["", "Files: `results.json` (everything), `per_case.csv`, `dice_vs_clicks.csv`, `clicks.csv`, "
            "`summary.csv`.", ""]
    return "\n".join(out)


def harm_section(summary: Mapping[str, Any]) -> List[str]:
    """Markdown lines: does a click harm? (per guided class, then NSD / error volumes / lesions lost
    per step)."""
    n = summary["n_clicks"] or 0
    labels = summary.get("step_labels") or [step_label(k) for k in range(n + 1)]
    guided = {name: g for name, g in summary["guided"].items() if g["guided"] and g.get("harm")}
    out = ["", "## Does a click harm?", "",
           f"Per click (one click step on one guided class): *harmful* = the class's Dice fell by more than "
           f"{HARM_TOLERANCE}; "
           "*lesions lost* = reference lesions detected before the click and missed after it (*elsewhere*: not the "
           "clicked lesion); *far Dice* = the class's Dice restricted to voxels beyond the guide's reach from every "
           "click so far, after minus before (it should not move); *not followed* = after the click the output "
           "still disagreed with it at the clicked voxel (a click that did nothing where the user clicked).", ""]
    rows = []
    for name, g in guided.items():
        h = g["harm"]
        rows.append([name, h["n_clicks"],
                     f"{h['n_harmful']} ({format_float(h['harmful_fraction'], 3)}; "
                     f"{format_float(h['harmful_ci95'][0], 3)}-{format_float(h['harmful_ci95'][1], 3)})"
                     if h["n_clicks"] else "0",
                     " / ".join(f"{s['n_harmful']} of {s['n_clicks']}" for s in _signs(h)),
                     h["largest_fall"], h["mean_gain"], f"{h['lesions_lost']} ({h['lesions_lost_elsewhere']})",
                     h["lesions_lost_per_click"], h["far_dice_change_mean"], h["far_dice_change_largest"],
                     _not_followed(h)])
    out.append(_md_table(["class", "clicks", "harmful (fraction; Wilson 95% interval)", "harmful: positive / negative",
                          "largest fall", "mean Dice gain per click", "lesions lost (elsewhere)",
                          "lesions lost per click", "far-Dice change, mean", "far-Dice change, largest",
                          "not followed: positive / negative"], rows))
    for kind in PROMPT_STARTS:  # the start's step, one per case: all its prompts at once
        rows = [[name, h["n_clicks"], f"{h['n_harmful']} of {h['n_clicks']}", h["largest_fall"], h["mean_gain"],
                 f"{h['lesions_lost']} ({h['lesions_lost_elsewhere']})", h["far_dice_change_mean"],
                 "-" if h.get("not_followed_fraction") is None else f"{h['n_not_followed']} of {h['n_clicks']}"]
                for name, h in ((name, g.get(f"{kind}_effect")) for name, g in guided.items()) if h]
        if rows:
            out += ["", f"The {kind} step (all of a case's {kind} prompts at once; not followed: some click of the "
                    "step still disagreed with the output at its own voxel):", "",
                    _md_table(["class", f"{kind} steps", "harmful", "largest fall", "mean Dice gain",
                               "lesions lost (elsewhere)", "far-Dice change, mean", "not followed"], rows)]
    tol = summary.get("nsd_tolerance_mm")
    out += ["", f"Per step: per-case mean normalised surface Dice (NSD, {format_float(tol, 1)} mm), false-positive "
            "and false-negative volume (mm^3, per-case mean), lesions lost and harmful clicks in that step "
            "(summed over cases):", ""]
    srows = []
    for name, g in summary["guided"].items():
        h = g.get("harm") or {}
        per = h.get("lesions_lost_per_step")
        for k in range(n + 1):
            at = lambda key: g[key][k] if g.get(key) else None  # noqa: E731
            srows.append([name, labels[k], g["mean_dice"][k], at("mean_nsd"), at("mean_fp_mm3"), at("mean_fn_mm3"),
                          per[k] if per and g["guided"] else "-"])
    out.append(_md_table(["class", "step", "mean Dice", "mean NSD", "FP volume (mm^3)", "FN volume (mm^3)",
                          "lesions lost"], srows))
    p = summary.get("plain")
    if p:
        out += ["", "Plain nnU-Net: " + "; ".join(
            f"{name} NSD {format_float(v.get('mean_nsd'))}, FP {format_float(v.get('mean_fp_mm3'), 1)} mm^3, "
            f"FN {format_float(v.get('mean_fn_mm3'), 1)} mm^3" for name, v in p.items()) + "."]
    return out


def write_report(out_dir: str, records: Sequence[Mapping[str, Any]],
                 plain: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 overlays: Sequence[Mapping[str, Any]] = (), title: str = "nnunet-guide evaluation",
                 context: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[str, Any]:
    """Write every output file into ``out_dir``; returns the summary.

    Args:
        records: :func:`case_record` outputs.
        plain: case id -> :func:`plain_record`, optional.
        overlays: dicts with keys ``case``, ``image``, ``reference``, ``predictions`` ((title,
            label map, click steps shown) triples), ``classes``, ``clicks`` (see :func:`plot_overlay`).
        context: lines about the run (model, data, caveats) for the top of the report.
        settings: the run's settings, stored in results.json.
    """
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(records, plain, thresholds)
    write_json_atomic({"settings": dict(settings or {}), "summary": summary, "cases": list(records),
                       "plain": dict(plain) if plain else None}, os.path.join(out_dir, "results.json"))
    write_csvs(out_dir, records, summary, plain, thresholds)
    if records:
        plot_curves(os.path.join(out_dir, "dice_vs_clicks.png"), records, summary)
    images = []
    if overlays:
        os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    for ov in overlays:
        rel = os.path.join("overlays", f"{ov['case']}.png")
        plot_overlay(os.path.join(out_dir, rel), ov["case"], ov["image"], ov["reference"], ov["predictions"],
                     ov["classes"], ov.get("clicks", ()))
        images.append(rel)
    md = markdown_report(summary, records, title, context, images, thresholds)
    write_text_atomic(md, os.path.join(out_dir, "report.md"))
    return summary
