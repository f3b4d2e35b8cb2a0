import json
import os

import pytest

from nnunet_guide.settings import (PLANS_KEY, SETTINGS_FILE, GuideSettings, GuideSettingsError, build_layout,
                                   load_layout, resolve_targets, save_layout)

DJ = {"labels": {"background": 0, "liver": 1, "tumor": 2}}
DJ_REGIONS = {"labels": {"background": 0, "liver": [1, 2], "tumor": 2}, "regions_class_order": [1, 2]}


def test_resolve_all_and_by_name_or_value():
    assert [t.name for t in resolve_targets(DJ, None)] == ["liver", "tumor"]
    assert [t.labels for t in resolve_targets(DJ, ["tumor"])] == [(2,)]
    assert [t.name for t in resolve_targets(DJ, [2])] == ["tumor"]
    assert [t.name for t in resolve_targets(DJ, ["2"])] == ["tumor"]
    assert [t.labels for t in resolve_targets(DJ_REGIONS, None)] == [(1, 2), (2,)]


def test_guided_class_missing_names_it():
    with pytest.raises(GuideSettingsError, match="'kidney'.*liver"):
        resolve_targets(DJ, ["kidney"])
    with pytest.raises(GuideSettingsError, match="7"):
        resolve_targets(DJ, [7])


def test_ignore_label_is_not_guided():
    dj = {"labels": {"background": 0, "a": 1, "ignore": 2}}
    assert [t.name for t in resolve_targets(dj, None, ignore_label=2)] == ["a"]


@pytest.mark.parametrize("kw,msg", [({"encoding": "gauss"}, "unknown guide encoding 'gauss'"),
                                    ({"click_policy": "x"}, "unknown click policy"),
                                    ({"p_drop": 1.5}, "p_drop"),
                                    ({"sigma_mm": -1}, "sigma_mm")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(GuideSettingsError, match=msg):
        GuideSettings(**kw)


def test_layout_channels_and_roundtrip(tmp_path):
    targets = resolve_targets(DJ, None)
    layout = build_layout(1, targets, GuideSettings(), ["CT"])
    assert [c["kind"] for c in layout.channels] == ["image", "guide", "guide", "guide", "guide"]
    assert layout.guide_channel(1, True) == 3 and layout.guide_channel(1, False) == 4
    assert layout.target_index("tumor") == 1 and layout.target_index(2) == 1
    with pytest.raises(GuideSettingsError, match="'bone' is not a guided class"):
        layout.target_index("bone")
    no_neg = build_layout(2, targets, GuideSettings(negatives=False))
    assert no_neg.num_channels == 4
    save_layout(layout, str(tmp_path))
    assert load_layout(str(tmp_path)).to_dict() == layout.to_dict()


def test_settings_file_must_match_the_plans_of_the_checkpoint(tmp_path):
    layout = build_layout(1, resolve_targets(DJ, None), GuideSettings(), ["CT"])
    other = build_layout(1, resolve_targets(DJ, ["tumor"]), GuideSettings(), ["CT"])
    save_layout(layout, str(tmp_path))
    with open(tmp_path / "plans.json", "w") as f:
        json.dump({PLANS_KEY: other.to_dict()}, f)
    with pytest.raises(GuideSettingsError, match="does not match"):
        load_layout(str(tmp_path))


def test_missing_or_broken_settings_file(tmp_path):
    with pytest.raises(GuideSettingsError, match="not trained with an nnunet_guide trainer"):
        load_layout(str(tmp_path))
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(GuideSettingsError, match="not valid JSON"):
        load_layout(str(tmp_path))
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"format_version": 1, "targets": []}))
    with pytest.raises(GuideSettingsError, match="malformed"):
        load_layout(str(tmp_path))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from nnunet_guide.settings import write_atomic, write_json_atomic
    path = str(tmp_path / "sub" / "case.nii.gz")
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("new")

    write_atomic(path, write)
    assert open(path).read() == "new" and seen[0].endswith(".nii.gz")  # the writer sees the file ending

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert open(path).read() == "new"
    assert sorted(os.listdir(tmp_path / "sub")) == ["case.nii.gz"]  # no temporary file left
    write_json_atomic({"a": [1, 2]}, str(tmp_path / "x.json"))
    assert json.load(open(tmp_path / "x.json")) == {"a": [1, 2]}


# ---- the model folder checks itself -------------------------------------------------------
def _saved(tmp_path, mutate, layout=None):
    """Save a valid layout (guide_settings.json and plans.json), apply ``mutate`` to the dict in
    the settings file (or, with ``where="plans"``, the plans' copy) and return the folder."""
    layout = layout or build_layout(1, resolve_targets(DJ, None), GuideSettings(), ["CT"])
    d = layout.to_dict()
    mutate(d)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(d))
    return str(tmp_path)


def _del_negative(d):
    d["channels"] = [c for c in d["channels"] if not (c.get("target") == "tumor" and c.get("sign") == "-")]
    d["num_channels"] = len(d["channels"])


def _no_kind(d):
    del d["channels"][1]["kind"]


def _set(path, value):
    def mutate(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return mutate


def _extra_channel(d):
    d["channels"].append({"kind": "guide", "target": "liver", "sign": "+"})
    d["num_channels"] = len(d["channels"])


@pytest.mark.parametrize("mutate,field", [
    (_del_negative, r"channels\[4\]"),                     # deleted negative channel of tumor
    (_no_kind, r"channels\[1\]"),                          # a channel without kind
    (_set(["num_image_channels"], 2), "num_image_channels"),  # disagrees with the channel list
    (_set(["num_image_channels"], True), "num_image_channels"),
    (_set(["guide", "negatives"], "no"), "guide.negatives"),
    (_set(["guide", "sigma_mm"], True), "guide.sigma_mm"),
    (_set(["guide", "sigma_mm"], float("nan")), "guide.sigma_mm"),
    (_set(["guide", "p_drop"], "0.5"), "guide.p_drop"),
    (_set(["guide", "connectivity"], 2.0), "guide.connectivity"),
    (_set(["guide", "offset_half"], 0), "guide.offset_half"),
    (_set(["guide", "guided_labels"], [True]), "guide.guided_labels"),
    (_set(["format_version"], True), "format_version"),
    (_set(["num_channels"], 4), "num_channels"),
    (_set(["targets", 0, "labels"], [1.5]), r"targets\[0\].labels"),
    (_set(["channels", 2, "sign"], "+"), r"channels\[2\]"),           # a reordered/duplicated channel
    (_set(["channels", 1, "kind"], "guidance"), r"channels\[1\].kind"),
    (_extra_channel, r"channels\[5\]"),                                # an extra channel
    (_set(["guide", "negatives"], False), r"channels\[2\]"),          # settings say no negatives, list has them
    (_set(["extra"], []), "extra"),
    (_set(["surprise"], 1), "surprise"),
])
def test_model_folder_checks_itself(tmp_path, mutate, field):
    folder = _saved(tmp_path, mutate)
    with pytest.raises(GuideSettingsError) as e:
        load_layout(folder)
    msg = str(e.value)
    assert SETTINGS_FILE in msg, msg
    import re
    assert re.search(field, msg), msg


def test_plans_copy_is_checked_with_its_file_name(tmp_path):
    layout = build_layout(1, resolve_targets(DJ, None), GuideSettings(), ["CT"])
    save_layout(layout, str(tmp_path))
    bad = layout.to_dict()
    bad["guide"]["negatives"] = "no"
    (tmp_path / "plans.json").write_text(json.dumps({PLANS_KEY: bad}))
    with pytest.raises(GuideSettingsError, match=r"plans\.json.*nnunet_guide.*guide\.negatives"):
        load_layout(str(tmp_path))
    from nnunet_guide.settings import layout_from_plans
    with pytest.raises(GuideSettingsError, match=r"my_plans\.json.*guide\.negatives"):
        layout_from_plans({PLANS_KEY: bad}, source="my_plans.json")
    (tmp_path / "plans.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(GuideSettingsError, match=r"plans\.json is not valid JSON"):
        load_layout(str(tmp_path))


def test_valid_layouts_still_load(tmp_path):
    for layout in (build_layout(2, resolve_targets(DJ, ["tumor"]), GuideSettings(negatives=False), ["T1", "T2"]),
                   build_layout(1, [], None, ["CT"]),
                   build_layout(1, resolve_targets(DJ_REGIONS, None), GuideSettings(guided_labels=["liver", 2],
                                                                                   sigma_mm=2), ["CT"])):
        folder = tmp_path / str(layout.num_channels)
        folder.mkdir()
        save_layout(layout, str(folder))
        (folder / "plans.json").write_text(json.dumps({PLANS_KEY: layout.to_dict()}))
        assert load_layout(str(folder)).to_dict() == layout.to_dict()
