"""The guide consistency term (GuideSettings.consistency_weight): far from every guide, the guided
output must equal the automatic one."""
import numpy as np
import pytest
import torch

from nnunet_guide.core.consistency import consistency_penalty, far_from_guides
from nnunet_guide.core.encoding import click_counts
from nnunet_guide.settings import GuideSettings, GuideSettingsError
from nnunet_guide.trainers.guide import GuideConsistencyLoss, nnUNetTrainerGuide

from helpers import make_trainer


def test_penalty_is_the_mean_squared_probability_change_over_far_voxels():
    logits = torch.zeros(1, 2, 1, 3)          # p = (0.5, 0.5) everywhere
    ref = torch.zeros(1, 2, 1, 3)
    ref[0, 0, 0, 1] = np.log(3.0)             # q = (0.75, 0.25) at voxel 1
    ref[0, 0, 0, 2] = np.log(3.0)             # ... and at voxel 2, which is near a guide
    far = torch.tensor([[[True, True, False]]])
    # voxel 0: no change; voxel 1: 0.25^2 * 2; voxel 2 is not counted -> mean over 2 far voxels
    assert consistency_penalty(logits, ref, far).item() == pytest.approx((0.0 + 0.125) / 2)
    # regions: per-channel sigmoid instead of softmax
    ref_r = torch.zeros(1, 1, 1, 2)
    ref_r[0, 0, 0, 1] = 10.0
    far_r = torch.ones(1, 1, 2, dtype=torch.bool)
    expected = (torch.sigmoid(torch.tensor(10.0)) - 0.5).item() ** 2 / 2
    assert consistency_penalty(torch.zeros(1, 1, 1, 2), ref_r, far_r, regions=True).item() == pytest.approx(expected)
    assert consistency_penalty(logits, ref, torch.zeros_like(far)).item() == 0.0


def test_penalty_has_gradient_only_through_the_guided_output():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    ref = torch.randn(2, 3, 4, 4, requires_grad=True)
    consistency_penalty(logits, ref, torch.ones(2, 4, 4, dtype=torch.bool)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert ref.grad is None


def test_far_from_guides_uses_the_no_click_value():
    g = torch.full((1, 2, 3), 0.5)
    g[0, 1, 2] = 0.7
    assert far_from_guides(g, GuideSettings(offset_half=True).no_guide_value).tolist() == [[True, True, False]]


def test_weight_is_checked():
    with pytest.raises(GuideSettingsError, match="consistency_weight"):
        GuideSettings(consistency_weight=-1.0)
    with pytest.raises(GuideSettingsError, match="consistency_weight"):
        GuideSettings.from_dict({"consistency_weight": True})


def test_loss_wrapper_adds_the_weighted_term_only_with_a_reference():
    base = lambda out, tgt: out[0].float().mean() * 0 + 1.0  # noqa: E731
    loss = GuideConsistencyLoss(base, 2.0, regions=False)
    out = [torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 1)]
    assert float(loss(out, None)) == 1.0
    ref = torch.zeros(1, 2, 1, 3)
    ref[0, 0, 0, 1] = np.log(3.0)
    loss.reference = (torch.tensor([1]), ref, torch.ones(1, 1, 3, dtype=torch.bool))
    assert float(loss(out, None)) == pytest.approx(1.0 + 2.0 * 0.125 / 3)


class Consistent(nnUNetTrainerGuide):
    guide_settings = GuideSettings(consistency_weight=1.0, p_drop=0.0, encoding="ball", ball_radius_mm=2.0)


def test_trainer_step_with_the_consistency_term(nnunet_paths, one_torch_thread):
    tr = make_trainer(Consistent, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    assert isinstance(tr.loss, GuideConsistencyLoss)
    dl_tr, _ = tr.get_dataloaders()
    batch = tr.guided_batch(next(dl_tr))
    rows, automatic, far = tr.automatic_reference(batch)
    assert rows.tolist() == np.flatnonzero(
        (batch["clicks"][..., 0] >= 0).sum(-1).numpy() > 0).tolist() and len(rows) > 0
    gi = tr.layout.guide_channel_indices
    guides = batch["data"][rows][:, gi[0]:gi[-1] + 1]
    assert torch.equal(far, (guides == 0).all(1)) and (~far).any() and far.any()
    unguided = batch["data"][rows].clone()
    unguided[:, gi[0]:gi[-1] + 1] = 0
    with torch.no_grad():
        torch.testing.assert_close(automatic, tr.network(unguided)[0].float())  # the model's own automatic output
    out = tr.train_step(next(dl_tr))
    assert np.isfinite(out["loss"]) and tr.loss.reference is None  # cleared for validation steps


# ---- the click-following term (GuideSettings.click_weight) ---------------------------------------

def _clicks(*clicks, capacity=4):
    from nnunet_guide.core.encoding import pack_click_batch
    return pack_click_batch([list(clicks)], 2, capacity)


def test_click_following_penalty_is_the_cross_entropy_at_the_clicked_voxels():
    from nnunet_guide.core.clicks import Click
    from nnunet_guide.core.consistency import click_following_penalty
    logits = torch.zeros(1, 3, 1, 4)          # labels 0, 1, 2: p = 1/3 each
    logits[0, 2, 0, 1] = np.log(2.0)          # voxel 1: p = (1/4, 1/4, 1/2)
    channels = [(2,), (1, 2)]                 # guided classes: label 2, and labels 1 + 2
    packed = _clicks(Click(0, (0.0, 1.4), True),                      # q = 1/2 (rounds to voxel 1)
                     Click(1, (0.0, 2.0), False),                     # q = 2/3: -log(1/3)
                     Click(0, (0.0, 2.0), True, (2.0, 2.0), "box"))   # boxes are skipped
    assert click_following_penalty(logits, packed, channels).item() == pytest.approx((np.log(2) + np.log(3)) / 2)
    # positions beyond the patch are clamped to its edge (voxel 3: q = 1/3)
    far_out = _clicks(Click(0, (0.0, 7.0), True))
    assert click_following_penalty(logits, far_out, channels).item() == pytest.approx(np.log(3))
    # regions: each class is one sigmoid channel
    assert click_following_penalty(torch.zeros(1, 1, 1, 4), _clicks(Click(0, (0.0, 0.0), False)), [(0,)],
                                   regions=True).item() == pytest.approx(np.log(2))
    # no point click: 0, and a gradient of zeros (the loss still backpropagates)
    x = torch.zeros(1, 3, 1, 4, requires_grad=True)
    none = click_following_penalty(x, _clicks(), channels)
    none.backward()
    assert none.item() == 0.0 and x.grad.abs().sum() == 0


def test_click_following_pulls_the_clicked_voxel_towards_the_click():
    from nnunet_guide.core.clicks import Click
    from nnunet_guide.core.consistency import click_following_penalty
    x = torch.zeros(1, 3, 1, 4, requires_grad=True)
    click_following_penalty(x, _clicks(Click(0, (0.0, 1.0), True), Click(0, (0.0, 3.0), False)), [(2,)]).backward()
    g = x.grad[0, :, 0]
    assert g[2, 1] < 0 and g[2, 3] > 0  # descent raises label 2 at the positive click, lowers it at the negative
    assert g[:, 0].abs().sum() == 0 and g[:, 2].abs().sum() == 0  # unclicked voxels get nothing


def test_loss_wrapper_adds_the_weighted_click_term_only_with_clicks():
    from nnunet_guide.core.clicks import Click
    base = lambda out, tgt: out[0].float().mean() * 0 + 1.0  # noqa: E731
    loss = GuideConsistencyLoss(base, 0.0, regions=False, click_weight=2.0, class_channels=[(1,)])
    out = [torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 1)]
    assert float(loss(out, None)) == 1.0
    loss.clicks = torch.cat((_clicks(Click(0, (0.0, 0.0), True)), _clicks()))  # sample 0 only: q = 1/2
    assert float(loss(out, None)) == pytest.approx(1.0 + 2.0 * np.log(2))


def test_class_channels_of_labels_and_regions():
    from types import SimpleNamespace
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunet_guide.settings import GuidedTarget
    organ, lesion = GuidedTarget("organ", (1, 2)), GuidedTarget("lesion", (2,))
    regions = LabelManager({"background": 0, "organ": [1, 2], "lesion": 2}, regions_class_order=[1, 2])
    trainer = SimpleNamespace(label_manager=regions, layout=SimpleNamespace(targets=[lesion, organ]))
    assert nnUNetTrainerGuide.class_channels(trainer) == [(1,), (0,)]
    trainer.layout.targets = [GuidedTarget("one", (1,))]
    with pytest.raises(GuideSettingsError, match=r"'one' \(labels \[1\]\) is none of this dataset's regions"):
        nnUNetTrainerGuide.class_channels(trainer)
    labels = LabelManager({"background": 0, "organ": 1, "lesion": 2}, regions_class_order=None)
    assert nnUNetTrainerGuide.class_channels(SimpleNamespace(label_manager=labels, layout=SimpleNamespace(
        targets=[lesion, organ]))) == [(2,), (1, 2)]
    with pytest.raises(GuideSettingsError, match="click_weight"):
        GuideSettings(click_weight=float("nan"))


class FollowsClicks(nnUNetTrainerGuide):
    guide_settings = GuideSettings(click_weight=1.0, p_drop=0.0)


def test_trainer_step_with_the_click_term(nnunet_paths, one_torch_thread, monkeypatch):
    import nnunet_guide.trainers.guide as guide_module
    tr = make_trainer(FollowsClicks, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    assert isinstance(tr.loss, GuideConsistencyLoss) and tr.loss.click_weight == 1.0
    assert tr.loss.class_channels == [tuple(t.labels) for t in tr.layout.targets]
    terms, real = [], guide_module.click_following_penalty

    def penalty(out, clicks, channels, regions):
        terms.append(real(out, clicks, channels, regions))
        return terms[-1]

    monkeypatch.setattr(guide_module, "click_following_penalty", penalty)
    dl_tr, _ = tr.get_dataloaders()
    out = tr.train_step(next(dl_tr))
    # the step's loss had the term, over the batch's own clicks at full resolution
    assert len(terms) == 1 and terms[0].item() > 0 and terms[0].requires_grad
    assert np.isfinite(out["loss"]) and tr.loss.clicks is None and tr.loss.reference is None  # cleared


class AutomaticNorms(nnUNetTrainerGuide):
    guide_settings = GuideSettings(click_weight=1.0, p_drop=0.0, norm_statistics="automatic")


def test_trainer_step_with_automatic_norm_statistics(nnunet_paths, one_torch_thread):
    """nnU-Net's own network, normalised with automatic statistics: every guided training step
    records them in a pass without the guides, then trains."""
    tr = make_trainer(AutomaticNorms, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    stats = tr.network._norm_statistics
    assert stats is not None and len(stats.norms) > 0
    calls, real = [], stats.run

    def run(*args):
        calls.append(len(args[-1]))
        return real(*args)

    stats.run = run
    dl_tr, _ = tr.get_dataloaders()
    out = tr.train_step(next(dl_tr))
    assert calls and calls[0] > 0 and np.isfinite(out["loss"])
    assert stats.mode is None and not stats.stats and stats._automatic is None  # its pass released after the step


class ConsistentAutomaticNorms(nnUNetTrainerGuide):
    guide_settings = GuideSettings(consistency_weight=1.0, p_drop=0.0, encoding="ball", ball_radius_mm=2.0,
                                   norm_statistics="automatic")


def test_consistency_reference_is_the_automatic_statistics_pass(nnunet_paths, one_torch_thread, monkeypatch):
    """With automatic norm statistics, the consistency term's reference is the output of the pass
    that records the statistics: a training step runs the network twice (automatic, guided), not
    three times, and the reference is still the model's automatic output of the clicked samples."""
    import copy

    from nnunet_guide.trainers import guide as guide_module
    tr = make_trainer(ConsistentAutomaticNorms, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    raw = next(dl_tr)
    guided = tr.guided_batch(copy.deepcopy(raw))
    rows = torch.nonzero(click_counts(guided["clicks"]) > 0).flatten()
    gi = tr.layout.guide_channel_indices
    unguided = guided["data"][rows].clone()
    unguided[:, gi[0]:gi[-1] + 1] = 0
    with torch.no_grad():
        expected = tr.network(unguided)[0].float()  # before the step changes the weights
    seen, real = [], guide_module.consistency_penalty

    def penalty(logits, reference, far, regions=False):
        seen.append((logits.shape[0], reference.clone(), far.clone()))
        return real(logits, reference, far, regions)

    monkeypatch.setattr(guide_module, "consistency_penalty", penalty)
    passes = []
    hook = tr.network.base.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))
    out = tr.train_step(raw)
    hook.remove()
    assert len(rows) > 0 and passes == [len(rows), raw["data"].shape[0]]  # automatic (clicked rows), guided
    assert len(seen) == 1 and seen[0][0] == len(rows)
    torch.testing.assert_close(seen[0][1], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(seen[0][2], (guided["data"][rows][:, gi[0]:gi[-1] + 1] == 0).all(1))
    assert np.isfinite(out["loss"]) and tr.loss.reference is None
    # asked for other samples than the pass ran, it refuses rather than hand on a wrong reference
    stats = tr.network._norm_statistics
    assert stats._automatic is None  # released after the step
    with pytest.raises(RuntimeError, match="no automatic pass with gradient has run"):
        stats.automatic_output(rows)
    tr.network(guided["data"])  # a training pass keeps its automatic pass again
    with pytest.raises(RuntimeError, match="automatic pass ran samples"):
        stats.automatic_output(rows[:0])


def test_consistency_rows_are_the_samples_whose_guides_hold_a_guide(nnunet_paths, one_torch_thread):
    """The trainer picks the consistency term's samples by the network's rule for automatic
    statistics (a guide voxel anywhere), not by their click count, so a sample whose clicks render
    nothing cannot make the reference and the statistics' pass disagree."""
    tr = make_trainer(ConsistentAutomaticNorms, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    guided = tr.guided_batch(next(dl_tr))
    clicked = torch.nonzero(click_counts(guided["clicks"]) > 0).flatten().tolist()
    assert len(clicked) == guided["data"].shape[0]  # p_drop 0: every sample has clicks
    gi = tr.layout.guide_channel_indices
    guided["data"][clicked[0], gi[0]:gi[-1] + 1] = tr.layout.guide.no_guide_value  # its clicks render nothing
    rows, automatic, far = tr.automatic_reference(guided)
    assert rows.tolist() == clicked[1:] and far.shape[0] == len(clicked) - 1
    tr.network(guided["data"])  # a training pass: the statistics' automatic pass runs the same samples
    assert automatic().shape[0] == len(clicked) - 1


class AutomaticLoss(nnUNetTrainerGuide):
    guide_settings = GuideSettings(automatic_weight=0.5, p_drop=0.0, norm_statistics="automatic")


def test_automatic_weight_needs_automatic_norm_statistics():
    with pytest.raises(GuideSettingsError, match="automatic_weight 1.0 needs norm_statistics 'automatic'"):
        GuideSettings(automatic_weight=1.0)
    with pytest.raises(GuideSettingsError, match="automatic_weight"):
        GuideSettings(automatic_weight=-1.0, norm_statistics="automatic")
    assert GuideSettings.from_dict({}).automatic_weight == 0.0  # settings files written before the field


def test_automatic_loss_is_nnunets_loss_on_the_statistics_pass(nnunet_paths, one_torch_thread):
    """automatic_weight: the step's loss is nnU-Net's loss of the guided batch plus the weight x
    nnU-Net's loss of the clicked samples' automatic output (every deep-supervision scale) against
    their targets, from the pass that records their statistics (no third pass)."""
    import copy
    np.random.seed(0)  # a fixed batch and initial network: the two terms below must differ
    torch.manual_seed(0)
    tr = make_trainer(AutomaticLoss, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    assert isinstance(tr.loss, GuideConsistencyLoss) and tr.loss.automatic_weight == 0.5
    dl_tr, _ = tr.get_dataloaders()
    raw = next(dl_tr)
    guided = tr.guided_batch(copy.deepcopy(raw))
    rows = torch.nonzero(click_counts(guided["clicks"]) > 0).flatten()
    assert len(rows) == guided["data"].shape[0]  # p_drop 0
    gi = tr.layout.guide_channel_indices
    unguided = guided["data"][rows].clone()
    unguided[:, gi[0]:gi[-1] + 1] = 0
    target = guided["target"]
    with torch.no_grad():  # before the step changes the weights
        plain = tr.loss.loss(tr.network(guided["data"]), target)
        automatic = tr.loss.loss(tr.network(unguided), [t[rows] for t in target])
    # the two terms differ by far more than the tolerance below, so the sum tells them apart
    # (the step reproduces these losses to ~1e-7)
    assert abs(float(automatic) - float(plain)) > 1e-4
    passes = []
    hook = tr.network.base.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))
    out = tr.train_step(raw)
    hook.remove()
    assert passes == [len(rows), raw["data"].shape[0]]  # automatic (clicked rows), guided: no third pass
    assert float(out["loss"]) == pytest.approx(float(plain) + 0.5 * float(automatic), rel=1e-5, abs=1e-5)
    assert tr.loss.automatic is None and tr.network._norm_statistics._automatic is None  # released


# ---- the clicked-object term (GuideSettings.object_weight) ---------------------------------------

def test_clicked_object_boxes_span_three_sigma_around_positive_clicks():
    from nnunet_guide.core.clicks import Click
    from nnunet_guide.core.consistency import clicked_object_boxes
    packed = _clicks(Click(0, (3.0, 3.0), True, (1.0, 0.5)),      # rows 3 -+ 3, columns 3 -+ 1.5
                     Click(1, (7.0, 7.0), True),                    # no sigma: min_sigma, clipped at the edge
                     Click(0, (0.0, 7.0), False, (5.0, 5.0)))       # negative: no box
    boxes = clicked_object_boxes(packed, (8, 8), 2, min_sigma=0.5)
    want = np.zeros((1, 2, 8, 8), bool)
    want[0, 0, 0:7, 1:6] = True     # floor(3 - 3) .. ceil(3 + 3); floor(3 - 1.5) .. ceil(3 + 1.5)
    want[0, 1, 5:8, 5:8] = True     # floor(7 - 1.5) .. the patch's edge
    np.testing.assert_array_equal(boxes.numpy(), want)
    # a sigma below min_sigma is raised to it: columns 3 -+ 3 with min_sigma 1
    assert clicked_object_boxes(packed, (8, 8), 2, min_sigma=1.0)[0, 0, 0].tolist() == [True] * 7 + [False]
    assert not clicked_object_boxes(_clicks(), (8, 8), 2).any()


def test_clicked_object_penalty_is_one_minus_the_soft_dice_in_the_box():
    from nnunet_guide.core.clicks import Click
    from nnunet_guide.core.consistency import clicked_object_penalty
    logits = torch.zeros(1, 2, 1, 8)                   # p(label 1) = 1/2 everywhere
    labels = torch.zeros(1, 1, 1, 8)
    labels[0, 0, 0, 2:4] = 1                           # the object: voxels 2, 3
    labels[0, 0, 0, 6] = 1                             # another object, outside the box
    packed = _clicks(Click(0, (0.0, 2.0), True, (1.0, 1.0)))   # box: columns 0 .. 5 (6 voxels)
    # soft Dice in the box: 2 * (2 * 1/2) / (6 * 1/2 + 2)
    want = 1 - 2 * 1.0 / (3.0 + 2.0)
    assert clicked_object_penalty(logits, labels, packed, [(1,)], min_sigma=1.0).item() == pytest.approx(want, abs=1e-5)
    # the ignore label's voxels count nowhere: voxels 0 and 1 ignored leaves 4 voxels in the box
    ignored = labels.clone()
    ignored[0, 0, 0, 0:2] = 9
    assert clicked_object_penalty(logits, ignored, packed, [(1,)], ignore_label=9, min_sigma=1.0).item() == \
        pytest.approx(1 - 2 * 1.0 / (2.0 + 2.0), abs=1e-5)
    # regions: the class is one sigmoid channel of region maps
    regions = (labels > 0).float()
    assert clicked_object_penalty(torch.zeros(1, 1, 1, 8), regions, packed, [(0,)], regions=True,
                                  min_sigma=1.0).item() == pytest.approx(want, abs=1e-5)
    # regions with an ignore label: nnU-Net's last target channel marks the ignored voxels (0 and 1 here)
    masked = torch.cat((regions, torch.zeros_like(regions)), 1)
    masked[0, 1, 0, 0:2] = 1
    assert clicked_object_penalty(torch.zeros(1, 1, 1, 8), masked, packed, [(0,)], regions=True, ignore_label=9,
                                  min_sigma=1.0).item() == pytest.approx(1 - 2 * 1.0 / (2.0 + 2.0), abs=1e-5)
    # gradient: only inside the box, raising the object and lowering the rest of the box
    x = torch.zeros(1, 2, 1, 8, requires_grad=True)
    clicked_object_penalty(x, labels, packed, [(1,)], min_sigma=1.0).backward()
    g = x.grad[0, 1, 0]
    assert (g[2:4] < 0).all() and (g[[0, 1, 4, 5]] > 0).all() and (g[6:] == 0).all()
    # no positive click: 0, with a gradient of zeros
    y = torch.zeros(1, 2, 1, 8, requires_grad=True)
    none = clicked_object_penalty(y, labels, _clicks(Click(0, (0.0, 2.0), False)), [(1,)])
    none.backward()
    assert none.item() == 0.0 and y.grad.abs().sum() == 0


def test_clicked_object_negatives_count_where_their_box_holds_the_class():
    from nnunet_guide.core.clicks import Click
    from nnunet_guide.core.consistency import clicked_object_penalty
    from nnunet_guide.core.encoding import pack_click_batch
    logits = torch.zeros(2, 2, 1, 8)                   # p(label 1) = 1/2 everywhere
    labels = torch.zeros(2, 1, 1, 8)
    labels[:, 0, 0, 2:4] = 1                           # the structure: voxels 2, 3
    packed = pack_click_batch([[Click(0, (0.0, 7.0), False, (0.5, 0.5))],    # box: columns 5 .. 7, no class
                               [Click(0, (0.0, 5.0), False, (1.0, 1.0))]],   # a rim click: columns 2 .. 7
                              2, 2)
    assert clicked_object_penalty(logits, labels, packed, [(1,)], min_sigma=0.5).item() == 0.0  # positives only
    # with negatives: sample 1 only, 2 * (2 * 1/2) / (6 * 1/2 + 2); sample 0's box holds no class voxel
    assert clicked_object_penalty(logits, labels, packed, [(1,)], min_sigma=0.5, negatives=True).item() == \
        pytest.approx(1 - 2 * 1.0 / 5.0, abs=1e-5)
    x = torch.zeros(2, 2, 1, 8, requires_grad=True)
    clicked_object_penalty(x, labels, packed, [(1,)], min_sigma=0.5, negatives=True).backward()
    assert x.grad[0].abs().sum() == 0                  # the pair that does not count gets no gradient
    g = x.grad[1, 1, 0]
    assert (g[2:4] < 0).all() and (g[4:] > 0).all() and (g[:2] == 0).all()  # keep the structure, clear the rim


def test_loss_wrapper_adds_the_weighted_object_term_on_the_full_resolution_target():
    from nnunet_guide.core.clicks import Click
    base = lambda out, tgt: out[0].float().mean() * 0 + 1.0  # noqa: E731
    loss = GuideConsistencyLoss(base, 0.0, regions=False, class_channels=[(1,)], object_weight=0.5, min_sigma=1.0)
    out = [torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 4)]
    target = [torch.zeros(2, 1, 1, 8), torch.zeros(2, 1, 1, 4)]
    target[0][0, 0, 0, 2:4] = 1
    loss.clicks = torch.cat((_clicks(Click(0, (0.0, 2.0), True, (1.0, 1.0))), _clicks()))
    assert float(loss(out, target)) == pytest.approx(1.0 + 0.5 * (1 - 2 * 1.0 / 5.0), abs=1e-5)
    loss.clicks = None
    assert float(loss(out, target)) == 1.0


class FollowsObjects(nnUNetTrainerGuide):
    guide_settings = GuideSettings(object_weight=1.0, p_drop=0.0)


def test_trainer_step_with_the_object_term(nnunet_paths, one_torch_thread, monkeypatch):
    import nnunet_guide.trainers.guide as guide_module
    tr = make_trainer(FollowsObjects, nnunet_paths["preprocessed"], "nnUNetPlans_small")
    tr.initialize()
    assert isinstance(tr.loss, GuideConsistencyLoss) and tr.loss.object_weight == 1.0 and tr.loss.click_weight == 0
    terms, real = [], guide_module.clicked_object_penalty

    def penalty(out, reference, clicks, *args):
        terms.append((real(out, reference, clicks, *args), tuple(out.shape), tuple(reference.shape)))
        return terms[-1][0]

    monkeypatch.setattr(guide_module, "clicked_object_penalty", penalty)
    dl_tr, _ = tr.get_dataloaders()
    out = tr.train_step(next(dl_tr))
    # the term ran once, on the full-resolution output and target, with gradient
    assert len(terms) == 1 and terms[0][0].item() > 0 and terms[0][0].requires_grad
    assert terms[0][1][2:] == terms[0][2][2:] == tuple(tr.configuration_manager.patch_size)
    assert np.isfinite(out["loss"]) and tr.loss.clicks is None
