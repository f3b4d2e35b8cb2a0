"""One rank of a 2-process torch.distributed (gloo, CPU) run of nnUNetTrainerGuide.

Started twice by tests/test_ddp_gloo.py (not a test module itself). nnU-Net's DDP path assumes
CUDA; exactly two things are patched here, both nnU-Net's device selection:

1. ``nnUNetTrainer.__init__`` sets ``self.device = cuda:<rank>`` whenever torch.distributed is
   initialised: the subclass below puts it back to the CPU (and drops the CUDA grad scaler that
   follows from that device);
2. ``initialize()`` wraps the network as ``DDP(network, device_ids=[rank])``: ``device_ids`` is
   dropped (DDP requires ``None`` for CPU modules).

Everything else (the split of validation cases across ranks, nnU-Net's barriers, rank 0 writing
the summary) is nnU-Net's and nnunet_guide's own code. ``torch.distributed.barrier`` is wrapped
only to observe when rank 1 first waits at a barrier (a marker file); it still synchronises.

Usage: ddp_harness.py RANK WORLD_SIZE PORT PREPROCESSED_FOLDER PLANS OUTPUT_FOLD RESULT_JSON
"""
import hashlib
import json
import os
import sys
import time


def digest(t) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    preprocessed, plans_name, out_fold, result_path = sys.argv[4:8]
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from torch.nn.parallel import DistributedDataParallel

    def ddp_on_cpu(module, device_ids=None, **kwargs):   # patch 2: no device_ids for CPU modules
        return DistributedDataParallel(module, **kwargs)
    nnunet_trainer_module.DDP = ddp_on_cpu

    import helpers as T
    from nnunet_guide.settings import GuideSettings
    from nnunet_guide.trainers import nnUNetTrainerGuide
    from nnunet_guide.trainers.guide import guided_dataset_class

    class nnUNetTrainerGuideGlooCPU(nnUNetTrainerGuide):
        # never dropped: with one sample per rank, p_drop 0.5 left both ranks' first batch unguided
        # in about a quarter of runs, and the per-rank click check had nothing to compare
        guide_settings = GuideSettings(p_drop=0.0)

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):   # nnU-Net records these names
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.device, self.grad_scaler = torch.device("cpu"), None   # patch 1: nnU-Net picked cuda:<rank>

    marker = os.path.join(os.path.dirname(result_path), f"rank{rank}_first_barrier")
    real_barrier = dist.barrier

    def observed_barrier(*args, **kwargs):
        if not os.path.exists(marker):
            open(marker, "w").close()
        return real_barrier(*args, **kwargs)
    dist.barrier = observed_barrier

    tr = T.make_trainer(nnUNetTrainerGuideGlooCPU, preprocessed, plans_name, "3d_fullres", fold=0)
    tr.initialize()
    assert tr.is_ddp and tr.local_rank == rank and tr.device.type == "cpu"
    tr.output_folder = out_fold
    tr.log_file = os.path.join(os.path.dirname(result_path), f"log_rank{rank}.txt")
    result = {"rank": rank, "batch_size": tr.batch_size}

    # per-rank click randomness: the guide channels of this rank's first training batch
    dl_tr, _ = tr.get_dataloaders()
    batch = tr.guided_batch(next(dl_tr))  # clicks travel as coordinates; the step renders them
    n_img = tr.layout.num_image_channels
    result["train_guides"] = digest(batch["data"][:, n_img:])
    result["train_guides_nonzero"] = bool((batch["data"][:, n_img:] != tr.layout.guide.no_guide_value).any())
    # guided validation clicks are seeded per case: the same on every rank
    _, val_keys = tr.do_split()
    result["val_keys"] = sorted(val_keys)
    cls = guided_dataset_class(tr.dataset_class, tr.layout, tr._patch_spacing, None, tr.label_manager.ignore_label)
    data = cls(tr.preprocessed_dataset_folder, [sorted(val_keys)[0]]).load_case(sorted(val_keys)[0])[0]
    result["val_guides"] = digest(torch.as_tensor(data[n_img:]))

    if rank == 0:   # rank 0 is the slow one: it starts the guided validation only once rank 1 waits at a barrier
        other = os.path.join(os.path.dirname(result_path), "rank1_first_barrier")
        deadline = time.time() + 240
        while not os.path.exists(other) and time.time() < deadline:
            time.sleep(0.05)
    result["returned"] = tr._guided_validation(False)
    with open(result_path, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
