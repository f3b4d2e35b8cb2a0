"""The demo (command ``nnUNetv2_guide_demo``, :mod:`nnunet_guide.cli.demo`): the whole method in
one run, on a CPU, in about 15 minutes.

Steps (each reports its progress and time; finished steps are reused when run again):

1. data: LiTS case 117 (from the PyPI wheel ``liver-ct-segmentation-package==1.6.0``, fetched
   once into the cache; a generated phantom when PyPI can't be reached) cut into 8 slabs of 16
   slices as an nnU-Net raw dataset, or the user's own dataset with ``--dataset``;
2. nnU-Net's own planning and preprocessing (``nnUNetv2_plan_and_preprocess``);
3. a derived small plans file (``nnUNetPlans_small``: 3 stages, 8 base features, batch 2) so
   training fits a CPU;
4. training, briefly: plain ``nnUNetTrainerShort`` and a guide-aware trainer with the same
   schedule (LiTS: ``nnUNetTrainerGuideTumorCorrectionShort``, clicks on tumours only, with
   correction clicks at the model's own errors; ``--dataset``: ``nnUNetTrainerGuideShort``), fold 0
   of nnU-Net's split;
5. plain nnU-Net predictions of the validation cases;
6. the simulated user on the guide model (0..N click steps) and the comparison;
7. the report: ``<output>/report/report.md`` with the table, the Dice-vs-clicks curve and
   overlays (plus JSON/CSV).

Everything lives under ``-o FOLDER`` (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``,
``logs``, ``report``); the numbers come from this run. On one patient cut into slabs, training and
evaluation slabs come from the same liver: the demo shows the mechanism works end to end, it is
not an accuracy estimate.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

from .paths import DatasetNameError, find_dataset_folder, scoped_environ, trainers_visible
from .preprocessing.small_plans import derive_small_plans, small_patch
from .runner import CommandError, echo_lines, nnunet_env, run_command

DEMO_DATASET_ID = 117
PLANS_SMALL = "nnUNetPlans_small"
PLAIN_TRAINER = "nnUNetTrainerShort"
GUIDE_TRAINER = "nnUNetTrainerGuideShort"  # --dataset: guides on every foreground class
LITS_GUIDE_TRAINER = "nnUNetTrainerGuideTumorCorrectionShort"  # LiTS: tumour clicks, correction training
MAX_PATCH_VOXELS = 16 * 128 * 128  # CPU budget per patch (the LiTS slab patch)


class DemoError(RuntimeError):
    """A demo step that failed; the message names the step, the command and its log file."""


class Progress:
    """Step messages with elapsed time, to stdout and the run log."""

    def __init__(self, log_file: str, n_steps: int):
        self.stream = sys.stdout  # kept, so messages still show while nnU-Net's prints are redirected
        self.t0 = time.time()
        self.log_file = log_file
        self.n_steps = n_steps
        self.step = 0

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.0f} s] {msg}"
        print(line, file=self.stream, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    def start(self, title: str) -> None:
        self.step += 1
        self(f"step {self.step}/{self.n_steps}: {title}")

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0


def demo_env(out: str, raw: Optional[str] = None, epochs: int = 20, iters: int = 25) -> Dict[str, str]:
    """Environment of nnU-Net's commands: folders under ``out``, our trainers registered, few
    export processes (process start-up dominates on 2 cores; the user's ``nnUNet_def_n_proc``
    wins), the short training schedule."""
    return nnunet_env(out, {
        "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc") or str(max(1, min(os.cpu_count() or 1, 4))),
        "NNUNET_GUIDE_EPOCHS": str(epochs),
        "NNUNET_GUIDE_ITERS": str(iters),
        "NNUNET_GUIDE_VAL_ITERS": "2",
        "PYTHONUNBUFFERED": "1",
    }, raw=raw)


def run_logged(cmd: List[str], env: Dict[str, str], log_file: str, progress: Progress, echo=()) -> None:
    """Run an nnU-Net command; its output goes to ``log_file``, lines containing one of ``echo``
    are shown as progress. Raises :class:`DemoError` with the output's tail on failure."""
    progress(f"$ {' '.join(cmd)}   (log: {log_file})")
    try:
        run_command(cmd, env, log_file, echo_lines(progress, echo), tail_lines=25)
    except CommandError as e:
        raise DemoError(str(e)) from e


@contextlib.contextmanager
def output_to(log_file: str):
    """Send Python-level stdout/stderr (nnU-Net's in-process chatter, warnings) to a log file."""
    with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def dataset_folder_name(raw: str, dataset_id: int) -> str:
    """The folder name of dataset ``dataset_id`` in ``raw``; :class:`DemoError` if there is not
    exactly one."""
    try:
        return find_dataset_folder(raw, int(dataset_id))
    except DatasetNameError as e:
        raise DemoError(str(e)) from e


def prepare_plans(pp_folder: str, configuration: str, max_stages: int = 3) -> str:
    """The derived CPU plans (:func:`~nnunet_guide.preprocessing.small_plans.derive_small_plans`)
    with a patch of at most ``MAX_PATCH_VOXELS``."""
    with open(os.path.join(pp_folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    if configuration not in plans["configurations"]:
        raise DemoError(f"configuration {configuration!r} is not in {pp_folder}/nnUNetPlans.json "
                        f"(has {sorted(plans['configurations'])})")
    cfg = plans["configurations"][configuration]
    strides = cfg["architecture"]["arch_kwargs"]["strides"][:max_stages]
    patch = small_patch(cfg["patch_size"], strides, MAX_PATCH_VOXELS)
    return derive_small_plans(pp_folder, max_stages=max_stages, base_features=8, batch_size=2,
                              patch_size={configuration: patch})


def _trained(model_folder: str, marker: Dict[str, object]) -> bool:
    path = os.path.join(model_folder, "fold_0", "demo_run.json")
    if not (os.path.isfile(os.path.join(model_folder, "fold_0", "checkpoint_final.pth")) and os.path.isfile(path)):
        return False
    with open(path) as f:
        return json.load(f) == marker


def train_model(dataset_id: int, configuration: str, trainer: str, env: Dict[str, str], logs: str,
                progress: Progress, marker: Dict[str, object], fresh: bool) -> str:
    from .settings import write_json_atomic
    name = dataset_folder_name(env["nnUNet_raw"], dataset_id)
    folder = os.path.join(env["nnUNet_results"], name, f"{trainer}__{PLANS_SMALL}__{configuration}")
    if not fresh and _trained(folder, marker):
        progress(f"{trainer}: already trained in {folder} (reused; --fresh retrains)")
        return folder
    if os.path.isdir(os.path.join(folder, "fold_0")):
        shutil.rmtree(os.path.join(folder, "fold_0"))
    t = time.time()
    env = dict(env, nnUNet_n_proc_DA="0")  # augmentation in process: no worker start-up (not for planning:
    # nnU-Net's planner calls torch.set_num_threads with this value)
    run_logged(["nnUNetv2_train", str(dataset_id), configuration, "0", "-tr", trainer, "-p", PLANS_SMALL,
                "-device", "cpu"], env, os.path.join(logs, f"train_{trainer}.log"), progress,
               echo=("Epoch ", "Pseudo dice", "Mean Validation Dice", "validation Dice"))
    write_json_atomic(marker, os.path.join(folder, "fold_0", "demo_run.json"))
    progress(f"{trainer}: trained in {time.time() - t:.0f} s")
    return folder


def validation_cases(pp_folder: str) -> List[str]:
    with open(os.path.join(pp_folder, "splits_final.json")) as f:
        splits = json.load(f)
    return sorted(splits[0]["val"])


def predict_plain(model_folder: str, images: Dict[str, List[str]], out_folder: str, progress: Progress) -> None:
    """Automatic predictions of the plain model with nnU-Net's own predictor (no TTA, in process)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), verbose=False,
                        verbose_preprocessing=False, allow_tqdm=False)
    with trainers_visible():
        p.initialize_from_trained_model_folder(model_folder, (0,), "checkpoint_final.pth")
    os.makedirs(out_folder, exist_ok=True)
    cases = sorted(images)
    p.predict_from_files_sequential([images[c] for c in cases], [os.path.join(out_folder, c) for c in cases],
                                    save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None)
    progress(f"plain nnU-Net predictions of {len(cases)} case(s) written to {out_folder}")


def run_demo(a) -> str:
    """Run every step for the parsed options ``a`` (attributes named as the command's options,
    see :mod:`nnunet_guide.cli.demo`); returns the report folder. Raises :class:`DemoError`.

    The in-process steps (plain prediction, evaluation) see the demo's nnU-Net folders and use
    every CPU core; both are set for the run only and restored afterwards."""
    out = os.path.abspath(a.output)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    progress = Progress(os.path.join(logs, "demo.log"), 7)
    if a.dataset is not None:
        raw = os.environ.get("nnUNet_raw")
        if not raw or not os.path.isdir(raw):
            raise DemoError("--dataset needs the nnUNet_raw environment variable pointing at your raw datasets")
    else:
        raw = None
    env = demo_env(out, raw, a.epochs, a.iters)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        with scoped_environ({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                 "nnUNet_def_n_proc", "nnUNet_compile")}):
            return _run_steps(a, out, logs, progress, env)
    finally:
        torch.set_num_threads(threads)


def _run_steps(a, out: str, logs: str, progress: Progress, env: Dict[str, str]) -> str:
    context: List[str] = []

    # 1. data
    progress.start("data")
    if a.dataset is None:
        from .data.lits import load_lits117, write_slab_dataset
        vol = load_lits117(allow_download=not a.offline, log=progress)
        progress(f"volume {vol.image.shape} from {vol.source}")
        dataset_id = DEMO_DATASET_ID
        write_slab_dataset(vol, env["nnUNet_raw"], dataset_id, "LiTS117Slabs", a.slabs, log=progress)
        context.append(f"data: {vol.source}, {vol.image.shape[0]} slices cut into {a.slabs} slabs "
                       f"({'GENERATED PHANTOM, not real CT' if vol.is_phantom else 'one real patient'}); "
                       f"training and evaluation slabs come from the same liver, so this shows the mechanism, "
                       f"not accuracy on new patients")
    else:
        dataset_id = a.dataset
    name = dataset_folder_name(env["nnUNet_raw"], dataset_id)
    if a.dataset is not None:
        context.append(f"data: your dataset {name} in {env['nnUNet_raw']}")
    raw_folder = os.path.join(env["nnUNet_raw"], name)
    pp_folder = os.path.join(env["nnUNet_preprocessed"], name)

    # 2. planning and preprocessing
    progress.start("nnU-Net planning and preprocessing")
    data_id_folder = None
    if os.path.isfile(os.path.join(pp_folder, "nnUNetPlans.json")):
        with open(os.path.join(pp_folder, "nnUNetPlans.json")) as f:
            cfg = json.load(f)["configurations"].get(a.configuration)
        if cfg is not None:
            data_id_folder = os.path.join(pp_folder, cfg["data_identifier"])
    fresh_data = os.path.getmtime(os.path.join(raw_folder, "dataset.json"))
    if data_id_folder and os.path.isdir(data_id_folder) and os.path.getmtime(data_id_folder) > fresh_data:
        progress(f"preprocessed data in {data_id_folder} reused")
    else:
        run_logged(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", a.configuration, "-np", "1",
                    "--verify_dataset_integrity"], env, os.path.join(logs, "plan_and_preprocess.log"), progress,
                   echo=("Preprocessing dataset", "Plans were saved"))

    # 3. CPU plans
    progress.start("small CPU plans")
    plans_file = prepare_plans(pp_folder, a.configuration)
    with open(plans_file) as f:
        cfg = json.load(f)["configurations"][a.configuration]
    arch = cfg["architecture"]["arch_kwargs"]
    progress(f"{plans_file}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
             f"features {arch['features_per_stage']}")

    # 4. training
    progress.start(f"training ({a.epochs} epochs x {a.iters} iterations each, CPU)")
    marker = {"epochs": a.epochs, "iters": a.iters, "plans": PLANS_SMALL, "configuration": a.configuration,
              "patch": cfg["patch_size"]}
    t = time.time()
    plain_model = train_model(dataset_id, a.configuration, PLAIN_TRAINER, env, logs, progress, marker, a.fresh)
    t_plain = time.time() - t
    guide_trainer = a.guide_trainer or (GUIDE_TRAINER if a.dataset is not None else LITS_GUIDE_TRAINER)
    t = time.time()
    guide_model = train_model(dataset_id, a.configuration, guide_trainer, env, logs, progress, marker, a.fresh)
    t_guide = time.time() - t
    context.append(f"training: {PLAIN_TRAINER} and {guide_trainer}, {a.configuration}, plans {PLANS_SMALL} "
                   f"(patch {cfg['patch_size']}, batch {cfg['batch_size']}, features {arch['features_per_stage']}), "
                   f"{a.epochs} epochs x {a.iters} iterations, fold 0 ({t_plain:.0f} s and {t_guide:.0f} s here)")

    # 5. plain predictions of the validation cases
    progress.start("plain nnU-Net predictions")
    with open(os.path.join(raw_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    fe = dataset_json["file_ending"]
    n_ch = len(dataset_json["channel_names"])
    cases = validation_cases(pp_folder)[:max(1, a.max_eval_cases)]
    images = {c: [os.path.join(raw_folder, "imagesTr", f"{c}_{i:04d}{fe}") for i in range(n_ch)] for c in cases}
    plain_folder = os.path.join(out, "predictions_plain")
    with output_to(os.path.join(logs, "predict_plain.log")):
        predict_plain(plain_model, images, plain_folder, progress)

    # 6. simulated user
    progress.start(f"simulated user: 0..{a.clicks} click steps on {len(cases)} validation case(s)")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from .evaluation.evaluate import (EvaluationOptions, evaluate, evaluated_classes, find_cases, guided_predict_fn,
                                      load_cases)
    found = find_cases(os.path.join(raw_folder, "imagesTr"), os.path.join(raw_folder, "labelsTr"), fe, n_ch,
                       plain_folder, cases)
    ignore = dataset_json["labels"].get("ignore")
    # LiTS: liver Dice is usually reported on liver + tumour
    classes = evaluated_classes(dataset_json, ["liver+tumor=1,2"] if a.dataset is None else [])
    reader = PlansManager(os.path.join(guide_model, "plans.json")).image_reader_writer_class
    with output_to(os.path.join(logs, "evaluate.log")):
        predict, layout = guided_predict_fn(guide_model, (0,), "checkpoint_final.pth", images)
        opts = EvaluationOptions(n_clicks=a.clicks, allow_negative=layout.guide.negatives, ignore_label=ignore,
                                 n_overlays=3)
        res = evaluate(load_cases(found, reader, opts.n_overlays), predict, layout.targets, classes, opts,
                       log=progress, guide_settings=layout.guide)

    # 7. report
    progress.start("report")
    from .evaluation.report import write_report
    report_dir = os.path.join(out, "report")
    context.append(f"evaluation: {len(cases)} validation case(s) of fold 0 ({', '.join(cases)}); guided classes "
                   f"{', '.join(t.name for t in layout.targets)}; no test-time augmentation")
    context.append(f"total time of this run: {progress.elapsed / 60:.1f} min on {os.cpu_count()} CPU core(s)")
    summary = write_report(report_dir, res.records, res.plain, res.overlays, title="nnunet-guide demo",
                           context=context, settings={"demo": vars(a), "guide_model": guide_model,
                                                      "plain_model": plain_model, **opts.to_dict()})
    progress(f"report: {os.path.join(report_dir, 'report.md')}")
    for cname, g in summary["guided"].items():
        p = (summary.get("plain") or {}).get(cname) or {}
        pd = p.get("mean_dice")
        progress(f"  {cname}: plain nnU-Net {pd if pd is None else round(pd, 3)}, guide model 0 clicks "
                 f"{g['mean_dice'][0]:.3f}, {a.clicks} click steps {g['mean_dice'][-1]:.3f} (per-case mean Dice)")
    return report_dir
