"""The "CDPDNet structures" dock widget in a real viewer (pytest-qt, under Xvfb), on real CT."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_cdpdnet.export.dicomseg import read_dicom_seg
from napari_cdpdnet.export.measure import label_statistics
from napari_cdpdnet.io.images import read_label_map

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display: run under xvfb-run -a"),
]

REPO = Path(__file__).resolve().parent.parent
TS_TO_CDPDNET = {1: 1, 2: 2, 3: 3, 5: 6, 6: 7, 52: 8}


def _register_manifest():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    if "napari-cdpdnet" not in pm._manifests:
        pm.register(npe2.PluginManifest.from_file(REPO / "napari.yaml"))


@pytest.fixture
def ct_viewer(make_napari_viewer, shared_path):
    """A viewer with the real CT and its TotalSegmentator label map opened through our reader."""
    _register_manifest()
    viewer = make_napari_viewer()
    [image] = viewer.open(str(shared_path("data", "totalsegmentator", "example_ct.nii.gz")), plugin="napari-cdpdnet")
    [labels] = viewer.open(str(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz")),
                           plugin="napari-cdpdnet")
    assert labels._type_string == "labels" and image._type_string == "image"
    return viewer, image, labels


def _widget(viewer, **kwargs):
    from napari_cdpdnet._table_widget import StructureTableWidget

    widget = StructureTableWidget(viewer, debounce_ms=20, **kwargs)
    viewer.window.add_dock_widget(widget, name="CDPDNet structures")
    widget.wait_idle()
    return widget


def _column(widget, column: int) -> list[str]:
    return [widget.table.item(i, column).text() for i in range(widget.table.rowCount())]


def _result_layer(viewer, image, labels):
    """What the segmentation widget makes: structure indices plus the metadata convention."""
    cdp = np.zeros(labels.data.shape, np.uint8)
    for ts, index in TS_TO_CDPDNET.items():
        cdp[labels.data == ts] = index
    meta = {"geometry": image.metadata["geometry"], "source_path": image.metadata["source_path"],
            "image_layer": image.name, "cdpdnet": {"structures": sorted(TS_TO_CDPDNET.values())}}
    return viewer.add_labels(cdp, name="CDPDNet result", metadata=meta, **image.metadata["geometry"].napari_transform())


def test_table_shows_measured_rows_of_the_chosen_layers(ct_viewer) -> None:
    viewer, image, labels = ct_viewer
    widget = _widget(viewer)
    assert widget.labels_layer() is labels and widget.image_layer() is image  # same-shape default
    stats = label_statistics(labels.data, labels.metadata["geometry"], image.data)
    assert widget.table.rowCount() == len(stats) > 50
    assert _column(widget, 1)[:3] == [f"label {s.value}" for s in stats[:3]]  # not CDPDNet values
    assert _column(widget, 2) == [str(s.voxel_count) for s in stats]
    assert _column(widget, 3) == [f"{s.volume_ml:.2f}" for s in stats]
    assert _column(widget, 4) == [f"{s.hu_mean:.1f}" for s in stats]
    assert _column(widget, 5) == [f"{s.hu_sd:.1f}" for s in stats]
    # the swatch shows the layer's own colour
    from napari_cdpdnet._gui.table_export import hex_color

    assert widget.table.item(0, 0).background().color().name() == hex_color(labels.get_color(stats[0].value))

    widget.image_combo.setCurrentIndex(0)  # no image: no HU columns
    widget.wait_idle()
    assert set(_column(widget, 4)) == {""} and "HU" in widget.status.text()


def test_result_layer_uses_vocabulary_and_its_image(ct_viewer) -> None:
    viewer, image, labels = ct_viewer
    viewer.add_image(np.zeros(labels.data.shape, np.int16), name="decoy")  # same shape, not the source
    result = _result_layer(viewer, image, labels)
    widget = _widget(viewer)
    assert widget.labels_layer() is result and widget.image_layer() is image  # metadata["image_layer"]
    names = _column(widget, 1)
    assert names == ["Spleen", "Right Kidney", "Left Kidney", "Liver", "Stomach", "Aorta"]
    widget.image_combo.setCurrentIndex(0)  # the user's "(none)" survives unrelated layer changes
    viewer.add_points([[0, 0, 0]])
    assert widget.image_layer() is None
    widget.labels_combo.setCurrentText(labels.name)  # another Labels layer: its own default image
    assert widget.labels_layer() is labels and widget.image_layer() is image


def test_painting_and_undo_update_the_table(ct_viewer, qtbot) -> None:
    viewer, image, labels = ct_viewer
    widget = _widget(viewer)
    before = {r.value: r.voxel_count for r in widget.rows}
    box = np.zeros(labels.data.shape, bool)
    box[50:60, 40:60, 50:70] = True
    grown = int(np.count_nonzero(box & (labels.data != 5)))
    indices = np.nonzero(box)
    previous = set(np.unique(labels.data[box]).tolist()) - {0}
    labels.data_setitem(indices, 5)  # emits paint, as a brush stroke or fill does
    qtbot.waitUntil(lambda: {r.value: r.voxel_count for r in widget.rows}.get(5) == before[5] + grown,
                    timeout=5000)
    assert set(labels.metadata["edited_labels"]) == previous | {5}
    assert widget.table.item([r.value for r in widget.rows].index(5), 2).text() == str(before[5] + grown)

    labels.undo()  # napari's undo only refreshes the layer
    qtbot.waitUntil(lambda: {r.value: r.voxel_count for r in widget.rows} == before, timeout=5000)

    labels.paint((55, 50, 60), 0)  # the eraser, through napari's brush
    qtbot.waitUntil(lambda: sum(r.voxel_count for r in widget.rows) < sum(before.values()), timeout=5000)


def test_big_volumes_are_measured_and_exported_in_a_worker(ct_viewer, qtbot, tmp_path: Path) -> None:
    viewer, image, labels = ct_viewer
    widget = _widget(viewer, thread_voxels=0)
    expected = label_statistics(labels.data, labels.metadata["geometry"], image.data)
    assert [r.voxel_count for r in widget.rows] == [s.voxel_count for s in expected]
    labels.data_setitem((np.array([5]), np.array([5]), np.array([5])), 99)
    qtbot.waitUntil(lambda: 99 in {r.value for r in widget.rows}, timeout=5000)

    snapshot = labels.data.copy()
    assert widget.export_to(tmp_path / "big.nii.gz", background=None) is None  # a worker writes
    labels.data_setitem((np.array([6]), np.array([6]), np.array([6])), 98)  # edits meanwhile
    widget.wait_idle()
    assert widget.last_export == [tmp_path / "big.nii.gz", tmp_path / "big.csv"]
    np.testing.assert_array_equal(read_label_map(tmp_path / "big.nii.gz")[0], snapshot)
    assert widget.export_button.isEnabled()


def test_export_nifti_and_table_with_reviewed(ct_viewer, tmp_path: Path) -> None:
    viewer, image, labels = ct_viewer
    result = _result_layer(viewer, image, labels)
    widget = _widget(viewer)
    widget.set_reviewed(6)
    assert result.metadata["reviewed_labels"] == [6]
    written = widget.export_to(tmp_path / "out.nii.gz", formats=())
    assert written == [tmp_path / "out.nii.gz", tmp_path / "out.csv"]
    back, geometry = read_label_map(written[0])
    np.testing.assert_array_equal(back, result.data)
    assert geometry.same_grid(image.metadata["geometry"], atol=1e-4)
    with open(written[1], newline="") as fh:
        rows = {int(r["value"]): r for r in csv.DictReader(fh)}
    assert rows[6]["name"] == "Liver" and rows[6]["reviewed"] == "true" and rows[1]["reviewed"] == "false"
    stats = {s.value: s for s in label_statistics(result.data, geometry, image.data)}
    assert float(rows[6]["volume_ml"]) == pytest.approx(stats[6].volume_ml, abs=0.01)


def test_buttons_use_the_dialogs_and_ask_before_overwriting(ct_viewer, tmp_path: Path) -> None:
    viewer, image, labels = ct_viewer
    widget = _widget(viewer)
    target = tmp_path / "table.csv"
    asked: list[list[Path]] = []
    widget.ask_save_path = lambda caption, file_filter: str(target)
    widget.confirm_overwrite = lambda paths: asked.append(list(paths)) or False
    widget.csv_button.click()
    assert target.read_text().startswith("value,key,name") and asked == []
    target.write_text("mine")
    widget.csv_button.click()
    assert asked == [[target]] and target.read_text() == "mine"  # declined: kept
    widget.confirm_overwrite = lambda paths: True
    widget.csv_button.click()
    assert target.read_text().startswith("value,key,name")

    from napari_cdpdnet.export import optional_formats

    assert list(widget.format_checks) == [f.name for f in optional_formats(probabilities=False)]
    widget.ask_save_path = lambda caption, file_filter: str(tmp_path / "seg.nrrd")
    widget.format_checks["stl"].setChecked(True)
    widget.export_button.click()
    assert (tmp_path / "seg.nrrd").is_file() and (tmp_path / "seg_label_5.stl").is_file()


def test_errors_become_notifications(ct_viewer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    viewer, image, labels = ct_viewer
    widget = _widget(viewer)
    assert widget.export_to(tmp_path / "x.nii.gz", formats={"dicom_seg"}) is None
    assert len(shown) == 1 and "not read from DICOM" in shown[0] and "Traceback" not in shown[0]
    assert list(tmp_path.iterdir()) == []
    assert widget.export_to(tmp_path / "x.png") is None
    assert "cannot write a label map" in shown[1]


def test_dicom_seg_export_on_the_dcmqi_series(make_napari_viewer, shared_path, tmp_path: Path) -> None:
    _register_manifest()
    viewer = make_napari_viewer()
    [image] = viewer.open(str(shared_path("data", "dcmqi", "ct-3slice")), plugin="napari-cdpdnet")
    geometry = image.metadata["geometry"]
    assert geometry.dicom is not None
    liver, _ = read_label_map(shared_path("data", "dcmqi", "liver_seg.nrrd"))
    # a layer drawn on the series: no geometry of its own, only the image's transform
    labels = liver.astype(np.uint8) * 6
    labels[:, 20:60, 20:60] = 30  # a second structure, drawn as a box
    layer = viewer.add_labels(labels, name="drawn", metadata={"cdpdnet": {}}, **geometry.napari_transform())
    widget = _widget(viewer)
    assert widget.labels_layer() is layer and widget.image_layer() is image
    written = widget.export_to(tmp_path / "liver.nii.gz", formats={"dicom_seg"})
    assert written is not None and written[2] == tmp_path / "liver.seg.dcm"
    back, segments = read_dicom_seg(written[2], geometry)
    from napari_cdpdnet.vocabulary.catalog import structure

    assert [s.label for s in segments] == ["Liver", structure(30).name]
    assert segments[0].type_code == ("10200004", "SCT", "Liver")
    np.testing.assert_array_equal(back == 1, labels == 6)
    np.testing.assert_array_equal(back == 2, labels == 30)
    ds = pydicom.dcmread(written[2])
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == geometry.dicom.series_instance_uid
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(geometry.dicom.sop_instance_uids)

    # dcmqi's liver map opened through the reader: NRRD geometry, no DICOM references of its
    # own; it lies on the series' grid, so the series' references are used
    [nrrd] = viewer.open(str(shared_path("data", "dcmqi", "liver_seg.nrrd")), plugin="napari-cdpdnet")
    assert nrrd.metadata["geometry"].dicom is None
    widget.labels_combo.setCurrentText(nrrd.name)
    assert widget.image_layer() is image
    written = widget.export_to(tmp_path / "nrrd.nii.gz", formats={"dicom_seg"})
    back, segments = read_dicom_seg(written[2], geometry)
    assert [s.label for s in segments] == ["label 1"] and segments[0].type_code[0] == "85756007"
    np.testing.assert_array_equal(back, liver)

    # the napari Save route (.dcm writer contribution) on a layer holding the geometry
    layer.metadata["geometry"] = geometry
    out = tmp_path / "saved.dcm"
    layer.save(str(out), plugin="napari-cdpdnet")
    back, segments = read_dicom_seg(out, geometry)
    np.testing.assert_array_equal(back == 1, labels == 6)


def test_choosers_follow_the_layer_list(ct_viewer) -> None:
    viewer, image, labels = ct_viewer
    widget = _widget(viewer)
    labels.name = "renamed"
    assert widget.labels_combo.currentText() == "renamed" and widget.labels_layer() is labels
    viewer.layers.remove(labels)
    widget.wait_idle()
    assert widget.labels_layer() is None and widget.table.rowCount() == 0
    assert "Labels layer" in widget.status.text()


def test_docks_from_the_plugin_menu_without_private_access(ct_viewer, qtbot) -> None:
    """Docked through the manifest (napari passes a proxy viewer that warns on private
    attribute access), it measures and follows edits and undo."""
    import warnings

    viewer, image, labels = ct_viewer
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Private attribute access", category=FutureWarning)
        _, widget = viewer.window.add_plugin_dock_widget("napari-cdpdnet", "CDPDNet structures")
        widget.wait_idle()
        assert widget.labels_layer().name == labels.name and widget.table.rowCount() > 50
        n5 = {r.value: r.voxel_count for r in widget.rows}[5]
        labels.data_setitem((np.array([0]), np.array([0]), np.array([0])), 5)
        qtbot.waitUntil(lambda: {r.value: r.voxel_count for r in widget.rows}[5] == n5 + 1, timeout=5000)
        labels.undo()
        qtbot.waitUntil(lambda: {r.value: r.voxel_count for r in widget.rows}[5] == n5, timeout=5000)
