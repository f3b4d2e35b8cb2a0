"""Files and folders we write get the mode a plain open()/mkdir would give under the umask, so a
colleague sharing a model folder or dataset can read them (mkstemp/mkdtemp alone give 0600/0700)."""
import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk


from nnunet_guide.data.lits import Volume, write_image_atomic, write_slab_dataset
from nnunet_guide.data.phantom import make_liver_phantom
from nnunet_guide.inference.click_io import ClickSpec, save_clicks
from nnunet_guide.settings import (GuidedTarget, GuideSettings, build_layout, save_layout,
                                   write_atomic, write_json_atomic, write_text_atomic)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_modes(folder):
    """(file mode, folder mode) that plain open() and os.mkdir give here under the current umask."""
    f, d = os.path.join(folder, "plain.txt"), os.path.join(folder, "plain_dir")
    with open(f, "w") as fh:
        fh.write("x")
    os.mkdir(d)
    return mode(f), mode(d)


def test_every_writer_gives_plain_open_modes(tmp_path, umask):
    file_mode, dir_mode = plain_modes(str(tmp_path))
    assert file_mode == 0o666 & ~umask and dir_mode == 0o777 & ~umask
    written = []
    p = str(tmp_path / "a.json"); write_json_atomic({"a": 1}, p); written.append(p)
    p = str(tmp_path / "a.md"); write_text_atomic("# hi", p); written.append(p)
    p = str(tmp_path / "raw.bin"); write_atomic(p, lambda tmp: open(tmp, "wb").write(b"\0")); written.append(p)
    p = str(tmp_path / "img.nii.gz")
    write_image_atomic(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32)), p); written.append(p)
    layout = build_layout(1, [GuidedTarget("tumor", (2,))], GuideSettings(), ["CT"])
    written.append(save_layout(layout, str(tmp_path / "model")))
    p = str(tmp_path / "clicks.json"); save_clicks({"c": [ClickSpec((1.0, 2.0, 3.0), "tumor")]}, p)
    written.append(p)
    for p in written:
        assert mode(p) == file_mode, (p, oct(mode(p)), oct(file_mode))
    from nnunet_guide.settings import make_temp_dir
    d = make_temp_dir(".stage_", str(tmp_path))
    assert mode(d) == dir_mode, oct(mode(d))


def test_report_files_have_plain_modes(tmp_path, umask):
    from test_report import run_eval
    from nnunet_guide.evaluation.report import write_report
    file_mode, dir_mode = plain_modes(str(tmp_path))
    res, _ = run_eval()
    out = tmp_path / "report"
    write_report(str(out), res.records, res.plain, res.overlays, title="T")
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]
    assert len(files) >= 6
    for p in files:
        assert mode(p) == file_mode, (p, oct(mode(p)))


def test_slab_dataset_folders_and_files_have_plain_modes(tmp_path, umask):
    file_mode, dir_mode = plain_modes(str(tmp_path))
    img, lab = make_liver_phantom((16, 24, 24), (2.0, 1.5, 1.5), n_tumours=2, seed=1)
    out = write_slab_dataset(Volume(img, lab, (2.0, 1.5, 1.5), "test phantom", True), str(tmp_path / "raw"), 902,
                             "Modes", n_slabs=2, case_prefix="ph", log=lambda m: None)
    assert mode(out) == dir_mode, oct(mode(out))
    n = 0
    for root, dirs, files in os.walk(out):
        for d in dirs:
            assert mode(os.path.join(root, d)) == dir_mode, (d, oct(mode(os.path.join(root, d))))
        for f in files:
            assert mode(os.path.join(root, f)) == file_mode, (f, oct(mode(os.path.join(root, f))))
            n += 1
    assert n == 5       # 2 images, 2 labels, dataset.json
