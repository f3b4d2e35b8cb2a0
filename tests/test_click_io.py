"""Click files: formats, normalisation, errors, and mapping into preprocessed space."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_guide.core.coords import PreprocessedGeometry
from nnunet_guide.inference.click_io import (
    ClickFileError, ClickSpec, check_cases, check_labels, load_clicks, resolve_clicks, save_clicks,
)
from nnunet_guide.settings import GuidedTarget, GuideSettings, build_layout


def layout(negatives=True):
    return build_layout(1, [GuidedTarget("liver", (1,)), GuidedTarget("tumor", (2,))],
                        GuideSettings(negatives=negatives))


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_own_format_defaults_and_fields(tmp_path):
    f = write(tmp_path, "clicks.json", {
        "case_001": [{"point": [1, 2, 3], "label": "tumor"},
                     {"point": [4.5, 5, 6], "label": 1, "positive": False, "space": "voxel"}],
        "case_002": [],
    })
    c = load_clicks(f)
    assert set(c) == {"case_001", "case_002"}
    a, b = c["case_001"]
    assert a.point == (1.0, 2.0, 3.0) and a.label == "tumor" and a.positive and a.space == "physical"
    assert b.point == (4.5, 5.0, 6.0) and b.label == 1 and not b.positive and b.space == "voxel"
    assert c["case_002"] == []
    # round trip through our writer
    out = str(tmp_path / "again.json")
    save_clicks(c, out)
    assert load_clicks(out) == {k: [ClickSpec(s.point, s.label, s.positive, s.space, s.source.replace(
        f, out)) for s in v] for k, v in c.items()}


@pytest.mark.parametrize("click,match", [
    ({"point": [1, 2], "label": "tumor", "positve": True}, "unknown key"),
    ({"label": "tumor"}, "missing 'point'"),
    ({"point": [1, 2, 3]}, "missing 'label'"),
    ({"point": [1, "a", 3], "label": "tumor"}, "finite numbers"),
    ({"point": [1, 2, 3, 4], "label": "tumor"}, "2 or 3"),
    ({"point": [1, 2, 3], "label": "tumor", "positive": "yes"}, "true or false"),
    ({"point": [1, 2, 3], "label": "tumor", "space": "ras"}, "'space' must be"),
    ({"point": [1, 2, 3], "label": 2.5}, "label"),
    ({"point": [1, 2, 3], "label": "tumor", "size_mm": -4}, "'size_mm' must be a positive number"),
    ({"point": [1, 2, 3], "label": "tumor", "size_mm": "big"}, "'size_mm' must be a positive number"),
])
def test_own_format_errors_name_file_case_and_value(tmp_path, click, match):
    f = write(tmp_path, "bad.json", {"case_007": [click]})
    with pytest.raises(ClickFileError, match=match) as e:
        load_clicks(f)
    assert "bad.json" in str(e.value) and "case_007" in str(e.value)


def test_invalid_json_and_missing_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ClickFileError, match="broken.json.*not valid JSON"):
        load_clicks(str(p))
    with pytest.raises(ClickFileError, match="does not exist"):
        load_clicks(str(tmp_path / "nope.json"))
    with pytest.raises(ClickFileError, match="top level"):
        load_clicks(write(tmp_path, "list.json", [1, 2]))
    with pytest.raises(ClickFileError, match="cannot tell the click format"):
        load_clicks(write(tmp_path, "odd.json", {"case": 3}))


def test_monai_style_single_case_and_keyed(tmp_path):
    f = write(tmp_path, "liver_3.json", {"tumor": [[10, 11, 12], [1, 2, 3]], "background": [[0, 0, 1]]})
    c = load_clicks(f)
    assert list(c) == ["liver_3"]
    specs = c["liver_3"]
    assert [(s.label, s.positive, s.space) for s in specs] == [
        ("tumor", True, "voxel"), ("tumor", True, "voxel"), ("background", False, "voxel")]
    assert specs[0].point == (10.0, 11.0, 12.0)
    f2 = write(tmp_path, "many.json", {"a": {"tumor": [[1, 2, 3]]}, "b": {"2": [[3, 2, 1]], "background": []}})
    c2 = load_clicks(f2)
    assert c2["a"][0].label == "tumor" and c2["b"][0].label == 2


def slicer_file(system="RAS", name="tumor", points=None):
    points = points or [{"id": "1", "label": "F-1", "position": [10.0, -20.0, 5.0]}]
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                       "Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": system, "name": name, "controlPoints": points}]}


def test_slicer_markups_ras_is_converted_to_lps(tmp_path):
    c = load_clicks(write(tmp_path, "case_9.mrk.json", slicer_file("RAS")))
    (s,) = c["case_9"]
    assert s.point == (-10.0, 20.0, 5.0) and s.label == "tumor" and s.positive and s.space == "physical"
    c = load_clicks(write(tmp_path, "case_8.mrk.json", slicer_file("LPS")))
    assert c["case_8"][0].point == (10.0, -20.0, 5.0)


def test_slicer_negative_points_background_and_description(tmp_path):
    pts = [{"label": "F-1", "position": [1, 2, 3]},
           {"label": "F-2-", "position": [1, 2, 3]},
           {"label": "x", "description": "negative", "position": [1, 2, 3]},
           {"label": "y", "description": "liver", "position": [1, 2, 3]}]
    c = load_clicks(write(tmp_path, "c.mrk.json", slicer_file("LPS", "tumor", pts)))["c"]
    assert [(s.label, s.positive) for s in c] == [("tumor", True), ("tumor", False), ("tumor", False),
                                                  ("liver", True)]
    bg = load_clicks(write(tmp_path, "d.mrk.json", slicer_file("LPS", "background")))["d"]
    assert bg[0].label == "background" and not bg[0].positive
    with pytest.raises(ClickFileError, match="coordinateSystem"):
        load_clicks(write(tmp_path, "e.mrk.json", slicer_file("XYZ")))


def test_folder_of_files_merges_and_refuses_duplicates(tmp_path):
    d = tmp_path / "clicks"
    d.mkdir()
    (d / "case_a").mkdir()
    (d / "case_a" / "tumors.mrk.json").write_text(json.dumps(slicer_file("LPS")))
    (d / "case_a" / "bg.mrk.json").write_text(json.dumps(slicer_file("LPS", "background")))
    (d / "case_b.json").write_text(json.dumps({"tumor": [[1, 2, 3]]}))
    c = load_clicks(str(d))
    assert sorted(c) == ["case_a", "case_b"] and len(c["case_a"]) == 2
    (d / "more.json").write_text(json.dumps({"case_b": [{"point": [1, 2, 3], "label": "tumor"}]}))
    with pytest.raises(ClickFileError, match="case 'case_b' has clicks in more than one file"):
        load_clicks(str(d))


def test_check_cases_and_labels():
    clicks = {"case_1": [ClickSpec((1, 2, 3), "tumour", True, "physical", "f.json, case 'case_1', click 0")]}
    with pytest.raises(ClickFileError, match=r"\['case_1'\] are not in the input"):
        check_cases(clicks, ["case_2", "case_3"], "f.json")
    check_cases(clicks, ["case_1"], "f.json")
    with pytest.raises(ClickFileError, match="f.json, case 'case_1', click 0.*'tumour' is not a guided class"):
        check_labels(clicks, layout())
    ok = {"c": [ClickSpec((1, 2, 3), "tumor"), ClickSpec((1, 2, 3), 1), ClickSpec((1, 2, 3), "background", False)]}
    check_labels(ok, layout())
    neg = {"c": [ClickSpec((1, 2, 3), "tumor", False, source="g.json")]}
    with pytest.raises(ClickFileError, match="g.json: negative click.*without negative"):
        check_labels(neg, layout(negatives=False))
    no_guides = build_layout(1, [], None)
    with pytest.raises(ClickFileError, match="no guide channels"):
        check_labels(ok, no_guides)


def case_properties(size_xyz=(20, 16, 10), spacing=(0.7, 0.9, 2.5)):
    img = sitk.GetImageFromArray(np.zeros(size_xyz[::-1], np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((3.0, -4.0, 10.0))
    c, s = np.cos(0.4), np.sin(0.4)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    raw_shape = size_xyz[::-1]
    tf = (2, 0, 1)
    before = tuple(raw_shape[t] for t in tf)
    props = {"sitk_stuff": {"spacing": img.GetSpacing(), "origin": img.GetOrigin(), "direction": img.GetDirection()},
             "spacing": list(spacing[::-1]), "shape_before_cropping": before,
             "bbox_used_for_cropping": [[1, before[0]], [0, before[1] - 2], [2, before[2]]],
             "shape_after_cropping_and_before_resampling": (before[0] - 1, before[1] - 2, before[2] - 2)}
    pre_shape = (25, 9, 30)
    return img, props, tf, pre_shape


def test_resolve_clicks_maps_physical_and_voxel_clicks_to_the_same_place():
    img, props, tf, pre_shape = case_properties()
    ijk = (7.0, 9.0, 4.0)
    phys = img.TransformContinuousIndexToPhysicalPoint(ijk)
    specs = [ClickSpec(phys, "tumor", True, "physical", "p"), ClickSpec(ijk, 2, False, "voxel", "v"),
             ClickSpec(ijk, "background", False, "voxel", "b")]
    clicks = resolve_clicks(specs, layout(), "case", props, tf, pre_shape)
    assert len(clicks) == 4  # background -> one negative click per guided class
    np.testing.assert_allclose(clicks[0].position, clicks[1].position, atol=1e-8)
    assert clicks[0].target == 1 and clicks[0].positive and clicks[1].target == 1 and not clicks[1].positive
    assert {(c.target, c.positive) for c in clicks[2:]} == {(0, False), (1, False)}
    pre = PreprocessedGeometry.from_properties(props, tf, pre_shape)
    np.testing.assert_allclose(pre.preprocessed_to_raw(clicks[0].position), ijk[::-1], atol=1e-8)


def test_resolve_clicks_refuses_points_outside_the_image():
    img, props, tf, pre_shape = case_properties()
    outside = ClickSpec((20.0, 3.0, 4.0), "tumor", True, "voxel", "f.json, case 'c', click 3")
    with pytest.raises(ClickFileError, match=r"f.json, case 'c', click 3: click at \[20.0, 3.0, 4.0\].*outside "
                                             r"the image of case 'c'.*20 x 16 x 10"):
        resolve_clicks([outside], layout(), "c", props, tf, pre_shape)
    far = img.TransformContinuousIndexToPhysicalPoint((5.0, 5.0, -3.0))
    with pytest.raises(ClickFileError, match="outside"):
        resolve_clicks([ClickSpec(far, "tumor", True, "physical", "x")], layout(), "c", props, tf, pre_shape)
    with pytest.raises(ClickFileError, match="has 2 coordinates"):
        resolve_clicks([ClickSpec((1.0, 2.0), "tumor", True, "voxel", "x")], layout(), "c", props, tf, pre_shape)


@pytest.mark.parametrize("orientation", ["LPS", "RAI", "PIL"])
def test_voxel_clicks_refer_to_the_file_when_the_reader_reorients(tmp_path, orientation):
    """nnU-Net's SimpleITKIOWithReorient hands out a RAS-reoriented array; a voxel click is still
    the ITK index of the file as SimpleITK opens it, so it lands on the same voxel as the same
    point given in mm, and on the voxel that holds the file's marked value."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIOWithReorient
    arr = np.zeros((9, 11, 13), np.float32)
    arr[2, 7, 3] = 5  # z, y, x of the file
    img = sitk.DICOMOrient(sitk.GetImageFromArray(arr), orientation)  # same voxels, other axis order
    img.SetSpacing((0.8, 1.5, 2.5))
    img.SetOrigin((4.0, -7.0, 12.0))
    f = str(tmp_path / "case_0000.nii.gz")
    sitk.WriteImage(img, f)
    on_disk = sitk.ReadImage(f)
    ijk = tuple(float(v) for v in np.argwhere(sitk.GetArrayFromImage(on_disk) == 5)[0][::-1])
    data, props = SimpleITKIOWithReorient().read_images([f])
    assert props["sitk_stuff"]["original_orientation"] == orientation
    shape = data.shape[1:]
    props.update({"bbox_used_for_cropping": [[0, s] for s in shape],
                  "shape_after_cropping_and_before_resampling": shape, "shape_before_cropping": shape})
    specs = [ClickSpec(ijk, "tumor", True, "voxel", "v"),
             ClickSpec(on_disk.TransformContinuousIndexToPhysicalPoint(ijk), "tumor", True, "physical", "p")]
    clicks = resolve_clicks(specs, layout(), "case", props, (0, 1, 2), shape)
    np.testing.assert_allclose(clicks[0].position, clicks[1].position, atol=1e-6)
    assert data[0][tuple(int(round(v)) for v in clicks[0].position)] == 5
    size = " x ".join(str(s) for s in on_disk.GetSize())
    with pytest.raises(ClickFileError, match=f"image size {size} voxels"):
        resolve_clicks([ClickSpec((0.0, 0.0, 40.0), "tumor", True, "voxel", "o")], layout(), "case", props,
                       (0, 1, 2), shape)


def test_object_size_becomes_a_sigma_in_preprocessed_voxels(tmp_path):
    """size_mm (the object's diameter) gives object_gaussian guides sigma = 0.37 x diameter, per
    preprocessed axis in that axis' voxels (anisotropic, transposed, resampled); the array space
    is the reader's (z, y, x) index."""
    f = write(tmp_path, "sized.json", {"case": [{"point": [7, 9, 4], "label": "tumor", "space": "voxel",
                                                 "size_mm": 20}]})
    spec = load_clicks(f)["case"][0]
    assert spec.size_mm == 20.0 and spec.to_dict()["size_mm"] == 20.0
    img, props, tf, pre_shape = case_properties()
    as_array = ClickSpec((4.0, 9.0, 7.0), "tumor", True, "array", "a")
    sized, unsized = resolve_clicks([spec, as_array], layout(), "case", props, tf, pre_shape)
    assert unsized.sigma is None
    np.testing.assert_allclose(sized.position, unsized.position)
    pre = PreprocessedGeometry.from_properties(props, tf, pre_shape)
    raw_mm = np.array(props["spacing"])[list(tf)]  # (z, y, x) spacing, transposed
    mm_per_voxel = raw_mm * np.array(pre.shape_after_cropping) / np.array(pre_shape)
    np.testing.assert_allclose(np.array(sized.sigma) * mm_per_voxel, 0.37 * 20.0)
