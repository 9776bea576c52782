"""CT I/O core: exact geometry in every format, DICOM series handling and every bad-input error."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_synth import stack_positions, write_series

from napari_cdpdnet import io
from napari_cdpdnet.errors import CdpdnetError, InputError, OutputExistsError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io import (
    LABEL_MAP_SUFFIXES,
    is_supported_path,
    list_dicom_series,
    looks_like_label_map,
    read_ct,
    read_image_or_labels,
    read_label_map,
    write_label_map,
)

RNG = np.random.default_rng(7)


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_geometry(shape: tuple[int, int, int] = (6, 9, 11)) -> Geometry:
    """Odd spacing, an origin far from 0 and a direction rotated about a skew axis."""
    rot = _rotation((0.3, -0.5, 0.8), 27.0)
    return Geometry((0.73, 0.91, 2.7), (-183.25, 42.5, 611.125), tuple(rot.ravel()), shape)


def ct_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """int16 HU with air, soft tissue and bone."""
    return RNG.integers(-1024, 1500, size=shape).astype(np.int16)


def write_sitk(path: Path, array: np.ndarray, geometry: Geometry) -> Path:
    sitk.WriteImage(geometry.to_sitk(array), str(path), True)
    return path


def write_mha_header(path: Path, *, spacing: str = "1 1 1", dims: str = "4 4 4", extra: str = "") -> Path:
    """A hand-written MetaImage (to express headers SimpleITK would refuse to write)."""
    n = int(np.prod([int(d) for d in dims.split()]))
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = {spacing}\n"
        f"DimSize = {dims}\n{extra}ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.full(n, -1000, "<i2").tobytes())
    return path


# ================================================================== round trips (synthetic)
@pytest.mark.parametrize("suffix", LABEL_MAP_SUFFIXES)
def test_label_map_round_trip_keeps_voxels_and_oblique_geometry(tmp_path: Path, suffix: str) -> None:
    g = oblique_geometry()
    labels = RNG.integers(0, 14, size=g.shape).astype(np.int64)
    out = write_label_map(tmp_path / f"labels{suffix}", labels, g)
    assert out == tmp_path / f"labels{suffix}"
    back, g2 = read_label_map(out)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    assert g2.same_grid(g, atol=1e-4), (g2, g)
    # nothing but the output (and the .mhd's data file) is left in the folder
    assert {p.name for p in tmp_path.iterdir()} <= {f"labels{suffix}", "labels.zraw"}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_ct_round_trip_every_format(tmp_path: Path, suffix: str) -> None:
    g = oblique_geometry()
    hu = ct_volume(g.shape)
    ct = read_ct(write_sitk(tmp_path / f"ct{suffix}", hu, g))
    assert ct.array.dtype == np.int16
    np.testing.assert_array_equal(ct.array, hu)
    assert ct.geometry.same_grid(g, atol=1e-4)
    assert ct.geometry.dicom is None
    assert ct.warnings == ()
    assert ct.path == tmp_path / f"ct{suffix}"
    assert ct.name == "ct"
    # labels written on the CT's grid come back on exactly that grid
    lab, lg = read_label_map(write_label_map(tmp_path / f"lab{suffix}", hu > 0, ct.geometry))
    assert lg.same_grid(ct.geometry, atol=1e-4)
    np.testing.assert_array_equal(lab, hu > 0)


def test_ct_dtypes_int16_when_whole_numbers_fit_else_float32(tmp_path: Path) -> None:
    g = Geometry.identity((3, 4, 5), (0.8, 0.8, 1.5))
    as_int32 = ct_volume(g.shape).astype(np.int32)
    assert read_ct(write_sitk(tmp_path / "i32.nrrd", as_int32, g)).array.dtype == np.int16
    whole_floats = as_int32.astype(np.float64)
    ct = read_ct(write_sitk(tmp_path / "f64.nii.gz", whole_floats, g))
    assert ct.array.dtype == np.int16
    np.testing.assert_array_equal(ct.array, as_int32)
    fractional = whole_floats + 0.25
    ct = read_ct(write_sitk(tmp_path / "frac.mha", fractional, g))
    assert ct.array.dtype == np.float32
    np.testing.assert_allclose(ct.array, fractional)
    too_big = as_int32.copy()
    too_big[0, 0, 0] = 40000
    assert read_ct(write_sitk(tmp_path / "big.nrrd", too_big, g)).array.dtype == np.float32


def test_label_map_dtype_grows_only_when_values_need_it(tmp_path: Path) -> None:
    g = Geometry.identity((2, 3, 4))
    labels = np.zeros(g.shape, np.int64)
    labels[0, 0, 0] = 300
    back, _ = read_label_map(write_label_map(tmp_path / "u16.nrrd", labels, g))
    assert back.dtype == np.uint16 and back[0, 0, 0] == 300
    labels[0, 0, 0] = 70000
    back, _ = read_label_map(write_label_map(tmp_path / "i32.nii.gz", labels, g))
    assert back.dtype == np.int32 and back[0, 0, 0] == 70000


def test_float_label_map_with_whole_values_is_accepted(tmp_path: Path) -> None:
    g = Geometry.identity((2, 3, 4))
    labels = RNG.integers(0, 5, size=g.shape)
    back, _ = read_label_map(write_sitk(tmp_path / "f.nii.gz", labels.astype(np.float32), g))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)


def test_four_d_file_with_a_single_volume_reads_as_3d(tmp_path: Path) -> None:
    arr = ct_volume((1, 3, 4, 5))  # numpy order t, z, y, x
    image = sitk.GetImageFromArray(arr, isVector=False)
    image.SetSpacing((0.7, 0.7, 2.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "t1.nii.gz"))
    ct = read_ct(tmp_path / "t1.nii.gz")
    assert ct.array.shape == (3, 4, 5)
    np.testing.assert_array_equal(ct.array, arr[0])
    assert ct.geometry.spacing == pytest.approx((0.7, 0.7, 2.0))


def test_seg_nrrd_carries_slicer_segment_metadata(tmp_path: Path) -> None:
    g = oblique_geometry()
    labels = np.zeros(g.shape, np.uint8)
    labels[1:3, 2:5, 3:7] = 6
    labels[4, 0, 0] = 2
    out = write_label_map(tmp_path / "seg.seg.nrrd", labels, g, label_names={6: "liver"})
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    reader.ReadImageInformation()
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    names = {meta[f"Segment{i}_LabelValue"]: meta[f"Segment{i}_Name"] for i in range(2)}
    assert names == {"2": "Segment_2", "6": "liver"}
    liver = next(i for i in range(2) if meta[f"Segment{i}_LabelValue"] == "6")
    assert meta[f"Segment{liver}_Extent"].split() == ["3", "6", "2", "4", "1", "2"]
    assert meta["Segmentation_ContainedRepresentationNames"].startswith("Binary labelmap")
    back, _ = read_label_map(out)
    np.testing.assert_array_equal(back, labels)


def test_looks_like_label_map() -> None:
    assert looks_like_label_map(np.array([[[0, 1, 2]]], np.int16))
    assert looks_like_label_map(np.zeros((2, 2, 2), bool))
    assert not looks_like_label_map(np.array([[[-1024, 0, 40]]], np.int16))
    raw_ct = np.arange(4096, dtype=np.uint16).reshape(16, 16, 16)  # unsigned, many values
    assert not looks_like_label_map(raw_ct)
    sparse_big_values = np.zeros((4, 4, 4), np.uint16)
    sparse_big_values[0, 0, :3] = [1000, 2000, 3000]
    assert looks_like_label_map(sparse_big_values)
    assert not looks_like_label_map(np.zeros((2, 2, 2), np.float32))


def test_is_supported_path(tmp_path: Path, dicom_folder: Path) -> None:
    nii = write_sitk(tmp_path / "a.nii.gz", ct_volume((2, 2, 2)), Geometry.identity((2, 2, 2)))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert is_supported_path(nii)
    assert is_supported_path(dicom_folder)
    assert is_supported_path(next(dicom_folder.iterdir()))
    assert not is_supported_path(tmp_path / "notes.txt")
    assert not is_supported_path(tmp_path / "empty")
    assert not is_supported_path(tmp_path / "missing.nii.gz")


# ================================================================== real data
def test_totalsegmentator_ct_reads_as_int16_hu(shared_path) -> None:
    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    assert ct.array.shape == (112, 101, 122)
    assert ct.array.dtype == np.int16  # stored int32, values fit
    assert (ct.array.min(), ct.array.max()) == (-1207, 3382)
    assert ct.geometry.spacing == pytest.approx((3.0, 3.0, 3.0))
    # NIfTI is RAS on disk; geometry is LPS: x and y axes point the other way
    assert np.allclose(ct.geometry.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    assert ct.info["format"] == "NIfTI" and ct.warnings == ()


@pytest.mark.parametrize("suffix", LABEL_MAP_SUFFIXES)
def test_real_label_map_round_trip_every_format(shared_path, tmp_path: Path, suffix: str) -> None:
    labels, g = read_label_map(shared_path("data", "totalsegmentator", "example_seg.nii.gz"))
    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz"))
    assert g.same_grid(ct.geometry)
    back, g2 = read_label_map(write_label_map(tmp_path / f"seg{suffix}", labels, ct.geometry))
    np.testing.assert_array_equal(back, labels)
    assert g2.same_grid(ct.geometry, atol=1e-5)


def test_dcmqi_series_and_liver_seg_share_one_grid(shared_path) -> None:
    folder = shared_path("data", "dcmqi", "ct-3slice")
    ct = read_ct(folder)
    labels, lg = read_label_map(shared_path("data", "dcmqi", "liver_seg.nrrd"))
    assert ct.geometry.same_grid(lg, atol=1e-3), (ct.geometry, lg)
    assert ct.array.shape == labels.shape == (3, 512, 512)
    assert ct.warnings == ()
    assert ct.array.dtype == np.int16
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    # liver voxels are soft tissue
    assert 0 < np.median(ct.array[labels == 1]) < 200


def test_dicom_slices_sop_uids_and_files_follow_array_order(shared_path) -> None:
    import pydicom

    ct = read_ct(shared_path("data", "dcmqi", "ct-3slice"))
    ref = ct.geometry.dicom
    assert ref is not None and len(ref.sop_instance_uids) == len(ref.files) == ct.array.shape[0]
    for k, (uid, f) in enumerate(zip(ref.sop_instance_uids, ref.files, strict=True)):
        ds = pydicom.dcmread(f)
        assert ds.SOPInstanceUID == uid
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(ct.array[k], hu)
        np.testing.assert_allclose(
            ct.geometry.index_to_world(np.array([k, 0, 0])),
            [float(v) for v in ds.ImagePositionPatient],
            atol=1e-4,
        )
    assert ref.study_instance_uid and ref.frame_of_reference_uid and ref.series_instance_uid
    assert ref.modality == "CT" and ct.info["modality"] == "CT"
    assert ct.info["manufacturer"] == "GE MEDICAL SYSTEMS"


def test_monai_series_with_uneven_gaps_warns_and_keeps_measured_slices(shared_path) -> None:
    import pydicom

    folder = shared_path("data", "monai_ct_dicom")
    ct = read_ct(folder)
    assert len(ct.warnings) == 1
    warning = ct.warnings[0]
    assert "uneven slice spacing" in warning and "resampled" in warning and "202.5" in warning
    g = ct.geometry
    assert g.spacing[2] == pytest.approx(1.25, abs=1e-3)
    assert ct.array.shape == (165, 16, 16)
    assert ct.info["dicom_resampled"] is True
    # every acquired slice sits on the grid, unchanged, at its true position
    for idx, f in zip(ct.info["acquired_slice_indices"], g.dicom.files, strict=True):
        ds = pydicom.dcmread(f)
        k = int(round(idx))
        assert abs(idx - k) < 1e-3
        np.testing.assert_array_equal(ct.array[k], ds.pixel_array.astype(np.int32) - 1024)
        np.testing.assert_allclose(
            g.index_to_world(np.array([k, 0, 0])), [float(v) for v in ds.ImagePositionPatient], atol=1e-3
        )


def test_rle_compressed_series_reads_identical(shared_path, tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import RLELossless

    src = shared_path("data", "dcmqi", "ct-3slice")
    for f in src.iterdir():
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / f.name)
    plain = read_ct(src)
    packed = read_ct(tmp_path)
    assert packed.info["transfer_syntax"] == RLELossless
    np.testing.assert_array_equal(packed.array, plain.array)
    assert packed.geometry.same_grid(plain.geometry)


# ================================================================== synthetic DICOM
@pytest.fixture
def dicom_folder(tmp_path: Path) -> Path:
    rot = _rotation((1.0, 0.2, 0.1), 20.0)
    folder = tmp_path / "oblique"
    write_series(
        folder,
        ct_volume((5, 6, 7)),
        positions=stack_positions((-50.0, 20.0, 300.0), rot[:, 2], np.arange(5) * 2.5),
        row_dir=rot[:, 0],
        col_dir=rot[:, 1],
        pixel_spacing_xy=(0.62, 0.74),
    )
    return folder


def test_oblique_dicom_geometry_agrees_with_simpleitk(dicom_folder: Path) -> None:
    ct = read_ct(dicom_folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_folder)))
    reference = reader.Execute()
    assert ct.geometry.same_grid(Geometry.from_sitk(reference), atol=1e-4)
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(reference))
    assert ct.warnings == ()
    assert ct.geometry.spacing == pytest.approx((0.62, 0.74, 2.5), abs=1e-5)


def test_single_dicom_file_reads_its_whole_series(dicom_folder: Path) -> None:
    one = sorted(dicom_folder.iterdir())[2]
    whole = read_ct(dicom_folder)
    ct = read_ct(one)
    assert ct.array.shape == whole.array.shape
    np.testing.assert_array_equal(ct.array, whole.array)


def test_gantry_tilt_is_corrected_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    # A bar along the slice normal in *patient* space, with a smooth (Gaussian) profile across
    # rows so its centre is measurable to a fraction of a pixel. With the tilt the scanner
    # records it drifting in-plane from slice to slice; correct geometry puts it back in place.
    shape, spacing, step = (9, 24, 24), 1.0, 2.0
    drift = np.tan(np.deg2rad(15.0))  # mm in-plane (along -y) per mm along the normal
    rows = np.arange(shape[1])[:, None]
    volume = np.full(shape, -1000, np.int16)
    for k in range(shape[0]):
        centre = 10.0 + k * step * drift / spacing  # where the fixed bar appears in slice k
        profile = -1000 + 1500 * np.exp(-((rows - centre) ** 2) / (2 * 1.5**2))
        volume[k, :, 10:13] = np.round(profile).astype(np.int16)
    positions = stack_positions((0, 0, 0), (0, 0, 1), np.arange(shape[0]) * step, (0, -drift, 0))
    write_series(tmp_path, volume, positions=positions, pixel_spacing_xy=(spacing, spacing), gantry_tilt=15.0)
    ct = read_ct(tmp_path)
    assert len(ct.warnings) == 1 and "gantry tilt" in ct.warnings[0]
    assert ct.info["gantry_tilt_corrected"] is True
    assert ct.info["gantry_tilt_deg"] == pytest.approx(15.0)
    assert ct.geometry.same_grid(
        Geometry((1, 1, step), (0, 0, 0), tuple(np.eye(3).ravel()), shape), atol=1e-4
    )
    assert ct.array.dtype == np.int16
    # the bar sits at row 10 (y = 10 mm) in every slice; uncorrected it would drift 4.3 px
    for k in range(shape[0]):
        weights = ct.array[k, :, 11].astype(float) + 1000.0
        centre = float(np.average(np.arange(shape[1]), weights=weights))
        assert centre == pytest.approx(10.0, abs=0.15), (k, centre)


def test_tilt_already_in_orientation_needs_no_correction(tmp_path: Path) -> None:
    rot = _rotation((1, 0, 0), 15.0)  # tilted slices whose positions follow their own normal
    write_series(
        tmp_path, ct_volume((4, 5, 5)),
        positions=stack_positions((0, 0, 0), rot[:, 2], np.arange(4) * 3.0),
        row_dir=rot[:, 0], col_dir=rot[:, 1], gantry_tilt=15.0,
    )
    ct = read_ct(tmp_path)
    assert ct.warnings == ()
    assert "gantry_tilt_corrected" not in ct.info
    assert np.allclose(ct.geometry.direction_matrix, rot, atol=1e-5)


def test_missing_slice_is_interpolated_with_a_warning(tmp_path: Path) -> None:
    volume = np.stack([np.full((4, 4), v, np.int16) for v in (0, 100, 300, 400)])
    offsets = [0.0, 2.0, 6.0, 8.0]  # the slice at 4 mm is missing
    write_series(tmp_path, volume, positions=stack_positions((0, 0, 0), (0, 0, 1), offsets))
    ct = read_ct(tmp_path)
    assert any("uneven slice spacing" in w and "1 of them are interpolated" in w for w in ct.warnings)
    assert ct.array.shape == (5, 4, 4) and ct.geometry.spacing[2] == pytest.approx(2.0)
    np.testing.assert_array_equal(ct.array[:, 0, 0], [0, 100, 200, 300, 400])
    assert ct.info["acquired_slice_indices"] == [0.0, 1.0, 3.0, 4.0]


def test_tiny_position_jitter_is_not_resampled(tmp_path: Path) -> None:
    offsets = np.arange(6) * 1.25 + np.array([0, 0.004, -0.003, 0.002, 0, -0.001])
    hu = ct_volume((6, 4, 4))
    write_series(tmp_path, hu, positions=stack_positions((0, 0, 0), (0, 0, 1), offsets))
    ct = read_ct(tmp_path)
    assert ct.warnings == ()
    np.testing.assert_array_equal(ct.array, hu)
    assert ct.geometry.spacing[2] == pytest.approx(1.25, abs=1e-3)


def test_localizer_in_the_series_is_left_out_with_a_warning(tmp_path: Path) -> None:
    uid, study = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    hu = ct_volume((4, 6, 6))
    write_series(tmp_path, hu, positions=stack_positions((0, 0, 0), (0, 0, 1), np.arange(4) * 2.0),
                 series_uid=uid, study_uid=study)
    write_series(tmp_path, ct_volume((1, 8, 8)), positions=[(0, 0, 0)], row_dir=(1, 0, 0),
                 col_dir=(0, 0, -1), series_uid=uid, study_uid=study, names=["scout.dcm"])
    ct = read_ct(tmp_path)
    assert any("localizers" in w for w in ct.warnings)
    np.testing.assert_array_equal(ct.array, hu)


def test_folder_with_several_series_picks_biggest_ct_and_says_so(tmp_path: Path) -> None:
    pos = lambda n: stack_positions((0, 0, 0), (0, 0, 1), np.arange(n) * 2.0)  # noqa: E731
    write_series(tmp_path / "a", ct_volume((3, 4, 4)), positions=pos(3), series_uid="1.2.3.1", description="small")
    write_series(tmp_path / "b", ct_volume((5, 4, 4)), positions=pos(5), series_uid="1.2.3.2", description="big")
    write_series(tmp_path / "c", ct_volume((9, 4, 4)), positions=pos(9), series_uid="1.2.3.3", modality="MR")
    assert is_supported_path(tmp_path)  # series in sub-folders are found
    found = {s.uid: s for s in list_dicom_series(tmp_path)}
    assert {u: (s.modality, s.num_slices) for u, s in found.items()} == {
        "1.2.3.1": ("CT", 3), "1.2.3.2": ("CT", 5), "1.2.3.3": ("MR", 9),
    }
    assert len(found["1.2.3.2"].files) == 5
    ct = read_ct(tmp_path)
    assert ct.geometry.dicom.series_instance_uid == "1.2.3.2"
    assert ct.name == "big"
    assert any("3 image series" in w and "1.2.3.2" in w and "series_uid" in w for w in ct.warnings)
    small = read_ct(tmp_path, series_uid="1.2.3.1")
    assert small.array.shape[0] == 3 and small.warnings == ()
    with pytest.raises(InputError, match=r"no series with UID 9\.9.*1\.2\.3\.1"):
        read_ct(tmp_path, series_uid="9.9")
    with pytest.raises(InputError, match="MR, not CT"):
        read_ct(tmp_path, series_uid="1.2.3.3")
    mr = read_ct(tmp_path, series_uid="1.2.3.3", allow_non_ct=True)
    assert mr.array.shape[0] == 9 and any("modality MR" in w for w in mr.warnings)


# ================================================================== bad input: each its own error
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.nii\.gz: no such file"):
        read_ct(tmp_path / "nope.nii.gz")


def test_not_an_image(tmp_path: Path) -> None:
    fake = tmp_path / "scan.nii.gz"
    fake.write_text("this is a text file, not a NIfTI volume\n" * 20)
    with pytest.raises(InputError, match=r"scan\.nii\.gz: not a readable NIfTI image"):
        read_ct(fake)
    fake_nrrd = tmp_path / "scan.nrrd"
    fake_nrrd.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(InputError, match=r"scan\.nrrd: not a readable NRRD image"):
        read_ct(fake_nrrd)


def test_unsupported_file_type(tmp_path: Path) -> None:
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(InputError, match=r"photo\.png: unsupported file type '\.png'.*\.nii\.gz"):
        read_ct(png)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "zero.mha").write_bytes(b"")
    with pytest.raises(InputError, match=r"zero\.mha: the file is empty"):
        read_ct(tmp_path / "zero.mha")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    g = Geometry.identity((20, 32, 32))
    path = write_sitk(tmp_path / f"cut{suffix}", ct_volume(g.shape), g)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    name = re.escape(f"cut{suffix}")
    with pytest.raises(InputError, match=rf"{name}: .*(truncated|cannot be parsed)"):
        read_ct(path)


def test_truncated_dicom_slice(tmp_path: Path) -> None:
    write_series(tmp_path, ct_volume((3, 16, 16)), positions=stack_positions((0, 0, 0), (0, 0, 1), [0, 1, 2]))
    victim = sorted(tmp_path.iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])
    with pytest.raises(InputError, match=rf"{victim.name}: the pixel data cannot be decoded"):
        read_ct(tmp_path)


def test_two_d_image(tmp_path: Path) -> None:
    flat = sitk.GetImageFromArray(ct_volume((1, 8, 8))[0])
    sitk.WriteImage(flat, str(tmp_path / "flat.mha"))
    with pytest.raises(InputError, match=r"flat\.mha: 2-D image"):
        read_ct(tmp_path / "flat.mha")
    one_slice = write_sitk(tmp_path / "one.nii.gz", ct_volume((1, 8, 8)), Geometry.identity((1, 8, 8)))
    with pytest.raises(InputError, match=r"one\.nii\.gz: 2-D image"):
        read_ct(one_slice)


def test_single_slice_dicom_series(tmp_path: Path) -> None:
    write_series(tmp_path, ct_volume((1, 8, 8)), positions=[(0, 0, 0)])
    with pytest.raises(InputError, match="2-D image: series .* has a single slice"):
        read_ct(tmp_path)


def test_four_d_image(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(ct_volume((3, 4, 5, 6)), isVector=False)  # 3 volumes
    sitk.WriteImage(image, str(tmp_path / "phases.nii.gz"))
    with pytest.raises(InputError, match=r"phases\.nii\.gz: 4-D image with 3 volumes"):
        read_ct(tmp_path / "phases.nii.gz")


def test_multi_component_image(tmp_path: Path) -> None:
    rgb = sitk.GetImageFromArray(RNG.integers(0, 255, (4, 5, 6, 3)).astype(np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match=r"rgb\.mha: multi-component image \(3 values per voxel"):
        read_ct(tmp_path / "rgb.mha")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"{tmp_path.name}: the folder is empty"):
        read_ct(tmp_path)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM files found"):
        read_ct(tmp_path)


def test_folder_with_only_non_image_dicom(shared_path, tmp_path: Path) -> None:
    shutil.copy(shared_path("data", "dcmqi", "liver.dcm"), tmp_path / "liver.dcm")
    # liver.dcm is a DICOM-SEG: it has frames, but it is no volume to read, even as non-CT
    for allow in (False, True):
        with pytest.raises(InputError, match="no image series, only derived objects .*SEG series"):
            read_ct(tmp_path, allow_non_ct=allow)


def test_non_ct_modality_in_dicom(tmp_path: Path) -> None:
    write_series(tmp_path, ct_volume((3, 4, 4)), positions=stack_positions((0, 0, 0), (0, 0, 1), [0, 1, 2]), modality="MR")
    with pytest.raises(InputError, match="no CT series here .*MR series.*allow_non_ct=True"):
        read_ct(tmp_path)
    mr = read_ct(tmp_path, allow_non_ct=True)
    assert mr.info["modality"] == "MR" and any("not CT" in w for w in mr.warnings)


def test_non_ct_modality_in_metaimage_header(tmp_path: Path) -> None:
    path = write_mha_header(tmp_path / "brain.mha", extra="Modality = MET_MOD_MR\n")
    with pytest.raises(InputError, match=r"brain\.mha: the header says modality MR, not CT"):
        read_ct(path)
    assert read_ct(path, allow_non_ct=True).info["modality"] == "MR"
    ok = write_mha_header(tmp_path / "ct.mha", extra="Modality = MET_MOD_CT\n")
    assert read_ct(ok).info["modality"] == "CT"


@pytest.mark.parametrize("spacing", ["0 1 1", "-1 1 1", "0.01 1 1", "1 1 80", "nan 1 1"])
def test_absurd_spacing(tmp_path: Path, spacing: str) -> None:
    path = write_mha_header(tmp_path / "bad.mha", spacing=spacing)
    with pytest.raises(InputError, match=r"bad\.mha: implausible voxel spacing"):
        read_ct(path)


def test_absurd_dicom_pixel_spacing(tmp_path: Path) -> None:
    write_series(tmp_path, ct_volume((3, 4, 4)), positions=stack_positions((0, 0, 0), (0, 0, 1), [0, 1, 2]),
                 pixel_spacing_xy=(0.01, 0.01))
    with pytest.raises(InputError, match=r"implausible voxel spacing \(0\.01, 0\.01\)"):
        read_ct(tmp_path)


def test_dicom_with_two_images_at_one_position(tmp_path: Path) -> None:
    write_series(tmp_path, ct_volume((3, 4, 4)), positions=stack_positions((0, 0, 0), (0, 0, 1), [0, 1, 1]))
    with pytest.raises(InputError, match="same slice position; the series holds several acquisitions"):
        read_ct(tmp_path)


def test_dicom_file_name_that_is_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "slice.dcm").write_text("not dicom")
    with pytest.raises(InputError, match=r"slice\.dcm: not a DICOM file"):
        read_ct(tmp_path / "slice.dcm")


def test_series_uid_on_a_nifti(tmp_path: Path) -> None:
    path = write_sitk(tmp_path / "a.nii.gz", ct_volume((2, 3, 3)), Geometry.identity((2, 3, 3)))
    with pytest.raises(InputError, match="series_uid only applies to DICOM"):
        read_ct(path, series_uid="1.2.3")


def test_ct_without_air_gets_a_hu_warning(tmp_path: Path) -> None:
    raw = RNG.integers(0, 3000, size=(3, 4, 4)).astype(np.uint16)  # unrescaled stored values
    ct = read_ct(write_sitk(tmp_path / "raw.nrrd", raw, Geometry.identity(raw.shape)))
    assert len(ct.warnings) == 1 and "no air" in ct.warnings[0] and "raw.nrrd" in ct.warnings[0]


# ---------------------------------------------------------------- label map errors
def test_ct_is_not_a_label_map(tmp_path: Path) -> None:
    path = write_sitk(tmp_path / "ct.nii.gz", ct_volume((2, 3, 3)), Geometry.identity((2, 3, 3)))
    with pytest.raises(InputError, match=r"ct\.nii\.gz: not a label map: negative values"):
        read_label_map(path)


def test_probability_map_is_not_a_label_map(tmp_path: Path) -> None:
    prob = RNG.random((2, 3, 3)).astype(np.float32)
    path = write_sitk(tmp_path / "prob.nrrd", prob, Geometry.identity((2, 3, 3)))
    with pytest.raises(InputError, match=r"prob\.nrrd: not a label map: fractional values"):
        read_label_map(path)


def test_label_map_from_a_folder_or_dicom(tmp_path: Path, shared_path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        read_label_map(tmp_path)
    with pytest.raises(InputError, match="read_dicom_seg"):
        read_label_map(shared_path("data", "dcmqi", "liver.dcm"))


def test_write_unsupported_suffix_lists_the_supported_ones(tmp_path: Path) -> None:
    g = Geometry.identity((2, 2, 2))
    with pytest.raises(InputError, match=r"labels\.tif: cannot write label maps as '\.tif'; use one of \.nii\.gz, \.nii, \.seg\.nrrd, \.nrrd, \.mha, \.mhd"):
        write_label_map(tmp_path / "labels.tif", np.zeros(g.shape, np.uint8), g)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    g = Geometry.identity((2, 2, 2))
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"user data")
    with pytest.raises(OutputExistsError, match="mask.nii.gz already exists"):
        write_label_map(target, np.ones(g.shape, np.uint8), g)
    assert target.read_bytes() == b"user data"
    write_label_map(target, np.ones(g.shape, np.uint8), g, overwrite=True)
    np.testing.assert_array_equal(read_label_map(target)[0], 1)


def test_write_refuses_to_overwrite_mhd_data_file(tmp_path: Path) -> None:
    g = Geometry.identity((2, 2, 2))
    (tmp_path / "mask.zraw").write_bytes(b"someone else's data")
    with pytest.raises(OutputExistsError, match="mask.zraw already exists"):
        write_label_map(tmp_path / "mask.mhd", np.ones(g.shape, np.uint8), g)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.zraw"]


def test_write_shape_mismatch_and_bad_values(tmp_path: Path) -> None:
    g = Geometry.identity((2, 2, 2))
    with pytest.raises(InputError, match=r"shape \(2, 2, 3\) does not match its image grid \(2, 2, 2\)"):
        write_label_map(tmp_path / "a.nrrd", np.zeros((2, 2, 3), np.uint8), g)
    with pytest.raises(InputError, match="negative values"):
        write_label_map(tmp_path / "a.nrrd", -np.ones(g.shape, np.int16), g)
    with pytest.raises(InputError, match="fractional values"):
        write_label_map(tmp_path / "a.nrrd", np.full(g.shape, 0.5), g)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = Geometry.identity((2, 2, 2))

    def broken_write(image, path, *args):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("itk::ERROR: ImageFileWriter: No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(InputError, match="cannot write .*a.nii.gz: .*No space left on device"):
        write_label_map(tmp_path / "a.nii.gz", np.ones(g.shape, np.uint8), g)
    assert list(tmp_path.iterdir()) == []


def test_every_error_is_a_cdpdnet_error_not_a_bare_traceback(tmp_path: Path) -> None:
    """A gzip stream with a valid NIfTI start but garbage after it must still be an InputError."""
    g = Geometry.identity((8, 16, 16))
    path = write_sitk(tmp_path / "x.nii.gz", ct_volume(g.shape), g)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:400]) + b"garbage" * 50)
    with pytest.raises(CdpdnetError):
        read_ct(path)


def test_read_image_or_labels_tells_them_apart(tmp_path: Path) -> None:
    g = oblique_geometry()
    lab = write_sitk(tmp_path / "lab.nii.gz", RNG.integers(0, 4, g.shape).astype(np.int16), g)
    img = write_sitk(tmp_path / "img.nii.gz", ct_volume(g.shape), g)
    kind, labels = read_image_or_labels(lab)
    assert kind == "labels" and labels.array.dtype == np.uint8 and labels.warnings == ()
    kind, image = read_image_or_labels(img)
    assert kind == "image" and image.array.dtype == np.int16
    assert labels.geometry.same_grid(image.geometry)


def test_module_import_is_light() -> None:
    """napari imports the reader at start-up: SimpleITK, pydicom, scipy only load on first read."""
    import subprocess
    import sys

    code = (
        "import sys, napari_cdpdnet.io.images, napari_cdpdnet.fileutil, napari_cdpdnet._reader, "
        "napari_cdpdnet._writer\n"
        "heavy = [m for m in ('SimpleITK', 'pydicom', 'torch', 'napari', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(io.__file__).parents[1])
