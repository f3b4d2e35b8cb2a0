"""batchgeneratorsv2 adapter: guide channels rendered from the augmented segmentation.

The transform sits after nnU-Net's spatial and intensity augmentations (so guides are aligned
with the augmented image and untouched by intensity changes) and before region conversion and
deep-supervision downsampling (so it still sees the plain label map).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from .core.clicks import sample_training_clicks
from .core.encoding import num_guide_channels, render_guides
from .settings import GuideSettings


class GuideChannelsTransform(BasicTransform):
    """Append guide channels simulated from ``segmentation[seg_channel]`` to ``image``.

    Args:
        settings: the model's GuideSettings.
        targets: per guided class, its label value(s) (in layout order).
        spacing: voxel size (mm) of the patch axes (the configuration's spacing; for a 2D patch
            the last two values).
        ignore_label: never clicked, never part of an object.
        seg_channel: which segmentation channel holds the label map.

    Randomness: a seed is drawn from numpy's global generator (which nnU-Net's augmenter seeds
    per worker, like every other batchgenerators transform), then all clicks of the sample come
    from ``numpy.random.default_rng(seed)``; ``get_parameters`` returns the clicks so the random
    half (which clicks) and the deterministic half (render them) can be tested apart.
    """

    def __init__(self, settings: GuideSettings, targets: Sequence[Tuple[int, ...]], spacing: Sequence[float],
                 ignore_label: Optional[int] = None, seg_channel: int = 0):
        super().__init__()
        self.settings = settings
        self.targets = [tuple(int(v) for v in t) for t in targets]
        self.spacing = tuple(float(s) for s in spacing)
        self.ignore_label = ignore_label
        self.seg_channel = seg_channel

    def get_parameters(self, **data_dict) -> dict:
        seg = data_dict["segmentation"][self.seg_channel]
        seg = seg.numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
        spacing = self.spacing[-seg.ndim:]
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        clicks = sample_training_clicks(seg, self.targets, spacing, self.settings, rng,
                                        ignore_label=self.ignore_label)
        return {"clicks": clicks, "spacing": spacing}

    def apply(self, data_dict, **params):
        img = data_dict["image"]
        shape = tuple(img.shape[1:])
        n_guide = num_guide_channels(len(self.targets), self.settings.negatives)
        out = torch.empty((img.shape[0] + n_guide, *shape), dtype=img.dtype)
        out[:img.shape[0]] = img
        guides = out[img.shape[0]:].numpy()
        render_guides(params["clicks"], shape, params["spacing"], self.settings, len(self.targets), out=guides)
        data_dict["image"] = out
        return data_dict
