"""LiTS data: MRC reading, the phantom, slab datasets, the LiTS-layout converter, the real case."""
import glob
import json
import os
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_guide.data import lits
from nnunet_guide.data.lits import (LitsDataError, Volume, convert_lits, find_lits_cases, read_lits117_wheel, read_mrc,
                                    write_slab_dataset)
from nnunet_guide.data.phantom import LIVER_HU, TUMOUR_HU, make_liver_phantom


def mrc_bytes(arr: np.ndarray, mode: int, ext: int = 0) -> bytes:
    header = np.zeros(256, "<i4")
    nz, ny, nx = arr.shape
    header[:4] = (nx, ny, nz, mode)
    header[16:19] = (1, 2, 3)
    header[23] = ext
    return header.tobytes() + b"\0" * ext + arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def test_read_mrc_float_and_uint16():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 5.5
    np.testing.assert_array_equal(read_mrc(mrc_bytes(a, 2)), a)
    b = np.arange(24, dtype=np.uint16).reshape(4, 3, 2)
    out = read_mrc(mrc_bytes(b, 6, ext=80))
    assert out.dtype == np.uint16 and out.shape == (4, 3, 2)
    np.testing.assert_array_equal(out, b)


def test_read_mrc_errors_name_source():
    a = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(LitsDataError, match="img.mrc.*bytes"):
        read_mrc(mrc_bytes(a, 2)[:-4], "img.mrc")
    with pytest.raises(LitsDataError, match="mode 3"):
        read_mrc(mrc_bytes(a, 3), "x")
    with pytest.raises(LitsDataError, match="shorter"):
        read_mrc(b"abc", "x")


def test_read_wheel_layout(tmp_path):
    img = np.full((4, 5, 6), 100.0, np.float32)
    lab = np.zeros((4, 5, 6), np.uint16)
    lab[1:3, 1:3, 1:3] = 2
    whl = tmp_path / "liver_ct_segmentation_package-1.6.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(lits.WHEEL_IMAGE, mrc_bytes(img, 2))
        z.writestr(lits.WHEEL_LABEL, mrc_bytes(lab, 6))
    vol = read_lits117_wheel(str(whl))
    assert vol.image.shape == (4, 5, 6) and vol.label.dtype == np.uint8 and vol.spacing == (1.0, 1.0, 1.0)
    assert int((vol.label == 2).sum()) == 8
    lab[0, 0, 0] = 7
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(lits.WHEEL_IMAGE, mrc_bytes(img, 2))
        z.writestr(lits.WHEEL_LABEL, mrc_bytes(lab, 6))
    with pytest.raises(LitsDataError, match=r"\[7\]"):
        read_lits117_wheel(str(whl))


def test_phantom_is_ct_like_and_deterministic():
    img, lab = make_liver_phantom((48, 64, 64), (2.0, 2.0, 2.0), n_tumours=6, seed=3)
    assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == lab.shape == (48, 64, 64)
    assert set(np.unique(lab).tolist()) == {0, 1, 2}
    assert abs(np.median(img[lab == 1]) - LIVER_HU) < 15
    assert abs(np.median(img[lab == 2]) - TUMOUR_HU) < 20
    assert img.min() < -800  # air around the body
    img2, lab2 = make_liver_phantom((48, 64, 64), (2.0, 2.0, 2.0), n_tumours=6, seed=3)
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_array_equal(img, img2)


def test_slab_dataset(tmp_path):
    img, lab = make_liver_phantom((32, 40, 40), (2.0, 1.5, 1.5), n_tumours=8, seed=1)
    vol = Volume(img, lab, (2.0, 1.5, 1.5), "test phantom", True)
    logs = []
    out = write_slab_dataset(vol, str(tmp_path), 901, "Slabs", n_slabs=4, case_prefix="ph", log=logs.append)
    assert os.path.basename(out) == "Dataset901_Slabs"
    dj = json.load(open(os.path.join(out, "dataset.json")))
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert dj["numTraining"] == 4 and dj["file_ending"] == ".nii.gz"
    assert "ONE patient" in dj["description"] and "phantom" in dj["description"]
    images = sorted(glob.glob(os.path.join(out, "imagesTr", "*.nii.gz")))
    labels = sorted(glob.glob(os.path.join(out, "labelsTr", "*.nii.gz")))
    assert [os.path.basename(p) for p in images] == [f"ph_slab{i:02d}_0000.nii.gz" for i in range(4)]
    assert len(labels) == 4
    s2 = sitk.ReadImage(images[2])
    assert s2.GetSize() == (40, 40, 8)
    assert s2.GetSpacing() == pytest.approx((1.5, 1.5, 2.0))
    assert s2.GetOrigin()[2] == pytest.approx(16 * 2.0)  # slab keeps its physical z
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(labels[2])), lab[16:24])
    np.testing.assert_allclose(sitk.GetArrayFromImage(s2), img[16:24])
    # cached on the second call, rebuilt when the slab count changes
    write_slab_dataset(vol, str(tmp_path), 901, "Slabs", n_slabs=4, case_prefix="ph", log=logs.append)
    assert "cached" in logs[-1]
    write_slab_dataset(vol, str(tmp_path), 901, "Slabs", n_slabs=2, case_prefix="ph", log=logs.append)
    assert len(glob.glob(os.path.join(out, "imagesTr", "*.nii.gz"))) == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary leftovers
    with pytest.raises(LitsDataError, match="id 901"):
        write_slab_dataset(vol, str(tmp_path), 901, "Other", n_slabs=2, log=logs.append)


def _write_lits_case(folder, n, shape=(6, 8, 8), seg_shape=None, seg_values=(0, 1, 2), test=False):
    img = sitk.GetImageFromArray(np.random.default_rng(n).integers(-200, 300, size=shape).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    prefix = "test-volume" if test else "volume"
    sitk.WriteImage(img, os.path.join(folder, f"{prefix}-{n}.nii"))
    if test:
        return
    seg_arr = np.zeros(seg_shape or shape, np.uint8)
    for i, v in enumerate(seg_values):
        seg_arr.flat[i * 5:(i + 1) * 5] = v
    seg = sitk.GetImageFromArray(seg_arr)
    seg.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(seg, os.path.join(folder, f"segmentation-{n}.nii"))


def test_convert_lits_layout(tmp_path):
    src = tmp_path / "LiTS" / "Training Batch 1"
    src.mkdir(parents=True)
    _write_lits_case(str(src), 0)
    _write_lits_case(str(src), 12, seg_values=(0, 1))  # no tumour: fine
    _write_lits_case(str(tmp_path / "LiTS"), 3, test=True)
    raw = tmp_path / "raw"
    out = convert_lits(str(tmp_path / "LiTS"), 17, str(raw), log=lambda m: None)
    assert os.path.basename(out) == "Dataset017_LiTS"
    dj = json.load(open(os.path.join(out, "dataset.json")))
    assert dj["numTraining"] == 2 and dj["labels"]["tumor"] == 2
    assert sorted(os.listdir(os.path.join(out, "labelsTr"))) == ["liver_000.nii.gz", "liver_012.nii.gz"]
    assert os.listdir(os.path.join(out, "imagesTs")) == ["liver_003_0000.nii.gz"]
    im = sitk.ReadImage(os.path.join(out, "imagesTr", "liver_012_0000.nii.gz"))
    assert im.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    with pytest.raises(LitsDataError, match="--overwrite"):
        convert_lits(str(tmp_path / "LiTS"), 17, str(raw), log=lambda m: None)


def test_convert_lits_errors(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    _write_lits_case(str(a), 5, seg_shape=(6, 8, 9))
    with pytest.raises(LitsDataError) as e:
        convert_lits(str(a), 18, str(tmp_path / "raw"), log=lambda m: None)
    assert "case 5" in str(e.value) and "(8, 8, 6)" in str(e.value) and "(9, 8, 6)" in str(e.value)
    b = tmp_path / "b"
    b.mkdir()
    _write_lits_case(str(b), 6, seg_values=(0, 1, 4))
    with pytest.raises(LitsDataError, match=r"\[4\]"):
        convert_lits(str(b), 19, str(tmp_path / "raw"), log=lambda m: None)
    c = tmp_path / "c"
    c.mkdir()
    _write_lits_case(str(c), 7)
    os.remove(c / "segmentation-7.nii")
    with pytest.raises(LitsDataError, match="no segmentation-7"):
        find_lits_cases(str(c))
    assert not os.path.exists(tmp_path / "raw" / "Dataset018_LiTS" / "dataset.json")


def test_cli_requires_raw_folder(monkeypatch, tmp_path):
    from nnunet_guide.cli import convert_lits as command
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit, match="nnUNet_raw"):
        command.main(["-i", str(tmp_path), "-d", "5"])
    assert command.main(["-i", str(tmp_path / "missing"), "-d", "5", "-o", str(tmp_path / "raw")]) == 1


def test_phantom_fallback_is_announced(monkeypatch, tmp_path):
    monkeypatch.setenv("NNUNET_GUIDE_SHARED_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(lits, "shared_data_dir", lambda: None)
    msgs = []
    vol = lits.load_lits117(cache=str(tmp_path), allow_download=False, log=msgs.append)
    assert vol.is_phantom and "phantom" in msgs[-1] and "not available" in msgs[-1]
    with pytest.raises(LitsDataError, match="not available"):
        lits.load_lits117(cache=str(tmp_path), allow_download=False, allow_phantom=False, log=msgs.append)


def _shared_lits():
    d = lits.shared_data_dir()
    if d is None or not os.path.isfile(os.path.join(d, "lits117", "ct.nii.gz")):
        pytest.skip("real data absent: set NNUNET_GUIDE_SHARED_DATA or place shared/data/lits117 beside the repo")
    return d


def test_real_lits117_case():
    _shared_lits()
    vol = lits.load_lits117(allow_download=False, allow_phantom=False, log=lambda m: None)
    assert vol.image.shape == (128, 128, 128) and not vol.is_phantom
    assert abs(np.median(vol.image[vol.label == 1]) - 119) < 3
    assert abs(np.median(vol.image[vol.label == 2]) - 69) < 3
    # every slab of the demo's 8 x 16 cut holds liver and tumour
    for i in range(8):
        sl = vol.label[16 * i:16 * (i + 1)]
        assert (sl == 1).any() and (sl == 2).any()


def test_cached_wheel_matches_local_copy():
    _shared_lits()
    wheels = sorted(glob.glob(os.path.join(lits.cache_dir(), "wheels", lits.WHEEL_GLOB)))
    if not wheels:
        pytest.skip(f"wheel {lits.WHEEL_SPEC} not cached in {lits.cache_dir()} (tests do not download)")
    w = read_lits117_wheel(wheels[0])
    local = lits.load_lits117(allow_download=False, allow_phantom=False, log=lambda m: None)
    np.testing.assert_array_equal(w.image, local.image)
    np.testing.assert_array_equal(w.label, local.label)
