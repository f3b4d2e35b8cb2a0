"""Viewer prompts as clicks (core.prompts) and their simulation in training (sample_training_clicks)."""
import numpy as np
import pytest
from scipy import ndimage

from nnunet_guide.core.clicks import sample_training_clicks
from nnunet_guide.core.encoding import render_guides
from nnunet_guide.core.prompts import (PromptError, bbox_click, fill_region, grid_subsample, lasso_clicks,
                                       point_click, scribble_clicks)
from nnunet_guide.settings import GuideSettings, GuideSettingsError

SP = (2.0, 0.8, 0.8)


def stroke_mask(shape=(6, 40, 40)):
    m = np.zeros(shape, bool)
    m[3, 10, 5:35] = True
    m[3, 10:30, 30] = True
    return m


def test_clicks_on_every_stroke_voxel_render_the_distance_to_the_stroke():
    m = stroke_mask()
    st = GuideSettings(encoding="exp_distance", sigma_mm=3.0, negatives=False)
    every = scribble_clicks(0, m, True, SP, step_mm=1e-6, shape=m.shape, max_clicks=10 ** 6)
    assert len(every) == m.sum()
    g = render_guides(every, m.shape, SP, st, 1)[0]
    d = ndimage.distance_transform_edt(~m, sampling=SP)
    want = np.exp(-d / 3.0)
    near = want > 1e-2
    np.testing.assert_allclose(g[near], want[near], atol=1e-5)
    # subsampled at half the sigma: every stroke voxel keeps a click within one cell's diagonal
    sub = scribble_clicks(0, m, True, SP, step_mm=1.5, shape=m.shape)
    assert len(sub) < 0.7 * len(every)
    pts = np.array([c.position for c in sub])
    dist = np.sqrt((((np.argwhere(m)[:, None] - pts[None]) * np.array(SP)) ** 2).sum(-1))
    assert dist.min(1).max() <= 1.5 * np.sqrt(3)
    gs = render_guides(sub, m.shape, SP, st, 1)[0]
    assert np.abs(gs - g).max() < 0.45 and np.abs(gs - g)[m].mean() < 0.25


def test_grid_subsample_keeps_one_per_cell_and_caps():
    c = np.argwhere(np.ones((4, 10, 10), bool))
    s = grid_subsample(c, (1, 1, 1), 2.0)
    assert len(s) == 2 * 5 * 5 and len(np.unique(s, axis=0)) == len(s)
    big = np.ones((6, 40, 40), bool)
    assert len(scribble_clicks(0, big, True, SP, 0.1, big.shape, max_clicks=50)) <= 50


def test_boxes_2d_3d_clipped_and_outside():
    c = bbox_click(1, [[3, 4], [10, 20], [0, 8]], False, (6, 40, 40))
    assert c.kind == "box" and not c.positive and c.target == 1
    assert c.position == (3.0, 14.5, 3.5)  # one slice thick: centred on that slice
    c = bbox_click(0, [[-5, 4], [10, 20], [30, 99]], True, (6, 40, 40))  # clipped to the image
    assert c.position == (1.5, 14.5, 34.5)
    with pytest.raises(PromptError, match="outside"):
        bbox_click(0, [[7, 9], [0, 1], [0, 1]], True, (6, 40, 40))
    with pytest.raises(PromptError, match="lo < hi"):
        bbox_click(0, [[3, 3], [0, 1], [0, 1]], True, (6, 40, 40))
    with pytest.raises(PromptError, match="3 finite"):
        bbox_click(0, [[0, 1], [0, 1]], True, (6, 40, 40))


def test_points_and_masks_outside_or_empty_are_refused():
    with pytest.raises(PromptError, match="outside the image"):
        point_click(0, (6, 1, 1), True, (6, 40, 40))
    with pytest.raises(PromptError, match="empty"):
        scribble_clicks(0, np.zeros((1, 3, 3)), True, SP, 1.0, (6, 40, 40))
    with pytest.raises(PromptError, match="outside the image"):
        scribble_clicks(0, np.ones((1, 3, 3)), True, SP, 1.0, (6, 40, 40), offset=(0, 39, 0))


def test_lasso_fills_the_outline_on_its_slice():
    ring = np.zeros((1, 20, 20), bool)
    ring[0, 4:16, 4] = ring[0, 4:16, 15] = ring[0, 4, 4:16] = ring[0, 15, 4:16] = True
    filled = fill_region(ring)
    assert filled.sum() == 12 * 12 and filled[0, 10, 10]
    clicks = lasso_clicks(0, ring, True, SP, 1.6, (6, 40, 40), offset=(2, 10, 10))
    pts = np.array([c.position for c in clicks])
    assert np.all(pts[:, 0] == 2) and pts[:, 1].min() >= 14 and pts[:, 1].max() <= 25
    assert any(abs(p[1] - 20) <= 2 and abs(p[2] - 20) <= 2 for p in pts)  # the interior, not just the ring


def blob_seg():
    seg = np.zeros((12, 40, 40), np.int16)
    zz, yy, xx = np.mgrid[:12, :40, :40]
    seg[((zz - 6) / 4) ** 2 + ((yy - 14) / 7) ** 2 + ((xx - 14) / 7) ** 2 <= 1] = 1
    seg[((zz - 5) / 3) ** 2 + ((yy - 30) / 5) ** 2 + ((xx - 30) / 5) ** 2 <= 1] = 2
    return seg


def test_training_simulates_boxes_and_strokes_as_clicks():
    seg = blob_seg()
    boxes = GuideSettings(p_drop=0.0, p_negative=0.0, p_box=1.0)
    strokes = GuideSettings(p_drop=0.0, p_negative=0.0, p_scribble=1.0)
    rng = np.random.default_rng(0)
    seen_2d = seen_3d = 0
    for _ in range(20):
        cl = sample_training_clicks(seg, [(1,), (2,)], SP, boxes, rng)
        assert cl and all(c.kind == "box" and c.positive for c in cl)
        for c in cl:
            assert seg[tuple(int(round(p)) for p in c.position)] == c.target + 1  # centred on its object
            seen_2d += int(c.sigma[0] < 1)
            seen_3d += int(c.sigma[0] >= 1)
        cl = sample_training_clicks(seg, [(1,), (2,)], SP, strokes, rng)
        assert cl and all(c.kind == "point" and c.positive for c in cl)
        for c in cl:
            assert seg[tuple(int(p) for p in c.position)] == c.target + 1  # strokes lie inside the object
        assert len({c.position[0] for c in cl if c.target == 0}) <= 1  # drawn on one slice
    assert seen_2d and seen_3d


def test_old_settings_load_and_keep_their_click_stream():
    old = GuideSettings().to_dict()
    del old["p_box"], old["p_scribble"]
    s = GuideSettings.from_dict(old)
    assert s.p_box == 0 and s.p_scribble == 0
    seg = blob_seg()
    a = sample_training_clicks(seg, [(1,), (2,)], SP, s, np.random.default_rng(3))
    b = sample_training_clicks(seg, [(1,), (2,)], SP, s.replace(p_box=0.0), np.random.default_rng(3))
    assert a == b and all(c.kind == "point" for c in a)
    with pytest.raises(GuideSettingsError, match="p_box \\+ p_scribble"):
        GuideSettings(p_box=0.6, p_scribble=0.6)
    with pytest.raises(GuideSettingsError, match="p_box"):
        GuideSettings(p_box=-0.1)


def test_prompt_trainer_settings_travel_through_the_training_transform_and_render():
    import torch
    from nnunet_guide.core.encoding import render_guide_batch, unpack_clicks
    from nnunet_guide.trainers.variants import nnUNetTrainerGuidePrompts
    from nnunet_guide.transforms import CLICKS_KEY, SimulateClicksTransform
    st = nnUNetTrainerGuidePrompts.guide_settings.replace(p_drop=0.0, p_box=0.5, p_scribble=0.5)
    tr = SimulateClicksTransform(st, [(1,), (2,)], SP, capacity=1024)
    seg = torch.from_numpy(blob_seg()[None].astype(np.int16))
    np.random.seed(0)
    kinds = set()
    for _ in range(6):
        packed = tr(image=torch.zeros((1, *seg.shape[1:])), segmentation=seg)[CLICKS_KEY]
        guides = render_guide_batch(packed[None], seg.shape[1:], SP, st, 2)
        assert guides.shape == (1, 4, *seg.shape[1:]) and guides.max() > 0.5
        kinds |= {c.kind for c in unpack_clicks(packed)}
    assert kinds == {"box", "point"}
