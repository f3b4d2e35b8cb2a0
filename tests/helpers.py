"""Test fixtures shared by tests and benchmarks: small real nnU-Net datasets, hand-written plans,
trainers built in process, and the console commands as setup.py declares them.

Tests import this module as ``helpers`` (pytest puts tests/ on ``sys.path``); benchmarks add
tests/ to ``sys.path`` first. The runtime pieces (environment, command runner, CPU plans) live
in the package and are re-exported here for the tests' convenience.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_guide.image_io import write_image
from nnunet_guide.paths import REPO_ROOT, dataset_folder_name, shared_data_dir
from nnunet_guide.preprocessing.small_plans import derive_small_plans
from nnunet_guide.runner import nnunet_env, plan_and_preprocess, run_command, train
from nnunet_guide.settings import write_json_atomic

__all__ = ["REPO_ROOT", "dataset_folder_name", "shared_data_dir", "derive_small_plans", "nnunet_env",
           "plan_and_preprocess", "run", "train", "write_image", "write_synthetic_dataset", "copy_hippocampus_subset",
           "preprocess_for_this_process", "plain_conv_unet", "configuration_plans", "hand_written_plans",
           "make_trainer", "console_scripts", "command"]

run = run_command


def write_synthetic_dataset(raw_root: str, dataset_id: int, name: str = "GuideSynthetic", num_cases: int = 8,
                            shape=(24, 40, 40), spacing=(2.0, 1.0, 1.0), seed: int = 0,
                            regions: bool = False) -> str:
    """A small CT-like dataset: an ellipsoidal organ (label 1) with 1-3 darker lesions (label 2).

    Intensities mimic the LiTS case (organ ~120 HU, lesions ~70 HU, noise 15 HU) so density
    features behave as on real CT. ``regions=True`` writes a region-based dataset.json
    (organ = {1, 2}, lesion = {2}). Returns the dataset folder.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, dataset_folder_name(dataset_id, name))
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
          "name": name, "description": "synthetic organ + lesion phantom made by nnunet-guide's tests/helpers.py"}
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
    dst = os.path.join(raw_root, dataset_folder_name(dataset_id, "Hippocampus"))
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


def preprocess_for_this_process(dataset_id: int, name: str, env: Dict[str, str],
                                configurations: Sequence[str] = ("3d_fullres",)) -> str:
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


def console_scripts() -> Dict[str, str]:
    """``{command name: "module:function"}`` as setup.py declares the console scripts."""
    tree = ast.parse(open(os.path.join(REPO_ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return {name.strip(): target.strip() for name, target in (s.split("=", 1) for s in scripts)}
    raise AssertionError("setup.py declares no console_scripts")


def command(name: str) -> List[str]:
    """The argv that runs console script ``name`` exactly as its installed wrapper would, through
    this checkout's setup.py entry point (so tests do not depend on how the package was installed)."""
    module, func = console_scripts()[name].split(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; "
                                  f"sys.exit({func}())"]


def same_partition(a, b):
    """Two label maps split the voxels into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    m = a > 0
    pairs = np.unique(np.stack([a[m], b[m]], 1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))
