"""Coordinate mapping: physical (LPS mm) <-> ITK index <-> raw array <-> nnU-Net preprocessed."""
import numpy as np
import pytest
import SimpleITK as sitk

import helpers as T
from nnunet_guide.core.coords import (
    CoordinateError, ImageGeometry, PreprocessedGeometry, array_to_itk_index, itk_index_to_array,
    lps_to_ras, physical_to_preprocessed, physical_to_raw, preprocessed_to_physical, raw_inside,
    raw_to_physical,
)


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_image(size_xyz=(20, 17, 9), spacing=(0.8, 1.1, 3.0), origin=(-12.0, 30.5, 7.0),
               direction=None, array=None):
    if array is None:
        array = np.zeros(size_xyz[::-1], np.float32)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is None:
        direction = rotation(0.3, -0.2, 0.9)
    img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return img


def test_geometry_matches_simpleitk_on_rotated_anisotropic_image():
    img = make_image()
    g = ImageGeometry.from_sitk_image(img)
    rng = np.random.default_rng(0)
    idx = rng.uniform(-1, 15, size=(20, 3))
    phys = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in idx])
    np.testing.assert_allclose(g.index_to_physical(idx), phys, atol=1e-9)
    back = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in phys])
    np.testing.assert_allclose(g.physical_to_index(phys), back, atol=1e-9)
    np.testing.assert_allclose(g.spacing, img.GetSpacing())


def test_array_index_is_reversed_itk_index_and_2d_images_get_a_leading_axis():
    np.testing.assert_array_equal(itk_index_to_array([1, 2, 3]), [3, 2, 1])
    np.testing.assert_array_equal(itk_index_to_array([[5, 7]]), [[0, 7, 5]])
    np.testing.assert_array_equal(array_to_itk_index([0, 7, 5], ndim_image=2), [5, 7])
    np.testing.assert_array_equal(array_to_itk_index([3, 2, 1]), [1, 2, 3])
    # the voxel SimpleITK reads at ITK index (i, j, k) is array[k, j, i]
    arr = np.zeros((4, 5, 6), np.float32)
    arr[3, 1, 4] = 1
    img = make_image(array=arr)
    assert img.GetPixel(4, 1, 3) == 1
    z, y, x = itk_index_to_array([4, 1, 3]).astype(int)
    assert arr[z, y, x] == 1


def test_lps_ras_flip():
    np.testing.assert_array_equal(lps_to_ras([1.0, -2.0, 3.0]), [-1.0, 2.0, 3.0])
    with pytest.raises(CoordinateError):
        lps_to_ras([1.0, 2.0])


def test_nibabel_affine_gives_same_physical_points_as_sitk():
    img = make_image()
    g_sitk = ImageGeometry.from_sitk_image(img)
    # NIfTI affine: RAS = A @ ijk; LPS = diag(-1,-1,1) @ RAS
    flip = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = flip @ g_sitk.matrix
    aff[:3, 3] = flip @ g_sitk.origin
    g_nib = ImageGeometry.from_ras_affine(aff)
    p = np.array([[1.0, 2.0, 3.0], [7.5, -1.0, 0.0]])
    np.testing.assert_allclose(g_nib.index_to_physical(p), g_sitk.index_to_physical(p), atol=1e-9)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("pre_shape_factor", [(1.0, 1.0, 1.0), (2.5, 0.7, 1.3), (0.5, 3.0, 1.0)])
def test_round_trip_physical_preprocessed_physical(transpose, pre_shape_factor):
    raw_shape = (9, 17, 20)  # z, y, x
    img = make_image(size_xyz=raw_shape[::-1])
    geom = ImageGeometry.from_sitk_image(img)
    before = tuple(raw_shape[t] for t in transpose)
    bbox = [[1, before[0] - 1], [2, before[1]], [0, before[2] - 3]]
    after = tuple(b[1] - b[0] for b in bbox)
    pre_shape = tuple(max(1, int(round(a * f))) for a, f in zip(after, pre_shape_factor))
    props = {"bbox_used_for_cropping": bbox, "shape_after_cropping_and_before_resampling": after,
             "shape_before_cropping": before}
    pre = PreprocessedGeometry.from_properties(props, transpose, pre_shape)
    assert pre.raw_shape == raw_shape

    rng = np.random.default_rng(1)
    # points inside the crop box, in raw index space, then to physical with SimpleITK itself
    lo = np.array([bbox[pre.transpose_backward[a]][0] for a in range(3)], float)
    hi = np.array([bbox[pre.transpose_backward[a]][1] for a in range(3)], float) - 1
    raw = rng.uniform(lo, hi, size=(50, 3))
    phys = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(r[::-1])) for r in raw])

    p = physical_to_preprocessed(phys, geom, pre)
    assert pre.inside(p).all()
    back = preprocessed_to_physical(p, geom, pre)
    np.testing.assert_allclose(back, phys, atol=1e-8)

    # the preprocessed voxel a point lands in has its centre within half a preprocessed voxel
    centres = preprocessed_to_physical(np.round(p), geom, pre)
    raw_c = physical_to_raw(centres, geom)
    raw_p = physical_to_raw(phys, geom)
    half_vox_raw = 0.5 * pre.preprocessed_voxel_size[list(pre.transpose_backward)]
    assert np.all(np.abs(raw_c - raw_p) <= half_vox_raw + 1e-9)

    # a point outside the crop box is reported outside
    outside = np.array([[0.0, 0.0, 0.0]])  # raw index (0,0,0) lies before the crop start on some axis
    if any(b[0] > 0 for b in bbox):
        assert not pre.inside(pre.raw_to_preprocessed(outside)).all()


def test_resampling_convention_matches_skimage_resize():
    """A preprocessed voxel o samples raw position (o + 0.5) * old/new - 0.5 (centre matching)."""
    from skimage.transform import resize
    old = np.arange(10, dtype=float)  # value = position
    for new_n in (4, 7, 23):
        new = resize(old[:, None], (new_n, 1), order=1, mode="edge", anti_aliasing=False)[:, 0]
        props = {"bbox_used_for_cropping": [[0, 10], [0, 1], [0, 1]],
                 "shape_after_cropping_and_before_resampling": (10, 1, 1), "shape_before_cropping": (10, 1, 1)}
        pre = PreprocessedGeometry.from_properties(props, (0, 1, 2), (new_n, 1, 1))
        o = np.arange(new_n, dtype=float)
        expected = pre.preprocessed_to_raw(np.stack([o, 0 * o, 0 * o], 1))[:, 0]
        inner = (expected >= 0) & (expected <= 9)  # edge mode clamps outside
        np.testing.assert_allclose(new[inner], expected[inner], atol=1e-9)


def test_raw_inside_and_errors():
    assert raw_inside([[0, 0, 0], [3.4, 4.4, 5.4]], (4, 5, 6)).all()
    assert not raw_inside([[3.6, 0, 0]], (4, 5, 6)).any()
    assert not raw_inside([[-0.6, 0, 0]], (4, 5, 6)).any()
    with pytest.raises(CoordinateError, match="expected 3"):
        ImageGeometry.from_sitk_image(make_image()).physical_to_index([1.0, 2.0])
    with pytest.raises(CoordinateError, match="finite"):
        ImageGeometry.from_sitk_image(make_image()).physical_to_index([1.0, np.nan, 2.0])
    with pytest.raises(CoordinateError, match="no geometry"):
        ImageGeometry.from_properties({"spacing": [1, 1, 1]})
    with pytest.raises(CoordinateError, match="bbox_used_for_cropping"):
        PreprocessedGeometry.from_properties({"spacing": [1, 1, 1]}, (0, 1, 2), (3, 3, 3))


def test_2d_image_round_trip():
    arr = np.zeros((30, 40), np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3))
    img.SetOrigin((5.0, -2.0))
    img.SetDirection((0.0, 1.0, 1.0, 0.0))
    geom = ImageGeometry.from_sitk_image(img)
    phys = np.array([img.TransformContinuousIndexToPhysicalPoint((12.3, 20.6))])
    raw = physical_to_raw(phys, geom)
    np.testing.assert_allclose(raw, [[0.0, 20.6, 12.3]], atol=1e-9)
    np.testing.assert_allclose(raw_to_physical(raw, geom), phys, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# against nnU-Net's own preprocessing
# ---------------------------------------------------------------------------------------------

def tiny_plans(transpose_forward, target_spacing):
    cfg = T.configuration_plans(target_spacing, (8, 8, 8), T.plain_conv_unet(3, (4, 8)))
    return T.hand_written_plans({"3d_fullres": cfg}, "Dataset999_Coords", transpose_forward)


@pytest.mark.parametrize("transpose,target_spacing", [
    ((0, 1, 2), (1.5, 1.0, 0.6)),
    ((2, 0, 1), (1.2, 2.0, 0.9)),
])
def test_mapping_agrees_with_nnunet_default_preprocessor(tmp_path, transpose, target_spacing):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw_shape = (14, 30, 26)  # z, y, x
    spacing_xyz = (0.8, 1.1, 3.0)
    arr = np.zeros(raw_shape, np.float32)
    box = (slice(2, 13), slice(4, 27), slice(3, 22))  # non-zero region: nnU-Net crops to it
    arr[box] = 1.0
    # a smooth blob whose centre we know in physical space
    img = make_image(size_xyz=raw_shape[::-1], spacing=spacing_xyz, array=arr)
    centre_raw = np.array([7.3, 15.6, 12.2])
    phys_centre = np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(centre_raw[::-1])))
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in raw_shape], indexing="ij")
    sp_zyx = np.array(spacing_xyz[::-1])
    d2 = sum(((c - m) * s) ** 2 for c, m, s in zip((zz, yy, xx), centre_raw, sp_zyx))
    blob = 50.0 * np.exp(-d2 / (2 * 4.0 ** 2))
    arr[box] += blob[box]
    img = make_image(size_xyz=raw_shape[::-1], spacing=spacing_xyz, array=arr)
    f = str(tmp_path / "case_0000.nii.gz")
    sitk.WriteImage(img, f)

    target = [target_spacing[i] for i in range(3)]  # already in transposed order
    pm = PlansManager(tiny_plans(transpose, target))
    cm = pm.get_configuration("3d_fullres")
    data, _, props = DefaultPreprocessor(verbose=False).run_case([f], None, pm, cm, {"labels": {"background": 0}})

    geom = ImageGeometry.from_properties(props)
    pre = PreprocessedGeometry.from_properties(props, pm.transpose_forward, data.shape[1:])
    assert pre.bbox_start != (0, 0, 0)
    assert pre.preprocessed_shape != pre.shape_after_cropping
    expected = physical_to_preprocessed(phys_centre, geom, pre)

    # blob centre in the preprocessed array: weighted centroid above the plateau
    d = data[0] - np.median(data[0])
    d[d < 0.2 * d.max()] = 0
    grid = np.meshgrid(*[np.arange(s) for s in d.shape], indexing="ij")
    found = np.array([(g * d).sum() / d.sum() for g in grid])
    assert np.all(np.abs(found - expected) < 0.5), (found, expected)
    # the brightest preprocessed voxel maps back next to the blob's raw centre (nearest-neighbour
    # resampling along the anisotropic axis makes a plateau, so this check is coarser)
    peak = np.array(np.unravel_index(np.argmax(data[0]), data.shape[1:]), float)
    assert np.all(np.abs(pre.preprocessed_to_raw(peak) - centre_raw) <= 1.0)


def test_geometry_from_nnunet_reader_properties(tmp_path):
    """SimpleITKIO and NibabelIO properties give the same physical points for the same file."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    arr = np.zeros((9, 17, 20), np.float32)
    arr[4, 8, 11] = 1
    img = make_image(array=arr)
    f = str(tmp_path / "x_0000.nii.gz")
    sitk.WriteImage(img, f)
    idx = np.array([[4.0, 8.0, 11.0], [1.5, 3.0, 19.0]])  # raw array index (z, y, x)
    truth = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i[::-1])) for i in idx])
    for rw in (SimpleITKIO(), NibabelIO()):
        data, props = rw.read_images([f])
        assert data[0, 4, 8, 11] == 1  # both readers give z, y, x arrays
        geom = ImageGeometry.from_properties(props, data.shape[1:])
        np.testing.assert_allclose(raw_to_physical(idx, geom), truth, atol=1e-4)
        assert geom.size == (20, 17, 9)
