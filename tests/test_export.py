"""export.export_segmentation / export_dicom_seg and the DICOM-SEG writer, on real CT."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_cdpdnet import export as export_mod
from napari_cdpdnet._writer import write_labels_dicom_seg
from napari_cdpdnet.errors import InputError, OutputExistsError
from napari_cdpdnet.export import (
    TISSUE,
    describe_labels,
    export_dicom_seg,
    export_segmentation,
)
from napari_cdpdnet.export.dicomseg import read_dicom_seg
from napari_cdpdnet.export.measure import label_statistics
from napari_cdpdnet.io.images import read_ct, read_label_map

REPO = Path(__file__).resolve().parent.parent
#: TotalSegmentator `total` labels → CDPDNet structure indices (shared/data/README).
TS_TO_CDPDNET = {1: 1, 2: 2, 3: 3, 5: 6, 6: 7, 52: 8}


@pytest.fixture(scope="module")
def totalseg(request: pytest.FixtureRequest):
    """Real CT, its TotalSegmentator map, and the same map as CDPDNet structure indices."""
    shared_path = request.getfixturevalue("shared_path")
    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    seg, seg_geometry = read_label_map(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    assert seg_geometry.same_grid(ct.geometry, atol=1e-3)
    cdp = np.zeros(seg.shape, np.uint8)
    for ts, index in TS_TO_CDPDNET.items():
        cdp[seg == ts] = index
    return ct, seg, cdp


@pytest.fixture(scope="module")
def dcmqi(request: pytest.FixtureRequest):
    shared_path = request.getfixturevalue("shared_path")
    ct = read_ct(shared_path("data", "dcmqi", "ct-3slice"))
    liver, geometry = read_label_map(shared_path("data", "dcmqi", "liver_seg.nrrd"))
    assert geometry.same_grid(ct.geometry) and ct.geometry.dicom is not None
    return ct, liver


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_label_map_and_table_read_back_on_the_ct_grid(totalseg, tmp_path: Path) -> None:
    ct, _, cdp = totalseg
    out = tmp_path / "result.nii.gz"
    written = export_segmentation(cdp, ct.geometry, ct.array, out, reviewed={6}, edited={7})
    assert written == [out, tmp_path / "result.csv"]
    back, geometry = read_label_map(out)
    np.testing.assert_array_equal(back, cdp)
    assert geometry.same_grid(ct.geometry, atol=1e-4)

    rows = _read_csv(tmp_path / "result.csv")
    stats = {s.value: s for s in label_statistics(cdp, ct.geometry, ct.array)}
    assert [int(r["value"]) for r in rows] == sorted(stats)
    by_value = {int(r["value"]): r for r in rows}
    for value, st in stats.items():
        assert int(by_value[value]["voxel_count"]) == st.voxel_count > 0
        assert float(by_value[value]["volume_ml"]) == pytest.approx(st.volume_ml, abs=0.01)
        assert float(by_value[value]["hu_mean"]) == pytest.approx(st.hu_mean, abs=0.01)
    liver = by_value[6]
    assert liver["name"] == "Liver" and liver["snomed_type"] == "10200004^SCT^Liver"
    assert liver["reviewed"] == "true" and by_value[1]["reviewed"] == "false"
    assert by_value[7]["source"] == "CDPDNet+edited" and liver["source"] == "CDPDNet"
    # a real liver at 3 mm: well over a litre, soft-tissue density
    assert 1000 < float(liver["volume_ml"]) < 3000 and 20 < float(liver["hu_mean"]) < 120
    assert not list(tmp_path.glob(".tmp*"))


def test_labels_from_elsewhere_are_plain_labels(totalseg, tmp_path: Path) -> None:
    ct, seg, _ = totalseg
    rows = describe_labels(seg, ct.geometry, None, cdpdnet=False, colors={5: "#ff0000"})
    assert len(rows) == len(np.unique(seg)) - 1 > 50
    five = next(r for r in rows if r.value == 5)
    assert (five.name, five.key, five.color, five.snomed_type) == ("label 5", "label_5", "#ff0000", "")
    assert np.isnan(five.hu_mean)
    # values beyond the 32 structures stay plain labels even on CDPDNet layers
    mixed = describe_labels(seg, ct.geometry, cdpdnet=True)
    assert {r.value: r.name for r in mixed}[5] == "Esophagus"  # CDPDNet index 5, as asked
    assert {r.value: r.name for r in mixed}[52] == "label 52"


def test_dicom_seg_references_the_series_and_carries_snomed_codes(dcmqi, tmp_path: Path) -> None:
    ct, liver = dcmqi
    labels = liver.astype(np.uint8) * 6  # CDPDNet liver
    labels[1, 100:140, 300:330] = 40  # a hand-drawn label that is no CDPDNet structure
    out = tmp_path / "liver.nrrd"
    written = export_segmentation(labels, ct.geometry, ct.array, out, formats={"dicom_seg"}, edited={6})
    seg_path = tmp_path / "liver.seg.dcm"
    assert written == [out, tmp_path / "liver.csv", seg_path]

    back, segments = read_dicom_seg(seg_path, ct.geometry)
    np.testing.assert_array_equal(back == 1, labels == 6)
    np.testing.assert_array_equal(back == 2, labels == 40)
    assert [s.label for s in segments] == ["Liver", "label 40"]
    assert segments[0].type_code == ("10200004", "SCT", "Liver")
    assert segments[1].type_code == TISSUE and segments[1].category_code == TISSUE

    ds = pydicom.dcmread(seg_path)
    ref = ct.geometry.dicom
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == ref.study_instance_uid
    assert ds.FrameOfReferenceUID == ref.frame_of_reference_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ref.series_instance_uid
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(ref.sop_instance_uids)
    assert [s.SegmentAlgorithmType for s in ds.SegmentSequence] == ["SEMIAUTOMATIC", "MANUAL"]


def test_dicom_seg_needs_a_dicom_source_and_writes_nothing_otherwise(totalseg, tmp_path: Path) -> None:
    ct, _, cdp = totalseg
    with pytest.raises(InputError, match="not read from DICOM"):
        export_segmentation(cdp, ct.geometry, ct.array, tmp_path / "a.nii.gz", formats={"dicom_seg"})
    with pytest.raises(InputError, match="not read from DICOM"):
        export_dicom_seg(cdp, ct.geometry, tmp_path / "a.dcm")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unless_asked(totalseg, tmp_path: Path) -> None:
    ct, _, cdp = totalseg
    table = tmp_path / "result.csv"
    table.write_text("mine")
    with pytest.raises(OutputExistsError, match="result.csv"):
        export_segmentation(cdp, ct.geometry, ct.array, tmp_path / "result.nii.gz")
    assert table.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]  # not even the label map
    export_segmentation(cdp, ct.geometry, ct.array, tmp_path / "result.nii.gz", overwrite=True)
    assert table.read_text().startswith("value,key,name")


def test_nothing_partial_when_a_step_fails(totalseg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ct, _, cdp = totalseg
    import napari_cdpdnet.export.meshes as meshes

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(meshes, "write_stl", broken)
    with pytest.raises(OSError, match="disk full"):
        export_segmentation(cdp, ct.geometry, ct.array, tmp_path / "r.nii.gz", formats={"stl"})
    assert list(tmp_path.iterdir()) == []  # no label map, no table, no staging folder


def test_failed_publish_puts_replaced_files_back(totalseg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ct, _, cdp = totalseg
    out = tmp_path / "r.nii.gz"
    export_segmentation(cdp, ct.geometry, ct.array, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import napari_cdpdnet.fileutil as fileutil

    real = fileutil._publish
    calls = []

    def second_fails(src, dst, overwrite):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("device gone")
        real(src, dst, overwrite)

    monkeypatch.setattr(fileutil, "_publish", second_fails)
    with pytest.raises(OSError, match="device gone"):
        export_segmentation(np.zeros_like(cdp), ct.geometry, None, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_meshes_one_stl_per_structure(dcmqi, tmp_path: Path) -> None:
    ct, liver = dcmqi
    labels = liver.astype(np.uint8) * 6
    written = export_segmentation(labels, ct.geometry, None, tmp_path / "m.mha", formats={"stl"})
    assert [p.name for p in written] == ["m.mha", "m.csv", "m_liver.stl"]
    data = written[2].read_bytes()
    (n,) = struct.unpack("<I", data[80:84])
    assert n > 100 and len(data) == 84 + 50 * n


def test_given_rows_probabilities_and_every_format_at_once(dcmqi, tmp_path: Path) -> None:
    """What ``cdpdnet segment`` passes: its own table (request order, an absent structure with zero
    volume) and probability maps; the files listed beforehand are the files written."""
    import SimpleITK as sitk

    from napari_cdpdnet.export import export_paths
    from napari_cdpdnet.export.labeltable import build_label_table
    from napari_cdpdnet.geometry import Geometry

    ct, liver = dcmqi
    labels = liver.astype(np.uint8) * 6
    rows = build_label_table(labels, ct.geometry, ct.array, values=[6, 1])  # liver, then spleen (absent)
    probabilities = {6: liver.astype(np.float32) * 0.9, 1: np.zeros(liver.shape, np.float32)}
    formats = {"dicom_seg", "stl", "probabilities"}
    expected = export_paths(tmp_path / "r.nii.gz", ["liver", "spleen"], formats=formats)
    written = export_segmentation(labels, ct.geometry, ct.array, tmp_path / "r.nii.gz", formats=formats,
                                  rows=rows, probabilities=probabilities)
    assert [p.name for p in written] == ["r.nii.gz", "r.csv", "r.seg.dcm", "r_liver.stl",
                                         "r_liver_prob.nii.gz", "r_spleen_prob.nii.gz"]
    assert set(written) < set(expected)  # the spleen has no mesh: it is empty
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert [(r["key"], r["voxel_count"]) for r in _read_csv(written[1])] == [
        ("liver", str(int(liver.sum()))), ("spleen", "0")]
    back, segments = read_dicom_seg(written[2], ct.geometry)
    assert [s.label for s in segments] == ["Liver"]
    np.testing.assert_array_equal(back == 1, liver == 1)
    image = sitk.ReadImage(str(written[4]))
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), probabilities[6])
    assert Geometry.from_sitk(image).same_grid(ct.geometry)


def test_format_requests_are_checked_before_writing(totalseg, tmp_path: Path) -> None:
    ct, _, cdp = totalseg
    with pytest.raises(InputError, match="unknown export format png"):
        export_segmentation(cdp, ct.geometry, None, tmp_path / "r.nii.gz", formats={"png"})
    with pytest.raises(InputError, match="probability maps"):
        export_segmentation(cdp, ct.geometry, None, tmp_path / "r.nii.gz", formats={"probabilities"})
    assert list(tmp_path.iterdir()) == []


def test_a_new_format_is_one_registry_entry(dcmqi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe of docs/architecture.md: a writer and an entry; export, CLI and GUI follow."""
    from napari_cdpdnet.cli import build_parser
    from napari_cdpdnet.export import FORMATS, ExportFormat, optional_formats

    def write_npz(job, path, row) -> None:
        np.savez_compressed(path, labels=job.labels)

    monkeypatch.setitem(FORMATS, "npz", ExportFormat("npz", "NumPy", "the labels as .npz", "{stem}.npz",
                                                     write_npz))
    ct, liver = dcmqi
    written = export_segmentation(liver, ct.geometry, None, tmp_path / "l.nrrd", formats={"npz"})
    assert [p.name for p in written] == ["l.nrrd", "l.csv", "l.npz"]
    np.testing.assert_array_equal(np.load(written[2])["labels"], liver)
    assert "npz" in {f.name for f in optional_formats(probabilities=False)}  # the table's checkboxes
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("segment", "segment-by-example"):
        assert "--npz" in {s for a in sub[command]._actions for s in a.option_strings}


def test_bad_inputs_are_refused_before_writing(totalseg, tmp_path: Path) -> None:
    ct, _, cdp = totalseg
    with pytest.raises(InputError, match="cannot write a label map"):
        export_segmentation(cdp, ct.geometry, None, tmp_path / "r.png")
    with pytest.raises(InputError, match="no longer matches"):
        export_segmentation(cdp[:-1], ct.geometry, None, tmp_path / "r.nii.gz")
    with pytest.raises(InputError, match="the image has shape"):
        export_segmentation(cdp, ct.geometry, ct.array[:-1], tmp_path / "r.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ================================================================== napari writer (.dcm)
def test_dicom_seg_writer_from_layer_attributes(dcmqi, tmp_path: Path) -> None:
    ct, liver = dcmqi
    labels = liver.astype(np.uint8) * 6
    attributes = {"metadata": {"geometry": ct.geometry, "cdpdnet": {}, "edited_labels": [6]}}
    [path] = write_labels_dicom_seg(str(tmp_path / "s.dcm"), labels, attributes)
    back, segments = read_dicom_seg(path, ct.geometry)
    np.testing.assert_array_equal(back == 1, liver == 1)
    assert segments[0].label == "Liver"
    assert pydicom.dcmread(path).SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    # without "cdpdnet" metadata the value 6 is just a label
    [path] = write_labels_dicom_seg(str(tmp_path / "s.dcm"), labels, {"metadata": {"geometry": ct.geometry}})
    assert read_dicom_seg(path, ct.geometry)[1][0].label == "label 6"
    with pytest.raises(InputError, match="not read from DICOM"):
        write_labels_dicom_seg(str(tmp_path / "t.dcm"), labels, {"metadata": {"geometry": ct.geometry.with_dicom(None)}})


def test_manifest_offers_dicom_seg_writer_and_the_table_widget() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(REPO / "napari.yaml")
    assert (REPO / "napari.yaml").read_text() == (REPO / "napari_cdpdnet" / "napari.yaml").read_text()
    writers = {w.command: w for w in manifest.contributions.writers}
    assert writers["napari-cdpdnet.write_dicom_seg"].filename_extensions == [".dcm"]
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    assert commands["napari-cdpdnet.write_dicom_seg"] == "napari_cdpdnet._writer:write_labels_dicom_seg"
    [widget] = [w for w in manifest.contributions.widgets if w.display_name == "CDPDNet structures"]
    assert commands[widget.command] == "napari_cdpdnet._table_widget:StructureTableWidget"
    assert callable(export_mod.export_segmentation)
