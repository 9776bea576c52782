"""Awkward DICOM that must read as the right volume: what PACS exports and anonymisers produce.

Each input is made from the real GE series in ../shared (tests/awkward_inputs.py) and compared
voxel for voxel, and on its geometry, with the same series read as it is. What must be refused
is in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import awkward_inputs as A
import numpy as np
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.export import export_segmentation
from napari_cdpdnet.export.dicomseg import dicom_seg_problem, read_dicom_seg
from napari_cdpdnet.io import list_dicom_series, read_ct, read_label_map
from napari_cdpdnet.io.dicom_scan import list_volume_series

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def series(shared_path) -> Path:
    return shared_path("data", "dcmqi", "ct-3slice")


@pytest.fixture(scope="module")
def base(series) -> list:
    return A.load_series(series)


@pytest.fixture(scope="module")
def reference(series):
    return read_ct(series)


def _same_volume(ct, reference) -> None:
    np.testing.assert_array_equal(ct.array, reference.array)
    assert ct.geometry.same_grid(reference.geometry, atol=1e-4)


# ----------------------------------------------------------------------------- blank and shared UIDs
@pytest.mark.parametrize("delete", [False, True], ids=["blank", "removed"])
def test_series_with_blank_uids_reads_as_one_volume_and_says_how_it_was_grouped(
    base, reference, tmp_path: Path, delete: bool
) -> None:
    A.write(A.blank_uids(base, tags=A.UID_TAGS[:3], delete=delete), tmp_path)
    ct = read_ct(tmp_path)
    _same_volume(ct, reference)
    assert any("have no SeriesInstanceUID" in w and "grouped into 1 series" in w for w in ct.warnings)
    ref = ct.geometry.dicom
    assert ref.series_instance_uid == "" and ref.sop_instance_uids == ("", "", "")
    assert ct.info["series_key"].startswith("noUID-")
    assert "blank StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID of 3 of its 3 images" in dicom_seg_problem(ct.geometry)


def test_blank_uids_never_merge_two_series(base, tmp_path: Path) -> None:
    A.write(A.blank_uids(A.as_new_series(base, series_number=2, description="arterial")), tmp_path,
            names=lambda k: f"a{k}")
    A.write(A.blank_uids(A.as_new_series(base, series_number=3, description="venous", hu_offset=60)), tmp_path,
            names=lambda k: f"v{k}")
    found = list_dicom_series(tmp_path)
    assert [(s.description, s.num_slices, s.series_instance_uid) for s in found] == [
        ("arterial", 3, ""), ("venous", 3, "")]
    assert list_volume_series(tmp_path) == found
    arterial, venous = (read_ct(tmp_path, series_uid=s.uid) for s in found)
    np.testing.assert_array_equal(venous.array, arterial.array + 60)
    default = read_ct(tmp_path)
    assert any("holds 2 image series" in w and found[1].uid in w for w in default.warnings)
    # one file given alone reads its own series, not its neighbour's
    np.testing.assert_array_equal(read_ct(tmp_path / "v1").array, venous.array)


def test_two_series_sharing_one_uid_are_read_apart(base, reference, tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.4242"
    A.write(A.as_new_series(base, series_uid=uid, series_number=4, description="soft"), tmp_path / "a")
    A.write(A.as_new_series(base, series_uid=uid, series_number=5, description="bone", hu_offset=-30), tmp_path / "b")
    A.write(A.as_new_series(base[:1], series_number=6), tmp_path / "c")  # a single slice: no volume
    shutil.copy(A.__file__, tmp_path / "notes.py")
    assert len(list_dicom_series(tmp_path)) == 3
    found = list_volume_series(tmp_path)
    assert [(s.uid, s.series_instance_uid, s.description) for s in found] == [
        (f"{uid}#1", uid, "soft"), (f"{uid}#2", uid, "bone")]
    soft = read_ct(tmp_path, series_uid=f"{uid}#1")
    _same_volume(soft, reference)
    assert any(f"SeriesInstanceUID {uid} is shared by 2 different image stacks" in w for w in soft.warnings)
    bone = read_ct(tmp_path, series_uid=f"{uid}#2")
    np.testing.assert_array_equal(bone.array, reference.array - 30)
    assert bone.geometry.dicom.series_instance_uid == uid  # what a DICOM-SEG must reference
    with pytest.raises(InputError, match=rf"UID {uid} names 2 series here; choose one of"):
        read_ct(tmp_path, series_uid=uid)


def test_acquisitions_at_the_same_positions_are_split_by_acquisition_number(base, reference, tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.777"
    for acq, offset in ((1, 0), (2, 100)):
        part = A.as_new_series(base, series_uid=uid, hu_offset=offset)
        for ds in part:
            ds.AcquisitionNumber = acq
        A.write(part, tmp_path, names=lambda k, acq=acq: f"acq{acq}_{k}.dcm")
    found = list_dicom_series(tmp_path)
    assert [s.uid for s in found] == [f"{uid}:acq1", f"{uid}:acq2"]
    np.testing.assert_array_equal(read_ct(tmp_path, series_uid=f"{uid}:acq2").array, reference.array + 100)


# ----------------------------------------------------------------------------- enhanced multi-frame
@pytest.mark.parametrize("sop_class", [A.ENHANCED_CT, "1.2.840.10008.5.1.4.1.1.2.2"], ids=["enhanced", "legacy-converted"])
def test_enhanced_multi_frame_ct_reads_like_its_classic_series(base, reference, tmp_path: Path, sop_class: str) -> None:
    A.enhanced(base, sop_class=sop_class).save_as(tmp_path / "volume")
    for path in (tmp_path, tmp_path / "volume"):  # the folder, or the file itself
        ct = read_ct(path)
        _same_volume(ct, reference)
        assert ct.info["multi_frame"] is True and ct.warnings == ()


def test_per_frame_rescale_of_an_enhanced_ct_is_applied_frame_by_frame(base, reference, tmp_path: Path) -> None:
    mf = A.enhanced(base)
    shared = mf.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    frames = mf.pixel_array.astype(np.int32)
    for k, item in enumerate(mf.PerFrameFunctionalGroupsSequence):
        own = copy.deepcopy(transform)
        own[0].RescaleIntercept = str(-1024 - 10 * k)  # stored values shifted up to compensate
        frames[k] += 10 * k
        item.PixelValueTransformationSequence = own
    mf.PixelData = frames.astype(np.int16).tobytes()
    mf.save_as(tmp_path / "mf.dcm")
    _same_volume(read_ct(tmp_path), reference)


def test_dicom_seg_of_an_enhanced_ct_references_its_frames(base, reference, tmp_path: Path) -> None:
    A.enhanced(base).save_as(tmp_path / "mf.dcm")
    ct = read_ct(tmp_path / "mf.dcm")
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[:, 200:300, 150:260] = 6
    written = export_segmentation(labels, ct.geometry, ct.array, tmp_path / "out" / "liver.nii.gz",
                                  formats=["dicom_seg"])
    back, segments = read_dicom_seg(written[-1], ct.geometry)
    np.testing.assert_array_equal(back == 1, labels == 6)
    assert [s.label for s in segments] == ["Liver"]


# ----------------------------------------------------------------------------- folders and files
def test_dicomdir_rooted_export_reads_from_the_folder_or_the_dicomdir(base, reference, tmp_path: Path) -> None:
    dicomdir = A.with_dicomdir(base, tmp_path)
    assert not any(p.suffix for p in tmp_path.rglob("IM*"))  # extension-less, nested
    for path in (tmp_path, dicomdir):
        ct = read_ct(path)
        _same_volume(ct, reference)
        assert ct.warnings == ()


def test_nested_folders_without_extensions_and_an_old_preamble_less_file(base, reference, tmp_path: Path) -> None:
    A.write(base[:2], tmp_path, names=lambda k: f"IMG{k}", nested=True)
    A.implicit_no_preamble(base[2], tmp_path / "old" / "deeper" / "raw0003")
    (tmp_path / "README.txt").write_text("exported by PACS")
    _same_volume(read_ct(tmp_path), reference)


def test_a_folder_that_links_to_itself_is_searched_once(base, reference, tmp_path: Path) -> None:
    A.write(base, tmp_path)
    A.self_link(tmp_path)
    A.self_link(tmp_path / "sub", "up")  # a loop one level down, too
    found = list_dicom_series(tmp_path)
    assert [len(s.files) for s in found] == [3]
    _same_volume(read_ct(tmp_path), reference)


def test_a_file_with_a_cut_header_is_skipped_with_a_warning(base, tmp_path: Path) -> None:
    paths = A.write(A.restack(base, [0, 1, 2, 3, 4, 5]), tmp_path)
    A.truncate(paths[2], keep=0.0004)  # only the preamble is left
    paths[3].write_bytes(paths[3].read_bytes()[:900])  # cut inside the header: pydicom reads it "fine"
    ct = read_ct(tmp_path)
    assert any("2 file(s) marked as DICOM could not be read and were skipped" in w and paths[2].name in w
               and paths[3].name in w for w in ct.warnings), ct.warnings
    assert any("uneven slice spacing" in w for w in ct.warnings)  # the gap it leaves is said, too
    assert ct.array.shape[0] == 6


# ----------------------------------------------------------------------------- geometry
def test_gantry_tilt_on_real_slices_is_corrected_with_a_warning(base, tmp_path: Path) -> None:
    A.write(A.restack(base, [0, 1.5, 3, 4.5], drift_mm_per_mm=(0, -0.2679, 0), gantry_tilt=15.0), tmp_path)
    ct = read_ct(tmp_path)
    assert ct.info["gantry_tilt_corrected"] is True and ct.info["gantry_tilt_deg"] == pytest.approx(15.0)
    assert np.allclose(ct.geometry.direction_matrix, np.eye(3), atol=1e-6)
    assert any("gantry tilt of about 15.0°" in w for w in ct.warnings)


def test_uneven_spacing_on_real_slices_is_resampled_with_a_warning(base, tmp_path: Path) -> None:
    A.write(A.restack(base, [0, 1, 2, 4]), tmp_path)  # slice at 3 mm missing
    ct = read_ct(tmp_path)
    assert ct.array.shape[0] == 5 and ct.geometry.spacing[2] == pytest.approx(1.0)
    assert any("1 of them are interpolated" in w for w in ct.warnings)
    expected = np.round((ct.array[2].astype(float) + ct.array[4]) / 2)
    assert np.abs(ct.array[3] - expected).max() <= 1


# ----------------------------------------------------------------------------- compression
@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian],
                         ids=["RLE", "JPEG-LS", "JPEG2000", "deflate"])
def test_compressed_series_read_identical(base, reference, tmp_path: Path, syntax: str) -> None:
    A.write(A.compressed(base, syntax), tmp_path)
    ct = read_ct(tmp_path)
    _same_volume(ct, reference)
    assert ct.info["transfer_syntax"] == syntax


def test_pydicom_decodes_what_gdcm_cannot(base, reference, tmp_path: Path, monkeypatch) -> None:
    """A SimpleITK build without a codec: pydicom's plugin (Pillow for JPEG 2000) takes over."""
    import SimpleITK as sitk

    A.write(A.compressed(base, JPEG2000Lossless), tmp_path)

    class NoCodec(sitk.ImageFileReader):
        def Execute(self):  # noqa: N802 - SimpleITK's name
            raise RuntimeError("itk::ERROR: GDCMImageIO(0x1): Failed to change to Implicit Transfer Syntax")

    monkeypatch.setattr(sitk, "ImageFileReader", NoCodec)
    _same_volume(read_ct(tmp_path), reference)


# ----------------------------------------------------------------------------- values
def test_some_nan_voxels_become_the_lowest_value_with_a_warning(tmp_path: Path) -> None:
    import SimpleITK as sitk

    volume = np.full((4, 6, 6), 40.0, np.float32)
    volume[0, 0, :] = -1000.5
    volume[1, :2, :2] = np.nan
    volume[2, 0, 0] = np.inf
    for name in ("partial.nii.gz", "partial.nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / name))
        ct = read_ct(tmp_path / name)
        assert np.isfinite(ct.array).all()
        assert ct.array[1, 0, 0] == pytest.approx(-1000.5) and ct.array[2, 0, 0] == pytest.approx(-1000.5)
        assert any("5 of 144 voxels are NaN or infinite" in w for w in ct.warnings), ct.warnings


# ----------------------------------------------------------------------------- exports
def test_blank_uid_series_exports_nifti_and_nrrd_but_no_dicom_seg(base, tmp_path: Path) -> None:
    A.write(A.blank_uids(base), tmp_path / "in")
    ct = read_ct(tmp_path / "in")
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[1, 100:200, 100:200] = 6
    with pytest.raises(InputError, match="DICOM-SEG cannot be written: the source series has blank .*NIfTI or NRRD"):
        export_segmentation(labels, ct.geometry, ct.array, tmp_path / "out" / "x.nii.gz", formats=["dicom_seg"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    for suffix in (".nii.gz", ".nrrd"):
        written = export_segmentation(labels, ct.geometry, ct.array, tmp_path / f"out{suffix}" / f"x{suffix}")
        back, geometry = read_label_map(written[0])
        np.testing.assert_array_equal(back, labels)
        assert geometry.same_grid(ct.geometry, atol=1e-4)


def test_cli_segments_a_blank_uid_series(base, weights, tmp_path: Path, capsys) -> None:
    from napari_cdpdnet.cli import main

    A.write(A.blank_uids(base), tmp_path / "anon")
    out = tmp_path / "out" / "anon.nrrd"
    code = main(["segment", str(tmp_path / "anon"), "-s", "liver", "-o", str(out), "--checkpoint", str(weights[0]),
                 "--dino", str(weights[1]), "--offline", "--no-progress", "--preset", "fast",
                 "--box", "-40", "-40", "-1000", "40", "40", "1000"])  # a small box keeps it quick
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "have no SeriesInstanceUID" in captured.err
    labels, geometry = read_label_map(out)
    assert geometry.same_grid(read_ct(tmp_path / "anon").geometry, atol=1e-4)
    assert labels.shape == (3, 512, 512)


def test_structure_table_offers_the_label_map_when_dicom_seg_cannot_be_written(
    make_napari_viewer, base, tmp_path: Path
) -> None:
    from napari_cdpdnet._table_widget import StructureTableWidget

    A.write(A.blank_uids(base), tmp_path / "anon")
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "anon"), plugin="napari-cdpdnet")
    geometry = image.metadata["geometry"]
    labels = np.zeros(image.data.shape, np.uint8)
    labels[:, 200:260, 200:260] = 6
    viewer.add_labels(labels, name="liver", metadata={"geometry": geometry, "cdpdnet": {}},
                      **geometry.napari_transform())
    widget = StructureTableWidget(viewer)
    offers: list[str] = []
    widget.offer_without_dicom_seg = lambda reason: offers.append(reason) or False
    assert widget.export_to(tmp_path / "out" / "liver.nii.gz", formats={"dicom_seg"}) is None
    assert "blank StudyInstanceUID" in offers[0] and "not exported" in widget.status.text()
    assert not (tmp_path / "out").exists()
    widget.offer_without_dicom_seg = lambda reason: offers.append(reason) or True
    written = widget.export_to(tmp_path / "out" / "liver.nii.gz", formats={"dicom_seg"})
    assert [p.name for p in written] == ["liver.nii.gz", "liver.csv"] and len(offers) == 2
    np.testing.assert_array_equal(read_label_map(written[0])[0], labels)
