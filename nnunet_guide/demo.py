"""``nnUNetv2_guide_demo``: the whole method in one command, on a CPU, in about 15 minutes.

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

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

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
    export processes (process start-up dominates on 2 cores), the short training schedule."""
    from .cli.env import env_value
    env = dict(os.environ)
    n_proc = str(max(1, min(os.cpu_count() or 1, 4)))
    env.update({
        "nnUNet_raw": raw or os.path.join(out, "nnUNet_raw"),
        "nnUNet_preprocessed": os.path.join(out, "nnUNet_preprocessed"),
        "nnUNet_results": os.path.join(out, "nnUNet_results"),
        "nnUNet_extTrainer": env_value(os.environ.get("nnUNet_extTrainer", "")),
        "nnUNet_compile": "false",
        "nnUNet_def_n_proc": n_proc,
        "NNUNET_GUIDE_EPOCHS": str(epochs),
        "NNUNET_GUIDE_ITERS": str(iters),
        "NNUNET_GUIDE_VAL_ITERS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[k], exist_ok=True)
    return env


def run_logged(cmd: Sequence[str], env: Dict[str, str], log_file: str, progress: Progress,
               echo: Sequence[str] = ()) -> None:
    """Run an nnU-Net command; its output goes to ``log_file``, lines containing one of ``echo``
    are shown as progress. Raises :class:`DemoError` with the log's tail on failure."""
    progress(f"$ {' '.join(cmd)}   (log: {log_file})")
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if any(e in line for e in echo):
                progress("    " + line.strip()[:160])
        rc = proc.wait()
    if rc != 0:
        with open(log_file) as f:
            tail = "".join(f.readlines()[-25:])
        raise DemoError(f"command failed with exit code {rc}: {' '.join(cmd)}\n--- last lines of {log_file} ---\n{tail}")


@contextlib.contextmanager
def output_to(log_file: str):
    """Send Python-level stdout/stderr (nnU-Net's in-process chatter, warnings) to a log file."""
    with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def dataset_folder_name(raw: str, dataset_id: int) -> str:
    prefix = f"Dataset{int(dataset_id):03d}_"
    names = sorted(d for d in os.listdir(raw) if d.startswith(prefix) and os.path.isdir(os.path.join(raw, d)))
    if not names:
        raise DemoError(f"no dataset with id {dataset_id} in {raw} (expected a folder {prefix}NAME)")
    if len(names) > 1:
        raise DemoError(f"several datasets with id {dataset_id} in {raw}: {names}")
    return names[0]


def small_patch(patch: Sequence[int], strides: Sequence[Sequence[int]], budget: int = MAX_PATCH_VOXELS) -> List[int]:
    """Shrink a patch (largest axes first, in multiples of the network's total stride) until it
    has at most ``budget`` voxels."""
    div = np.prod(np.asarray(strides), axis=0).astype(int)
    ps = [max(int(d), int(p) // int(d) * int(d)) for p, d in zip(patch, div)]
    while int(np.prod(ps)) > budget:
        ax = int(np.argmax(ps))
        if ps[ax] - div[ax] < div[ax]:
            break
        ps[ax] -= int(div[ax])
    return ps


def prepare_plans(pp_folder: str, configuration: str, max_stages: int = 3) -> str:
    """The derived CPU plans (nnunet_guide.testing.derive_small_plans) with a capped patch."""
    from .testing import derive_small_plans
    with open(os.path.join(pp_folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    if configuration not in plans["configurations"]:
        raise DemoError(f"configuration {configuration!r} is not in {pp_folder}/nnUNetPlans.json "
                        f"(has {sorted(plans['configurations'])})")
    cfg = plans["configurations"][configuration]
    strides = cfg["architecture"]["arch_kwargs"]["strides"][:max_stages]
    patch = small_patch(cfg["patch_size"], strides)
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
    from .inference.predictor import ensure_trainers_discoverable
    ensure_trainers_discoverable()
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), verbose=False,
                        verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(model_folder, (0,), "checkpoint_final.pth")
    os.makedirs(out_folder, exist_ok=True)
    cases = sorted(images)
    p.predict_from_files_sequential([images[c] for c in cases], [os.path.join(out_folder, c) for c in cases],
                                    save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None)
    progress(f"plain nnU-Net predictions of {len(cases)} case(s) written to {out_folder}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_guide_demo",
        description="Build a small real dataset (LiTS case 117 cut into slabs), plan and preprocess it with nnU-Net, "
                    "train a plain and a guide-aware model briefly on the CPU, predict with and without simulated "
                    "clicks and write a report (Markdown + PNG). About 15 minutes on 2 cores.")
    p.add_argument("-o", "--output", required=True, help="demo folder (nnU-Net folders, logs and report/ go here)")
    p.add_argument("--dataset", type=int, default=None,
                   help="run on your own nnU-Net dataset id from $nnUNet_raw instead of the LiTS slabs")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per model (default 20)")
    p.add_argument("--iters", type=int, default=25, help="iterations per epoch (default 25)")
    p.add_argument("-n", "--clicks", type=int, default=5, help="click steps of the simulated user (default 5)")
    p.add_argument("--max-eval-cases", type=int, default=8,
                   help="evaluate at most this many validation cases (default 8)")
    p.add_argument("--slabs", type=int, default=8, help="slabs the LiTS volume is cut into (default 8)")
    p.add_argument("--guide-trainer", default=None,
                   help=f"guide trainer (default {LITS_GUIDE_TRAINER} for the LiTS slabs, {GUIDE_TRAINER} with "
                        f"--dataset); must accept NNUNET_GUIDE_EPOCHS/ITERS to follow --epochs/--iters")
    p.add_argument("--fresh", action="store_true", help="retrain even if a model from the same settings exists")
    p.add_argument("--offline", action="store_true", help="do not contact PyPI (use the cache or the phantom)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        run_demo(a)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_demo(a) -> str:
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
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                          "nnUNet_extTrainer", "nnUNet_def_n_proc", "nnUNet_compile")})
    try:
        import torch
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    except ImportError:  # pragma: no cover
        pass
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
        context.append(f"data: your dataset {dataset_folder_name(env['nnUNet_raw'], dataset_id)} in {env['nnUNet_raw']}")
    name = dataset_folder_name(env["nnUNet_raw"], dataset_id)
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
    from .evaluation.cli import EvaluationOptions, evaluate, evaluated_classes, find_cases, guided_predict_fn, load_cases
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


if __name__ == "__main__":
    sys.exit(main())
