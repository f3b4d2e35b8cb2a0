"""LiTS liver-tumour data: the demo's real case, slab datasets, and the LiTS-layout converter.

Three jobs:

1. :func:`load_lits117`: the one real LiTS case the demo needs, without any data preparation.
   It is LiTS training case 117, cropped around the liver and resampled to 128^3 by the
   distributor of the PyPI wheel ``liver-ct-segmentation-package==1.6.0`` (MIT; LiTS data
   licence CC BY-NC-SA 4.0), which ships it as ``data/img_117.mrc`` (float32 HU) and
   ``data/lab_117.mrc`` (uint16 labels: 0 background, 1 liver, 2 tumour). The voxel size is not
   recorded there; it is set to 1 mm. Sources, in order: a local copy (``ct.nii.gz`` /
   ``label.nii.gz`` in ``$NNUNET_GUIDE_SHARED_DATA/lits117`` or the repository's
   ``../shared/data/lits117``), the wheel cached in ``$NNUNET_GUIDE_CACHE`` (default
   ``~/.cache/nnunet_guide``), the wheel fetched with ``pip download --no-deps``; when none works
   the reason is reported and a generated phantom (:mod:`nnunet_guide.data.phantom`) is used.
2. :func:`write_slab_dataset`: one volume cut along z into slabs, written as an nnU-Net raw
   dataset (one patient, so the "cases" are not independent: dataset.json says so).
3. :func:`convert_lits` (the command ``nnUNetv2_guide_convert_lits``): the LiTS challenge layout
   (``volume-N.nii``, ``segmentation-N.nii``, optionally ``test-volume-N.nii``) into an nnU-Net
   raw dataset.

Arrays are in SimpleITK order (z, y, x); spacing is mm per array axis in that order.
Writes are atomic: a file appears complete or not at all; a slab dataset appears as a whole;
a converted dataset gets its dataset.json last, so nnU-Net never sees a half-converted one.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..image_io import to_sitk, write_image
from ..paths import DatasetNameError, dataset_prefix, shared_data_dir
from ..paths import dataset_folder_name as _dataset_folder_name
from ..settings import make_temp_dir, write_json_atomic

WHEEL_SPEC = "liver-ct-segmentation-package==1.6.0"
WHEEL_GLOB = "liver_ct_segmentation_package-1.6.0-*.whl"
WHEEL_IMAGE = "liver_ct_segmentation_package/data/img_117.mrc"
WHEEL_LABEL = "liver_ct_segmentation_package/data/lab_117.mrc"
LITS_LABELS = {"background": 0, "liver": 1, "tumor": 2}
MRC_HEADER_BYTES = 1024
_MRC_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16}

Log = Callable[[str], None]


class LitsDataError(RuntimeError):
    """Data that cannot be read or converted; the message names the file and what was expected."""


@dataclass
class Volume:
    """One CT volume with labels.

    Attributes:
        image: float32 (z, y, x) in HU.
        label: uint8 (z, y, x): 0 background, 1 liver, 2 tumour.
        spacing: mm per array axis (z, y, x).
        source: where it came from (a path, the wheel, or "phantom").
        is_phantom: True for the generated fallback.
    """
    image: np.ndarray
    label: np.ndarray
    spacing: Tuple[float, float, float]
    source: str
    is_phantom: bool = False


# --------------------------------------------------------------------------------------------
# locations


def cache_dir() -> str:
    """``$NNUNET_GUIDE_CACHE`` or ``~/.cache/nnunet_guide``."""
    return os.path.abspath(os.environ.get("NNUNET_GUIDE_CACHE") or
                           os.path.join(os.path.expanduser("~"), ".cache", "nnunet_guide"))


# --------------------------------------------------------------------------------------------
# MRC


def read_mrc(data: bytes, source: str = "MRC data") -> np.ndarray:
    """Decode an MRC 2014 volume from bytes into a (z, y, x) array.

    Header words used (little-endian int32): 0-2 = nx, ny, nz (columns, rows, sections),
    3 = mode (0 int8, 1 int16, 2 float32, 6 uint16), 16-18 = axis mapping (only the standard
    1, 2, 3 is accepted), 23 = extended header bytes. Data start at 1024 + extended header,
    x varying fastest, so the array reshapes directly to (nz, ny, nx).
    """
    if len(data) < MRC_HEADER_BYTES:
        raise LitsDataError(f"{source}: {len(data)} bytes, shorter than the {MRC_HEADER_BYTES}-byte MRC header")
    words = np.frombuffer(data[:MRC_HEADER_BYTES], dtype="<i4")
    nx, ny, nz, mode = (int(v) for v in words[:4])
    if min(nx, ny, nz) <= 0:
        raise LitsDataError(f"{source}: MRC dimensions {(nx, ny, nz)} are not positive (not an MRC file?)")
    if mode not in _MRC_MODES:
        raise LitsDataError(f"{source}: MRC mode {mode} is not supported; expected one of {sorted(_MRC_MODES)}")
    mapping = tuple(int(v) for v in words[16:19])
    if mapping not in ((1, 2, 3), (0, 0, 0)):
        raise LitsDataError(f"{source}: MRC axis mapping {mapping} is not the standard (1, 2, 3)")
    ext = int(words[23])
    dtype = np.dtype(_MRC_MODES[mode]).newbyteorder("<")
    n_bytes = nx * ny * nz * dtype.itemsize
    start = MRC_HEADER_BYTES + max(ext, 0)
    if len(data) < start + n_bytes:
        raise LitsDataError(
            f"{source}: header says {nx}x{ny}x{nz} voxels of {dtype.name} ({n_bytes} bytes after byte {start}) "
            f"but the file has {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, count=nx * ny * nz, offset=start)
    return arr.reshape(nz, ny, nx).astype(dtype.newbyteorder("="))


def read_lits117_wheel(wheel_path: str) -> Volume:
    """Read LiTS case 117 from the ``liver-ct-segmentation-package`` wheel (a zip file)."""
    try:
        with zipfile.ZipFile(wheel_path) as z:
            img = read_mrc(z.read(WHEEL_IMAGE), f"{wheel_path}:{WHEEL_IMAGE}")
            lab = read_mrc(z.read(WHEEL_LABEL), f"{wheel_path}:{WHEEL_LABEL}")
    except (zipfile.BadZipFile, KeyError) as e:
        raise LitsDataError(f"{wheel_path} is not the expected wheel ({type(e).__name__}: {e}); "
                            f"delete it so it is fetched again") from e
    if img.shape != lab.shape:
        raise LitsDataError(f"{wheel_path}: image shape {img.shape} differs from label shape {lab.shape}")
    return Volume(img.astype(np.float32), _checked_labels(lab, wheel_path), (1.0, 1.0, 1.0),
                  f"PyPI wheel {WHEEL_SPEC} ({os.path.basename(wheel_path)})")


def _checked_labels(lab: np.ndarray, source: str) -> np.ndarray:
    values = np.unique(lab)
    bad = [v for v in values.tolist() if v not in LITS_LABELS.values()]
    if bad:
        raise LitsDataError(f"{source}: label values {bad} found; LiTS labels are 0 background, 1 liver, 2 tumour")
    if np.issubdtype(lab.dtype, np.floating) and not np.all(np.mod(lab, 1) == 0):
        raise LitsDataError(f"{source}: label image holds non-integer values")
    return lab.astype(np.uint8)


def fetch_lits117_wheel(cache: Optional[str] = None, log: Log = print, timeout_s: float = 300.0) -> str:
    """Path of the wheel, downloading it with ``pip download --no-deps`` into ``cache/wheels``
    when it is not cached. Raises :class:`LitsDataError` with pip's message when that fails."""
    folder = os.path.join(cache or cache_dir(), "wheels")
    found = sorted(glob.glob(os.path.join(folder, WHEEL_GLOB)))
    if found:
        return found[0]
    os.makedirs(folder, exist_ok=True)
    log(f"fetching {WHEEL_SPEC} (4.5 MB, the LiTS case 117) from PyPI into {folder} ...")
    tmp = make_temp_dir(prefix=".download_", dir=folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", WHEEL_SPEC, "-d", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        got = sorted(glob.glob(os.path.join(tmp, WHEEL_GLOB)))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise LitsDataError(f"pip download {WHEEL_SPEC} failed (exit {proc.returncode}): {' | '.join(tail)}")
        dest = os.path.join(folder, os.path.basename(got[0]))
        os.replace(got[0], dest)
        return dest
    except subprocess.TimeoutExpired as e:
        raise LitsDataError(f"pip download {WHEEL_SPEC} did not finish in {timeout_s:.0f} s (PyPI unreachable?)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_nifti_pair(image_path: str, label_path: str) -> Volume:
    """Read an image/label NIfTI pair (same grid) into a :class:`Volume`."""
    img = sitk.ReadImage(image_path)
    lab = sitk.ReadImage(label_path)
    if img.GetSize() != lab.GetSize():
        raise LitsDataError(f"{label_path} has size {lab.GetSize()} but {image_path} has {img.GetSize()} (x, y, z)")
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
    return Volume(sitk.GetArrayFromImage(img).astype(np.float32),
                  _checked_labels(sitk.GetArrayFromImage(lab), label_path), spacing, image_path)


def load_lits117(cache: Optional[str] = None, allow_download: bool = True, allow_phantom: bool = True,
                 log: Log = print) -> Volume:
    """The demo's default volume: LiTS case 117 (128^3, 1 mm), or the phantom as a last resort.

    Tries a local copy, the cached wheel, then PyPI (see the module docstring). Each failure is
    logged with its reason; without ``allow_phantom`` the last failure is raised instead.
    """
    shared = shared_data_dir()
    if shared:
        d = os.path.join(shared, "lits117")
        ct, lab = os.path.join(d, "ct.nii.gz"), os.path.join(d, "label.nii.gz")
        if os.path.isfile(ct) and os.path.isfile(lab):
            vol = read_nifti_pair(ct, lab)
            vol.source = f"LiTS case 117, local copy {d}"
            return vol
    reason = None
    folder = os.path.join(cache or cache_dir(), "wheels")
    cached = sorted(glob.glob(os.path.join(folder, WHEEL_GLOB)))
    if cached or allow_download:
        try:
            return read_lits117_wheel(fetch_lits117_wheel(cache, log))
        except LitsDataError as e:
            reason = str(e)
    else:
        reason = f"no cached wheel in {folder} and downloading is switched off"
    if not allow_phantom:
        raise LitsDataError(f"LiTS case 117 is not available: {reason}")
    log(f"LiTS case 117 is not available ({reason}); PyPI could not be used, so a generated liver "
        f"phantom is used instead (numbers from it say nothing about real CT)")
    from .phantom import make_liver_phantom
    img, lab = make_liver_phantom()
    return Volume(img, lab, (1.0, 1.0, 1.0), "generated phantom (nnunet_guide.data.phantom)", True)


# --------------------------------------------------------------------------------------------
# writing nnU-Net raw datasets


def write_image_atomic(image: sitk.Image, path: str) -> None:
    """Write an image to a temporary name in the same folder and rename it into place."""
    write_image(path, image)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's ``DatasetXXX_NAME``; :class:`LitsDataError` for an id or name it cannot use."""
    try:
        return _dataset_folder_name(dataset_id, name)
    except DatasetNameError as e:
        raise LitsDataError(str(e)) from e


def _check_id_free(raw_root: str, dataset_id: int, folder_name: str) -> None:
    others = [os.path.basename(p) for p in glob.glob(os.path.join(raw_root, dataset_prefix(dataset_id) + "*"))
              if os.path.basename(p) != folder_name and os.path.isdir(p)]
    if others:
        raise LitsDataError(
            f"{raw_root} already holds {others[0]} with dataset id {dataset_id}; nnU-Net needs unique ids: "
            f"choose another -d or remove that folder")


def _fingerprint(*arrays: np.ndarray, extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def write_slab_dataset(volume: Volume, raw_root: str, dataset_id: int, name: str = "LiTS117Slabs",
                       n_slabs: int = 8, case_prefix: str = "lits117", log: Log = print) -> str:
    """Cut a volume along z (array axis 0) into ``n_slabs`` slabs and write an nnU-Net raw dataset.

    Slabs are consecutive (``numpy.array_split``: 128 slices -> 8 slabs of 16), keep their
    physical position (origin shifted along z) and become ``imagesTr/{prefix}_slabNN_0000.nii.gz``
    and ``labelsTr/{prefix}_slabNN.nii.gz``. dataset.json declares channel ``{"0": "CT"}`` and
    labels background/liver/tumor, and says that all cases come from one patient.

    Cached: if the dataset exists and was built from the same volume and slab count (a
    fingerprint stored in dataset.json), it is reused. Otherwise it is written into a temporary
    folder and renamed into place, so it appears complete or not at all.

    Returns the dataset folder.
    """
    if volume.image.shape != volume.label.shape:
        raise LitsDataError(f"{volume.source}: image shape {volume.image.shape} != label shape {volume.label.shape}")
    depth = volume.image.shape[0]
    if not (1 <= n_slabs <= depth):
        raise LitsDataError(f"cannot cut {depth} slices into {n_slabs} slabs; expected 1..{depth}")
    folder_name = dataset_folder_name(dataset_id, name)
    os.makedirs(raw_root, exist_ok=True)
    _check_id_free(raw_root, dataset_id, folder_name)
    target = os.path.join(raw_root, folder_name)
    fp = _fingerprint(volume.image, volume.label, extra=f"{n_slabs}|{volume.spacing}|{case_prefix}")
    dj_path = os.path.join(target, "dataset.json")
    if os.path.isfile(dj_path):
        try:
            with open(dj_path) as f:
                if json.load(f).get("nnunet_guide_fingerprint") == fp:
                    log(f"slab dataset {target} is up to date (cached)")
                    return target
        except (OSError, json.JSONDecodeError):
            pass
        log(f"{target} exists but was built from other data; rebuilding it")
    tmp = make_temp_dir(prefix=f".tmp_{folder_name}_", dir=raw_root)
    try:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(depth), n_slabs)])
        tumour_slabs = 0
        for i in range(n_slabs):
            z0, z1 = int(bounds[i]), int(bounds[i + 1])
            case = f"{case_prefix}_slab{i:02d}"
            origin = (0.0, 0.0, z0 * float(volume.spacing[0]))
            img = to_sitk(np.ascontiguousarray(volume.image[z0:z1]).astype(np.float32), volume.spacing, origin)
            lab = to_sitk(np.ascontiguousarray(volume.label[z0:z1]).astype(np.uint8), volume.spacing, origin)
            sitk.WriteImage(img, os.path.join(tmp, "imagesTr", f"{case}_0000.nii.gz"), True)
            sitk.WriteImage(lab, os.path.join(tmp, "labelsTr", f"{case}.nii.gz"), True)
            tumour_slabs += int((volume.label[z0:z1] == 2).any())
        dj = {
            "name": folder_name,
            "description": (f"ONE patient cut into {n_slabs} slabs of about {depth // n_slabs} slices along z, "
                            f"from {volume.source}. The cases are not independent: use it to show the method "
                            f"runs, not to estimate accuracy on new patients."
                            + (" This is a generated phantom, not real CT." if volume.is_phantom else "")),
            "channel_names": {"0": "CT"},
            "labels": dict(LITS_LABELS),
            "numTraining": n_slabs,
            "file_ending": ".nii.gz",
            "reference": "LiTS (Bilic et al. 2023), training case 117" if not volume.is_phantom else "none",
            "licence": "CC BY-NC-SA 4.0 (LiTS)" if not volume.is_phantom else "generated",
            "nnunet_guide_fingerprint": fp,
        }
        write_json_atomic(dj, os.path.join(tmp, "dataset.json"))
        if os.path.isdir(target):
            old = make_temp_dir(prefix=f".old_{folder_name}_", dir=raw_root)
            os.replace(target, os.path.join(old, "d"))
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {target}: {n_slabs} slabs ({tumour_slabs} with tumour) from {volume.source}")
    return target


# --------------------------------------------------------------------------------------------
# LiTS layout converter

_VOLUME_RE = re.compile(r"^(test-)?volume-(\d+)\.nii(\.gz)?$")
_SEG_RE = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")


@dataclass
class LitsCase:
    number: int
    volume: str
    segmentation: Optional[str]  # None for test volumes


def find_lits_cases(folder: str) -> Tuple[List[LitsCase], List[LitsCase]]:
    """Find ``volume-N.nii[.gz]`` / ``segmentation-N.nii[.gz]`` pairs (searching subfolders, as
    the LiTS download unpacks into "Training Batch 1/2") and ``test-volume-N.nii[.gz]``.

    Returns (training cases, test cases), sorted by N. Raises :class:`LitsDataError` for a volume
    without its segmentation, a segmentation without its volume, or duplicate numbers.
    """
    if not os.path.isdir(folder):
        raise LitsDataError(f"{folder} is not a folder")
    volumes: Dict[int, str] = {}
    tests: Dict[int, str] = {}
    segs: Dict[int, str] = {}
    for root, _, files in os.walk(folder):
        for fn in sorted(files):
            path = os.path.join(root, fn)
            m = _VOLUME_RE.match(fn)
            if m:
                table = tests if m.group(1) else volumes
                n = int(m.group(2))
                if n in table:
                    raise LitsDataError(f"case {n} appears twice: {table[n]} and {path}")
                table[n] = path
                continue
            m = _SEG_RE.match(fn)
            if m:
                n = int(m.group(1))
                if n in segs:
                    raise LitsDataError(f"segmentation {n} appears twice: {segs[n]} and {path}")
                segs[n] = path
    if not volumes and not tests:
        raise LitsDataError(f"no volume-N.nii / test-volume-N.nii files found under {folder}")
    missing = sorted(set(volumes) - set(segs))
    if missing:
        raise LitsDataError(f"{volumes[missing[0]]} has no segmentation-{missing[0]}.nii[.gz] beside it "
                            f"({len(missing)} volume(s) without segmentation: {missing[:10]})")
    orphans = sorted(set(segs) - set(volumes))
    if orphans:
        raise LitsDataError(f"{segs[orphans[0]]} has no volume-{orphans[0]}.nii[.gz] "
                            f"({len(orphans)} segmentation(s) without volume: {orphans[:10]})")
    train = [LitsCase(n, volumes[n], segs[n]) for n in sorted(volumes)]
    test = [LitsCase(n, tests[n], None) for n in sorted(tests)]
    return train, test


def _check_geometry(case: LitsCase, img: sitk.Image, seg: sitk.Image) -> sitk.Image:
    """Same size is required; spacing/origin/direction that differ only by header round-off are
    replaced by the volume's (LiTS segmentations are known to carry slightly different headers)."""
    if img.GetSize() != seg.GetSize():
        raise LitsDataError(
            f"case {case.number}: {case.volume} has size {img.GetSize()} but {case.segmentation} has "
            f"{seg.GetSize()} (x, y, z); image and segmentation must share one voxel grid")
    sp_i, sp_s = np.array(img.GetSpacing()), np.array(seg.GetSpacing())
    if not np.allclose(sp_i, sp_s, rtol=1e-3, atol=1e-4):
        raise LitsDataError(
            f"case {case.number}: spacing {tuple(sp_i)} of {case.volume} differs from {tuple(sp_s)} of "
            f"{case.segmentation}")
    if not np.allclose(img.GetOrigin(), seg.GetOrigin(), atol=0.5) or \
            not np.allclose(img.GetDirection(), seg.GetDirection(), atol=1e-3):
        raise LitsDataError(
            f"case {case.number}: origin/direction of {case.segmentation} ({seg.GetOrigin()}, {seg.GetDirection()}) "
            f"do not match {case.volume} ({img.GetOrigin()}, {img.GetDirection()})")
    seg.CopyInformation(img)
    return seg


def convert_lits(input_folder: str, dataset_id: int, raw_root: str, name: str = "LiTS",
                 overwrite: bool = False, log: Log = print) -> str:
    """Convert a LiTS-layout folder into ``raw_root/DatasetXXX_name`` (nnU-Net raw format).

    Training cases become ``imagesTr/liver_NNN_0000.nii.gz`` + ``labelsTr/liver_NNN.nii.gz``
    (labels checked to be 0/1/2, stored as uint8; image pixels untouched), test volumes
    ``imagesTs/liver_NNN_0000.nii.gz``. Each file is written atomically and dataset.json last.
    Cases without tumour are fine (counted in the log). Returns the dataset folder.
    """
    train, test = find_lits_cases(input_folder)
    folder_name = dataset_folder_name(dataset_id, name)
    os.makedirs(raw_root, exist_ok=True)
    _check_id_free(raw_root, dataset_id, folder_name)
    target = os.path.join(raw_root, folder_name)
    if os.path.exists(os.path.join(target, "dataset.json")) and not overwrite:
        raise LitsDataError(f"{target} already holds a dataset; pass --overwrite to convert again")
    no_tumour = 0
    for i, case in enumerate(train):
        cid = f"liver_{case.number:03d}"
        img = sitk.ReadImage(case.volume)
        seg = _check_geometry(case, img, sitk.ReadImage(case.segmentation))
        arr = sitk.GetArrayFromImage(seg)
        lab = _checked_labels(arr, f"case {case.number} ({case.segmentation})")
        no_tumour += int(not (lab == 2).any())
        out = sitk.GetImageFromArray(lab)
        out.CopyInformation(img)
        write_image_atomic(img, os.path.join(target, "imagesTr", f"{cid}_0000.nii.gz"))
        write_image_atomic(out, os.path.join(target, "labelsTr", f"{cid}.nii.gz"))
        log(f"[{i + 1}/{len(train)}] {cid}: size {img.GetSize()} spacing "
            f"{tuple(round(s, 3) for s in img.GetSpacing())}")
    for case in test:
        write_image_atomic(sitk.ReadImage(case.volume),
                           os.path.join(target, "imagesTs", f"liver_{case.number:03d}_0000.nii.gz"))
    dj = {
        "name": folder_name,
        "description": f"LiTS liver tumour segmentation, converted from {os.path.abspath(input_folder)}",
        "channel_names": {"0": "CT"},
        "labels": dict(LITS_LABELS),
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "reference": "Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), Medical Image Analysis 2023",
        "licence": "CC BY-NC-SA 4.0",
    }
    write_json_atomic(dj, os.path.join(target, "dataset.json"))
    log(f"wrote {target}: {len(train)} training cases ({no_tumour} without tumour), {len(test)} test volumes")
    return target
