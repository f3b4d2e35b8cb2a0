"""Training study for issue 12: which guide training makes every click help, keeps automatic mode at
plain nnU-Net's quality, and teaches clicks early. Trains the variants of a study file (nnU-Net's own
``nnUNetv2_train``, several at once), then measures each on its folds' held-out cases.

    python benchmarks/click_study.py prepare ROOT                 # hippocampus (24 cases) + LiTS slabs raw/preprocessed
    python benchmarks/click_study.py run benchmarks/studies/hippocampus.json --root ROOT/hippocampus --out OUT \\
        [--epochs 20 --iters 25 --save-every 5] [--parallel 4 --da-workers 3] [--device cuda] [-n 3] [--deadline S] \\
        [--test-set] [--repeats K]

A study file names the dataset, plans, configuration, base ``GuideSettings`` and jobs; each job is
plain nnU-Net (``"plain": true``, trainer ``nnUNetTrainerStudy``) or a guide variant (trainer
``nnUNetTrainerGuideStudy`` with the base settings updated by the job's ``settings``), on its
``folds``. A job with ``"density": true`` trains ``nnUNetTrainerGuideDensityStudy`` instead: the
density and texture channels too, on a copy of the study's plans with histograms, which
``nnUNetv2_guide_plan`` writes when it is missing; with ``"density": "fold"`` every fold gets its
own copy, planned from that fold's training cases only (``--fold``), so its held-out cases are not
in the histograms. All jobs share the schedule (``--epochs`` x
``--iters``). A job's ``"click_selection"`` sets where training clicks are chosen
(``nnUNetTrainerGuide.click_selection``). Per job and fold it uses:

- nnU-Net's own validation of the fold (``validation/summary.json``, 0 clicks) and the guide
  trainer's guided validation (``validation_guided/summary.json``, one click per object): automatic
  Dice against plain nnU-Net's (paired by fold, mean +- sd over folds) and one-click gain;
- ``nnUNetv2_guide_evaluate`` (simulated user, ``-n`` click steps, and ``--start box`` where the job
  asks for it) on the fold's validation cases for every saved checkpoint: harmful-click fraction
  (with its Wilson 95% interval), largest fall, lesions lost per click and on a click at another
  lesion, far-Dice change, and the click gain against training length; for jobs with several
  ``starts``, the first box or scribble against the first click, paired by case;
- with ``--test-set``, the same for every fold's final model on the dataset's test cases
  (``imagesTs``/``labelsTs`` of its raw folder; ``prepare`` puts there the 236 hippocampus cases
  outside the 24 trained on), next to plain nnU-Net's predictions of the same fold. A fold holds out
  5 hippocampus cases, 15 clicks per structure: far too few to tell a 5% harmful rate from 20%
  (0 of 15 still allows 20%); the test set gives about 700 clicks per structure and model;
- with ``--repeats K``, K trainings of every job on every fold (nnU-Net's training is not seeded,
  so they differ as reruns do). The r-th repeat trains into ``OUT/results/JOB__repeatR`` and is
  evaluated into ``OUT/eval/JOB__repeatR``; the first keeps the folders of a run without repeats,
  so a study run once is extended by running it again with ``--repeats 2``. The tables pool every
  training, give the sd between trainings of one fold next to the mean, and list every training
  of a job trained more than once per fold (automatic Dice, one-click gain, the simulated user's
  Dice, harmful clicks, clicks not followed, lesions lost elsewhere). On the LiTS slabs two
  trainings of one recipe on one fold differed by 0.11 automatic tumour Dice: a difference
  between recipes smaller than that needs repeats before it decides anything.

Prints the tables and writes ``OUT/study.json`` and ``OUT/study.md``; asserts nothing. Finished
trainings and evaluations are reused when run again (resumable); ``--deadline`` stops starting new
work after that many seconds so the tables of what finished are still written.
"""
import argparse
import concurrent.futures as cf
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from click_harm import report_lines  # noqa: E402

PLAIN_TRAINER, GUIDE_TRAINER = "nnUNetTrainerStudy", "nnUNetTrainerGuideStudy"
DENSITY_TRAINER = "nnUNetTrainerGuideDensityStudy"
TRAIN = ("from nnunetv2.run.run_training import run_training_entry as m; import sys; "
         "sys.argv[0] = 'nnUNetv2_train'; m()")


# ---- data ----------------------------------------------------------------------------------
def prepare(root: str) -> None:
    """nnU-Net raw + preprocessed folders under ROOT/hippocampus (24 cases of ../shared/data, default
    plans) and ROOT/lits (LiTS case 117 in 8 slabs, default plans + the demo's small CPU plans)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from helpers import copy_hippocampus_subset  # the tests' fixture: the same 24 cases
    from nnunet_guide.data.lits import load_lits117, write_slab_dataset
    from nnunet_guide.demo import prepare_plans
    from nnunet_guide.paths import shared_data_dir
    from nnunet_guide.runner import nnunet_env, plan_and_preprocess
    if not shared_data_dir():
        raise SystemExit("../shared/data (or $NNUNET_GUIDE_SHARED_DATA) is needed for the real scans")
    env = nnunet_env(os.path.join(root, "hippocampus"))
    copy_hippocampus_subset(env["nnUNet_raw"], 4, 24)
    plan_and_preprocess(4, env)
    write_test_set(os.path.join(env["nnUNet_raw"], "Dataset004_Hippocampus"),
                   os.path.join(shared_data_dir(), "Dataset004_Hippocampus"))
    env = nnunet_env(os.path.join(root, "lits"))
    write_slab_dataset(load_lits117(allow_download=False, allow_phantom=False), env["nnUNet_raw"], 117, n_slabs=8)
    plan_and_preprocess(117, env)
    print(prepare_plans(os.path.join(env["nnUNet_preprocessed"], "Dataset117_LiTS117Slabs"), "3d_fullres"))
    for pp in (os.path.join(root, "hippocampus", "nnUNet_preprocessed", "Dataset004_Hippocampus"),
               os.path.join(env["nnUNet_preprocessed"], "Dataset117_LiTS117Slabs")):
        write_splits(pp)


def write_test_set(raw_folder: str, source: str) -> int:
    """Every case of ``source`` (an nnU-Net raw dataset) that ``raw_folder`` does not train on, as
    nnU-Net's test set of ``raw_folder``: ``imagesTs/CASE_XXXX.nii.gz`` and ``labelsTs/CASE.nii.gz``
    (copies, written atomically). Returns the number of test cases."""
    from nnunet_guide.settings import write_atomic
    train = {n[:-len(".nii.gz")] for n in os.listdir(os.path.join(raw_folder, "labelsTr")) if n.endswith(".nii.gz")}
    cases = sorted(n[:-len(".nii.gz")] for n in os.listdir(os.path.join(source, "labelsTr"))
                   if n.endswith(".nii.gz") and n[:-len(".nii.gz")] not in train)
    images = sorted(os.listdir(os.path.join(source, "imagesTr")))
    for sub in ("imagesTs", "labelsTs"):
        os.makedirs(os.path.join(raw_folder, sub), exist_ok=True)
    for c in cases:
        pairs = [(os.path.join(source, "labelsTr", f"{c}.nii.gz"), os.path.join(raw_folder, "labelsTs", f"{c}.nii.gz"))]
        pairs += [(os.path.join(source, "imagesTr", n), os.path.join(raw_folder, "imagesTs", n))
                  for n in images if n.startswith(c + "_") and len(n) == len(c) + len("_0000.nii.gz")]
        for src, dst in pairs:
            if not os.path.isfile(dst):
                write_atomic(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
    return len(cases)


def write_splits(pp_folder: str) -> None:
    """nnU-Net's default 5-fold split (what its trainer writes on first use), written up front so
    the study knows every fold's held-out cases before training."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    ids = sorted({n.split(".")[0] for n in os.listdir(os.path.join(pp_folder, "gt_segmentations"))})
    with open(os.path.join(pp_folder, "splits_final.json"), "w") as f:
        json.dump(generate_crossval_split(ids, seed=12345, n_splits=5), f, indent=1)


# ---- jobs ----------------------------------------------------------------------------------
class Study:
    def __init__(self, spec: dict, root: str, out: str, a):
        self.spec, self.root, self.out, self.a = spec, os.path.abspath(root), os.path.abspath(out), a
        self.dataset = str(spec["dataset"])
        self.plans = spec.get("plans", "nnUNetPlans")
        self.config = spec.get("configuration", "3d_fullres")
        from nnunet_guide.paths import find_dataset_folder
        raw = os.path.join(self.root, "nnUNet_raw")
        self.name = find_dataset_folder(raw, self.dataset)
        self.raw = os.path.join(raw, self.name)
        with open(os.path.join(self.root, "nnUNet_preprocessed", self.name, "splits_final.json")) as f:
            self.splits = json.load(f)
        self.t0 = time.time()
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)

    def late(self) -> bool:
        return self.a.deadline is not None and time.time() - self.t0 > self.a.deadline

    @staticmethod
    def trainer(job: dict) -> str:
        return PLAIN_TRAINER if job.get("plain") else DENSITY_TRAINER if job.get("density") else GUIDE_TRAINER

    def job_plans(self, job: dict, fold: int) -> str:
        """The study's plans, or for a density job their density copy (same preprocessed data, plus
        the histograms; :meth:`plan_density` writes it under this name): one for all folds
        (``"density": true``) or one per fold (``"density": "fold"``)."""
        density = job.get("density")
        if density not in (None, False, True, "fold"):
            raise SystemExit(f"job {job.get('name')!r}: \"density\" is true or \"fold\", got {density!r}")
        if not density:
            return self.plans
        return self.plans + ("_density" if density is True else f"_density_fold{fold}")

    def plan_density(self, jobs: List[dict]) -> None:
        """``nnUNetv2_guide_plan`` for every density plans file the chosen jobs train on that is
        missing (``--fold`` for fold-wise ones)."""
        for plans, fold in sorted({(self.job_plans(j, f), j["density"] == "fold" and f)
                                   for j in jobs if j.get("density") for f in j["folds"]}, key=str):
            if os.path.isfile(os.path.join(self.root, "nnUNet_preprocessed", self.name, plans + ".json")):
                continue
            log = os.path.join(self.out, "logs", f"plan_{plans}.log")
            if not self._run([sys.executable, "-m", "nnunet_guide.cli.plan", "-d", self.dataset, "-c", self.config,
                              "-p", self.plans, "-o", plans] + ([] if fold is False else ["--fold", str(fold)]),
                             self.env({"name": "density plans", "plain": True}), log):
                raise SystemExit(f"nnUNetv2_guide_plan failed for {self.name} ({plans}): see {log}")

    @staticmethod
    def run_name(job: dict, rep: int = 0) -> str:
        """Folder name of one training of a job: the job's slug for the first training of each fold,
        ``<slug>__repeat<r>`` for the r-th repeat (``--repeats``)."""
        return slug(job["name"]) + (f"__repeat{rep}" if rep else "")

    def model_folder(self, job: dict, fold: int, rep: int = 0) -> str:
        return os.path.join(self.out, "results", self.run_name(job, rep), self.name,
                            f"{self.trainer(job)}__{self.job_plans(job, fold)}__{self.config}")

    def env(self, job: dict, rep: int = 0) -> Dict[str, str]:
        from nnunet_guide.paths import trainer_search_path
        options = {k: job[k] for k in ("oversample", "click_selection") if k in job}
        if not job.get("plain"):
            options["settings"] = {**self.spec.get("base", {}), **job.get("settings", {})}
        return {**os.environ, "nnUNet_raw": os.path.join(self.root, "nnUNet_raw"),
                "nnUNet_preprocessed": os.path.join(self.root, "nnUNet_preprocessed"),
                "nnUNet_results": os.path.join(self.out, "results", self.run_name(job, rep)),
                "nnUNet_extTrainer": trainer_search_path(os.environ.get("nnUNet_extTrainer", "")),
                "nnUNet_compile": "false", "nnUNet_n_proc_DA": str(self.a.da_workers),
                "nnUNet_def_n_proc": str(max(1, self.a.da_workers)), "PYTHONUNBUFFERED": "1",
                "NNUNET_GUIDE_EPOCHS": str(self.a.epochs), "NNUNET_GUIDE_ITERS": str(self.a.iters),
                "NNUNET_GUIDE_VAL_ITERS": str(self.a.val_iters), "NNUNET_GUIDE_SAVE_EVERY": str(self.a.save_every),
                "NNUNET_GUIDE_STUDY": json.dumps(options)}

    def _run(self, cmd: List[str], env: Dict[str, str], log: str) -> bool:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            with open(log) as f:
                tail = f.readlines()[-8:]
            print(f"  FAILED ({rc}): {' '.join(cmd[-8:])}; log {log}:\n    " + "    ".join(tail), flush=True)
        return rc == 0

    def train(self, job: dict, fold: int, rep: int = 0) -> Optional[str]:
        fold_dir = os.path.join(self.model_folder(job, fold, rep), f"fold_{fold}")
        if os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")):
            return fold_dir
        if self.late():
            return None
        t = time.time()
        ok = self._run([sys.executable, "-c", TRAIN, self.dataset, self.config, str(fold), "-tr", self.trainer(job),
                        "-p", self.job_plans(job, fold), "-device", self.a.device], self.env(job, rep),
                       os.path.join(self.out, "logs", f"train_{self.run_name(job, rep)}_f{fold}.log"))
        print(f"  trained {job['name']} fold {fold}{f' (repeat {rep})' if rep else ''} in {time.time() - t:.0f} s "
              f"({'ok' if ok else 'failed'}) "
              f"[{time.time() - self.t0:.0f} s]", flush=True)
        return fold_dir if ok else None

    def summary_keys(self) -> Dict[str, str]:
        """Class name (dataset.json) -> its key in nnU-Net's validation summary: the label value, or
        the region's tuple of values."""
        with open(os.path.join(self.raw, "dataset.json")) as f:
            labels = json.load(f)["labels"]
        return {name: str(v) if isinstance(v, int) else str(tuple(v)) for name, v in labels.items()}

    def checkpoints(self, fold_dir: str) -> List[str]:
        names = [n for n in os.listdir(fold_dir) if n.startswith("checkpoint_epoch") and n.endswith(".pth")]
        names.sort(key=lambda n: int(n[len("checkpoint_epoch"):-4]))
        return names + ["checkpoint_final.pth"]

    def test_cases(self) -> List[str]:
        """Case ids of the dataset's test set (``labelsTs`` of its raw folder)."""
        folder = os.path.join(self.raw, "labelsTs")
        if not os.path.isdir(folder):
            raise SystemExit(f"--test-set: {folder} does not exist (`click_study.py prepare` writes the hippocampus "
                             f"test set; LiTS case 117 has none)")
        return sorted(n[:-len(".nii.gz")] for n in os.listdir(folder) if n.endswith(".nii.gz"))

    def predict_plain_test(self, job: dict, fold: int) -> Optional[str]:
        """Plain nnU-Net's predictions of the test set with the fold's model (reused when complete)."""
        out = os.path.join(self.out, "test_predictions", slug(job["name"]), f"fold_{fold}")
        cases = self.test_cases()
        if all(os.path.isfile(os.path.join(out, f"{c}.nii.gz")) for c in cases):
            return out
        if self.late():
            return None
        t = time.time()
        code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from click_harm import predict_plain; "
                "a = json.load(open(sys.argv[2])); predict_plain(a['model'], [a['fold']], a['images'], a['out'], "
                "a['device'])")
        images = {c: [os.path.join(self.raw, "imagesTs", f"{c}_0000.nii.gz")] for c in cases}
        args = os.path.join(self.out, "logs", f"predict_test_{slug(job['name'])}_f{fold}.json")
        with open(args, "w") as f:
            json.dump({"model": self.model_folder(job, fold), "fold": fold, "images": images, "out": out,
                       "device": self.a.device}, f, indent=1)
        ok = self._run([sys.executable, "-c", code, HERE, args], self.env(job),
                       os.path.join(self.out, "logs", f"predict_test_{slug(job['name'])}_f{fold}.log"))
        print(f"  plain {job['name']} fold {fold}: {len(cases)} test cases predicted in {time.time() - t:.0f} s",
              flush=True)
        return out if ok else None

    def eval_folder(self, job: dict, fold: int, chk: str, start: str, where: str, rep: int = 0) -> str:
        tag = f"{chk[:-4]}_{start}" + ("_test" if where == "test" else "")
        return os.path.join(self.out, "eval", self.run_name(job, rep), f"fold_{fold}", tag)

    def per_case(self, job: dict, fold: int, chk: str, start: str, where: str, rep: int = 0) -> List[dict]:
        """The evaluation's ``per_case.csv`` rows, with the fold (and the repeat, when not the first
        training) added ([] when it did not run)."""
        path = os.path.join(self.eval_folder(job, fold, chk, start, where, rep), "per_case.csv")
        if not os.path.isfile(path):
            return []
        with open(path, newline="") as f:
            return [{**r, "fold": fold if not rep else f"{fold}/{rep}"} for r in csv.DictReader(f)]

    def evaluate(self, job: dict, fold: int, chk: str, start: str, where: str = "held-out",
                 plain: Optional[str] = None, rep: int = 0) -> Optional[dict]:
        """``nnUNetv2_guide_evaluate`` of one checkpoint of the fold's ``rep``-th training on the
        fold's held-out cases, or on the test set (``where="test"``, compared with the plain
        predictions in ``plain``)."""
        out = self.eval_folder(job, fold, chk, start, where, rep)
        tag = os.path.basename(out)
        res = os.path.join(out, "results.json")
        if not os.path.isfile(res):
            if self.late():
                return None
            if where == "test":
                folders, cases = ("imagesTs", "labelsTs"), self.test_cases()
            else:
                folders, cases = ("imagesTr", "labelsTr"), sorted(self.splits[fold]["val"])
            cmd = [sys.executable, "-m", "nnunet_guide.cli.evaluate", "-m", self.model_folder(job, fold, rep),
                   "-f", str(fold), "-chk", chk, "-i", os.path.join(self.raw, folders[0]),
                   "-r", os.path.join(self.raw, folders[1]), "-o", out, "-n", str(self.a.clicks), "--start", start,
                   "--cases", *cases, "--overlays", "0", "--device", self.a.device]
            if plain:
                cmd += ["--plain", plain]
            for c in self.spec.get("classes", []):
                cmd += ["--class", c]
            log = os.path.join(self.out, "logs", f"eval_{self.run_name(job, rep)}_f{fold}_{tag}.log")
            if not self._run(cmd, self.env(job, rep), log):
                return None
        with open(res) as f:
            return json.load(f)["summary"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def validation_dice(fold_dir: Optional[str], sub: str) -> Dict[str, float]:
    """Per-class mean Dice of an nnU-Net validation summary (``validation`` or ``validation_guided``)."""
    path = os.path.join(fold_dir or "", sub, "summary.json")
    if not fold_dir or not os.path.isfile(path):
        return {}
    with open(path) as f:
        s = json.load(f)
    return {str(k): v["Dice"] for k, v in s["mean"].items()} | {"mean": s["foreground_mean"]["Dice"]}


def mean_sd(values: List[float]):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def pooled(rows: List[dict]) -> dict:
    """Harm figures of one job/checkpoint/class pooled over folds (weighted by clicks)."""
    from nnunet_guide.core.metrics import proportion_ci
    n = sum(r["clicks"] for r in rows)
    w = lambda key: (sum(r[key] * r["clicks"] for r in rows if r[key] is not None) / n) if n else None  # noqa: E731
    harmful = sum(r["n_harmful"] for r in rows)
    by_sign = {k: [sum((r["by_sign"].get(k) or {}).get(f, 0) for r in rows) for f in ("n_harmful", "n_clicks")]
               for k in ("positive", "negative")} if all(r["by_sign"] for r in rows) else None  # older reports
    ignored = [sum((r["by_sign"].get(k) or {}).get("n_not_followed", 0) for r in rows)
               for k in ("positive", "negative")]
    known = all(r.get("not_followed_fraction") is not None for r in rows)  # older reports have none
    return {"clicks": n, "n_harmful": harmful, "harmful_ci95": proportion_ci(harmful, n), "by_sign": by_sign,
            "not_followed": ignored if known and by_sign else None,
            "harmful_fraction": w("harmful_fraction"), "gain_per_click": w("gain_per_click"),
            "lesions_lost_per_click": w("lesions_lost_per_click"),
            "lesions_lost_elsewhere": sum(r["lesions_lost_elsewhere"] or 0 for r in rows),
            "largest_fall": max((r["largest_fall"] or 0.0 for r in rows), default=None),
            "far_dice_change_mean": w("far_dice_change_mean"),
            "auto": mean_sd([r["auto"] for r in rows])[0],
            "auto_minus_plain": mean_sd([r["auto_minus_plain"] for r in rows])[0],
            "gain_first_click_step": mean_sd([r["gain_first_click_step"] for r in rows])[0],
            "dice_n": mean_sd([r["dice_n"] for r in rows])[0], "folds": len(rows)}


def prompts_against_clicks(per_start: Dict[str, List[dict]]) -> List[dict]:
    """A first box or scribble against a first click, paired by case: ``per_start`` maps each start
    (``"clicks"``, ``"box"``, ``"scribble"``) to the evaluations' per-case rows (``fold``, ``case``,
    ``class``, ``dice_0``, ``dice_1``, ``auc``) of one model. Per other start and class: the cases
    both evaluations have, the mean first-step gain of each, the mean paired difference (prompt minus
    click) of the Dice after the first step with its 95% interval (normal approximation), the same
    for the AUC, and how many cases the prompt ended at least as well (within 0.005)."""
    def index(rows):
        return {(str(r["fold"]), r["case"], r["class"]): r for r in rows if r.get("dice_1") not in (None, "")}
    clicks, out = index(per_start.get("clicks", [])), []
    for start, rows in per_start.items():
        if start == "clicks":
            continue
        other = index(rows)
        for cname in sorted({k[2] for k in other}):
            keys = sorted(k for k in other if k[2] == cname and k in clicks)
            if not keys:
                continue
            diff = [float(other[k]["dice_1"]) - float(clicks[k]["dice_1"]) for k in keys]
            auc = [float(other[k]["auc"]) - float(clicks[k]["auc"]) for k in keys]

            def gain(rows):
                return sum(float(rows[k]["dice_1"]) - float(rows[k]["dice_0"]) for k in keys) / len(keys)
            out.append({"start": start, "class": cname, "cases": len(keys), "gain": gain(other),
                        "click_gain": gain(clicks),
                        "minus_click": mean_ci(diff), "auc_minus_click": mean_ci(auc),
                        "at_least_as_good": sum(d >= -0.005 for d in diff)})
    return out


def by_training(values: Dict[tuple, float]) -> dict:
    """One figure over the trainings of a job: ``values`` maps (fold, repeat) to the figure of that
    training. Returns the values, their mean and sd over all trainings, each fold's mean, and the sd
    between trainings of one fold pooled over the folds that have two or more (the square root of
    the summed squared deviations from each fold's mean over the summed degrees of freedom; None
    without such a fold)."""
    folds: Dict[int, List[float]] = {}
    for (fold, _), v in sorted(values.items()):
        folds.setdefault(fold, []).append(v)
    means = {f: sum(v) / len(v) for f, v in folds.items()}
    dof = sum(len(v) - 1 for v in folds.values())
    ss = sum((x - means[f]) ** 2 for f, v in folds.items() for x in v)
    return {"values": dict(sorted(values.items())), "mean_sd": mean_sd(list(values.values())), "per_fold": means,
            "within_fold_sd": math.sqrt(ss / dof) if dof else None}


def keyed(values: Dict[tuple, float]) -> Dict[str, float]:
    """(fold, repeat) keys as ``"fold/repeat"`` for study.json."""
    return {f"{f}/{r}": v for (f, r), v in values.items()}


def mean_ci(values: List[float]):
    """Mean and its 95% interval by the normal approximation (no interval for fewer than 2 values)."""
    m, sd = mean_sd(values)
    if m is None or len(values) < 2:
        return m, None
    h = 1.96 * sd / math.sqrt(len(values))
    return m, (m - h, m + h)


def f3(v, sign=False):
    return "-" if v is None else (f"{v:+.3f}" if sign else f"{v:.3f}")


def f4(v):
    return "-" if v is None else f"{v:+.4f}"


def run(a) -> int:
    with open(a.study) as f:
        spec = json.load(f)
    study = Study(spec, a.root, a.out, a)
    jobs = [j for j in spec["jobs"] if not a.only or j["name"] in a.only or slug(j["name"]) in a.only]
    if a.repeats < 1:
        raise SystemExit(f"--repeats: at least 1 training per job and fold, got {a.repeats}")
    for j in jobs:
        j["folds"] = list(a.folds) if a.folds is not None else j.get("folds", [0])
    n_train = sum(len(j["folds"]) for j in jobs) * a.repeats
    print(f"study {a.study}: {study.name}, {study.plans} {study.config}, {len(jobs)} jobs / {n_train} trainings of "
          f"{a.epochs} x {a.iters} iterations on {a.device}, {a.parallel} at once", flush=True)
    trained = train_all(study, jobs)
    evals = evaluate_all(study, jobs, trained)

    result = {"study": spec, "schedule": {"epochs": a.epochs, "iters": a.iters, "device": a.device,
                                          "clicks": a.clicks}, "validation": {}, "harm": {}, "curve": {}}
    lines = [f"# {spec.get('title', study.name)}", "",
             f"{study.name}, plans {study.plans} {study.config}, {a.epochs} x {a.iters} iterations per training, "
             f"device {a.device}; {time.time() - study.t0:.0f} s", ""]
    table, spread = validation_table(study, jobs, trained, result)
    lines += table
    lines += user_table(study, jobs, evals, result)
    lines += training_table(spread, evals, study.summary_keys() if spread else {}, result)
    lines += prompt_table(study, jobs, trained, evals, result)
    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    with open(os.path.join(study.out, "study.md"), "w") as f:
        f.write(text)
    with open(os.path.join(study.out, "study.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


def trainings(job: dict, repeats: int) -> List[Tuple[int, int]]:
    """(fold, repeat) of every training of a job, fold by fold."""
    return [(f, r) for f in job["folds"] for r in range(repeats)]


def plain_job(jobs: List[dict]) -> Optional[dict]:
    """The study's plain nnU-Net job among ``jobs`` (None without one)."""
    return next((j for j in jobs if j.get("plain")), None)


def train_all(study: Study, jobs: List[dict]) -> Dict[tuple, Optional[str]]:
    """(job name, fold, repeat) -> fold folder of every training (None: failed or not started).
    Plain first (every guide job is compared with it); first trainings of every job and fold before
    the repeats."""
    study.plan_density(jobs)
    with cf.ThreadPoolExecutor(study.a.parallel) as pool:
        trained = {(j["name"], f, r): pool.submit(study.train, j, f, r)
                   for r in range(study.a.repeats) for j in jobs for f in j["folds"]}
        return {k: v.result() for k, v in trained.items()}


def evaluate_all(study: Study, jobs: List[dict], trained: dict) -> Dict[tuple, Optional[dict]]:
    """(job name, fold, repeat, checkpoint, start, cases) -> the evaluation's summary. Final
    checkpoints first (held-out cases, then the test set), then the earlier ones (click gain
    against length)."""
    a = study.a
    plain = plain_job(jobs)
    plain_test = {}
    if a.test_set and plain:  # the test set's plain predictions come from plain's first training of each fold
        plain_test = {f: study.predict_plain_test(plain, f) for f in plain["folds"] if trained[(plain["name"], f, 0)]}
    work = []
    for j in jobs:
        if j.get("plain"):
            continue
        for f, r in trainings(j, a.repeats):
            if trained[(j["name"], f, r)] is None:
                continue
            chks = study.checkpoints(trained[(j["name"], f, r)])
            for start in j.get("starts", ["clicks"]):
                work.append((0, j, f, r, chks[-1], start, "held-out"))
                if a.test_set:
                    work.append((1, j, f, r, chks[-1], start, "test"))
            if j.get("curve"):
                work += [(2, j, f, r, c, "clicks", "held-out") for c in chks[:-1]]
    work.sort(key=lambda w: w[0])
    with cf.ThreadPoolExecutor(a.parallel) as pool:
        evals = {(j["name"], f, r, c, s, w): pool.submit(study.evaluate, j, f, c, s, w,
                                                         plain_test.get(f) if w == "test" else None, r)
                 for _, j, f, r, c, s, w in work}
        return {k: v.result() for k, v in evals.items()}


def validation_table(study: Study, jobs: List[dict], trained: dict, result: dict) -> Tuple[List[str], List[tuple]]:
    """Report lines of nnU-Net's validation (automatic Dice against plain, paired by fold) and the
    guided validation (one click per object) per job and class, and the (job, class, fold, repeat,
    auto, gain) of every training of the jobs trained more than once on a fold."""
    plain = plain_job(jobs)

    def dice(job, sub):  # (fold, repeat) -> per-class Dice of every finished training of a job
        return {(f, r): validation_dice(trained[(job["name"], f, r)], sub)
                for f, r in trainings(job, study.a.repeats) if trained[(job["name"], f, r)]}
    plain_val = dice(plain, "validation") if plain else {}
    lines = ["## Automatic Dice (nnU-Net's validation, 0 clicks) and one click per object (guided validation)", "",
             "Per class (label value or region as nnU-Net's summary names it) and the foreground mean; mean +- sd "
             "over trainings (folds, and with `--repeats` several trainings per fold); auto - plain is paired by fold "
             "(each fold's mean over its trainings). Between trainings: the sd of trainings of one fold, pooled over "
             "folds (`--repeats` 2 or more).", "",
             "| job | class | trainings | auto Dice | between trainings | auto - plain | guided Dice | "
             "gain of one click per object | between trainings |",
             "|---|---|---|---|---|---|---|---|---|"]
    ms = lambda t, s=False: "-" if t[0] is None else f"{f3(t[0], s)} +- {t[1]:.3f}"  # noqa: E731
    spread = []
    for j in jobs:
        auto, guided = dice(j, "validation"), dice(j, "validation_guided")
        for key in sorted({k for v in auto.values() for k in v}, key=lambda k: (k == "mean", k)):
            a_ = by_training({t: v[key] for t, v in auto.items() if key in v})
            g_ = by_training({t: v[key] for t, v in guided.items() if key in v})
            gain = by_training({t: guided[t][key] - v[key] for t, v in auto.items()
                                if key in v and key in guided.get(t, {})})
            p_ = by_training({t: v[key] for t, v in plain_val.items() if key in v})["per_fold"]
            row = {"auto": a_["mean_sd"], "auto_between_trainings_sd": a_["within_fold_sd"],
                   "auto_minus_plain": mean_sd([m - p_[f] for f, m in a_["per_fold"].items() if f in p_]),
                   "guided": g_["mean_sd"], "gain": gain["mean_sd"],
                   "gain_between_trainings_sd": gain["within_fold_sd"],
                   "per_fold_auto": a_["per_fold"], "per_fold_guided": g_["per_fold"],
                   "per_training_auto": keyed(a_["values"]), "per_training_gain": keyed(gain["values"])}
            result["validation"].setdefault(j["name"], {})[key] = row
            lines.append(f"| {j['name']} | {key} | {len(a_['values'])} | {ms(row['auto'])} | "
                         f"{f3(a_['within_fold_sd'])} | {ms(row['auto_minus_plain'], True)} | {ms(row['guided'])} | "
                         f"{ms(row['gain'], True)} | {f3(gain['within_fold_sd'])} |")
            if a_["within_fold_sd"] is not None and key != "mean":
                spread += [(j, key, f, r, v, gain["values"].get((f, r))) for (f, r), v in a_["values"].items()]

    return lines, spread


def user_table(study: Study, jobs: List[dict], evals: dict, result: dict) -> List[str]:
    """Report lines of the simulated user's evaluations, pooled over folds and trainings, per job,
    checkpoint, start, cases and class."""
    a = study.a
    lines = ["", f"## Simulated user, {a.clicks} click steps (pooled over folds and trainings)", "",
             "Cases: each fold's held-out cases, or the test set (`--test-set`: cases no fold trained on; auto - "
             "plain is then the guide model's automatic Dice minus plain nnU-Net's of the same fold on the same "
             "cases). Dice per step is the per-case mean after 0, 1, ... steps (with `--start box` or `scribble` the "
             "prompt is step 1); AUC is the evaluation's area under that curve. Harmful: the fraction of clicks "
             "after which the class's Dice fell by more than 0.005, with its Wilson 95% interval. Not followed: "
             "clicks after which the output still disagreed with the click at its own voxel.", "",
             "| job | cases | start | checkpoint | class | clicks | Dice per step | AUC | auto - plain | "
             "gain 1st click step | gain/click | harmful (95% interval) | harmful: positive / negative clicks | "
             "not followed: positive / negative clicks | largest fall | lesions lost/click | lost elsewhere | "
             "far-Dice change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        if j.get("plain"):
            continue
        keys = sorted({(c, s, w) for (n, f, r, c, s, w) in evals if n == j["name"]},
                      key=lambda k: (k[2], k[1], int(k[0][16:-4]) if k[0].startswith("checkpoint_epoch") else 10 ** 9))
        for chk, start, where in keys:
            summaries = [evals[(j["name"], f, r, chk, start, where)] for f, r in trainings(j, a.repeats)
                         if evals.get((j["name"], f, r, chk, start, where))]
            rows = [r for s in summaries for r in report_lines(s, chk)]
            for cname in sorted({r["class"] for r in rows}):
                p = pooled([r for r in rows if r["class"] == cname])
                curves = [s["guided"][cname]["mean_dice"] for s in summaries]
                p["dice_per_step"] = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
                p["auc"] = mean_sd([s["guided"][cname].get("mean_auc") for s in summaries])[0]
                result["harm"].setdefault(j["name"], []).append({"cases": where, "start": start, "checkpoint": chk,
                                                                 "class": cname, **p})
                steps = " / ".join(f"{v:.3f}" for v in p["dice_per_step"])
                ci = p["harmful_ci95"]
                harm = f3(p["harmful_fraction"]) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                n_cases = sum(s.get("n_cases") or 0 for s in summaries) or "-"
                signs = " / ".join("{} of {}".format(*p["by_sign"][k]) for k in ("positive", "negative")) \
                    if p["by_sign"] else "-"
                ignored = " / ".join(f"{m} of {p['by_sign'][k][1]}"
                                     for m, k in zip(p["not_followed"], ("positive", "negative"))) \
                    if p["not_followed"] else "-"
                lines.append(f"| {j['name']} | {where} ({n_cases}) | {start} | {chk[:-4]} | {cname} | {p['clicks']} | "
                             f"{steps} | {f3(p['auc'])} | {f3(p['auto_minus_plain'], True)} | "
                             f"{f3(p['gain_first_click_step'], True)} | {f3(p['gain_per_click'], True)} | "
                             f"{harm} | {signs} | {ignored} | "
                             f"{f3(p['largest_fall'])} | "
                             f"{f3(p['lesions_lost_per_click'])} | {p['lesions_lost_elsewhere']} | "
                             f"{f4(p['far_dice_change_mean'])} |")
    return lines


def training_table(spread: List[tuple], evals: dict, keys: Dict[str, str], result: dict) -> List[str]:
    """Report lines with one row per training of the jobs trained more than once on a fold
    (``--repeats``): automatic Dice and one-click gain of the validation (``spread``: job, class,
    fold, repeat, auto, gain), and the simulated user's final-checkpoint evaluation of the fold's
    held-out cases (Dice before and after the clicks, harmful clicks, clicks not followed, lesions
    lost to a click elsewhere) of the class whose validation key ``keys`` gives its name."""
    if not spread:
        return []
    lines = ["", "## Every training (jobs trained more than once per fold)", "",
             "Validation: nnU-Net's automatic Dice and the guided validation's one-click gain. Simulated user: the "
             "final checkpoint on the fold's held-out cases, first start, Dice after 0 and after the last step.", "",
             "| job | class | fold | training | auto Dice | one-click gain | simulated user: Dice 0 -> last | "
             "harmful | not followed | lost elsewhere |", "|---|---|---|---|---|---|---|---|---|---|"]
    for job, key, f, r, auto, gain in spread:
        start = job.get("starts", ["clicks"])[0]
        s = evals.get((job["name"], f, r, "checkpoint_final.pth", start, "held-out"))
        # nnU-Net's summary names a class by its label value or region, the evaluation by its name
        row = next((x for x in (report_lines(s, "checkpoint_final.pth") if s else []) if keys.get(x["class"]) == key),
                   None)
        user = harm = ignored = lost = "-"
        if row:
            user = f"{row['auto']:.3f} -> {row['dice_n']:.3f}"
            harm = f"{row['n_harmful']} of {row['clicks']}"
            ignored = "-" if row["n_not_followed"] is None else f"{row['n_not_followed']} of {row['clicks']}"
            lost = str(row["lesions_lost_elsewhere"])
        result.setdefault("trainings", []).append({"job": job["name"], "class": key, "fold": f, "repeat": r,
                                                   "auto": auto, "gain": gain, "user": row})
        lines.append(f"| {job['name']} | {key} | {f} | {r + 1} | {auto:.3f} | {f3(gain, True)} | {user} | {harm} | "
                     f"{ignored} | {lost} |")
    return lines


def prompt_table(study: Study, jobs: List[dict], trained: dict, evals: dict, result: dict) -> List[str]:
    """Report lines comparing each job's first box / scribble with its first click, paired by case
    (final checkpoints; held-out cases pooled over folds, and the test set)."""
    lines = []
    for j in jobs:
        if len(j.get("starts", ["clicks"])) < 2 or "clicks" not in j["starts"]:
            continue
        for where in ("held-out", "test"):
            per_start = {}
            for start in j["starts"]:
                for f, r in trainings(j, study.a.repeats):
                    if trained.get((j["name"], f, r)) and evals.get((j["name"], f, r, "checkpoint_final.pth", start,
                                                                     where)):
                        per_start.setdefault(start, []).extend(
                            study.per_case(j, f, "checkpoint_final.pth", start, where, r))
            rows = prompts_against_clicks(per_start)
            if not rows:
                continue
            result.setdefault("prompts", {}).setdefault(j["name"], {})[where] = rows
            if not lines:
                lines += ["", "## A first box or scribble against a first click (paired by case)", "",
                          "Same model, final checkpoint; each case evaluated from each start. Minus click: the "
                          "Dice after the prompt minus the Dice after the first click step, mean over cases "
                          "with its 95% interval (normal approximation); the same for the AUC of the whole "
                          "curve (the prompt adds a step to it). At least as good: cases where the prompt's Dice "
                          "is no more than 0.005 below the click's.", "",
                          "| job | cases | start | class | n | gain, prompt | gain, click | prompt minus click "
                          "(95%) | AUC, prompt minus click (95%) | at least as good |",
                          "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {j['name']} | {where} | {r['start']} | {r['class']} | {r['cases']} | "
                             f"{f3(r['gain'], True)} | {f3(r['click_gain'], True)} | {fci(r['minus_click'])} | "
                             f"{fci(r['auc_minus_click'])} | {r['at_least_as_good']} of {r['cases']} |")
    return lines


def fci(t) -> str:
    m, ci = t
    return "-" if m is None else f3(m, True) + (f" ({ci[0]:+.3f} to {ci[1]:+.3f})" if ci else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the hippocampus and LiTS slab datasets under ROOT")
    pp.add_argument("root")
    pr = sub.add_parser("run", help="train and measure a study")
    pr.add_argument("study", help="study file (benchmarks/studies/*.json)")
    pr.add_argument("--root", required=True, help="folder with the dataset's nnUNet_raw and nnUNet_preprocessed")
    pr.add_argument("--out", required=True, help="results, evaluations, logs and the tables go here")
    pr.add_argument("--epochs", type=int, default=20)
    pr.add_argument("--iters", type=int, default=25, help="iterations per epoch (default 25: the demo's 500 in all)")
    pr.add_argument("--val-iters", type=int, default=2, help="nnU-Net's pseudo-Dice iterations per epoch")
    pr.add_argument("--save-every", type=int, default=5, help="extra checkpoint every N epochs (curve jobs)")
    pr.add_argument("--parallel", type=int, default=1, help="trainings/evaluations at once (default 1)")
    pr.add_argument("--da-workers", type=int, default=0, help="nnU-Net augmentation workers per training")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("-n", "--clicks", type=int, default=3, help="click steps of the simulated user (default 3)")
    pr.add_argument("--only", nargs="+", help="only these jobs (names, or names with _ for spaces)")
    pr.add_argument("--repeats", type=int, default=1,
                    help="trainings of every chosen job per fold (default 1); the r-th repeat trains into "
                         "OUT/results/JOB__repeatR, and the tables give the spread between trainings of a fold")
    pr.add_argument("--folds", nargs="+", type=int,
                    help="train and measure every chosen job on these folds (default: the job's own folds, or 0)")
    pr.add_argument("--deadline", type=float, help="start no new training/evaluation after this many seconds")
    pr.add_argument("--test-set", action="store_true",
                    help="also evaluate every fold's final model on the dataset's test set (imagesTs/labelsTs), "
                         "next to the plain job's predictions of it")
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.root)
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
