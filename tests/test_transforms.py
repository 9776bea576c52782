"""Preprocessing equals the official MONAI chain, and the inverse brings results back to the source grid."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import LPS_TO_RAS, Geometry
from napari_cdpdnet.inference.transforms import (
    box_to_preprocessed,
    invert_labels,
    invert_probabilities,
    preprocess,
    preprocess_labels,
)

torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

# TotalSegmentator `total` label -> CDPDNet structure index (shared/data/README.md)
TOTALSEG_TO_CDPDNET = {
    1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13, 19: 14,
    12: 16, 13: 16, 14: 16, 10: 17, 11: 17, 20: 18, 18: 19, 21: 21, 22: 22,
}
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def read(path) -> tuple[np.ndarray, Geometry]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from Euler angles in degrees (x, then y, then z)."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: Oblique, flipped, permuted and odd-spacing grids (direction columns in LPS).
SYNTHETIC = {
    "oblique-flipped": Geometry((0.83, 1.1, 2.5), (10.0, -20.0, 30.0),
                                tuple((rotation(20, -35, 70) @ np.diag([1, -1, 1])).ravel()), (23, 41, 37)),
    "dicom-lps-axial": Geometry((0.7, 0.7, 3.0), (-180.0, -150.0, -400.0), tuple(np.eye(3).ravel()), (20, 50, 50)),
    "sagittal-permuted": Geometry((1.2, 0.9, 2.0), (5.0, 5.0, 5.0),
                                  tuple(np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float).ravel()), (30, 45, 17)),
    "fine-isotropic": Geometry((0.6, 0.6, 0.6), (0.0, 0.0, 0.0), tuple(rotation(0, 0, 12).ravel()), (40, 44, 36)),
}


def noise_ct(geometry: Geometry, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-100, 400, geometry.shape).astype(np.int16)


# --------------------------------------------------------------------------- MONAI reference
def monai_forward():
    from monai.transforms import (
        Compose,
        CropForegroundd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    return Compose([
        Orientationd("image", axcodes="RAS", labels=RAS_LABELS),
        Spacingd("image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
        ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd("image", source_key="image"),
    ])


def monai_image(array: np.ndarray, geometry: Geometry):
    from monai.data import MetaTensor

    xyz = np.ascontiguousarray(array.transpose(2, 1, 0))[None].astype(np.float32)
    return MetaTensor(torch.from_numpy(xyz), affine=torch.as_tensor(geometry.affine_ras()))


def monai_invert(array: np.ndarray, geometry: Geometry, model_space: np.ndarray, nearest: bool) -> np.ndarray:
    """MONAI's Invertd of a model-space array, as the official --store_result path does."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    fwd = monai_forward()
    d = fwd({"image": monai_image(array, geometry)})
    pred = MetaTensor(torch.from_numpy(np.asarray(model_space, dtype=np.float32)[None]),
                      affine=d["image"].affine)
    pred.applied_operations = d["image"].applied_operations
    d["pred"] = pred
    out = Invertd(keys="pred", transform=fwd, orig_keys="image", nearest_interp=nearest)(d)["pred"]
    return out[0].numpy().transpose(2, 1, 0)


def assert_same_as_monai(array: np.ndarray, geometry: Geometry) -> None:
    pre = preprocess(array, geometry)
    ref = monai_forward()({"image": monai_image(array, geometry)})["image"]
    assert pre.image.dtype == np.float32
    assert pre.image.shape == tuple(ref.shape[1:])
    np.testing.assert_array_equal(pre.image, ref[0].numpy())
    np.testing.assert_allclose(pre.affine, ref.affine.numpy(), atol=1e-9)


# --------------------------------------------------------------------------- forward
def test_preprocess_equals_monai_on_the_real_ct(shared_path) -> None:
    array, geometry = read(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    assert_same_as_monai(array, geometry)


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_preprocess_equals_monai_on_oblique_and_odd_grids(name: str) -> None:
    geometry = SYNTHETIC[name]
    assert_same_as_monai(noise_ct(geometry), geometry)


def test_windowing_and_spacing_values() -> None:
    """−175 HU → 0, 250 HU → 1, linear in between; the grid is 1.5 mm with round(extent/1.5 + 1) voxels."""
    geometry = Geometry.identity((4, 5, 7), spacing=(3.0, 3.0, 3.0))
    hu = np.array([-1000, -175, 37.5, 250, 3000], dtype=np.float32)
    array = np.broadcast_to(hu[None, :, None], geometry.shape).copy()
    pre = preprocess(array, geometry)
    # the 1.5 mm grid keeps every source voxel at an even index; y (index 1 in LPS) is flipped in RAS
    assert pre.resampled_shape == (13, 9, 7)
    np.testing.assert_allclose(np.linalg.norm(pre.affine[:3, :3], axis=0), 1.5)
    # the crop drops the voxels at or below −175 HU (Y index 6 and above)
    assert pre.shape == (13, 6, 7)
    column = pre.image[0, :, 0]
    np.testing.assert_allclose(column[::2], [1.0, 1.0, 0.5], atol=1e-6)
    # resampled first (HU midpoints 1625, 143.75, −68.75), windowed afterwards
    np.testing.assert_allclose(column[1::2], [1.0, 0.75, 0.25], atol=1e-6)


def test_model_space_is_ras() -> None:
    """A bright spot at the patient's right-anterior-superior corner lands at high X, Y, Z indices."""
    geometry = SYNTHETIC["dicom-lps-axial"]  # LPS-aligned like most DICOM: x grows to the left
    array = np.full(geometry.shape, -100, dtype=np.int16)
    array[-4:, :4, :4] = 1000  # superior slices, low y (anterior), low x (right)
    pre = preprocess(array, geometry)
    hot = np.argwhere(pre.image > 0.99)
    assert hot.size
    for axis in range(3):
        assert hot[:, axis].min() > pre.shape[axis] * 0.7, axis


def test_all_air_and_bad_inputs_are_input_errors() -> None:
    geometry = Geometry.identity((8, 9, 10), (2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="no voxel above"):
        preprocess(np.full(geometry.shape, -1000, np.int16), geometry)
    with pytest.raises(InputError, match="does not match"):
        preprocess(np.zeros((8, 9, 11), np.int16), geometry)
    with pytest.raises(InputError, match="3-D"):
        preprocess(np.zeros((8, 9), np.int16), geometry)
    bad = np.zeros(geometry.shape, np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        preprocess(bad, geometry)
    sheared = Geometry((1, 1, 1), (0, 0, 0), (1, 0.5, 0, 0, 1, 0, 0, 0, 1), geometry.shape)
    with pytest.raises(InputError, match="orthonormal"):
        preprocess(np.zeros(geometry.shape, np.int16), sheared)
    with pytest.raises(InputError, match="not numeric"):
        preprocess(np.zeros(geometry.shape, bool), geometry)


# --------------------------------------------------------------------------- inverse
def half_voxel_ties(pre, shape) -> np.ndarray:
    """Source voxels whose model-grid coordinate is exactly halfway between two voxels on some axis."""
    zyx = np.indices(shape).reshape(3, -1).astype(float)
    c = (pre.source_to_resampled() @ np.vstack([zyx, np.ones(zyx.shape[1])]))[:3]
    return (np.abs(c - np.floor(c) - 0.5) < 1e-6).any(axis=0).reshape(shape)


@pytest.mark.parametrize("name", ["oblique-flipped", "sagittal-permuted", "fine-isotropic"])
def test_inverse_equals_monai_invertd(name: str) -> None:
    geometry = SYNTHETIC[name]
    array = noise_ct(geometry, 1)
    pre = preprocess(array, geometry)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 30, pre.shape).astype(np.uint8)
    ours = invert_labels(labels, pre)
    assert ours.dtype == np.uint8 and ours.shape == geometry.shape
    ref = monai_invert(array, geometry, labels, nearest=True)
    # nearest interpolation is only ambiguous exactly halfway between two voxels, where
    # floating-point round-off decides (differently in MONAI's normalised coordinates)
    differ = ours != ref
    assert not np.any(differ & ~half_voxel_ties(pre, geometry.shape))
    prob = rng.random(pre.shape, dtype=np.float32)
    np.testing.assert_allclose(invert_probabilities(prob, pre),
                               monai_invert(array, geometry, prob, nearest=False), atol=1e-6)


def test_inverse_zero_pads_the_crop() -> None:
    """Outside the foreground crop the inverse is background, as with MONAI's inverse crop."""
    geometry = Geometry.identity((20, 30, 30), (1.5, 1.5, 1.5))
    array = np.full(geometry.shape, -1000, np.int16)
    array[5:15, 10:20, 8:22] = 40
    pre = preprocess(array, geometry)
    assert pre.shape == (14, 10, 10)
    back = invert_labels(np.ones(pre.shape, np.uint8), pre)
    np.testing.assert_array_equal(back, (array > -175).astype(np.uint8))
    prob = invert_probabilities(np.full(pre.shape, 0.8, np.float32), pre)
    np.testing.assert_allclose(prob[array > -175], 0.8, atol=1e-6)
    assert prob[0, 0, 0] == 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_label_round_trip_on_the_real_segmentation(shared_path) -> None:
    """example_seg_full (TotalSegmentator → CDPDNet indices) survives forward + inverse: Dice ≥ 0.99."""
    array, geometry = read(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    seg, seg_geometry = read(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    assert seg_geometry.same_grid(geometry)
    lut = np.zeros(256, np.uint8)
    for ts, cdpd in TOTALSEG_TO_CDPDNET.items():
        lut[ts] = cdpd
    labels = lut[seg]
    pre = preprocess(array, geometry)
    model = preprocess_labels(labels, pre)
    assert model.shape == pre.shape
    back = invert_labels(model, pre)
    assert back.shape == geometry.shape
    present = [s for s in sorted(set(TOTALSEG_TO_CDPDNET.values())) if (labels == s).any()]
    assert len(present) >= 15
    for s in present:
        assert dice(labels == s, back == s) >= 0.99, s


@pytest.mark.parametrize("name", ["oblique-flipped", "sagittal-permuted", "dicom-lps-axial"])
def test_round_trip_keeps_structures_in_place_on_synthetic_grids(name: str) -> None:
    """Two balls drawn in world coordinates come back where they were (no flip, no shift)."""
    geometry = SYNTHETIC[name]
    zyx = np.indices(geometry.shape).reshape(3, -1).T
    world = geometry.index_to_world(zyx)
    centre = world.mean(axis=0)
    extent = world.max(axis=0) - world.min(axis=0)
    radius = 0.3 * extent.min()
    shift = np.array([0.2, 0.1, 0.0]) * extent
    labels = np.zeros(len(world), np.uint8)
    labels[np.linalg.norm(world - centre + shift, axis=1) < radius] = 3
    labels[np.linalg.norm(world - centre - shift, axis=1) < radius * 0.8] = 7
    labels = labels.reshape(geometry.shape)
    pre = preprocess(np.where(labels > 0, 50, -100).astype(np.int16), geometry)
    model = preprocess_labels(labels, pre)
    for s in (3, 7):
        # the model-space centroid is at the same patient position
        idx = np.argwhere(model == s).mean(axis=0)
        ras = pre.affine @ np.append(idx, 1.0)
        lps = (LPS_TO_RAS @ ras)[:3]
        expected = geometry.index_to_world(np.argwhere(labels == s).mean(axis=0))
        assert np.linalg.norm(lps - expected) < 1.0, s
    back = invert_labels(model, pre)
    for s in (3, 7):
        assert dice(labels == s, back == s) >= 0.9, s  # 1.5 mm steps on balls a few mm wide


# --------------------------------------------------------------------------- ROI boxes
def test_box_to_preprocessed_covers_the_box() -> None:
    geometry = SYNTHETIC["dicom-lps-axial"]
    array = np.full(geometry.shape, 40, np.int16)
    pre = preprocess(array, geometry)
    lo = np.array(geometry.index_to_world([5, 10, 12]))
    hi = np.array(geometry.index_to_world([12, 30, 40]))
    box = box_to_preprocessed([hi, lo], pre)  # corner order does not matter
    inside = np.zeros(pre.shape, bool)
    inside[box] = True
    # every model voxel whose centre is in the LPS box is inside the index box, and nothing more
    xyz = np.indices(pre.shape).reshape(3, -1)
    lps = (LPS_TO_RAS @ pre.affine @ np.vstack([xyz, np.ones(xyz.shape[1])]))[:3].T
    mn, mx = np.minimum(lo, hi), np.maximum(lo, hi)
    in_box = np.all((lps >= mn - 1e-6) & (lps <= mx + 1e-6), axis=1).reshape(pre.shape)
    np.testing.assert_array_equal(inside, in_box)


def test_bad_boxes_are_input_errors() -> None:
    geometry = SYNTHETIC["dicom-lps-axial"]
    pre = preprocess(np.full(geometry.shape, 40, np.int16), geometry)
    with pytest.raises(InputError, match="does not overlap"):
        box_to_preprocessed([(5000, 5000, 5000), (5100, 5100, 5100)], pre)
    with pytest.raises(InputError, match="two"):
        box_to_preprocessed([(0, 0, 0)], pre)
    with pytest.raises(InputError, match="two"):
        box_to_preprocessed([(0, 0, "a"), (1, 1, 1)], pre)
