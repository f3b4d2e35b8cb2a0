"""Multi-process training code paths, as far as a CPU allows: two real ranks (torch.distributed,
gloo backend) run nnUNetTrainerGuide's per-rank parts through tests/ddp_harness.py.

Only nnU-Net's device selection is patched in the harness (cuda:<rank> -> cpu, and no DDP
device_ids); see its docstring. Checked: the ranks draw different training clicks, guided
validation clicks are the same on every rank, the validation cases are split across the ranks and
all end up in validation_guided/ (a stale staging folder is cleared before any rank writes), and
only rank 0 writes and reports the summary.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

import helpers as T

HARNESS = os.path.join(os.path.dirname(__file__), "ddp_harness.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_guided_validation_and_click_randomness(nnunet_paths, tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from nnunet_guide.trainers import nnUNetTrainerGuide
    pp = nnunet_paths["preprocessed"]
    T.make_trainer(nnUNetTrainerGuide, pp, "nnUNetPlans_small").do_split()   # splits_final.json before the ranks
    fold = tmp_path / "fold_0"
    stale = fold / ".validation_guided_staging" / "validation"
    stale.mkdir(parents=True)
    (stale / "stale_case.nii.gz").write_bytes(b"left by an interrupted run")
    env = dict(os.environ, **{k: nnunet_paths["env"][k] for k in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                     "nnUNet_results", "nnUNet_extTrainer")},
               nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", OMP_NUM_THREADS="1", nnUNet_compile="false")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, HARNESS, str(r), "2", str(port), pp, "nnUNetPlans_small", str(fold),
                               str(tmp_path / f"rank{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=480)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-4000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["batch_size"] == r1["batch_size"] == 1              # nnU-Net split the global batch of 2
    # per-rank randomness: each rank simulates its own training clicks
    assert r0["train_guides_nonzero"] or r1["train_guides_nonzero"]
    assert r0["train_guides"] != r1["train_guides"]
    # guided validation clicks are seeded per case, so every rank renders the same guides
    assert r0["val_guides"] == r1["val_guides"]
    # the cases were split across ranks, and every one reached validation_guided/
    val_keys = r0["val_keys"]
    assert val_keys == r1["val_keys"] and len(val_keys) >= 2
    final = fold / "validation_guided"
    assert sorted(f for f in os.listdir(final) if f.endswith(".nii.gz")) == [f"{k}.nii.gz" for k in val_keys]
    summary = json.loads((final / "summary.json").read_text())
    assert sorted(os.path.basename(c["prediction_file"]) for c in summary["metric_per_case"]) == \
        [f"{k}.nii.gz" for k in val_keys]
    assert all(c["prediction_file"].startswith(str(final) + os.sep) for c in summary["metric_per_case"])
    # rank 0 reports the summary, rank 1 returns nothing; no staging or old folders are left
    assert r0["returned"] == pytest.approx(summary["foreground_mean"]["Dice"]) and r1["returned"] is None
    assert sorted(os.listdir(fold)) == ["validation_guided"]
