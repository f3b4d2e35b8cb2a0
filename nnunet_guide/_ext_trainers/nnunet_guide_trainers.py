"""Thin module for nnU-Net's ``nnUNet_extTrainer`` search: nnU-Net imports every module in this
folder as a top-level name and looks for the trainer class by name. The classes live in
``nnunet_guide.trainers``."""
from nnunet_guide.trainers import *  # noqa: F401,F403
