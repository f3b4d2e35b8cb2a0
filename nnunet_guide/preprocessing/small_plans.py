"""CPU-sized plans: a derived nnU-Net plans file with a shallower, narrower network and a small
batch, reusing nnU-Net's preprocessed data (the demo, tests and benchmarks train with it)."""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..settings import write_json_atomic


def small_patch(patch: Sequence[int], strides: Sequence[Sequence[int]], budget: Optional[int] = None) -> List[int]:
    """The patch cut to a multiple of the network's total stride, then shrunk (largest axes
    first, a stride at a time) until it has at most ``budget`` voxels (None: no budget)."""
    div = np.prod(np.asarray(strides), axis=0).astype(int)
    ps = [max(int(d), int(p) // int(d) * int(d)) for p, d in zip(patch, div)]
    while budget is not None and int(np.prod(ps)) > budget:
        ax = int(np.argmax(ps))
        if ps[ax] - div[ax] < div[ax]:
            break
        ps[ax] -= int(div[ax])
    return ps


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
        if patch_size is not None and name in patch_size:
            cfg["patch_size"] = list(patch_size[name])
        else:
            cfg["patch_size"] = small_patch(cfg["patch_size"], arch["strides"])
        cfg["batch_size"] = int(batch_size)
    dst = os.path.join(preprocessed_dataset_folder, target + ".json")
    write_json_atomic(new, dst)
    return dst
