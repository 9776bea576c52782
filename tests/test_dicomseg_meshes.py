"""DICOM-SEG export/import on the real dcmqi series, and STL surface meshes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.errors import InputError, OutputExistsError
from napari_cdpdnet.export.dicomseg import SegmentSpec, read_dicom_seg, write_dicom_seg
from napari_cdpdnet.export.meshes import label_mesh, write_stl
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io.images import read_ct, read_label_map

LIVER = SegmentSpec(6, "Liver", ("10200004", "SCT", "Liver"), color=(221, 130, 101))
TUMOUR = SegmentSpec(
    27, "Liver Tumor", ("108369006", "SCT", "Neoplasm"),
    ("49755003", "SCT", "Morphologically Abnormal Structure"),
)
R_KIDNEY = SegmentSpec(2, "Right Kidney", ("64033007", "SCT", "Kidney"), modifier_code=("24028007", "SCT", "Right"))


@pytest.fixture(scope="module")
def dcmqi(request: pytest.FixtureRequest):
    shared_path = request.getfixturevalue("shared_path")
    ct = read_ct(shared_path("data", "dcmqi", "ct-3slice"))
    liver, liver_geom = read_label_map(shared_path("data", "dcmqi", "liver_seg.nrrd"))
    assert liver_geom.same_grid(ct.geometry)
    return ct, liver, shared_path("data", "dcmqi", "liver.dcm")


def test_seg_round_trip_keeps_segments_codes_and_voxels(dcmqi, tmp_path: Path) -> None:
    ct, liver, _ = dcmqi
    labels = liver.astype(np.uint8) * 6
    labels[1, 100:140, 300:330] = 27
    labels[2, 400:420, 100:120] = 2
    out = write_dicom_seg(tmp_path / "seg.dcm", labels, ct.geometry, [LIVER, TUMOUR, R_KIDNEY])
    back, segments = read_dicom_seg(out, ct.geometry)
    assert [s.label for s in segments] == ["Liver", "Liver Tumor", "Right Kidney"]
    assert segments[2].modifier_code == ("24028007", "SCT", "Right")
    assert segments[1].category_code[0] == "49755003"
    for number, value in enumerate((6, 27, 2), start=1):
        np.testing.assert_array_equal(back == number, labels == value)

    import pydicom

    ds = pydicom.dcmread(out)
    ref = ct.geometry.dicom
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == ref.study_instance_uid
    assert ds.FrameOfReferenceUID == ref.frame_of_reference_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ref.series_instance_uid
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(ref.sop_instance_uids)


def test_reference_seg_reads_onto_the_source_grid(dcmqi) -> None:
    """dcmqi's own liver.dcm, read onto the CT grid, equals its liver_seg.nrrd."""
    ct, liver, ref_seg = dcmqi
    back, segments = read_dicom_seg(ref_seg, ct.geometry)
    assert [s.label for s in segments] == ["Liver"]
    np.testing.assert_array_equal(back == 1, liver == 1)


def test_seg_refuses_what_it_cannot_write(dcmqi, tmp_path: Path) -> None:
    ct, liver, _ = dcmqi
    with pytest.raises(InputError, match="not read from DICOM"):
        write_dicom_seg(tmp_path / "a.dcm", liver, ct.geometry.with_dicom(None), [LIVER])
    with pytest.raises(InputError, match="nothing to export"):
        write_dicom_seg(tmp_path / "a.dcm", np.zeros_like(liver), ct.geometry, [LIVER])
    (tmp_path / "b.dcm").write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        write_dicom_seg(tmp_path / "b.dcm", liver * 6, ct.geometry, [LIVER])
    assert (tmp_path / "b.dcm").read_bytes() == b"mine"
    with pytest.raises(InputError, match="not a readable DICOM Segmentation"):
        read_dicom_seg(tmp_path / "b.dcm", ct.geometry)


def _ellipsoid(shape=(30, 40, 50)) -> np.ndarray:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return ((((z - 15) * 2.0) ** 2 + (y - 20.0) ** 2 + ((x - 25) * 0.8) ** 2) < 144).astype(np.uint8) * 3


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([1.0, 1.0, -1.0]), np.eye(3)[[1, 0, 2]]])
def test_mesh_is_closed_outward_and_in_patient_mm(direction: np.ndarray, tmp_path: Path) -> None:
    labels = _ellipsoid()
    geom = Geometry((0.8, 1.0, 2.0), (10.0, -20.0, 30.0), tuple(direction.ravel()), labels.shape)
    verts, faces = label_mesh(labels, 3, geom)
    tri = verts[faces]
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    voxel_volume = (labels == 3).sum() * geom.voxel_volume_mm3
    assert signed_volume == pytest.approx(voxel_volume, rel=0.05)  # positive: normals point out
    centre = geom.index_to_world(np.array([15.0, 20.0, 25.0]))
    np.testing.assert_allclose(verts.mean(axis=0), centre, atol=1.0)

    path = write_stl(tmp_path / "s.stl", verts, faces)
    data = path.read_bytes()
    (n,) = struct.unpack("<I", data[80:84])
    assert n == len(faces) and len(data) == 84 + 50 * n


def test_mesh_of_empty_label_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        label_mesh(np.zeros((4, 4, 4), np.uint8), 1, Geometry.identity((4, 4, 4)))


def test_single_segment_seg_round_trip(dcmqi, tmp_path: Path) -> None:
    """highdicom stores a lone segment's number in the shared functional groups, not per frame."""
    ct, liver, _ = dcmqi
    out = write_dicom_seg(tmp_path / "one.dcm", liver * 6, ct.geometry, [LIVER])
    back, segments = read_dicom_seg(out, ct.geometry)
    assert [s.label for s in segments] == ["Liver"]
    np.testing.assert_array_equal(back == 1, liver == 1)
