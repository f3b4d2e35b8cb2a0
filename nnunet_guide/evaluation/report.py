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
from ..core.metrics import (LesionDetection, class_mask, clicks_to_reach, dice_auc, dice_from_counts, dice_masks,
                            format_float, global_dice, lesion_detection, mean_dice, noc_summary, sum_detections)
from ..core.user_sim import SessionResult
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
        "clicks": [{"step": step, "target": guided_names[c.target], "position": [float(p) for p in c.position],
                    "positive": bool(c.positive)} for step, c in session.clicks],
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
            "noc": {_tkey(t): vars(clicks_to_reach(curve, t)) for t in thresholds},
            "detection": [d.to_dict(with_lesions=False) for d in tr.detection],
            "lesions": {
                "size": list(tr.detection[0].lesion_size),
                "dice": [[float(v) for v in lesion_curves[:, j]] for j in range(n_lesions)],
                "noc": {_tkey(t): [vars(clicks_to_reach(lesion_curves[:, j], t)) for j in range(n_lesions)]
                        for t in thresholds},
            },
        }
        rec["classes"][name] = c
    return rec


def plain_record(case_id: str, reference: np.ndarray, prediction: np.ndarray, classes: Mapping[str, Sequence[int]],
                 connectivity: int = 2, detection_min_dice: float = 0.0,
                 ignore_label: Optional[int] = None) -> Dict[str, Any]:
    """Metrics of an automatic prediction (a plain nnU-Net result) of one case."""
    out: Dict[str, Any] = {}
    for name, vals in classes.items():
        r, p = class_mask(reference, vals), class_mask(prediction, vals)
        if ignore_label is not None:
            keep = reference != ignore_label
            r, p = r & keep, p & keep
        d = dice_masks(r, p, case_id)
        det = lesion_detection(r, p, connectivity, detection_min_dice, case_id)
        out[name] = {**d.to_dict(), "detection": det.to_dict(with_lesions=False)}
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
        }
    plain_sum = None
    if plain:
        plain_sum = {}
        for name in names:
            rows = [plain[r["case"]][name] for r in records if r["case"] in plain]
            results = [dice_from_counts(p["tp"], p["fp"], p["fn"]) for p in rows]
            det = sum_detections([_det_from_dict(p["detection"]) for p in rows])
            plain_sum[name] = {"n_cases": len(rows), "mean_dice": mean_dice(results).value if rows else None,
                               "global_dice": global_dice(results).dice if rows else None,
                               "recall": det.recall, "precision": det.precision}
    return {"n_cases": len(records), "n_clicks": steps - 1, "guided": guided, "plain": plain_sum}


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
    """per_case.csv, dice_vs_clicks.csv and summary.csv; returns the paths."""
    paths = []
    n = summary["n_clicks"] or 0
    head = ["case", "class", "guided"] + [f"dice_{k}" for k in range(n + 1)] + ["auc"]
    for t in thresholds:
        head += [f"noc{_tkey(t)}", f"noc{_tkey(t)}_reached"]
    head += ["n_lesions", "recall_0", "precision_0", f"recall_{n}", f"precision_{n}",
             "plain_dice", "plain_recall", "plain_precision"]
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
            rows.append(row)
    paths.append(os.path.join(out_dir, "per_case.csv"))
    _csv_atomic(rows, paths[-1])

    rows = [["class", "clicks", "mean_dice", "global_dice", "lesion_recall", "lesion_precision"]]
    for name, g in summary["guided"].items():
        for k in range(n + 1):
            rows.append([name, k, g["mean_dice"][k], g["global_dice"][k], g["recall"][k], g["precision"][k]])
    paths.append(os.path.join(out_dir, "dice_vs_clicks.csv"))
    _csv_atomic(rows, paths[-1])

    rows = [["class", "method", "mean_dice", "global_dice", "lesion_recall", "lesion_precision", "dice_auc"]
            + [f"noc{_tkey(t)}_mean" for t in thresholds] + [f"noc{_tkey(t)}_failed" for t in thresholds]]
    for name, g in summary["guided"].items():
        if summary.get("plain"):
            p = summary["plain"][name]
            rows.append([name, "plain nnU-Net", p["mean_dice"], p["global_dice"], p["recall"], p["precision"], None]
                        + [None] * (2 * len(thresholds)))
        curve_figures = [g["mean_auc"]] + [g["noc"][_tkey(t)]["mean_clicks"] for t in thresholds] + \
            [g["noc"][_tkey(t)]["n_failed"] for t in thresholds]
        steps = [(0, "guide model, 0 clicks")] + ([(n, f"guide model, {n} click steps")] if n > 0 else [])
        for k, label in steps:
            extra = curve_figures if k == n else [None] * len(curve_figures)
            rows.append([name, label, g["mean_dice"][k], g["global_dice"][k], g["recall"][k], g["precision"][k]]
                        + extra)
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
    out = [f"# {title}", ""]
    out += [f"- {c}" for c in context]
    out += ["", "## Summary", "",
            f"{summary['n_cases']} case(s); the simulated user adds one click per guided class per step at the "
            f"interior-most point of the largest error region (positive on a missed region, negative on a false "
            f"one), up to {n} step(s). Mean = per-case mean Dice; global = Dice of the voxel counts summed over "
            f"cases (as LiTS reports). NoC = click steps to reach the Dice threshold, failures counted as {n}.", ""]
    header = ["class", "method", "mean Dice", "global Dice", "lesion recall", "lesion precision", "Dice AUC"] + \
             [f"NoC@{_tkey(t)} (failed)" for t in thresholds]
    rows = []
    for name, g in summary["guided"].items():
        if summary.get("plain"):
            p = summary["plain"][name]
            rows.append([name, "plain nnU-Net", p["mean_dice"], p["global_dice"], p["recall"], p["precision"], None]
                        + ["-"] * len(thresholds))
        rows.append([name, "guide model, 0 clicks", g["mean_dice"][0], g["global_dice"][0], g["recall"][0],
                     g["precision"][0], None] + ["-"] * len(thresholds))
        if n > 0:
            rows.append([name, f"guide model, {n} click steps", g["mean_dice"][n], g["global_dice"][n],
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
    out += ["", "Files: `results.json` (everything), `per_case.csv`, `dice_vs_clicks.csv`, `summary.csv`.", ""]
    return "\n".join(out)


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
