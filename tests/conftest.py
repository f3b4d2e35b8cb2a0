"""Shared fixtures: a tiny real nnU-Net dataset, planned and preprocessed by nnU-Net's own command."""
import os

# nnU-Net's validation exports and scores in worker pools of nnUNet_def_n_proc `spawn` processes
# (default 8), each importing torch and nnU-Net again: on a 2-core machine that start-up was most
# of a tiny training's validation. One worker is plenty for the tests' few tiny cases. Set before
# anything imports nnU-Net, and inherited by every command the tests run.
os.environ.setdefault("nnUNet_def_n_proc", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers as T  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks on a shared CPU: one thread is ~100x faster than contended threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_nnunet(tmp_path_factory):
    """Synthetic organ+lesion CT phantom (6 cases), planned for 3d_fullres and 2d, with a small
    derived plans file ``nnUNetPlans_small``. Returns a dict with ``env`` (nnU-Net folders set,
    our trainers registered), ``root``, ``dataset_id``, ``preprocessed`` and ``raw`` folders."""
    root = str(tmp_path_factory.mktemp("nnunet"))
    env = T.nnunet_env(root, {"NNUNET_GUIDE_EPOCHS": "1", "NNUNET_GUIDE_ITERS": "3", "NNUNET_GUIDE_VAL_ITERS": "1"})
    raw = T.write_synthetic_dataset(env["nnUNet_raw"], 901, num_cases=6, shape=(16, 32, 32))
    T.plan_and_preprocess(901, env, ("3d_fullres", "2d"))
    pp = os.path.join(env["nnUNet_preprocessed"], "Dataset901_GuideSynthetic")
    T.derive_small_plans(pp, batch_size=2)
    return {"env": env, "root": root, "dataset_id": 901, "preprocessed": pp, "raw": raw}


@pytest.fixture()
def nnunet_paths(tiny_nnunet, monkeypatch):
    """The tiny dataset's nnU-Net folders in this process's environment (nnU-Net reads them lazily)."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(k, tiny_nnunet["env"][k])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return tiny_nnunet
