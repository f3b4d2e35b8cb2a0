"""Class-conditional intensity histograms in a derived plans file (the library of ``nnUNetv2_guide_plan``).

Run after nnU-Net's own ``nnUNetv2_plan_and_preprocess``. For each requested configuration it
reads the preprocessed cases (the intensities exactly as the network sees them, after nnU-Net's
normalisation), samples voxels per label, and stores one histogram per input channel and label
(:class:`nnunet_guide.core.density.HistogramAccumulator`). The result is written as a copy of the
source plans with its own ``plans_name`` and the key ``nnunet_guide_density``; configurations
keep their ``data_identifier``, so nnU-Net's preprocessed data is reused as is. nnU-Net's own
plans file is only read.

    nnUNetv2_guide_plan -d 4 [-c 3d_fullres 2d] [-p nnUNetPlans] [-o nnUNetPlans_density]
    nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainerDensity -p nnUNetPlans_density

Like nnU-Net's own normalisation statistics, the histograms come from every training case by
default, so a cross-validation fold's held-out cases are in them. ``--fold F`` plans them from
fold F's training cases only (nnU-Net's ``splits_final.json``, or the split nnU-Net's trainer
would create), into ``<source>_density_fold<F>``; the entry lists those cases, and the density
trainers refuse to train another fold with it.
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..core.density import DEFAULT_NUM_BINS, DensityError, HistogramAccumulator
from ..paths import DatasetNameError, DatasetNotFoundError, find_dataset_folder
from ..settings import write_json_atomic

#: key of the planned histograms in a derived plans file
PLANS_DENSITY_KEY = "nnunet_guide_density"


def _preprocessed_root(preprocessed_dir: Optional[str]) -> str:
    root = preprocessed_dir or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise DensityError("nnUNet_preprocessed is not set (and no preprocessed folder was given)")
    return root


def _dataset_folder(dataset: str, root: str) -> str:
    """Dataset folder under ``root`` from an id (``4``, ``004``) or a full name."""
    try:
        return os.path.join(root, find_dataset_folder(root, dataset))
    except DatasetNotFoundError as e:
        raise DensityError(f"no preprocessed dataset {dataset!r} in {root}; run nnUNetv2_plan_and_preprocess "
                           f"first") from e
    except DatasetNameError as e:
        raise DensityError(str(e)) from e


def _label_values(dataset_json: dict) -> List[int]:
    """Integer label values to histogram: every value of dataset.json's labels except the
    ignore label (regions contribute their member values)."""
    vals = set()
    ignore = None
    for name, v in dataset_json.get("labels", {}).items():
        if name == "ignore":
            ignore = int(v)
            continue
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            vals.add(int(x))
    vals.discard(-1)
    if ignore is not None:
        vals.discard(ignore)
    if not vals:
        raise DensityError("dataset.json has no labels to plan histograms for")
    return sorted(vals | {0})


def fold_training_cases(dataset_folder: str, fold: int, identifiers: Sequence[str]) -> List[str]:
    """The training cases of cross-validation fold ``fold``, as nnU-Net's trainer will take them:
    from ``splits_final.json`` in the preprocessed dataset folder, or, where that file does not
    exist yet, from the seeded 5-fold split nnU-Net's trainer writes on first use (computed with
    nnU-Net's own function over ``identifiers``, not written). DensityError naming the file and
    the value for a fold the split does not have or a case the preprocessed data lacks."""
    splits_file = os.path.join(dataset_folder, "splits_final.json")
    if os.path.isfile(splits_file):
        try:
            with open(splits_file) as f:
                splits = json.load(f)
        except (OSError, ValueError) as e:
            raise DensityError(f"{splits_file} cannot be read as JSON: {e}") from e
        if not isinstance(splits, list) or not all(isinstance(s, dict) and isinstance(s.get("train"), list)
                                                   for s in splits):
            raise DensityError(f"{splits_file}: not an nnU-Net split file (a list of "
                               f"{{'train': [...], 'val': [...]}} per fold)")
        source = splits_file
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        splits = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)
        source = f"nnU-Net's default 5-fold split of {len(identifiers)} cases ({splits_file} does not exist yet)"
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise DensityError(f"fold {fold!r} is not in {source}: it has folds 0..{len(splits) - 1}")
    train = [str(c) for c in splits[fold]["train"]]
    missing = sorted(set(train) - set(identifiers))
    if missing:
        raise DensityError(f"{source}, fold {fold}: {len(missing)} training case(s) have no preprocessed data, e.g. "
                           f"{missing[:3]}")
    if not train:
        raise DensityError(f"{source}, fold {fold} has no training case")
    return train


def compute_histograms(data_folder: str, labels: Sequence[int], num_channels: int,
                       channel_names: Optional[Sequence[str]] = None, num_bins: int = DEFAULT_NUM_BINS,
                       max_samples_per_label: int = 20000, max_cases: Optional[int] = None, seed: int = 0,
                       verbose: bool = True, fold: Optional[int] = None) -> Dict:
    """Histograms of one preprocessed folder (nnU-Net's dataset classes read the cases): of all its
    cases, or with ``fold`` of that cross-validation fold's training cases only
    (:func:`fold_training_cases`; the entry then records ``fold`` and ``training_cases``).

    Returns the dict of :meth:`HistogramAccumulator.finalize` plus ``data_identifier``.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    try:
        dataset_cls = infer_dataset_class(data_folder)
    except (AssertionError, KeyError) as e:
        raise DensityError(f"{data_folder}: not an nnU-Net preprocessed folder ({e})") from e
    dataset = dataset_cls(data_folder)
    ids = list(dataset.identifiers)
    if not ids:
        raise DensityError(f"{data_folder} holds no preprocessed case")
    if fold is not None:
        ids = fold_training_cases(os.path.dirname(os.path.normpath(data_folder)), fold, ids)
    if max_cases is not None and len(ids) > max_cases:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, int(max_cases), replace=False).tolist())
    acc = HistogramAccumulator(num_channels, labels, max_samples_per_label, seed)
    t0 = time.time()
    for i, cid in enumerate(ids):
        data, seg, _, _ = dataset.load_case(cid)
        acc.add_case(np.asarray(data[:]), np.asarray(seg[:]), case=f"{cid} ({data_folder})")
        if verbose and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(ids)} cases ({time.time() - t0:.0f} s)", flush=True)
    out = acc.finalize(num_bins, channel_names)
    out["data_identifier"] = os.path.basename(os.path.normpath(data_folder))
    if fold is not None:
        out["fold"] = int(fold)
        out["training_cases"] = sorted(ids)
    return out


def plan_density(dataset: str, configurations: Optional[Sequence[str]] = None, source_plans: str = "nnUNetPlans",
                 target_plans: Optional[str] = None, num_bins: int = DEFAULT_NUM_BINS,
                 max_samples_per_label: int = 20000, max_cases: Optional[int] = None, seed: int = 0,
                 preprocessed_dir: Optional[str] = None, verbose: bool = True, fold: Optional[int] = None) -> str:
    """Write ``<target_plans>.json`` next to the source plans; returns its path.

    Args:
        dataset: id or name of a preprocessed dataset.
        configurations: which configurations to plan (default: every one whose preprocessed
            folder exists). Configurations sharing a ``data_identifier`` are computed once.
        source_plans / target_plans: plans identifiers (target default: source + "_density", with
            ``fold`` source + "_density_fold<fold>").
        num_bins, max_samples_per_label, max_cases, seed: see ``HistogramAccumulator``.
        fold: plan from this cross-validation fold's training cases only (:func:`compute_histograms`).
    Histograms already in the target file for configurations not requested are kept.
    """
    root = _preprocessed_root(preprocessed_dir)
    folder = _dataset_folder(str(dataset), root)
    target_plans = target_plans or f"{source_plans}_density" + ("" if fold is None else f"_fold{fold}")
    if target_plans == source_plans:
        raise DensityError(f"the derived plans need their own identifier; -o {target_plans} equals -p {source_plans}")
    src = os.path.join(folder, source_plans + ".json")
    if not os.path.isfile(src):
        raise DensityError(f"{src} does not exist; run nnUNetv2_plan_and_preprocess (or pass -p) first")
    with open(src) as f:
        plans = json.load(f)
    dj_path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(dj_path):
        raise DensityError(f"{dj_path} does not exist; nnU-Net's preprocessing writes it")
    with open(dj_path) as f:
        dataset_json = json.load(f)
    names = [str(v) for v in dataset_json.get("channel_names", dataset_json.get("modality", {})).values()]
    labels = _label_values(dataset_json)
    all_cfgs = plans.get("configurations", {})

    def identifier(cfg: str) -> Optional[str]:  # follows inherits_from like nnU-Net's PlansManager
        seen = set()
        while cfg in all_cfgs and cfg not in seen:
            seen.add(cfg)
            c = all_cfgs[cfg]
            if "data_identifier" in c:
                return c["data_identifier"]
            cfg = c.get("inherits_from")
        return None

    if configurations is None:
        configurations = [c for c in all_cfgs if identifier(c) and os.path.isdir(os.path.join(folder, identifier(c)))]
        if not configurations:
            raise DensityError(f"no configuration of {src} has preprocessed data in {folder}; "
                               f"run nnUNetv2_plan_and_preprocess first")
    entries: Dict[str, Dict] = {}
    by_ident: Dict[str, Dict] = {}
    for cfg in configurations:
        if cfg not in all_cfgs:
            raise DensityError(f"configuration {cfg!r} is not in {src}; it has {sorted(all_cfgs)}")
        ident = identifier(cfg)
        data_folder = os.path.join(folder, ident or "")
        if not ident or not os.path.isdir(data_folder):
            raise DensityError(f"configuration {cfg!r}: preprocessed folder {data_folder} does not exist; run "
                               f"nnUNetv2_plan_and_preprocess -d {dataset} -c {cfg}")
        if ident not in by_ident:
            if verbose:
                print(f"{cfg}: histograms of {data_folder}", flush=True)
            by_ident[ident] = compute_histograms(data_folder, labels, len(names), names, num_bins,
                                                 max_samples_per_label, max_cases, seed, verbose, fold)
        entries[cfg] = by_ident[ident]

    dst = os.path.join(folder, target_plans + ".json")
    kept: Dict[str, Dict] = {}
    if os.path.isfile(dst):
        try:
            with open(dst) as f:
                old = json.load(f).get(PLANS_DENSITY_KEY, {}).get("configurations", {})
            kept = {k: v for k, v in old.items() if k not in entries and k in all_cfgs
                    and v.get("data_identifier") == identifier(k) and v.get("fold") == fold}
        except (OSError, json.JSONDecodeError, AttributeError):
            kept = {}
    new = copy.deepcopy(plans)
    new["plans_name"] = target_plans
    new[PLANS_DENSITY_KEY] = {
        "format_version": 1,
        "source_plans": source_plans,
        "configurations": {**kept, **entries},
    }
    write_json_atomic(new, dst)
    if verbose:
        print(f"wrote {dst} (plans {target_plans!r}; configurations {sorted(new[PLANS_DENSITY_KEY]['configurations'])}); "
              f"train with -p {target_plans}", flush=True)
    return dst
