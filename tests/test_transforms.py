"""GuideChannelsTransform on its own: the random half (which clicks) apart from rendering."""
import pickle

import numpy as np
import torch

from nnunet_guide.settings import GuideSettings
from nnunet_guide.transforms import GuideChannelsTransform


def sample():
    seg = torch.zeros((1, 12, 20, 20), dtype=torch.int16)
    seg[0, 3:8, 4:10, 4:10] = 1
    seg[0, 5:7, 12:16, 12:16] = 2
    return {"image": torch.randn(1, 12, 20, 20), "segmentation": seg}


def test_same_numpy_seed_same_clicks_and_channels():
    t = GuideChannelsTransform(GuideSettings(p_drop=0.0), [(1,), (2,)], (2.0, 1.0, 1.0))
    np.random.seed(3)
    a = t(**sample())
    np.random.seed(3)
    b = t(**sample())
    torch.testing.assert_close(a["image"][1:], b["image"][1:])
    assert a["image"].shape == (5, 12, 20, 20)
    np.random.seed(3)
    params = t.get_parameters(**sample())
    assert params["clicks"] and params["spacing"] == (2.0, 1.0, 1.0)


def test_image_channels_untouched_and_segmentation_unchanged():
    t = GuideChannelsTransform(GuideSettings(p_drop=0.0), [(2,)], (1, 1, 1))
    s = sample()
    img, seg = s["image"].clone(), s["segmentation"].clone()
    out = t(**s)
    torch.testing.assert_close(out["image"][:1], img)
    assert torch.equal(out["segmentation"], seg)


def test_2d_patch_uses_in_plane_spacing():
    t = GuideChannelsTransform(GuideSettings(p_drop=0.0, p_negative=0.0), [(1,)], (5.0, 1.0, 1.0))
    seg = torch.zeros((1, 20, 20), dtype=torch.int16)
    seg[0, 8:12, 8:12] = 1
    out = t(image=torch.zeros(1, 20, 20), segmentation=seg)
    assert out["image"].shape == (3, 20, 20) and out["image"][1].max() > 0.9


def test_picklable_for_worker_processes_and_ddp():
    t = GuideChannelsTransform(GuideSettings(), [(1,), (2,)], (1, 1, 1), ignore_label=3)
    t2 = pickle.loads(pickle.dumps(t))
    np.random.seed(0)
    a = t(**sample())["image"][1:]
    np.random.seed(0)
    b = t2(**sample())["image"][1:]
    torch.testing.assert_close(a, b)
