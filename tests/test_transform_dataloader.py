"""Clicks inside nnU-Net's real data pipeline (trainer -> dataloader -> batch), rendered on the
training device by the trainer's step."""
import sys
from os.path import dirname

import numpy as np
import pytest
import torch

import helpers as T
from nnunet_guide.settings import GuideSettings, GuideSettingsError
from nnunet_guide.trainers import nnUNetTrainerGuide, nnUNetTrainerGuideAlways
from nnunet_guide.core.encoding import click_counts, packed_width, unpack_clicks
from nnunet_guide.transforms import AttachClicksTransform, LabelObjectsTransform, SimulateClicksTransform

sys.path.insert(0, dirname(__file__))
from reference_encoding import render_guides as reference_render  # noqa: E402


def make_trainer(cls, paths, configuration="3d_fullres"):
    return T.make_trainer(cls, paths["preprocessed"], "nnUNetPlans_small", configuration)


class NeverGuided(nnUNetTrainerGuide):
    guide_settings = GuideSettings(p_drop=1.0)


class GuidesKidney(nnUNetTrainerGuide):
    guide_settings = GuideSettings(guided_labels=("kidney",))


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_batches_carry_guides_aligned_with_the_augmented_labels(nnunet_paths, configuration):
    tr = make_trainer(nnUNetTrainerGuideAlways, nnunet_paths, configuration)
    tr.initialize()
    dl_tr, dl_val = tr.get_dataloaders()
    assert tr.layout.num_channels == 5
    seen_lesion = 0
    for _ in range(4):
        loaded = next(dl_tr)
        assert loaded["data"].shape[1] == 1  # the loader ships the image and the clicks only
        assert loaded["target"][-1].shape == (tr.batch_size, tr.max_clicks_per_sample, packed_width(loaded["data"].ndim - 2))
        batch = tr.guided_batch(loaded)
        data, target = batch["data"], batch["target"]
        target = target[0] if isinstance(target, list) else target
        assert data.shape[1] == 5 and data.shape[2:] == target.shape[2:]
        for b in range(data.shape[0]):
            has_lesion = bool((target[b, 0] == 2).any())
            pos_lesion = data[b, tr.layout.guide_channel(1, True)]
            if has_lesion:
                seen_lesion += 1
                assert pos_lesion.max() > 0.9
                # the click peak is on (or next to) a lesion voxel of the augmented label map
                peak = np.unravel_index(int(torch.argmax(pos_lesion)), pos_lesion.shape)
                window = tuple(slice(max(0, p - 2), p + 3) for p in peak)
                assert (target[b, 0][window] == 2).any()
            else:
                assert pos_lesion.max() == 0
    assert seen_lesion > 0
    val = tr.guided_batch(next(dl_val))
    assert val["data"].shape[1] == 5


class NeverGuidedSplit(NeverGuided):
    click_selection = "split"


@pytest.mark.parametrize("trainer", [NeverGuided, NeverGuidedSplit])
def test_dropped_guides_are_no_guide(nnunet_paths, trainer):
    """Guides dropped in the loader: no click shipped, or ("split") a map the loader did not
    label, and no guide rendered."""
    from nnunet_guide.core.clicks import DROPPED_OBJECTS
    tr = make_trainer(trainer, nnunet_paths)
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    batch = next(dl_tr)
    if tr.labels_objects_in_loader:
        assert torch.all(batch["target"][-1] == DROPPED_OBJECTS)
    else:
        assert torch.all(click_counts(batch["target"][-1]) == 0)
    guided = tr.guided_batch(batch)
    assert torch.all(click_counts(guided["clicks"]) == 0)
    assert torch.all(guided["data"][:, 1:] == 0)


def test_the_object_transform_drops_guides_with_p_drop():
    """LabelObjectsTransform draws the drop coin from numpy's global generator (seeded per worker
    by nnU-Net): about p_drop of the samples get the DROPPED_OBJECTS map, the rest their objects."""
    from nnunet_guide.core.clicks import DROPPED_OBJECTS, object_map
    seg = np.zeros((1, 6, 20, 20), np.int16)
    seg[0, 1:3, 2:6, 2:6] = 1
    seg[0, 3:5, 10:16, 10:12] = 2
    seg[0, 0, 18:, 18:] = 1
    want = object_map(seg[0], [(1,), (2,)])
    np.random.seed(0)
    t = LabelObjectsTransform([(1,), (2,)], p_drop=0.5)
    dropped = 0
    for _ in range(200):
        m = t(**{"segmentation": torch.from_numpy(seg)})["guide_objects"][0].numpy()
        if (m == DROPPED_OBJECTS).all():
            dropped += 1
        else:
            np.testing.assert_array_equal(m, want)
    assert 70 < dropped < 130
    _, key, pos, *_ = np.random.get_state()
    LabelObjectsTransform([(1,), (2,)])(**{"segmentation": torch.from_numpy(seg)})   # p_drop 0: no coin drawn
    _, key_after, pos_after, *_ = np.random.get_state()
    assert pos_after == pos and np.array_equal(key_after, key)


def test_transform_sits_before_label_consumers(nnunet_paths):
    tr = make_trainer(nnUNetTrainerGuide, nnunet_paths)
    t = tr.get_training_transforms(tr.configuration_manager.patch_size, (0, 0), [[1, 1, 1], [0.5, 0.5, 0.5]],
                                   (0, 1, 2), False)
    names = [type(x).__name__ for x in t.transforms]
    i = names.index("SimulateClicksTransform")
    assert names[i - 1].startswith("RemoveLabelT") and names[i + 1] == "DownsampleSegForDSTransform"
    assert isinstance(t.transforms[i], SimulateClicksTransform) and isinstance(t.transforms[-1], AttachClicksTransform)


class _OldGuideChannels(SimulateClicksTransform):
    """The pipeline as it was before clicks travelled as coordinates: clicks rendered into dense
    channels on the CPU, with the numpy renderer."""

    def apply(self, data_dict, **params):
        img = data_dict["image"]
        guides = reference_render(params["clicks"], img.shape[1:], params["spacing"], self.settings, len(self.targets))
        data_dict["image"] = torch.cat((img, torch.from_numpy(guides)), 0)
        return data_dict


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_seeded_batch_gives_the_network_input_of_the_dense_cpu_pipeline(nnunet_paths, configuration):
    """Same numpy seed, same loaded patch: image + guides rendered on the device equal what the
    old pipeline (dense numpy channels from the same click simulation) fed the network."""
    tr = make_trainer(nnUNetTrainerGuideAlways, nnunet_paths, configuration)
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    new_pipeline = dl_tr.data_loader.transforms if hasattr(dl_tr, "data_loader") else dl_tr.generator.transforms
    old_pipeline = type(new_pipeline)([t for t in new_pipeline.transforms if not isinstance(t, AttachClicksTransform)])
    i = next(k for k, t in enumerate(old_pipeline.transforms) if isinstance(t, SimulateClicksTransform))
    sim = old_pipeline.transforms[i]
    old_pipeline.transforms[i] = _OldGuideChannels(sim.settings, sim.targets, sim.spacing, sim.capacity, sim.ignore_label)
    case = tr.get_tr_and_val_datasets()[0]
    data, seg, _, _ = case.load_case(case.identifiers[0])
    patch = tuple(tr.configuration_manager.patch_size)
    image = torch.from_numpy(np.asarray(data[:])[(slice(None),) + tuple(slice(0, p) for p in patch[-3:])]).float()
    labels = torch.from_numpy(np.asarray(seg[:])[(slice(None),) + tuple(slice(0, p) for p in patch[-3:])]).short()
    if len(patch) == 2:
        image, labels = image[:, labels.shape[1] // 2], labels[:, labels.shape[1] // 2]
    n_clicks = 0
    for seed in range(4):
        np.random.seed(seed), torch.manual_seed(seed)
        new = new_pipeline(image=image.clone(), segmentation=labels.clone())
        np.random.seed(seed), torch.manual_seed(seed)
        old = old_pipeline(image=image.clone(), segmentation=labels.clone())
        batch = {"data": new["image"][None], "target": [s[None] for s in new["segmentation"]]}
        n_clicks += len(unpack_clicks(new["segmentation"][-1]))
        fed = tr.guided_batch(batch)["data"][0]
        torch.testing.assert_close(fed, old["image"], atol=2e-6, rtol=0)
    assert n_clicks > 0


def test_network_has_extra_channels_and_runs_automatic_and_guided(nnunet_paths):
    tr = make_trainer(nnUNetTrainerGuide, nnunet_paths)
    tr.initialize()
    net = tr.network
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == 5
    x = torch.randn(1, 1, *tr.configuration_manager.patch_size)
    tr.set_deep_supervision_enabled(False)
    net.eval()
    with torch.no_grad():
        auto = net(x)
        same = net(torch.cat((x, torch.zeros(1, 4, *x.shape[2:])), 1))
        guided = net(torch.cat((x, torch.ones(1, 4, *x.shape[2:])), 1))
    torch.testing.assert_close(auto, same)
    assert not torch.allclose(auto, guided)
    with pytest.raises(ValueError, match="got 3 input channels"):
        net(torch.zeros(1, 3, *x.shape[2:]))


def test_guided_class_the_dataset_lacks(nnunet_paths):
    with pytest.raises(GuideSettingsError, match="'kidney' is not a foreground class"):
        make_trainer(GuidesKidney, nnunet_paths)


class CorrectsAlways(nnUNetTrainerGuide):
    guide_settings = GuideSettings(p_correction=1.0, correction_rounds=1, encoding="ball", ball_radius_mm=1.0)


class CorrectsAlwaysOnCPU(nnUNetTrainerGuide):
    guide_settings = GuideSettings(p_correction=1.0, correction_rounds=1, encoding="ball", ball_radius_mm=1.0,
                                   correction_user="largest_error")


@pytest.mark.parametrize("configuration,trainer", [("3d_fullres", CorrectsAlways), ("2d", CorrectsAlways),
                                                   ("3d_fullres", CorrectsAlwaysOnCPU)])
def test_correction_clicks_land_on_the_networks_errors(nnunet_paths, configuration, trainer, one_torch_thread):
    """Both correction users (densest_error on the device, largest_error on the CPU)."""
    tr = make_trainer(trainer, nnunet_paths, configuration)
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    batch = tr.guided_batch(next(dl_tr))
    before = batch["data"].clone()
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    tr.network.eval()
    with torch.no_grad():
        pred = tr.network(before)[0].argmax(1)
    tr.network.train()
    added = tr.add_correction_clicks(batch, np.random.default_rng(0))
    assert tr.network.training  # left as it was
    n_img = tr.layout.num_image_channels
    torch.testing.assert_close(batch["data"][:, :n_img], before[:, :n_img])  # the image is untouched
    n_clicks = 0
    for b, clicks in enumerate(added):
        for c in clicks:
            n_clicks += 1
            pos = tuple(int(p) for p in c.position)
            labels = tr.layout.targets[c.target].labels
            truth, predicted = int(target[b, 0][pos]) in labels, int(pred[b][pos]) in labels
            assert truth == c.positive and predicted != truth  # a miss gets +, a false positive gets -
            assert batch["data"][b, tr.layout.guide_channel(c.target, c.positive)][pos] == 1
            assert (c.target, c.position, c.positive) in [(u.target, u.position, u.positive)
                                                          for u in unpack_clicks(batch["clicks"][b])]
        if not clicks:
            torch.testing.assert_close(batch["data"][b], before[b])
    assert n_clicks > 0  # an untrained network is wrong somewhere
    out = tr.train_step(next(dl_tr))
    assert np.isfinite(out["loss"])


def test_correction_label_maps_of_a_region_based_dataset_follow_nnunet():
    """Region outputs/targets become label maps by nnU-Net's own rule (regions_class_order)."""
    from types import SimpleNamespace
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager({"background": 0, "organ": [1, 2], "lesion": 2}, regions_class_order=[1, 2])
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(2, 2, 4, 5, 6)).astype(np.float32))
    target = (torch.from_numpy(rng.random((2, 2, 4, 5, 6))) > 0.5).float()
    pred, ref = nnUNetTrainerGuide._label_maps(SimpleNamespace(label_manager=lm), logits, target)
    for b in range(2):
        np.testing.assert_array_equal(pred[b], np.asarray(lm.convert_logits_to_segmentation(logits[b])))
        np.testing.assert_array_equal(ref[b], np.asarray(lm.convert_probabilities_to_segmentation(target[b])))


class ChoosesOnDevice(nnUNetTrainerGuideAlways):
    click_selection = "device"


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_clicks_chosen_on_the_device_leave_the_loader_plain(nnunet_paths, configuration, one_torch_thread):
    tr = make_trainer(ChoosesOnDevice, nnunet_paths, configuration)
    tr.initialize()
    assert tr.selects_clicks_on_device
    dl_tr, dl_val = tr.get_dataloaders()
    pipeline = (dl_tr.data_loader if hasattr(dl_tr, "data_loader") else dl_tr.generator).transforms.transforms
    assert not any(isinstance(t, (SimulateClicksTransform, AttachClicksTransform)) for t in pipeline)
    seen = 0
    for _ in range(3):
        loaded = next(dl_tr)
        assert loaded["data"].shape[1] == 1
        batch = tr.guided_batch(loaded)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        assert batch["data"].shape[1] == 5
        for b in range(batch["data"].shape[0]):
            for c in unpack_clicks(batch["clicks"][b]):
                seen += 1
                pos = tuple(int(round(p)) for p in c.position)
                window = tuple(slice(max(0, p - 2), p + 3) for p in pos)
                labels = tr.layout.targets[c.target].labels
                near = np.isin(target[b, 0][window].numpy(), labels)
                assert near.any() == c.positive or not c.positive
                assert batch["data"][b, tr.layout.guide_channel(c.target, c.positive)][pos] > 0.5
    assert seen > 0
    out = tr.train_step(next(dl_tr))
    assert np.isfinite(out["loss"])
    assert "loss" in tr.validation_step(next(dl_val))


class SplitsSelection(nnUNetTrainerGuideAlways):
    click_selection = "split"


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_objects_labelled_in_the_loader_clicks_chosen_on_the_device(nnunet_paths, configuration, one_torch_thread,
                                                                    monkeypatch):
    """click_selection 'split': the loader ships the guided classes' objects as one int16 map
    (labelled from the augmented label map, as the loader's own choice labels them), the step
    chooses the clicks from it without labelling again; nnU-Net's target reaches the loss without it."""
    from nnunet_guide.core import device_clicks
    from nnunet_guide.core.clicks import label_objects

    def no_labelling(*args, **kwargs):
        raise AssertionError("the step labelled the objects the loader shipped")
    monkeypatch.setattr(device_clicks, "label_components", no_labelling)
    tr = make_trainer(SplitsSelection, nnunet_paths, configuration)
    tr.initialize()
    assert tr.selects_clicks_on_device and tr.labels_objects_in_loader
    dl_tr, dl_val = tr.get_dataloaders()
    pipeline = (dl_tr.data_loader if hasattr(dl_tr, "data_loader") else dl_tr.generator).transforms.transforms
    assert any(isinstance(t, LabelObjectsTransform) for t in pipeline)
    assert not any(isinstance(t, SimulateClicksTransform) for t in pipeline)
    n_objects = seen = 0
    for _ in range(3):
        loaded = next(dl_tr)
        objects = loaded["target"][-1]
        assert objects.dtype == torch.int16 and objects.shape == loaded["target"][0].shape
        for b in range(objects.shape[0]):
            seg = loaded["target"][0][b, 0].numpy()
            for t in tr.layout.targets:
                mask = np.isin(seg, t.labels)
                assert T.same_partition(np.where(mask, objects[b, 0].numpy(), 0), label_objects(mask, 2)[0])
            n_objects += len(np.unique(objects[b, 0].numpy())) - 1
        batch = tr.guided_batch(loaded)
        assert len(batch["target"]) == len(tr._get_deep_supervision_scales())  # the map is off nnU-Net's target
        for b in range(batch["data"].shape[0]):
            for c in unpack_clicks(batch["clicks"][b]):
                if c.positive:
                    seen += 1
                    pos = tuple(int(round(p)) for p in c.position)
                    assert batch["data"][b, tr.layout.guide_channel(c.target, True)][pos] > 0.5
    assert n_objects > 0 and seen > 0
    assert np.isfinite(tr.train_step(next(dl_tr))["loss"])
    assert "loss" in tr.validation_step(next(dl_val))
    plain = next(dl_tr)
    plain["target"] = plain["target"][:-1]  # a batch from elsewhere, without the map
    with pytest.raises(RuntimeError, match="carries no object map"):
        tr.guided_batch(plain)


@pytest.mark.parametrize("trainer", [nnUNetTrainerGuideAlways, SplitsSelection])
def test_packed_clicks_cross_nnunets_worker_processes(nnunet_paths, monkeypatch, trainer):
    """With augmentation workers (NonDetMultiThreadedAugmenter), the clicks (or, split, the object
    map) arrive collated at the end of the target list, as in the single-threaded loader."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    tr = make_trainer(trainer, nnunet_paths)
    tr.initialize()
    dl_tr, dl_val = tr.get_dataloaders()
    try:
        assert type(dl_tr).__name__ == "NonDetMultiThreadedAugmenter"
        n_clicks = 0
        for _ in range(3):
            batch = tr.guided_batch(next(dl_tr))
            assert batch["data"].shape[1] == 5 and len(batch["target"]) == len(tr._get_deep_supervision_scales())
            n_clicks += int(click_counts(batch["clicks"]).sum())
        assert n_clicks > 0
    finally:
        for dl in (dl_tr, dl_val):
            dl._finish()


def test_boxes_and_scribbles_travel_as_coordinates_and_refuse_device_selection(nnunet_paths):
    from nnunet_guide.trainers import nnUNetTrainerGuidePrompts

    class PromptsAlways(nnUNetTrainerGuidePrompts):
        guide_settings = GuideSettings(p_drop=0.0, p_box=0.5, p_scribble=0.5)

    tr = make_trainer(PromptsAlways, nnunet_paths)
    tr.initialize()
    dl_tr, _ = tr.get_dataloaders()
    kinds, per_sample = set(), []
    for _ in range(3):
        batch = tr.guided_batch(next(dl_tr))
        for b in range(batch["data"].shape[0]):
            clicks = unpack_clicks(batch["clicks"][b])
            kinds |= {c.kind for c in clicks}
            per_sample.append(len(clicks))
            if clicks:
                assert batch["data"][b, 1:].max() > 0.5
    assert "box" in kinds and max(per_sample) > 2  # a box, and a scribble's several clicks

    class PromptsOnDevice(PromptsAlways):
        click_selection = "device"
    with pytest.raises(GuideSettingsError, match="boxes and scribbles"):
        make_trainer(PromptsOnDevice, nnunet_paths).selects_clicks_on_device
