"""How much a click buys, measured with a simulated user (the library of ``nnUNetv2_guide_evaluate``).

For every case: predict with no click, then N times add one click per guided class at the
interior-most point of its largest error region (:mod:`nnunet_guide.core.user_sim`) and predict
again. Reports Dice after 0..N click steps, its area under the curve, NoC@85/90 per case and per
lesion, lesion-wise detection, per-case mean and global Dice, and the same automatic figures for
a plain nnU-Net result folder (``--plain``). Writes JSON, CSV, PNG and Markdown
(:mod:`nnunet_guide.evaluation.report`).

The model enters :func:`evaluate` only as ``predict(case_id, clicks) -> label map`` (raw image
voxel grid, SimpleITK array order; click positions are raw array indices), so the loop runs
with any predictor; :func:`guided_predict_fn` builds that function from a trained model folder
with :class:`nnunet_guide.inference.predictor.GuidedPredictor`.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..core.clicks import Click
from ..core.encoding import OBJECT_SIGMA_PER_DIAMETER
from ..core.metrics import check_label_values, check_pair, click_reach_voxels, guide_reach_mm
from ..core.prompts import STEP_PER_SIGMA, prompt_step_mm
from ..core.user_sim import PredictFn, simulate_session
from ..settings import GuidedTarget, resolve_targets
from .report import DEFAULT_THRESHOLDS, case_record, plain_record, step_label, write_report

Log = Callable[[str], None]


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use; the message names the case/file and what was expected."""


@dataclass
class CaseInput:
    """One case to evaluate.

    Attributes:
        case_id: nnU-Net case identifier.
        reference: integer label map (z, y, x) in the raw image's voxel grid.
        spacing: mm per array axis of ``reference``.
        image: first image channel (z, y, x) for overlays, or None.
        plain: a plain nnU-Net prediction of the case (same grid), or None.
        plain_spacing: its spacing (checked against ``spacing``).
    """
    case_id: str
    reference: np.ndarray
    spacing: Tuple[float, ...]
    image: Optional[np.ndarray] = None
    plain: Optional[np.ndarray] = None
    plain_spacing: Optional[Tuple[float, ...]] = None


@dataclass
class EvaluationOptions:
    """Settings of the simulated user and the metrics (stored in results.json)."""
    n_clicks: int = 5
    connectivity: int = 2
    allow_negative: bool = True
    min_error_voxels: int = 1
    detection_min_dice: float = 0.0
    thresholds: Tuple[float, ...] = DEFAULT_THRESHOLDS
    ignore_label: Optional[int] = None
    n_overlays: int = 3
    seed: int = 0
    start: str = "clicks"
    nsd_tolerance_mm: float = 2.0

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


@dataclass
class EvaluationResult:
    records: List[Dict[str, Any]] = field(default_factory=list)
    plain: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    overlays: List[Dict[str, Any]] = field(default_factory=list)


def evaluate(cases: Iterable[CaseInput], predict: PredictFn, guided: Sequence[GuidedTarget],
             classes: Mapping[str, Sequence[int]], options: EvaluationOptions, log: Log = print,
             guide_settings=None, slice_axis: Optional[int] = None) -> EvaluationResult:
    """Run the simulated user on every case and collect records (see :mod:`.report`).

    Args:
        cases: case inputs (may be a generator: cases are loaded one at a time).
        predict: ``predict(case_id, clicks) -> label map`` on the reference's grid.
        guided: the model's guided classes, in its target order (``Click.target`` indexes it).
        classes: evaluated classes, name -> label value(s).
        options: simulated-user and metric settings.
        guide_settings: the model's ``GuideSettings``: with it, each click's effect includes the
            Dice beyond the guide's reach (:func:`rendered_reach`); None skips that figure. A
            scribble start draws its clicks on the grid the server uses for this model
            (:func:`nnunet_guide.core.prompts.prompt_step_mm`; without settings, every
            ``STEP_PER_SIGMA`` x 3 mm).
        slice_axis: raw array axis a 2D model slices along (its clicks reach their slice only).
    """
    out = EvaluationResult()
    guided_names = [t.name for t in guided]
    reach_settings = guide_settings  # None when the far-from-click Dice is skipped
    if guide_settings is not None:
        try:
            guide_reach_mm(guide_settings)
        except ValueError as e:  # an encoding whose reach the metrics don't know: no far Dice
            log(f"far-from-click Dice skipped: {e}")
            reach_settings = None
    allowed = sorted({0, *(v for vals in classes.values() for v in vals)} |
                     ({options.ignore_label} if options.ignore_label is not None else set()))
    for i, case in enumerate(cases):
        t0 = time.time()
        check_label_values(case.reference, allowed, case.case_id, "reference")
        session = simulate_session(
            case.case_id, predict, case.reference, case.spacing, [t.labels for t in guided], dict(classes),
            options.n_clicks, connectivity=options.connectivity, allow_negative=options.allow_negative,
            ignore_label=options.ignore_label, min_error_voxels=options.min_error_voxels,
            detection_min_dice=options.detection_min_dice, start=options.start,
            nsd_tolerance_mm=options.nsd_tolerance_mm,
            reach=None if reach_settings is None else rendered_reach(case.spacing, reach_settings),
            slice_axis=slice_axis,
            prompt_step_mm=STEP_PER_SIGMA * 3.0 if guide_settings is None else prompt_step_mm(guide_settings,
                                                                                               case.spacing))
        rec = case_record(session, classes, guided_names, case.spacing, options.thresholds)
        out.records.append(rec)
        last = step_label(session.n_steps, options.start)
        panels = [("0 clicks", session.first_prediction, 0), (last, session.last_prediction, session.n_steps)]
        if case.plain is not None:
            check_pair(case.reference, case.plain, case.case_id, case.spacing, case.plain_spacing)
            out.plain[case.case_id] = plain_record(case.case_id, case.reference, case.plain, classes,
                                                   options.connectivity, options.detection_min_dice,
                                                   options.ignore_label, case.spacing, options.nsd_tolerance_mm)
            panels.insert(0, ("plain nnU-Net", case.plain, 0))
        if case.image is not None and len(out.overlays) < options.n_overlays:
            out.overlays.append({"case": case.case_id, "image": case.image, "reference": case.reference,
                                 "predictions": panels, "classes": dict(classes), "clicks": session.clicks})
        parts = [f"{n} {c['dice'][0]:.3f} -> {c['dice'][-1]:.3f}" for n, c in rec["classes"].items()]
        stop = "" if session.stopped_at is None else f", user stopped after {session.stopped_at} step(s)"
        harmful = sum(1 for e in session.effects if e.kind == "point" and e.effect.harmful)
        lost = sum(len(e.effect.lesions_lost) for e in session.effects if e.kind == "point")
        log(f"[{i + 1}] {case.case_id}: Dice 0 clicks -> {last}: {', '.join(parts)} "
            f"({len(session.clicks)} prompts, {harmful} harmful, {lost} lesion(s) lost{stop}, "
            f"{time.time() - t0:.1f} s)")
    if not out.records:
        raise EvaluationError("no case was evaluated")
    return out


# --------------------------------------------------------------------------------------------
# files in nnU-Net's layout


def find_cases(images_folder: str, reference_folder: str, file_ending: str, num_channels: int,
               plain_folder: Optional[str] = None, only: Optional[Sequence[str]] = None
               ) -> List[Tuple[str, List[str], str, Optional[str]]]:
    """Cases of an nnU-Net images folder (``{case}_{XXXX}{file_ending}``) with their reference
    (``{case}{file_ending}``) and optional plain prediction.

    Returns ``(case_id, image files, reference file, plain file or None)`` sorted by case id.
    Raises :class:`EvaluationError` naming the missing file.
    """
    if not os.path.isdir(images_folder):
        raise EvaluationError(f"images folder {images_folder} does not exist")
    if not os.path.isdir(reference_folder):
        raise EvaluationError(f"reference folder {reference_folder} does not exist")
    suffix = f"_0000{file_ending}"
    ids = sorted(f[:-len(suffix)] for f in os.listdir(images_folder) if f.endswith(suffix))
    if only:
        missing = sorted(set(only) - set(ids))
        if missing:
            raise EvaluationError(f"case(s) {missing} have no {{case}}{suffix} in {images_folder}")
        ids = [c for c in ids if c in set(only)]
    if not ids:
        raise EvaluationError(f"no images named CASE{suffix} in {images_folder}")
    out = []
    for cid in ids:
        files = [os.path.join(images_folder, f"{cid}_{c:04d}{file_ending}") for c in range(num_channels)]
        for f in files:
            if not os.path.isfile(f):
                raise EvaluationError(f"case {cid!r}: image channel file {f} is missing "
                                      f"(the model expects {num_channels} channel(s))")
        ref = os.path.join(reference_folder, f"{cid}{file_ending}")
        if not os.path.isfile(ref):
            raise EvaluationError(f"case {cid!r}: reference {ref} is missing")
        plain = None
        if plain_folder:
            plain = os.path.join(plain_folder, f"{cid}{file_ending}")
            if not os.path.isfile(plain):
                raise EvaluationError(f"case {cid!r}: plain nnU-Net prediction {plain} is missing")
        out.append((cid, files, ref, plain))
    return out


def load_cases(found: Sequence[Tuple[str, List[str], str, Optional[str]]], reader_class,
               with_image: int = 3) -> Iterator[CaseInput]:
    """Read cases lazily with nnU-Net's reader (the model's ``image_reader_writer``), so arrays
    and spacings are in the same order as the predictor's output. Images are read only for the
    first ``with_image`` cases (overlays)."""
    for i, (cid, files, ref, plain) in enumerate(found):
        rw = reader_class()
        seg, props = rw.read_seg(ref)
        spacing = tuple(float(s) for s in props["spacing"])
        image = None
        if i < with_image:
            img, _ = rw.read_images([files[0]])
            image = np.asarray(img[0], np.float32)
            if image.shape != seg.shape[1:]:
                raise EvaluationError(f"case {cid!r}: image {files[0]} has shape {image.shape} but reference "
                                      f"{ref} has {seg.shape[1:]}")
        pl, pl_sp = None, None
        if plain:
            p, pprops = rw.read_seg(plain)
            pl, pl_sp = np.asarray(p[0]), tuple(float(s) for s in pprops["spacing"])
        yield CaseInput(cid, np.asarray(seg[0]), spacing, image, pl, pl_sp)


def predict_fn_from_predictor(predictor, images: Mapping[str, Sequence[str]]) -> PredictFn:
    """``predict(case_id, clicks)`` from an initialised :class:`GuidedPredictor`.

    Each case is preprocessed once by nnU-Net (the last case is cached) and predicted again for
    every new click list. Simulated point clicks (raw array index z, y, x; ``target`` = index into
    the model's guided classes) go through the predictor's own mapping into preprocessed space, as
    ``space="array"`` clicks, so the evaluation feeds clicks exactly as a user's click file would;
    box clicks go through :func:`boxes_to_preprocessed`. The returned function carries the
    predictor as ``predict.predictor``.

    Args:
        predictor: a GuidedPredictor after ``initialize_from_trained_model_folder``.
        images: case id -> the case's channel files.
    """
    from ..inference.click_io import ClickSpec
    layout = predictor.layout
    cache: Dict[str, Any] = {}

    def predict(case_id: str, clicks: List[Click]) -> np.ndarray:
        if case_id not in cache:
            cache.clear()  # one case at a time: memory stays flat
            if case_id not in images:
                raise EvaluationError(f"case {case_id!r} has no image files")
            cache[case_id] = predictor.preprocess(list(images[case_id]))
        data, props = cache[case_id]
        specs = [ClickSpec(tuple(float(v) for v in c.position), layout.targets[c.target].name, bool(c.positive),
                           "array", f"simulated user, case {case_id!r}, click {n + 1}",
                           _size_mm(c.sigma, props["spacing"]))
                 for n, c in enumerate(clicks) if c.kind == "point"]
        pre_clicks = predictor.clicks_to_preprocessed(specs, case_id, props, data.shape[1:])
        boxes = [c for c in clicks if c.kind == "box"]
        if boxes:
            pre_clicks += boxes_to_preprocessed(boxes, props, predictor.plans_manager.transpose_forward,
                                                data.shape[1:])
        return np.asarray(predictor.segmentation_from_logits(predictor.predict_preprocessed(data, props, pre_clicks),
                                                             props))

    predict.predictor = predictor
    return predict


def raw_slice_axis(predictor) -> Optional[int]:
    """The raw array axis a 2D model's guides are confined to (None for 3D models): the
    preprocessed axis 0, which the plans' ``transpose_forward`` takes from this raw axis."""
    if predictor.slice_axis is None:
        return None
    return int(predictor.plans_manager.transpose_forward[predictor.slice_axis])


def boxes_to_preprocessed(boxes: Sequence[Click], properties: Mapping, transpose_forward: Sequence[int],
                          preprocessed_shape: Sequence[int]) -> List[Click]:
    """Box clicks of the raw array (z, y, x; :func:`nnunet_guide.core.clicks.box_click`) as box
    clicks of nnU-Net's preprocessed grid: the box's edges go through the same transpose, crop and
    resampling as point clicks (:class:`~nnunet_guide.core.coords.PreprocessedGeometry`), so the
    centre maps like a point and the per-axis sigma (proportional to the side) scales with the
    resampling."""
    from ..core.coords import PreprocessedGeometry
    pre = PreprocessedGeometry.from_properties(properties, transpose_forward, preprocessed_shape)
    out = []
    for c in boxes:
        if c.sigma is None:
            raise EvaluationError(f"box click at {c.position} has no sigma")
        pos = pre.raw_to_preprocessed(np.asarray(c.position, float))
        sigma = np.asarray(c.sigma, float)[list(pre.transpose_forward)] * pre.scale
        out.append(Click(c.target, tuple(float(v) for v in pos), c.positive, tuple(float(v) for v in sigma), "box"))
    return out


def rendered_reach(spacing: Sequence[float], guide_settings) -> Callable[[Click], np.ndarray]:
    """``reach(click)``: per-axis reach (raw voxels of a case with this ``spacing``) of a simulated
    click's guide as the predictor renders it (:func:`nnunet_guide.core.metrics.click_reach_voxels`):
    point clicks of the ``object_gaussian`` encoding go to the predictor with one diameter in mm
    (:func:`_size_mm`), so their Gaussian is isotropic in mm."""
    sp = np.asarray(spacing, float)

    def reach(c: Click) -> np.ndarray:
        if c.kind == "point" and c.sigma is not None:
            size = _size_mm(c.sigma, sp)
            c = Click(c.target, c.position, c.positive, tuple(OBJECT_SIGMA_PER_DIAMETER * size / sp), c.kind)
        return click_reach_voxels(c, sp, guide_settings)

    return reach


def _size_mm(sigma_voxels, spacing) -> Optional[float]:
    """The diameter (mm) a user would give for an error region of this robust sigma (voxels per
    array axis): the geometric mean over axes, as ``object_gaussian`` guides take one size."""
    if sigma_voxels is None:
        return None
    mm = np.asarray(sigma_voxels, float) * np.asarray(spacing, float)[-len(sigma_voxels):]
    return float(np.exp(np.log(mm).mean()) / OBJECT_SIGMA_PER_DIAMETER)


def evaluated_classes(dataset_json: Mapping, extra: Sequence[str] = ()) -> Dict[str, Tuple[int, ...]]:
    """Every foreground class of dataset.json, plus classes made of several labels given as
    ``NAME=L1,L2`` (e.g. ``liver+tumor=1,2``)."""
    ignore = dataset_json["labels"].get("ignore")
    classes = {t.name: tuple(t.labels) for t in resolve_targets(dataset_json, None, ignore)}
    known = sorted({v for vals in classes.values() for v in vals})
    for spec in extra:
        name, sep, values = str(spec).partition("=")
        try:
            labels = tuple(int(v) for v in values.split(","))
        except ValueError:
            labels = ()
        if not sep or not name or not labels:
            raise EvaluationError(f"--class {spec!r}: expected NAME=L1,L2 with integer label values, e.g. "
                                  f"liver+tumor=1,2")
        unknown = [v for v in labels if v not in known]
        if unknown:
            raise EvaluationError(f"--class {spec!r}: label value(s) {unknown} are not foreground labels of "
                                  f"dataset.json ({known})")
        if name in classes:
            raise EvaluationError(f"--class {spec!r}: a class named {name!r} already exists")
        classes[name] = labels
    return classes


def guided_predict_fn(model_folder: str, folds, checkpoint: str, images: Mapping[str, Sequence[str]],
                      device: str = "cpu", use_mirroring: bool = False, step_size: float = 0.5):
    """Load a trained guide model with :class:`GuidedPredictor`; returns ``(predict, layout)``
    (see :func:`predict_fn_from_predictor`)."""
    import torch
    from ..inference.predictor import GuidedPredictor
    from ..settings import GuideSettingsError
    predictor = GuidedPredictor(tile_step_size=step_size, use_mirroring=use_mirroring, device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    try:
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=checkpoint)
    except GuideSettingsError as e:
        raise EvaluationError(str(e)) from e
    except FileNotFoundError as e:
        raise EvaluationError(f"{model_folder}: {e} (folds {list(folds)}, checkpoint {checkpoint})") from e
    return predict_fn_from_predictor(predictor, images), predictor.layout


# --------------------------------------------------------------------------------------------
# a whole evaluation from the command's options


def model_folder_of(a) -> str:
    """The model folder of the options: ``a.model``, or nnU-Net's folder of ``a.d``, ``a.tr``,
    ``a.p``, ``a.c`` (as ``nnUNetv2_predict`` finds it)."""
    if a.model:
        if not os.path.isdir(a.model):
            raise EvaluationError(f"model folder {a.model} does not exist")
        return a.model
    if a.d is None:
        raise EvaluationError("give the model folder with -m, or -d (with -c, -tr, -p) like nnUNetv2_predict")
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    folder = get_output_folder(a.d, a.tr, a.p, a.c)
    if not os.path.isdir(folder):
        raise EvaluationError(f"no trained model at {folder} (dataset {a.d}, trainer {a.tr}, plans {a.p}, "
                              f"configuration {a.c})")
    return folder


def run_evaluation(a) -> int:
    """The whole ``nnUNetv2_guide_evaluate`` run for parsed options ``a`` (attributes named as
    the command's options, see :mod:`nnunet_guide.cli.evaluate`): load the model, run the
    simulated user on every case, write the report. Raises :class:`EvaluationError`."""
    if a.clicks < 0:
        raise EvaluationError(f"-n/--clicks must be >= 0, got {a.clicks}")
    if not a.nsd_tolerance >= 0:
        raise EvaluationError(f"--nsd-tolerance must be >= 0 mm, got {a.nsd_tolerance}")
    random.seed(a.seed)
    np.random.seed(a.seed)
    try:
        import torch
        torch.manual_seed(a.seed)
    except ImportError:  # pragma: no cover
        pass
    folder = model_folder_of(a)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(os.path.join(folder, "plans.json"))
    folds = [f if f == "all" else int(f) for f in a.f]
    found = find_cases(a.images, a.reference, dataset_json["file_ending"], len(dataset_json["channel_names"]),
                       a.plain, a.cases)
    if a.max_cases:
        found = found[:a.max_cases]
    print(f"nnUNetv2_guide_evaluate: {len(found)} case(s), model {folder}, N = {a.clicks}")
    predict, layout = guided_predict_fn(folder, folds, a.chk, {c[0]: c[1] for c in found}, a.device, a.tta,
                                        a.step_size)
    if layout.guide is None or not layout.targets:
        raise EvaluationError(f"{folder} has no guide channels; there is nothing to click")
    ignore = dataset_json["labels"].get("ignore")
    classes = evaluated_classes(dataset_json, a.extra_classes)
    opts = EvaluationOptions(n_clicks=a.clicks, connectivity=a.connectivity,
                             allow_negative=bool(layout.guide is not None and layout.guide.negatives),
                             min_error_voxels=a.min_error_voxels, detection_min_dice=a.detection_min_dice,
                             thresholds=tuple(a.thresholds), ignore_label=ignore, n_overlays=a.overlays,
                             seed=a.seed, start=a.start, nsd_tolerance_mm=a.nsd_tolerance)
    res = evaluate(load_cases(found, plans.image_reader_writer_class, a.overlays), predict, layout.targets,
                   classes, opts, guide_settings=layout.guide, slice_axis=raw_slice_axis(predict.predictor))
    settings = {"model": os.path.abspath(folder), "folds": a.f, "checkpoint": a.chk,
                "images": os.path.abspath(a.images), "reference": os.path.abspath(a.reference),
                "plain": os.path.abspath(a.plain) if a.plain else None, "device": a.device, "tta": a.tta,
                "guided": [t.name for t in layout.targets], **opts.to_dict()}
    context = [f"model: `{folder}` (folds {', '.join(a.f)}, {a.chk})",
               f"images: `{a.images}`; reference: `{a.reference}`"
               + (f"; plain nnU-Net: `{a.plain}`" if a.plain else ""),
               f"guided classes: {', '.join(t.name for t in layout.targets)}; negative clicks: "
               f"{'yes' if opts.allow_negative else 'no (model has no negative channels)'}"]
    write_report(a.output, res.records, res.plain or None, res.overlays, context=context, settings=settings,
                 thresholds=opts.thresholds)
    print(f"report written to {os.path.join(a.output, 'report.md')}")
    return 0
