"""The click transforms on their own: the random half (which clicks), shipped as coordinates."""
import pickle

import numpy as np
import pytest
import torch

from nnunet_guide.core.encoding import packed_width, unpack_clicks
from nnunet_guide.settings import GuideSettings, GuideSettingsError
from nnunet_guide.transforms import CLICKS_KEY, AttachClicksTransform, SimulateClicksTransform


def sample():
    seg = torch.zeros((1, 12, 20, 20), dtype=torch.int16)
    seg[0, 3:8, 4:10, 4:10] = 1
    seg[0, 5:7, 12:16, 12:16] = 2
    return {"image": torch.randn(1, 12, 20, 20), "segmentation": seg}


def test_same_numpy_seed_same_clicks():
    t = SimulateClicksTransform(GuideSettings(p_drop=0.0), [(1,), (2,)], (2.0, 1.0, 1.0), capacity=16)
    np.random.seed(3)
    a = t(**sample())[CLICKS_KEY]
    np.random.seed(3)
    b = t(**sample())[CLICKS_KEY]
    torch.testing.assert_close(a, b, equal_nan=True)
    assert a.shape == (16, packed_width(3)) and a.dtype == torch.float32
    np.random.seed(3)
    params = t.get_parameters(**sample())
    assert params["clicks"] and params["spacing"] == (2.0, 1.0, 1.0)
    assert unpack_clicks(a) == [c.__class__(c.target, tuple(float(np.float32(p)) for p in c.position), c.positive,
                                            tuple(float(np.float32(s)) for s in c.sigma), c.kind)
                                for c in params["clicks"]]


def test_image_untouched_and_clicks_end_the_segmentation_list():
    t = SimulateClicksTransform(GuideSettings(p_drop=0.0), [(2,)], (1, 1, 1), capacity=8)
    s = sample()
    img, seg = s["image"].clone(), s["segmentation"].clone()
    out = AttachClicksTransform()(**t(**s))
    assert torch.equal(out["image"], img)  # no dense guide channel on the CPU
    assert isinstance(out["segmentation"], list) and len(out["segmentation"]) == 2
    assert torch.equal(out["segmentation"][0], seg) and out["segmentation"][1].shape == (8, packed_width(3))
    assert CLICKS_KEY not in out
    # deep supervision: a list of targets gets the clicks appended
    s = t(**sample())
    s["segmentation"] = [seg, seg[:, ::2, ::2, ::2]]
    assert len(AttachClicksTransform()(**s)["segmentation"]) == 3


def test_2d_patch_uses_in_plane_spacing():
    t = SimulateClicksTransform(GuideSettings(p_drop=0.0, p_negative=0.0, encoding="object_gaussian",
                                              max_object_clicks=1), [(1,)],
                                (5.0, 1.0, 1.0), capacity=4)
    seg = torch.zeros((1, 20, 20), dtype=torch.int16)
    seg[0, 8:12, 8:12] = 1
    params = t.get_parameters(image=torch.zeros(1, 20, 20), segmentation=seg)
    assert params["spacing"] == (1.0, 1.0)
    (c,) = unpack_clicks(t.apply({"image": torch.zeros(1, 20, 20), "segmentation": seg}, **params)[CLICKS_KEY])
    assert 8 <= c.position[0] <= 11 and 8 <= c.position[1] <= 11


def test_more_clicks_than_rows_is_a_clear_error():
    t = SimulateClicksTransform(GuideSettings(p_drop=0.0, p_negative=0.0), [(1,), (2,)], (1, 1, 1), capacity=1)
    np.random.seed(0)
    with pytest.raises(GuideSettingsError, match="max_clicks_per_sample"):
        for _ in range(20):  # two classes with an object each: k >= 1 per class
            t(**sample())


def test_picklable_for_worker_processes_and_ddp():
    t = SimulateClicksTransform(GuideSettings(), [(1,), (2,)], (1, 1, 1), capacity=16, ignore_label=3)
    t2 = pickle.loads(pickle.dumps(t))
    np.random.seed(0)
    a = t(**sample())[CLICKS_KEY]
    np.random.seed(0)
    b = t2(**sample())[CLICKS_KEY]
    torch.testing.assert_close(a, b, equal_nan=True)
