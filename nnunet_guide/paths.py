"""Where things are: nnU-Net dataset folder names, the project's real-scan folder, and the
folder through which nnU-Net finds this package's trainers by name.

No nnU-Net import: this module only builds names and reads the environment.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, Iterator, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
#: nnU-Net looks up trainers by class name in the folders of this environment variable
EXT_TRAINER_VAR = "nnUNet_extTrainer"


class DatasetNameError(ValueError):
    """A dataset id or name nnU-Net cannot use, or an id that names several folders."""


class DatasetNotFoundError(DatasetNameError):
    """No folder of the dataset asked for."""


def shared_data_dir() -> Optional[str]:
    """The project's real-scan folder (``$NNUNET_GUIDE_SHARED_DATA``, or ``../shared/data`` beside
    the repository); None when it is not there (a user's clone)."""
    cand = os.environ.get("NNUNET_GUIDE_SHARED_DATA") or os.path.join(REPO_ROOT, "..", "shared", "data")
    return os.path.abspath(cand) if os.path.isdir(cand) else None


def dataset_prefix(dataset_id: int) -> str:
    """``DatasetXXX_``: how nnU-Net's dataset folders start."""
    return f"Dataset{int(dataset_id):03d}_"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name of a dataset, ``DatasetXXX_NAME`` (id 1..999; letters, digits, ``_``
    and ``-`` in the name)."""
    if not (0 < int(dataset_id) < 1000):
        raise DatasetNameError(f"dataset id must be in 1..999 (nnU-Net's DatasetXXX), got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise DatasetNameError(f"dataset name {name!r} may only hold letters, digits, '_' and '-'")
    return dataset_prefix(dataset_id) + name


def find_dataset_folder(root: str, dataset) -> str:
    """The folder name under ``root`` of a dataset given by id (``4``, ``"004"``) or full name.
    Raises :class:`DatasetNotFoundError` when there is none, :class:`DatasetNameError` when the id
    is ambiguous; both name ``root``."""
    dataset = str(dataset)
    if os.path.isdir(os.path.join(root, dataset)):
        return dataset
    if dataset.isdigit():
        prefix = dataset_prefix(int(dataset))
        names = sorted(d for d in os.listdir(root) if d.startswith(prefix)
                       and os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
        if len(names) == 1:
            return names[0]
        if len(names) > 1:
            raise DatasetNameError(f"several datasets with id {dataset} in {root}: {names}")
        raise DatasetNotFoundError(f"no dataset with id {dataset} in {root} (expected a folder {prefix}NAME)")
    raise DatasetNotFoundError(f"no dataset {dataset!r} in {root}")


# ---- trainer discovery ---------------------------------------------------------------------
def ext_trainer_folder() -> str:
    """The folder holding the thin module nnU-Net's trainer search imports (``_ext_trainers``)."""
    return os.path.join(PACKAGE_DIR, "_ext_trainers")


def trainer_search_path(current: str = "") -> str:
    """``nnUNet_extTrainer`` with this package's trainer folder first, other folders kept."""
    folder = ext_trainer_folder()
    parts = [p for p in current.split(os.pathsep) if p and p != folder]
    return os.pathsep.join([folder] + parts)


@contextlib.contextmanager
def scoped_environ(updates: Dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them (nnU-Net reads
    its folders and switches from the environment when it needs them)."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trainers_visible() -> "contextlib.AbstractContextManager[None]":
    """Make this package's trainers findable by nnU-Net for the duration of the block.

    nnU-Net finds a trainer class by name (``recursive_find_trainer_class_by_name``, used when a
    model folder is loaded) and its only extension point for classes outside its own package is
    the ``nnUNet_extTrainer`` environment variable, read at lookup time. So the variable is set
    for the block only, and restored afterwards.
    """
    return scoped_environ({EXT_TRAINER_VAR: trainer_search_path(os.environ.get(EXT_TRAINER_VAR, ""))})


def ensure_trainers_discoverable() -> None:
    """Register the trainers for the rest of this process (what ``eval "$(nnUNetv2_guide_env)"``
    does for a shell): for scripts that run nnU-Net's own predictor or trainer in process. The
    package's own code scopes this with :func:`trainers_visible` instead."""
    os.environ[EXT_TRAINER_VAR] = trainer_search_path(os.environ.get(EXT_TRAINER_VAR, ""))
