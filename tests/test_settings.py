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
