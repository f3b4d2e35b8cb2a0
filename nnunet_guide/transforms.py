"""batchgeneratorsv2 adapters: clicks simulated from the augmented segmentation, shipped as coordinates.

The data loader only chooses clicks; it never renders them. Dense guide channels exist only on
the training device, where the trainer renders them (:func:`nnunet_guide.core.encoding.render_guide_batch`)
at the start of each train/validation step. So guides add no full-size channel to the CPU
pipeline, to the worker queues or to pinned memory: a sample's clicks are one (K, 3 + 2 * ndim)
float tensor.

Two transforms, because nnU-Net's loader collates only ``image`` and ``segmentation``:
- :class:`SimulateClicksTransform` sits after the spatial and intensity augmentations and before
  region conversion and deep-supervision downsampling (it needs the augmented plain label map);
  it stores the sample's packed clicks under the key ``guide_clicks``;
- :class:`AttachClicksTransform` ends the pipeline: it appends the packed clicks to the
  ``segmentation`` list (making it a list when deep supervision is off), so nnU-Net's own loader
  stacks them into ``batch["target"][-1]`` of shape (B, K, 3 + 2 * ndim), through its worker
  processes and pin-memory thread unchanged. The trainer takes them off again before the loss
  sees the target (:meth:`nnunet_guide.trainers.guide.nnUNetTrainerGuide.guided_batch`).

With ``click_selection = "split"`` the loader only drops guides and labels the objects:
:class:`LabelObjectsTransform` takes the place of :class:`SimulateClicksTransform` and ships one
int16 object map per sample the same way, and the step chooses the clicks from it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from .core.clicks import DROPPED_OBJECTS, object_map, sample_training_clicks
from .core.encoding import pack_clicks
from .settings import GuideSettings, GuideSettingsError

#: the data_dict key the packed clicks travel under between the two transforms
CLICKS_KEY = "guide_clicks"
#: the data_dict key of the guided classes' object map (:class:`LabelObjectsTransform`)
OBJECTS_KEY = "guide_objects"


class SimulateClicksTransform(BasicTransform):
    """Simulate one sample's clicks from ``segmentation[seg_channel]`` and store them packed
    (:func:`nnunet_guide.core.encoding.pack_clicks`, ``capacity`` rows) under ``guide_clicks``.

    Args:
        settings: the model's GuideSettings.
        targets: per guided class, its label value(s) (in layout order).
        spacing: voxel size (mm) of the patch axes (the configuration's spacing; for a 2D patch
            the last two values).
        capacity: click rows per sample (all samples of a batch need the same number to be
            stacked); a sample with more clicks raises GuideSettingsError.
        ignore_label: never clicked, never part of an object.
        seg_channel: which segmentation channel holds the label map.

    Randomness: a seed is drawn from numpy's global generator (which nnU-Net's augmenter seeds
    per worker, like every other batchgenerators transform), then all clicks of the sample come
    from ``numpy.random.default_rng(seed)``; ``get_parameters`` returns the clicks so the random
    half (which clicks) and the deterministic half (render them) can be tested apart.
    """

    def __init__(self, settings: GuideSettings, targets: Sequence[Tuple[int, ...]], spacing: Sequence[float],
                 capacity: int = 256, ignore_label: Optional[int] = None, seg_channel: int = 0):
        super().__init__()
        self.settings = settings
        self.targets = [tuple(int(v) for v in t) for t in targets]
        self.spacing = tuple(float(s) for s in spacing)
        self.capacity = int(capacity)
        self.ignore_label = ignore_label
        self.seg_channel = seg_channel

    def get_parameters(self, **data_dict) -> dict:
        seg = data_dict["segmentation"][self.seg_channel]
        seg = seg.numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
        spacing = self.spacing[-seg.ndim:]
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        clicks = sample_training_clicks(seg, self.targets, spacing, self.settings, rng,
                                        ignore_label=self.ignore_label)
        if len(clicks) > self.capacity:
            raise GuideSettingsError(
                f"a training sample got {len(clicks)} simulated clicks, more than the {self.capacity} click rows "
                f"per sample; raise the trainer's max_clicks_per_sample")
        return {"clicks": clicks, "spacing": spacing}

    def apply(self, data_dict, **params):
        ndim = data_dict["segmentation"].ndim - 1
        data_dict[CLICKS_KEY] = pack_clicks(params["clicks"], ndim, self.capacity)
        return data_dict


class LabelObjectsTransform(BasicTransform):
    """The objects of the guided classes of ``segmentation[seg_channel]``, as one (1, *spatial)
    int16 map (:func:`nnunet_guide.core.clicks.object_map`) under ``guide_objects``: the labelling
    half of :class:`SimulateClicksTransform`, for trainers that choose the clicks themselves on
    the training device from these objects (``click_selection = "split"``).

    The sample's guides are dropped here, with probability ``p_drop`` (numpy's global generator,
    seeded per worker by nnU-Net's augmenter, as in :class:`SimulateClicksTransform`): a dropped
    sample is not labelled (half the labelling at nnU-Net's default of ``p_drop`` 0.5), and its map
    is :data:`nnunet_guide.core.clicks.DROPPED_OBJECTS` everywhere, so the step gives it no click.

    Args:
        targets: per guided class, its label value(s) (in layout order; disjoint).
        connectivity: as ``GuideSettings.connectivity``.
        ignore_label: never part of an object.
        seg_channel: which segmentation channel holds the label map.
        p_drop: as ``GuideSettings.p_drop``.
    """

    def __init__(self, targets: Sequence[Tuple[int, ...]], connectivity: int = 2, ignore_label: Optional[int] = None,
                 seg_channel: int = 0, p_drop: float = 0.0):
        super().__init__()
        self.targets = [tuple(int(v) for v in t) for t in targets]
        self.connectivity = int(connectivity)
        self.ignore_label = ignore_label
        self.seg_channel = seg_channel
        self.p_drop = float(p_drop)

    def get_parameters(self, **data_dict) -> dict:
        return {"dropped": bool(self.p_drop > 0 and np.random.uniform() < self.p_drop)}

    def apply(self, data_dict, **params):
        seg = data_dict["segmentation"][self.seg_channel]
        seg = seg.numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
        if params["dropped"]:
            objects = np.full(seg.shape, DROPPED_OBJECTS, np.int16)
        else:
            try:
                objects = object_map(seg, self.targets, self.connectivity, self.ignore_label)
            except ValueError as e:
                raise GuideSettingsError(str(e)) from e
        data_dict[OBJECTS_KEY] = torch.from_numpy(objects)[None]
        return data_dict


class AttachClicksTransform(BasicTransform):
    """Move what the guide transforms stored under ``key`` (the packed clicks, ``guide_clicks``, or
    the object map, ``guide_objects``) to the end of the ``segmentation`` list, the one per-sample
    value besides ``image`` that nnU-Net's loader collates."""

    def __init__(self, key: str = CLICKS_KEY):
        super().__init__()
        self.key = key

    def apply(self, data_dict, **params):
        value = data_dict.pop(self.key)
        seg = data_dict["segmentation"]
        data_dict["segmentation"] = (list(seg) if isinstance(seg, (list, tuple)) else [seg]) + [value]
        return data_dict
