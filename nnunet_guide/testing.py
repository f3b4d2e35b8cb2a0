"""Helpers for tests, benchmarks and the demo: small real nnU-Net datasets and CPU-sized plans.

Everything here drives nnU-Net through its own commands (``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train``) in subprocesses with the nnU-Net folders in the environment, the way a
user runs it. Default plans are far too slow on a CPU; :func:`derive_small_plans` writes a
derived plans file (own identifier, same preprocessed data) with a smaller network and batch.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from .cli.env import env_value
from .settings import write_atomic, write_json_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data_dir() -> Optional[str]:
    """The project's real-scan folder (``../shared/data`` beside the repo, or
    ``$NNUNET_GUIDE_SHARED_DATA``); None when it is not there (a user's clone)."""
    cand = os.environ.get("NNUNET_GUIDE_SHARED_DATA") or os.path.join(REPO_ROOT, "..", "shared", "data")
    return os.path.abspath(cand) if os.path.isdir(cand) else None


def nnunet_env(root: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment with nnU-Net's three folders under ``root`` and our trainers registered."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": os.path.join(root, "nnUNet_raw"),
        "nnUNet_preprocessed": os.path.join(root, "nnUNet_preprocessed"),
        "nnUNet_results": os.path.join(root, "nnUNet_results"),
        "nnUNet_extTrainer": env_value(os.environ.get("nnUNet_extTrainer", "")),
        "nnUNet_compile": "false",
    })
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[k], exist_ok=True)
    if extra:
        env.update(extra)
    return env


def run(cmd: Sequence[str], env: Dict[str, str], log: Optional[str] = None, timeout: Optional[float] = None) -> str:
    """Run a command; on failure raise with the tail of its output."""
    proc = subprocess.run(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}")
    return proc.stdout


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def write_image(path: str, array: np.ndarray, spacing_zyx: Sequence[float], origin=None, direction=None) -> None:
    """Write a (z, y, x) array as NIfTI with spacing given in array order."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    write_atomic(path, lambda tmp: sitk.WriteImage(img, tmp))


def write_synthetic_dataset(raw_root: str, dataset_id: int, name: str = "GuideSynthetic", num_cases: int = 8,
                            shape=(24, 40, 40), spacing=(2.0, 1.0, 1.0), seed: int = 0,
                            regions: bool = False) -> str:
    """A small CT-like dataset: an ellipsoidal organ (label 1) with 1-3 darker lesions (label 2).

    Intensities mimic the LiTS case (organ ~120 HU, lesions ~70 HU, noise 15 HU) so density
    features behave as on real CT. ``regions=True`` writes a region-based dataset.json
    (organ = {1, 2}, lesion = {2}). Returns the dataset folder.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, dataset_name(dataset_id, name))
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(num_cases):
        c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        r = np.array(shape) * rng.uniform(0.28, 0.36, 3)
        organ = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
        seg = organ.astype(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            inside = np.argwhere(organ)
            lc = inside[rng.integers(len(inside))]
            lr = rng.uniform(2.0, 4.5)
            lesion = (((zz - lc[0]) * spacing[0]) ** 2 + ((yy - lc[1]) * spacing[1]) ** 2 +
                      ((xx - lc[2]) * spacing[2]) ** 2) <= (lr * 1.6) ** 2
            seg[lesion & organ] = 2
        img = rng.normal(-50, 15, shape)
        img[seg == 1] = rng.normal(120, 15, int((seg == 1).sum()))
        img[seg == 2] = rng.normal(70, 15, int((seg == 2).sum()))
        cid = f"{name.lower()}_{i:03d}"
        write_image(os.path.join(folder, "imagesTr", f"{cid}_0000.nii.gz"), img.astype(np.float32), spacing)
        write_image(os.path.join(folder, "labelsTr", f"{cid}.nii.gz"), seg, spacing)
    labels = {"background": 0, "organ": [1, 2], "lesion": 2} if regions else {"background": 0, "organ": 1, "lesion": 2}
    dj = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": num_cases, "file_ending": ".nii.gz",
          "name": name, "description": "synthetic organ + lesion phantom made by nnunet_guide.testing"}
    if regions:
        dj["regions_class_order"] = [1, 2]
    write_json_atomic(dj, os.path.join(folder, "dataset.json"))
    return folder


def copy_hippocampus_subset(raw_root: str, dataset_id: int = 4, num_cases: int = 24,
                            source: Optional[str] = None) -> str:
    """The first ``num_cases`` cases of the MSD hippocampus set as an nnU-Net raw dataset."""
    src = source or os.path.join(shared_data_dir() or "", "Dataset004_Hippocampus")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"hippocampus data not found at {src}")
    dst = os.path.join(raw_root, dataset_name(dataset_id, "Hippocampus"))
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
    cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(src, "labelsTr")) if f.endswith(".nii.gz"))
    cases = cases[:num_cases]
    for c in cases:
        shutil.copy(os.path.join(src, "imagesTr", f"{c}_0000.nii.gz"), os.path.join(dst, "imagesTr"))
        shutil.copy(os.path.join(src, "labelsTr", f"{c}.nii.gz"), os.path.join(dst, "labelsTr"))
    with open(os.path.join(src, "dataset.json")) as f:
        dj = json.load(f)
    dj["numTraining"] = len(cases)
    write_json_atomic(dj, os.path.join(dst, "dataset.json"))
    return dst


def plan_and_preprocess(dataset_id: int, env: Dict[str, str], configurations: Iterable[str] = ("3d_fullres",),
                        log: Optional[str] = None) -> None:
    """nnU-Net's own planning and preprocessing (one process; CPU friendly)."""
    configs = list(configurations)
    env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # the planner rejects 0
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configs, "-np",
         *(["1"] * len(configs)), "-npfp", "1", "--verify_dataset_integrity"], env, log)


def preprocess_for_this_process(dataset_id: int, name: str, env: Dict[str, str],
                                configurations: Iterable[str] = ("3d_fullres",)) -> str:
    """Plan and preprocess a raw dataset, then point this process's nnU-Net folders at ``env``'s
    (benchmarks build trainers in process). Returns the preprocessed dataset folder."""
    plan_and_preprocess(dataset_id, env, configurations)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[k] = env[k]
    return os.path.join(env["nnUNet_preprocessed"], name)


def plain_conv_unet(dim: int, features: Sequence[int], n_conv: int = 1) -> dict:
    """The ``architecture`` entry of nnU-Net plans for a PlainConvUNet (3x3 kernels, stride 2 after
    the first stage, instance norm, leaky ReLU)."""
    n = len(features)
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
                            "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
                            "n_conv_per_stage": [n_conv] * n, "n_conv_per_stage_decoder": [n_conv] * (n - 1),
                            "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def configuration_plans(spacing: Sequence[float], patch: Sequence[int], architecture: dict,
                        normalization: str = "ZScoreNormalization", data_identifier: str = "tiny") -> dict:
    """One configuration of hand-written nnU-Net plans (nnU-Net's default resampling)."""
    return {"data_identifier": data_identifier, "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": list(spacing),
            "normalization_schemes": [normalization], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": architecture, "batch_dice": False}


def hand_written_plans(configurations: Dict[str, dict], dataset_name: str, transpose: Sequence[int] = (0, 1, 2),
                       reader: str = "SimpleITKIO", intensity: Optional[dict] = None) -> dict:
    """nnU-Net plans around the given configurations, for tests and benchmarks that need a model
    folder or nnU-Net's preprocessor without planning a dataset (``intensity``: the foreground
    intensity properties of channel 0, used by CT normalisation)."""
    first = next(iter(configurations.values()))
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(first["spacing"]),
            "original_median_shape_after_transp": list(first["median_image_size_in_voxels"]),
            "image_reader_writer": reader,
            "transpose_forward": list(transpose), "transpose_backward": [int(i) for i in np.argsort(transpose)],
            "configurations": configurations, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": intensity or {
                "mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}}}


def derive_small_plans(preprocessed_dataset_folder: str, source: str = "nnUNetPlans",
                       target: str = "nnUNetPlans_small", max_stages: int = 3, base_features: int = 8,
                       batch_size: int = 2, patch_size: Optional[Dict[str, Sequence[int]]] = None) -> str:
    """Write ``<target>.json``: the source plans with a shallower, narrower network and a small batch.

    The configurations keep their ``data_identifier``, so nnU-Net's preprocessed data is reused.
    Patch sizes are cut to what ``max_stages`` stages can divide (or set per configuration by
    ``patch_size``). The source plans file is only read. Returns the new file's path.
    """
    src = os.path.join(preprocessed_dataset_folder, source + ".json")
    with open(src) as f:
        plans = json.load(f)
    new = copy.deepcopy(plans)
    new["plans_name"] = target
    for name, cfg in new["configurations"].items():
        if "inherits_from" in cfg and "architecture" not in cfg:
            continue
        arch = cfg["architecture"]["arch_kwargs"]
        n = min(max_stages, arch["n_stages"])
        for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
            arch[key] = arch[key][:n]
        if "n_conv_per_stage_decoder" in arch:
            arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][:n - 1]
        arch["n_stages"] = n
        arch["features_per_stage"] = [min(base_features * 2 ** i, 320) for i in range(n)]
        divisor = np.prod(np.array(arch["strides"]), axis=0)
        if patch_size is not None and name in patch_size:
            ps = list(patch_size[name])
        else:
            ps = [max(int(d), int(p) // int(d) * int(d)) for p, d in zip(cfg["patch_size"], divisor)]
        cfg["patch_size"] = ps
        cfg["batch_size"] = int(batch_size)
    dst = os.path.join(preprocessed_dataset_folder, target + ".json")
    write_json_atomic(new, dst)
    return dst


def make_trainer(trainer_class, preprocessed_dataset_folder: str, plans_name: str = "nnUNetPlans",
                 configuration: str = "3d_fullres", fold=0, initialize: bool = False, device=None):
    """A trainer built in this process from a preprocessed dataset folder, on ``device`` (default
    the CPU), the way ``nnUNetv2_train`` builds it (nnU-Net's folders must be in the environment)."""
    import torch
    with open(os.path.join(preprocessed_dataset_folder, plans_name + ".json")) as f:
        plans = json.load(f)
    plans["continue_training"] = False  # nnUNetv2_train sets this; the trainer pops it
    with open(os.path.join(preprocessed_dataset_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    trainer = trainer_class(plans, configuration, fold, dataset_json,
                            device=torch.device("cpu") if device is None else device)
    if initialize:
        trainer.initialize()
    return trainer


def train(dataset_id: int, configuration: str, fold, trainer: str, plans: str, env: Dict[str, str],
          log: Optional[str] = None, extra_args: Sequence[str] = ()) -> str:
    """``nnUNetv2_train`` on the CPU; returns the model folder."""
    env = dict(env)
    env.setdefault("nnUNet_n_proc_DA", "0")  # in-process augmentation: no worker start-up on 2 cores
    run(["nnUNetv2_train", str(dataset_id), configuration, str(fold), "-tr", trainer, "-p", plans,
         "-device", "cpu", *extra_args], env, log)
    results = env["nnUNet_results"]
    name = [d for d in os.listdir(results) if d.startswith(f"Dataset{int(dataset_id):03d}_")][0]
    return os.path.join(results, name, f"{trainer}__{plans}__{configuration}")


def python_exe() -> str:
    return sys.executable
