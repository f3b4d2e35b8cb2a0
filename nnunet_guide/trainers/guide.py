"""nnUNetTrainerGuide: one model that segments automatically and also takes clicks.

An :class:`~nnunet_guide.trainers.base.nnUNetTrainerExtraChannels` (the layout in the plans, the
network wrapper) whose layout has guide channels, with three small changes to nnU-Net's trainer:
- the training/validation pipelines simulate clicks (:class:`SimulateClicksTransform`, before
  region conversion and deep-supervision downsampling) and ship them as coordinates; the train
  and validation steps render them into guide channels on the training device
  (:meth:`nnUNetTrainerGuide.guided_batch`);
- validation runs twice: ``validation/`` automatic (for find_best_configuration and ensembling)
  and ``validation_guided/`` with seeded simulated clicks.

Variants set one class attribute (``guide_settings``), like nnU-Net's own variants.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from os.path import isdir, isfile, join
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from ..core.clicks import validation_clicks
from ..core.consistency import (click_following_penalty, clicked_object_penalty, consistency_penalty,
                                far_from_guides, samples_with_guides)
from ..core.device_clicks import DEVICE_POLICIES, select_training_clicks
from ..core.device_user import densest_error_clicks, uses_device_user
from ..core.encoding import (append_clicks, num_guide_channels, render_guide_batch, render_guides,
                             unpack_clicks)
from ..core.user_sim import correction_clicks
from ..network import automatic_norm_statistics
from ..settings import ChannelLayout, GuidedTarget, GuideSettings, GuideSettingsError, resolve_targets, write_text_atomic
from ..transforms import (CLICKS_KEY, OBJECTS_KEY, AttachClicksTransform, LabelObjectsTransform,
                          SimulateClicksTransform)
from .base import nnUNetTrainerExtraChannels

try:  # these transforms mark the end of the label-map part of nnU-Net's pipeline
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    _LABEL_CONSUMERS: Tuple[type, ...] = (ConvertSegmentationToRegionsTransform, DownsampleSegForDSTransform)
except ImportError:  # pragma: no cover - older batchgeneratorsv2
    _LABEL_CONSUMERS = ()


#: where training clicks are chosen (``nnUNetTrainerGuide.click_selection``)
CLICK_SELECTIONS = ("loader", "device", "split")

#: the consistency term's automatic output: the tensor, or a callable returning it after the step's forward pass
Reference = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _case_seed(base_seed: int, case_id: str) -> int:
    """A seed per case that is the same in every process and every Python run."""
    return (int(base_seed) * 1_000_003 + zlib.crc32(case_id.encode())) % (2 ** 31 - 1)


def guided_dataset_class(base_cls, layout: ChannelLayout, spacing, slice_axis: Optional[int],
                         ignore_label: Optional[int]):
    """A subclass of an nnU-Net dataset class whose ``load_case`` appends guide channels
    rendered from seeded simulated clicks on the case's (preprocessed) reference."""
    settings = layout.guide
    targets = [t.labels for t in layout.targets]

    class _GuidedValidationDataset(base_cls):
        def load_case(self, identifier):
            data, seg, seg_prev, properties = super().load_case(identifier)
            data = np.asarray(data[:], dtype=np.float32)
            labels = np.asarray(seg[:])[0]
            clicks = validation_clicks(labels, targets, spacing, settings,
                                       _case_seed(settings.validation_seed, identifier),
                                       ignore_label=ignore_label, slice_axis=slice_axis)
            guides = render_guides(clicks, labels.shape, spacing, settings, len(targets), slice_axis=slice_axis)
            properties = dict(properties)
            properties["nnunet_guide_num_clicks"] = len(clicks)
            return np.concatenate((data, guides), axis=0), seg, seg_prev, properties

    _GuidedValidationDataset.__name__ = f"Guided{base_cls.__name__}"
    return _GuidedValidationDataset


class GuideConsistencyLoss(nn.Module):
    """nnU-Net's loss plus the guide terms of the current training batch:

    - ``weight`` x the consistency term (:func:`nnunet_guide.core.consistency.consistency_penalty`),
      when the trainer has set ``reference`` (the guided rows, their automatic output or a callable
      that returns it once the network has run, the far voxels);
    - ``click_weight`` x the click-following term
      (:func:`nnunet_guide.core.consistency.click_following_penalty`), when it has set ``clicks``
      (the batch's packed clicks; ``class_channels``: the output channels of each guided class);
    - ``object_weight`` x the clicked-object term
      (:func:`nnunet_guide.core.consistency.clicked_object_penalty`) on the full-resolution target,
      when it has set ``clicks``.
    - ``automatic_weight`` x nnU-Net's loss on the automatic output of the samples with clicks,
      when it has set ``automatic`` (their rows and a callable returning that output, every
      deep-supervision scale with its graph, once the network has run).

    The trainer sets both around nnU-Net's ``train_step`` only, so validation steps get nnU-Net's
    loss unchanged."""

    def __init__(self, loss: nn.Module, weight: float, regions: bool, click_weight: float = 0.0,
                 class_channels: Sequence[Sequence[int]] = (), object_weight: float = 0.0,
                 ignore_label: Optional[int] = None, min_sigma: float = 2.0, object_negatives: bool = False,
                 automatic_weight: float = 0.0):
        super().__init__()
        self.loss, self.weight, self.regions = loss, float(weight), regions
        self.click_weight, self.class_channels = float(click_weight), [tuple(c) for c in class_channels]
        self.object_weight, self.ignore_label, self.min_sigma = float(object_weight), ignore_label, float(min_sigma)
        self.object_negatives = bool(object_negatives)
        self.automatic_weight = float(automatic_weight)
        self.automatic: Optional[Tuple[torch.Tensor, Callable]] = None
        self.reference: Optional[Tuple[torch.Tensor, Reference, torch.Tensor]] = None
        self.clicks: Optional[torch.Tensor] = None

    def forward(self, output, target):
        loss = self.loss(output, target)
        out = output[0] if isinstance(output, (list, tuple)) else output
        if self.reference is not None:
            rows, automatic, far = self.reference
            automatic = automatic() if callable(automatic) else automatic  # kept by this step's forward pass
            loss = loss + self.weight * consistency_penalty(out[rows], automatic, far, self.regions)
        if self.clicks is not None and self.click_weight > 0:
            loss = loss + self.click_weight * click_following_penalty(out, self.clicks, self.class_channels,
                                                                      self.regions)
        if self.clicks is not None and self.object_weight > 0:
            reference = target[0] if isinstance(target, (list, tuple)) else target
            loss = loss + self.object_weight * clicked_object_penalty(
                out, reference, self.clicks, self.class_channels, self.regions, self.ignore_label, self.min_sigma,
                self.object_negatives)
        if self.automatic is not None and self.automatic_weight > 0:
            rows, prediction = self.automatic
            rows_target = [t[rows] for t in target] if isinstance(target, (list, tuple)) else target[rows]
            loss = loss + self.automatic_weight * self.loss(prediction(), rows_target)
        return loss


class nnUNetTrainerGuide(nnUNetTrainerExtraChannels):
    """nnU-Net trainer with guide channels: positive/negative click maps per guided class,
    simulated from the ground truth and dropped at random (``guide_settings.p_drop``)."""

    guide_settings: GuideSettings = GuideSettings()
    #: run the guided validation pass (validation_guided/) at the end of training
    guided_validation: bool = True
    #: click rows per training sample (the loader stacks samples, so all get the same number;
    #: a simulated scribble is up to 64 clicks; 4096 rows are 144 KiB per 3D sample)
    max_clicks_per_sample: int = 4096
    #: where training clicks are chosen: "loader" (nnU-Net's augmentation workers, numpy/scipy; the
    #: clicks travel in the batch as coordinates) or "device" (the train/validation step, torch, on
    #: the training device; the loader stays plain nnU-Net's). Measured on an H100
    #: (benchmarks/bench_pipeline_overhead.py): choosing on the device costs 8-19 ms of every step,
    #: in the loader 1.5-5 ms of one worker's batch, so "loader" is the default; "device" suits
    #: machines with few CPU cores per GPU. "split": the loader drops guides and labels the guided
    #: classes' objects of the samples it keeps (cc3d, the cheap half of choosing) and ships them as
    #: one int16 map, and the step chooses the clicks from them with the device's torch code (no
    #: labelling there; about 350 small torch operations per batch). Region-based datasets,
    #: the "interior" click policy and simulated boxes/scribbles need "loader".
    click_selection: str = "loader"

    # ---- layout -------------------------------------------------------------------------
    def guided_targets(self) -> List[GuidedTarget]:
        if self.guide_settings is None:
            raise GuideSettingsError(f"{type(self).__name__}: a guide trainer needs guide_settings (a trainer "
                                     f"without guides derives from nnUNetTrainerExtraChannels)")
        targets = resolve_targets(self.dataset_json, self.guide_settings.guided_labels, self.label_manager.ignore_label)
        if not targets:
            raise GuideSettingsError("this dataset has no foreground class to guide (dataset.json 'labels')")
        return targets

    # ---- data pipeline ------------------------------------------------------------------
    @property
    def _patch_spacing(self) -> Tuple[float, ...]:
        return tuple(float(s) for s in self.configuration_manager.spacing)

    @property
    def selects_clicks_on_device(self) -> bool:
        g = self.layout.guide
        unsupported = ("region-based datasets" if self.label_manager.has_regions else
                       f"click policy {g.click_policy!r}" if g.click_policy not in DEVICE_POLICIES else
                       "simulated boxes and scribbles (p_box, p_scribble)" if g.p_box or g.p_scribble else None)
        if self.click_selection not in CLICK_SELECTIONS:
            raise GuideSettingsError(f"click_selection must be one of {', '.join(CLICK_SELECTIONS)}, got "
                                     f"{self.click_selection!r}")
        if unsupported is not None:
            if self.click_selection != "loader":
                raise GuideSettingsError(f"click_selection={self.click_selection!r} is not available for {unsupported}; "
                                         f"use 'loader'")
            return False
        return self.click_selection != "loader"

    @property
    def labels_objects_in_loader(self) -> bool:
        """``click_selection = "split"``: the loader ships the objects, the step chooses the clicks."""
        return self.selects_clicks_on_device and self.click_selection == "split"

    def _click_generator(self) -> torch.Generator:
        """The torch generator of clicks chosen on the device, seeded from numpy's global state
        (which differs per DDP rank and per run, as nnU-Net's own augmentation randomness does)."""
        if getattr(self, "_click_gen", None) is None:
            self._click_gen = torch.Generator(device=self.device).manual_seed(int(np.random.randint(0, 2 ** 31 - 1)))
        return self._click_gen

    def _with_guides(self, composed):
        targets = [t.labels for t in self.layout.targets]
        if self.labels_objects_in_loader:
            guide, key = LabelObjectsTransform(targets, self.layout.guide.connectivity, self.label_manager.ignore_label,
                                               p_drop=self.layout.guide.p_drop), OBJECTS_KEY
        elif self.selects_clicks_on_device:
            return composed  # the loader stays plain nnU-Net's
        else:
            guide, key = SimulateClicksTransform(self.layout.guide, targets, self._patch_spacing,
                                                 capacity=self.max_clicks_per_sample,
                                                 ignore_label=self.label_manager.ignore_label), CLICKS_KEY
        transforms = composed.transforms
        at = next((i for i, t in enumerate(transforms) if isinstance(t, _LABEL_CONSUMERS)), len(transforms))
        transforms.insert(at, guide)
        transforms.append(AttachClicksTransform(key))
        return composed

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        return self._with_guides(super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm, is_cascaded, foreground_labels, regions, ignore_label))

    def get_validation_transforms(self, deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None):
        return self._with_guides(super().get_validation_transforms(
            deep_supervision_scales, is_cascaded, foreground_labels, regions, ignore_label))

    # ---- guides rendered on the training device -------------------------------------------
    def guided_batch(self, batch: dict) -> dict:
        """A loader batch as the network and the loss take it, with guide channels rendered on
        ``self.device`` (``data`` becomes image + guide channels, on the device; ``clicks`` holds
        the packed clicks, on the CPU). The clicks come off the end of ``batch["target"]``
        (chosen in the loader) or are chosen here from the full-resolution target (chosen on the
        device, see ``click_selection``), from the objects at the end of ``batch["target"]`` when
        the loader labelled them ("split")."""
        target, objects = batch["target"], None
        if self.labels_objects_in_loader:
            scales = self._get_deep_supervision_scales() if self.enable_deep_supervision else None
            if not isinstance(target, list) or len(target) != (len(scales) if scales else 1) + 1 \
                    or target[-1].dtype != torch.int16:
                raise RuntimeError("this batch carries no object map: it did not come through the guide trainer's "
                                   "data pipeline (LabelObjectsTransform + AttachClicksTransform)")
            objects = target[-1][:, 0].to(self.device, non_blocking=True)
            target = target[:-1] if self.enable_deep_supervision else target[0]
        if self.selects_clicks_on_device:
            target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                else target.to(self.device, non_blocking=True)
            labels = (target[0] if isinstance(target, list) else target)[:, 0]
            clicks = select_training_clicks(labels, [t.labels for t in self.layout.targets], self.layout.guide,
                                            self._click_generator(), self.label_manager.ignore_label,
                                            capacity=self.max_clicks_per_sample, spacing=self._patch_spacing,
                                            objects=objects)
        else:
            if not isinstance(target, list) or target[-1].ndim != 3:
                raise RuntimeError("this batch carries no packed clicks: it did not come through the guide trainer's "
                                   "data pipeline (SimulateClicksTransform + AttachClicksTransform)")
            clicks = target[-1]  # stays on the CPU: the renderer plans there and sends the device a few kernels
            target = target[:-1] if self.enable_deep_supervision else target[0]
        image = batch["data"].to(self.device, non_blocking=True)
        n_img, n_guide = image.shape[1], num_guide_channels(len(self.layout.targets), self.layout.guide.negatives)
        data = torch.empty((image.shape[0], n_img + n_guide, *image.shape[2:]), dtype=image.dtype, device=self.device)
        data[:, :n_img] = image
        render_guide_batch(clicks, image.shape[2:], self._patch_spacing[-(image.ndim - 2):], self.layout.guide,
                           len(self.layout.targets), out=data[:, n_img:])
        return {**batch, "data": data, "target": target, "clicks": clicks}

    def train_step(self, batch: dict) -> dict:
        batch = self.guided_batch(batch)
        if self.layout.guide.p_correction > 0:
            self.add_correction_clicks(batch)
        terms = isinstance(self.loss, GuideConsistencyLoss)
        if terms:
            g = self.layout.guide
            self.loss.reference = self.automatic_reference(batch) if g.consistency_weight > 0 else None
            self.loss.clicks = batch["clicks"] if g.click_weight > 0 or g.object_weight > 0 else None
            self.loss.automatic = self.automatic_prediction(batch) if g.automatic_weight > 0 else None
        try:
            return super().train_step(batch)
        finally:
            if terms:
                self.loss.reference = self.loss.clicks = self.loss.automatic = None
            stats = automatic_norm_statistics(self.network)
            if stats is not None:  # the step's automatic pass, and the graph it holds, go now
                stats.release()

    def _build_loss(self):
        loss = super()._build_loss()
        g = self.layout.guide
        if g.consistency_weight <= 0 and g.click_weight <= 0 and g.object_weight <= 0 and g.automatic_weight <= 0:
            return loss
        return GuideConsistencyLoss(loss, g.consistency_weight, self.label_manager.has_regions, g.click_weight,
                                    self.class_channels(), g.object_weight, self.label_manager.ignore_label,
                                    g.min_object_sigma, g.object_negatives, g.automatic_weight)

    def class_channels(self) -> List[Tuple[int, ...]]:
        """Per guided class, the network's output channels that make it up: its label values
        (softmax output, one channel per label), or the channel of the region with exactly its
        labels (region-based training; a guided class that is no region is refused)."""
        lm = self.label_manager
        if not lm.has_regions:
            return [tuple(int(v) for v in t.labels) for t in self.layout.targets]
        regions = [tuple(sorted(int(v) for v in np.atleast_1d(r))) for r in lm.foreground_regions]
        out = []
        for t in self.layout.targets:
            want = tuple(sorted(int(v) for v in t.labels))
            if want not in regions:
                raise GuideSettingsError(f"click_weight or object_weight > 0: guided class {t.name!r} (labels "
                                         f"{list(want)}) is none of this dataset's regions {[list(r) for r in regions]}")
            out.append((regions.index(want),))
        return out

    @torch.no_grad()
    def automatic_reference(self, batch: dict) -> Optional[Tuple[torch.Tensor, Reference, torch.Tensor]]:
        """For the consistency term: the guided samples of a :meth:`guided_batch` (indices: those
        whose guide channels hold a guide anywhere, the rule the network's automatic statistics use,
        so both pick the same samples), the network's automatic output of them (guides removed, full
        resolution, no gradient) and the voxels no guide reaches; None when no sample has a guide.
        With automatic norm statistics the training step's forward pass computes that output anyway
        (it records their statistics), so the output is a callable that takes it from there after
        the pass, not a second pass."""
        guides, rows = self._guided_rows(batch)
        if rows.numel() == 0:
            return None
        no_guide = self.layout.guide.no_guide_value
        far = far_from_guides(batch["data"][:, guides][rows], no_guide)
        stats = automatic_norm_statistics(self.network)
        if stats is not None:  # no copy of the samples, no pass here
            return rows, lambda: stats.automatic_output(rows).float(), far
        data = batch["data"][rows]
        data[:, guides] = no_guide
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = self.network(data)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return rows, out.float(), far

    def automatic_prediction(self, batch: dict) -> Optional[Tuple[torch.Tensor, Callable]]:
        """For the automatic-mode loss: the samples of a :meth:`guided_batch` with a guide (the
        rows the network's automatic statistics take) and a callable returning their automatic
        output, every deep-supervision scale with its graph, from the training step's own forward
        pass (which computes it to record their statistics); None when no sample has a guide."""
        rows = self._guided_rows(batch)[1]
        if rows.numel() == 0:
            return None
        stats = automatic_norm_statistics(self.network)
        return rows, lambda: stats.automatic_prediction(rows)

    def _guided_rows(self, batch: dict) -> Tuple[slice, torch.Tensor]:
        """The guide channels of a :meth:`guided_batch`'s ``data`` and the samples whose guides hold
        a guide anywhere (the rule the network's automatic statistics use to pick their samples)."""
        guides = slice(self.layout.guide_channel_indices[0], self.layout.guide_channel_indices[-1] + 1)
        return guides, samples_with_guides(batch["data"][:, guides], self.layout.guide.no_guide_value)

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self.guided_batch(batch))

    # ---- correction clicks (iterative click simulation) ---------------------------------
    def _label_maps(self, output: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predicted and reference label maps (B, *spatial), int64 on ``output``'s device, of a
        full-resolution output/target."""
        lm = self.label_manager
        target = target.to(output.device, non_blocking=True)
        if not lm.has_regions:
            return output.argmax(1), target[:, 0].round().long()
        pred = torch.zeros((output.shape[0], *output.shape[2:]), dtype=torch.long, device=output.device)
        ref = torch.zeros_like(pred)
        for i, value in enumerate(lm.regions_class_order):  # nnU-Net's own region -> label rule
            pred[output[:, i] > 0] = value
            ref[target[:, i] > 0.5] = value
        return pred, ref

    @torch.no_grad()
    def add_correction_clicks(self, batch: dict, rng: Optional[np.random.Generator] = None) -> List[List]:
        """Add the simulated user's correction clicks to a :meth:`guided_batch` (in place: its
        ``clicks`` and the guide channels of its ``data``), for samples drawn with probability
        ``p_correction``: predict the chosen samples with their current guides, click the largest
        error of each guided class (``correction_user``: on the device, or the evaluation's user on
        the CPU), re-render their guides with the same renderer, repeat for U{1..correction_rounds}
        rounds. Returns the clicks added per sample."""
        g = self.layout.guide
        rng = rng if rng is not None else np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        data = batch["data"]
        chosen = np.flatnonzero(rng.random(data.shape[0]) < g.p_correction)
        added: List[List] = [[] for _ in range(data.shape[0])]
        if chosen.size == 0:
            return added
        if self.label_manager.has_regions and self.label_manager.has_ignore_label:
            raise GuideSettingsError("p_correction > 0 is not supported for region-based datasets with an ignore "
                                     "label (the reference label map cannot be rebuilt from the region targets)")
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        gi = self.layout.guide_channel_indices
        g_lo, g_hi = gi[0], gi[-1] + 1
        targets = [t.labels for t in self.layout.targets]
        shape = tuple(data.shape[2:])
        spacing = self._patch_spacing[-(data.ndim - 2):]
        sel = torch.from_numpy(chosen).to(data.device)
        ref_target = target[sel.to(target.device)].to(data.device, non_blocking=True)  # once, not per round
        on_device = uses_device_user(g)
        was_training = self.network.training
        self.network.eval()
        try:
            for _ in range(int(rng.integers(1, g.correction_rounds + 1))):
                with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
                        else dummy_context():
                    out = self.network(data[sel])  # the chosen samples only
                out = out[0] if isinstance(out, (list, tuple)) else out
                pred, ref = self._label_maps(out.float(), ref_target)
                ignore = self.label_manager.ignore_label
                if on_device:  # the clicks come back as a few numbers, not the label maps
                    rows = densest_error_clicks(pred, ref, targets, spacing, g, ignore).cpu()
                    new_clicks = [unpack_clicks(r) for r in rows]
                else:
                    pred, ref = pred.cpu().numpy(), ref.cpu().numpy()
                    new_clicks = [correction_clicks(p, r, targets, spacing, g, ignore) for p, r in zip(pred, ref)]
                for b, new in zip(chosen, new_clicks):
                    batch["clicks"] = append_clicks(batch["clicks"], int(b), new)
                    added[b] += new
                data[sel, g_lo:g_hi] = render_guide_batch(batch["clicks"][torch.from_numpy(chosen)], shape, spacing, g,
                                                          len(targets), device=data.device)
        finally:
            self.network.train(was_training)
        return added

    # ---- validation ---------------------------------------------------------------------
    def perform_actual_validation(self, save_probabilities: bool = False):
        guided_dice = None
        if self.guided_validation:
            guided_dice = self._guided_validation(save_probabilities)
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            auto = self._summary_dice(join(self.output_folder, "validation", "summary.json"))
            self.print_to_log_file(f"Automatic validation Dice (no clicks): {auto}", also_print_to_console=True)
            if guided_dice is not None:
                self.print_to_log_file(f"Guided validation Dice (one simulated click per object, seed "
                                       f"{self.layout.guide.validation_seed}): {guided_dice}",
                                       also_print_to_console=True)

    @staticmethod
    def _summary_dice(path: str) -> Optional[float]:
        if not isfile(path):
            return None
        with open(path) as f:
            return json.load(f)["foreground_mean"]["Dice"]

    def _guided_validation(self, save_probabilities: bool) -> Optional[float]:
        """nnU-Net's validation with guide channels appended to every case, into validation_guided/."""
        fold_folder = self.output_folder
        staging = join(fold_folder, ".validation_guided_staging")
        final = join(fold_folder, "validation_guided")
        if self.local_rank == 0 and isdir(staging):
            shutil.rmtree(staging)  # a stale staging folder of an interrupted run
        if self.is_ddp:  # no rank may write into the staging folder before rank 0 has cleared it
            torch.distributed.barrier()
        is_2d = len(self.configuration_manager.patch_size) == 2
        spacing = (1.0, *self._patch_spacing) if is_2d else self._patch_spacing
        original_dataset_class = self.dataset_class
        self.dataset_class = guided_dataset_class(original_dataset_class, self.layout, spacing,
                                                  0 if is_2d else None, self.label_manager.ignore_label)
        self.output_folder = staging  # nnU-Net writes into <output_folder>/validation
        self.print_to_log_file("Guided validation: simulated clicks, one per object", also_print_to_console=True)
        try:
            nnUNetTrainer.perform_actual_validation(self, save_probabilities)
        finally:
            self.output_folder = fold_folder
            self.dataset_class = original_dataset_class
        if self.is_ddp:
            torch.distributed.barrier()
        if self.local_rank != 0:
            return None
        # the summary names files by the staging path; point it at the final folder (atomically,
        # still inside the staging folder)
        staged, summary = join(staging, "validation"), join(final, "summary.json")
        if isfile(join(staged, "summary.json")):
            with open(join(staged, "summary.json")) as f:
                text = f.read().replace(staged, final)
            write_text_atomic(text, join(staged, "summary.json"))
        # swap in the finished folder only now, and never delete the old results before the new ones
        # are in place: the old folder is renamed aside, the new one renamed into place, then the old
        # one deleted (an interruption leaves either validation_guided/ or .validation_guided_old_*)
        old = None
        if isdir(final):
            old = join(fold_folder, f".validation_guided_old_{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        try:
            os.replace(staged, final)
        except BaseException:
            if old is not None and not isdir(final):
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        dice = self._summary_dice(summary)
        if dice is not None:
            self.logger.log_summary("final_val_guided/foreground_dice", dice)
        return dice
