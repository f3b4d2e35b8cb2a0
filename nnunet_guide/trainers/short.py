"""A short training schedule for CPU runs (tests, the demo, benchmarks), as one mixin."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class ShortSchedule:
    """Mixin (put it first): few epochs and iterations, read from ``NNUNET_GUIDE_EPOCHS``,
    ``NNUNET_GUIDE_ITERS`` and ``NNUNET_GUIDE_VAL_ITERS`` (default 2 x 20, 5 validation
    iterations). ``class nnUNetTrainerXShort(ShortSchedule, nnUNetTrainerX)`` is X's short version.
    The ``__init__`` arguments are spelled out: nnU-Net records them by name for checkpoints."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("NNUNET_GUIDE_EPOCHS", 2))
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_GUIDE_ITERS", 20))
        self.num_val_iterations_per_epoch = int(os.environ.get("NNUNET_GUIDE_VAL_ITERS", 5))


class nnUNetTrainerShort(ShortSchedule, nnUNetTrainer):
    """Plain nnUNetTrainer with the short schedule (the baseline of the ``...Short`` trainers)."""
