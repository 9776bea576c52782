"""The segmentation widget and its layer rules: tiny official-format weights, real CT, real viewer.

Layer rules (`_layers`) are tested without a window first; the widget tests run napari under
Xvfb with a real thread worker, so cancelling, busy states and notifications are the ones a
user gets.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gui_support import add_segmentation_dock

from napari_cdpdnet._gui import layer_input
from napari_cdpdnet._gui import layers as _layers
from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, structure

REPO = Path(__file__).resolve().parent.parent
LIVER = structure("liver").index  # 6
LEFT_KIDNEY = structure("left_kidney").index  # 3
SPLEEN = structure("spleen").index  # 1

needs_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY"), reason="needs a display: run under xvfb-run -a"
)


# ================================================================== layer rules, no window
def _rotated_geometry(shape: tuple[int, int, int] = (6, 7, 8)) -> Geometry:
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    return Geometry(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, -30.0), direction=direction, shape=shape)


def test_layer_data_carries_geometry_colours_names_and_run_metadata() -> None:
    g = _rotated_geometry()
    labels = np.zeros(g.shape, np.uint8)
    labels[1:3, 2:4, 2:5] = LIVER
    structs = [structure("liver"), structure("left kidney")]
    data, kwargs, kind = _layers.labels_layer_data(
        labels, g, structs, image_layer="ct", source_path="/x/ct.nii.gz", request="liver, left kidney",
        preset="fast", run=2)
    assert kind == "labels" and data is labels
    assert kwargs["name"] == "CDPDNet: liver, left_kidney #2"
    assert _layers.layer_name(structs, 1) == "CDPDNet: liver, left_kidney"
    assert kwargs["metadata"]["geometry"] is g and kwargs["metadata"]["image_layer"] == "ct"
    assert kwargs["metadata"]["cdpdnet"] == {"request": "liver, left kidney", "structures": ["liver", "left_kidney"],
                                              "preset": "fast", "run": 2, "edited": False}
    for key, value in g.napari_transform().items():
        np.testing.assert_allclose(kwargs[key], value)
    features = kwargs["features"]
    row = features["index"].index(LIVER)
    assert features["name"][row] == "Liver" and features["key"][row] == "liver"
    cmap = kwargs["colormap"]
    r, gr, b = STRUCTURES[LIVER - 1].color
    np.testing.assert_allclose(cmap.map(np.array([LIVER]))[0], [r / 255, gr / 255, b / 255, 1.0], atol=1e-6)
    assert cmap.map(np.array([0]))[0][3] == 0  # background transparent
    with pytest.raises(InputError, match="does not match"):
        _layers.labels_layer_data(labels[:-1], g, structs, image_layer="ct", source_path=None,
                                  request="liver", preset="exact", run=1)


def test_run_numbers_count_per_image_layer() -> None:
    metas = [{"image_layer": "ct", "cdpdnet": {"run": 1}}, {"image_layer": "ct", "cdpdnet": {"run": 3}},
             {"image_layer": "other", "cdpdnet": {"run": 7}}, {"geometry": None}]
    assert _layers.next_run_number(metas, "ct") == 4
    assert _layers.next_run_number(metas, "new") == 1


def test_merge_fills_background_and_same_structure_only_and_spares_edits() -> None:
    target = np.array([0, 0, 6, 1, 6, 0, 0], np.uint8)
    new = np.array([6, 6, 6, 6, 0, 3, 6], np.uint8)
    protected = np.array([0, 0, 0, 0, 0, 0, 1], bool)
    written = _layers.merge_labels_into(target, new, protected=protected)
    np.testing.assert_array_equal(target, [6, 6, 6, 1, 6, 3, 0])  # spleen kept, nothing erased
    assert written == 3
    before = target.copy()
    assert _layers.merge_labels_into(target, np.full_like(target, 3), protected=True) == 0
    np.testing.assert_array_equal(target, before)
    with pytest.raises(InputError):
        _layers.merge_labels_into(target, new[:3])


def test_edit_tracker_records_brush_fill_and_data_replacement() -> None:
    from napari.layers import Labels

    layer = Labels(np.zeros((5, 20, 20), np.uint8), metadata={"cdpdnet": {"run": 1, "edited": False}})
    tracker = _layers.EditTracker(layer)
    assert not tracker.edited and tracker.protected() is False
    layer.brush_size = 3
    layer.paint((2, 10, 10), 4)
    painted = layer.data == 4
    assert painted.any() and tracker.edited
    assert np.array_equal(tracker.protected() & painted, painted)
    assert not tracker.protected()[0, 0, 0]
    assert layer.metadata["cdpdnet"]["edited"] is True
    layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 2)
    assert tracker.protected()[0, 0, 0]
    layer.data = np.ones((5, 20, 20), np.uint8)
    assert tracker.protected() is True


def test_pick_component_takes_the_most_probable_structure_and_its_connected_region() -> None:
    g = Geometry.identity((4, 10, 10))
    liver = np.zeros(g.shape, np.float32)
    liver[:, 1:4, 1:4] = 0.9  # region A
    liver[:, 6:9, 6:9] = 0.8  # region B, not connected to A
    kidney = np.zeros(g.shape, np.float32)
    kidney[:, 2:5, 2:5] = 0.95  # overlaps A, more probable there
    cache = _layers.ProbabilityCache.from_probabilities(g, {LIVER: liver, LEFT_KIDNEY: kidney}, "res")
    assert cache.nbytes == 2 * liver.size  # one byte per voxel per structure
    index, region = _layers.pick_component(cache, (1, 7, 7))
    assert index == LIVER and region.sum() == 4 * 9 and region[:, 6:9, 6:9].all()
    index, region = _layers.pick_component(cache, (0, 3, 3))
    assert index == LEFT_KIDNEY and np.array_equal(region, kidney > 0.5)
    assert _layers.pick_component(cache, (0, 0, 9)) is None  # background everywhere
    assert _layers.pick_component(cache, (9, 0, 0)) is None  # outside the grid
    half = np.full(g.shape, 0.5, np.float32)  # exactly 0.5 is not > 0.5
    assert _layers.pick_component(_layers.ProbabilityCache.from_probabilities(g, {LIVER: half}, ""), (0, 0, 0)) is None


def test_a_pick_fills_background_only_as_one_undoable_edit() -> None:
    from napari.layers import Labels

    data = np.zeros((2, 4, 4), np.uint8)
    data[0, 0, :2] = SPLEEN
    layer = Labels(data, metadata={"cdpdnet": {"run": 1, "structures": ["spleen"]}})
    region = np.zeros(data.shape, bool)
    region[0, :2, :] = True  # 8 voxels, 2 of them spleen
    assert _layers.add_picked_region(layer, LIVER, region) == 6
    assert np.all(layer.data[0, 0, :2] == SPLEEN) and np.all(layer.data[0, 1] == LIVER)
    assert layer.selected_label == LIVER
    assert layer.metadata["cdpdnet"]["structures"] == ["spleen", "liver"]
    layer.undo()
    assert not np.any(layer.data == LIVER)


def test_box_on_voxels_becomes_an_lps_roi_and_flat_axes_span_the_image() -> None:
    g = _rotated_geometry((6, 7, 8))
    # a rectangle on slice z=2 from (y, x) = (1, 2) to (4, 6): flat in z
    pts = np.array([[2, 1, 2], [2, 1, 6], [2, 4, 6], [2, 4, 2]], float)
    lo, hi = layer_input.roi_from_index_points(pts, g)
    corners = np.array([[z, y, x] for z in (-0.5, 5.5) for y in (0.5, 4.5) for x in (1.5, 6.5)])
    lps = g.index_to_world(corners)
    np.testing.assert_allclose(lo, lps.min(axis=0), atol=1e-9)
    np.testing.assert_allclose(hi, lps.max(axis=0), atol=1e-9)
    nan_axis = np.array([[np.nan, 1, 2], [np.nan, 4, 6]], float)
    np.testing.assert_allclose(layer_input.roi_from_index_points(nan_axis, g)[0], lo, atol=1e-9)
    with pytest.raises(InputError, match="outside"):
        layer_input.roi_from_index_points(np.array([[0, 50, 60], [0, 70, 80]], float), g)


# ================================================================== the widget in a viewer
def _register_manifest():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    if "napari-cdpdnet" not in pm._manifests:
        pm.register(npe2.PluginManifest.from_file(REPO / "napari.yaml"))
    return pm


def _open_ct(viewer, shared_path) -> Any:
    _register_manifest()
    path = shared_path("data", "totalsegmentator", "example_ct.nii.gz")
    [layer] = viewer.open(str(path), plugin="napari-cdpdnet")
    return layer


def _run(qtbot, widget, timeout_s: float = 150) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=int(timeout_s * 1000)) as blocker:
        widget.run_button.click()
    return blocker.args[0]


def _labels_layers(viewer) -> list[Any]:
    from napari.layers import Labels

    return [lyr for lyr in viewer.layers if isinstance(lyr, Labels)]


@pytest.mark.gui
@pytest.mark.slow
@pytest.mark.shared
@needs_display
def test_run_cancel_edit_rerun_merge_and_pick(make_napari_viewer, qtbot, shared_path, segmenter, notes, MouseEvent) -> None:
    viewer = make_napari_viewer()
    image = _open_ct(viewer, shared_path)
    geometry: Geometry = image.metadata["geometry"]
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    assert widget.image_combo.currentText() == image.name
    assert "ready" in widget.weights_label.text()

    # ---- run 1: typed request, fast preset, whole image
    widget.text_edit.setText("liver, left kidney")
    widget.preset_combo.setCurrentText("fast")
    qtbot.waitUntil(lambda: "Left Kidney (exact 1.00)" in widget.resolved_label.text(), timeout=2000)
    assert "Liver (exact 1.00)" in widget.resolved_label.text()
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    heartbeat = QTimer()
    heartbeat.timeout.connect(lambda: ticks.append(time.perf_counter()))
    heartbeat.start(100)
    t0 = time.perf_counter()
    assert _run(qtbot, widget) == "done", widget.status_label.text()
    heartbeat.stop()
    elapsed = time.perf_counter() - t0
    # the GUI thread kept serving events during the whole run (which takes a minute on 2 cores)
    gaps = np.diff([t0, *ticks, time.perf_counter()])
    assert len(ticks) > elapsed * 2 and gaps.max() < 5.0, (len(ticks), elapsed, gaps.max())
    [first] = _labels_layers(viewer)
    assert first.name == "CDPDNet: liver, left_kidney"
    assert first.metadata["geometry"].same_grid(geometry)
    idx = np.array([5, 40, 60])
    np.testing.assert_allclose(first.data_to_world(idx), image.data_to_world(idx), atol=1e-6)
    values = set(np.unique(first.data).tolist())
    assert values <= {0, LIVER, LEFT_KIDNEY} and values > {0}, values
    rows = dict(zip(first.features["index"], first.features["name"], strict=True))
    assert rows[LIVER] == "Liver" and rows[LEFT_KIDNEY] == "Left Kidney"
    shown_value = sorted(values - {0})[0]
    voxel = np.argwhere(first.data == shown_value)[0]
    status = first.get_status(first.data_to_world(voxel), world=True)
    assert rows[shown_value] in str(status)  # hovering names the structure
    assert first.metadata["cdpdnet"]["structures"] == ["liver", "left_kidney"]
    assert image.name in widget.probability_cache
    assert notes["error"] == []

    # ---- run 2: cancelled after its first window -> nothing added, widget idle, layer untouched
    before = first.data.copy()
    seen: list[tuple[int, int]] = []

    def cancel_after_first_window(event) -> None:
        if event.stage == "inference":
            seen.append((event.done, event.total))
            if event.done >= 1:
                widget.cancel_button.click()

    widget.progressed.connect(cancel_after_first_window)
    assert _run(qtbot, widget) == "cancelled"
    widget.progressed.disconnect(cancel_after_first_window)
    assert seen and max(d for d, _ in seen) < seen[-1][1]  # stopped midway
    assert _labels_layers(viewer) == [first]
    assert not widget.is_running and widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "Cancelled" in widget.status_label.text()
    np.testing.assert_array_equal(first.data, before)
    assert notes["error"] == []

    # ---- the user paints on the result; a rerun (limited to a box) makes a new layer
    first.brush_size = 5
    centre = tuple(int(c) for c in np.array(geometry.shape) // 2)
    first.paint(centre, SPLEEN)
    painted = first.data.copy()
    assert (painted == SPLEEN).any() and first.metadata["cdpdnet"]["edited"] is True

    z = geometry.shape[0] // 2
    corners_idx = np.array([[z, 40, 50], [z, 40, 70], [z, 60, 70], [z, 60, 50]], float)
    box = np.array([image.data_to_world(c) for c in corners_idx], dtype=float)
    viewer.add_shapes(box, shape_type="rectangle", name="box")
    viewer.layers.selection.active = image
    widget.box_check.setChecked(True)
    assert _run(qtbot, widget) == "done", widget.status_label.text()
    first_again, second = _labels_layers(viewer)
    assert first_again is first and second.name == "CDPDNet: liver, left_kidney #2"
    np.testing.assert_array_equal(first.data, painted)
    assert second.metadata["cdpdnet"]["run"] == 2
    outside = np.ones(geometry.shape, bool)
    outside[:, 39:62, 49:72] = False
    assert not second.data[outside].any()  # the box limited the run (x, y; z spans the image)

    # ---- explicit merge of a box-limited run into the painted layer: fills background only
    widget.merge_combo.setCurrentText(first.name)
    widget.text_edit.setText("liver")
    assert _run(qtbot, widget) == "merged", widget.status_label.text()
    assert len(_labels_layers(viewer)) == 2
    changed = first.data != painted
    assert np.all(painted[changed] == 0) and np.all(first.data[changed] == LIVER)
    assert np.all(first.data[painted == SPLEEN] == SPLEEN)  # the user's voxels are untouched
    widget.merge_combo.setCurrentText("New layer")

    # ---- point and click: the last run's probabilities add a structure without rerunning
    cache = widget.probability_cache[image.name]
    assert cache.layer_name == first.name and set(cache.maps) == {LIVER}
    target = first
    liver_voxels = np.argwhere((cache.maps[LIVER] >= 128) & (painted == 0))
    assert len(liver_voxels), "the tiny model gave no liver probability above 0.5 in the box"
    click = liver_voxels[len(liver_voxels) // 2]
    target.data[target.data == LIVER] = 0  # the user removed the liver...
    target.refresh()
    viewer.layers.selection.active = target
    target.mode = "paint"
    widget.pick_button.setChecked(True)
    assert target.mode == "pan_zoom"  # picking does not paint as well
    [on_click] = [cb for cb in viewer.mouse_drag_callbacks if cb == widget.pick_panel.tool]
    t0 = time.perf_counter()
    on_click(viewer, MouseEvent(type="mouse_press", position=tuple(image.data_to_world(click)), button=1))
    assert time.perf_counter() - t0 < 5  # instant: no model run
    assert target.data[tuple(click)] == LIVER and target.selected_label == LIVER
    assert "added Liver" in widget.status_label.text()
    assert np.all(target.data[painted == SPLEEN] == SPLEEN)
    target.undo()  # the pick is an ordinary, undoable edit
    assert target.data[tuple(click)] == 0
    widget.pick_button.setChecked(False)
    assert widget.pick_panel.tool not in viewer.mouse_drag_callbacks
    assert notes["error"] == []


@pytest.mark.gui
@pytest.mark.shared
@needs_display
def test_unknown_structure_is_a_notification_not_a_traceback(
    make_napari_viewer, qtbot, shared_path, segmenter, notes, monkeypatch
) -> None:
    viewer = make_napari_viewer()
    _open_ct(viewer, shared_path)
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    widget.text_edit.setText("liver, brain")
    qtbot.waitUntil(lambda: "not resolved" in widget.resolved_label.text(), timeout=2000)
    assert "brain" in widget.resolved_label.text()
    widget.run_button.click()
    assert not widget.is_running
    assert len(notes["error"]) == 1 and "brain" in notes["error"][0] and "not one of" in notes["error"][0]
    assert "Traceback" not in notes["error"][0]
    assert _labels_layers(viewer) == [] and widget.run_button.isEnabled()
    widget.text_edit.setText("")
    widget.run_button.click()  # nothing requested
    assert "no structures requested" in notes["error"][-1]
    widget.set_checked(["spleen"])
    widget.box_check.setChecked(True)  # ... but no rectangle anywhere
    widget.run_button.click()
    assert "no Shapes layer holds a rectangle" in notes["error"][-1] and not widget.is_running
    image = viewer.layers[0]
    widget.box_check.setChecked(False)
    assert widget.settings(image, 2).return_probabilities  # 1.4 M voxels: kept for clicks
    monkeypatch.setattr("napari_cdpdnet._gui.run_panel.PROBABILITY_BUDGET", image.data.size * 4 * 2 - 1)
    assert widget.settings(image, 1).return_probabilities and not widget.settings(image, 2).return_probabilities
    image.name = "renamed CT"
    assert widget.image_combo.currentText() == "renamed CT"
    viewer.add_image(np.zeros((3, 4, 5)), name="no geometry")
    widget.image_combo.setCurrentText("no geometry")
    widget.run_button.click()
    assert "no patient geometry" in notes["error"][-1]


@pytest.mark.gui
@needs_display
def test_completion_checklist_and_no_image(make_napari_viewer, qtbot, segmenter, notes) -> None:
    from qtpy.QtWidgets import QLabel

    from napari_cdpdnet._gui.request_box import completion_terms
    from napari_cdpdnet.vocabulary.catalog import FIXED_CONDITIONING_NOTE

    viewer = make_napari_viewer()
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    terms = completion_terms()
    assert {"Liver", "left kidney", "IVC"} <= set(terms)
    assert widget.completer.splitPath("liver, left ki") == ["left ki"]
    widget.set_checked(["pancreas", "aorta"])
    assert [s.key for s in widget.checked_structures()] == ["aorta", "pancreas"]
    qtbot.waitUntil(lambda: "Pancreas (ticked)" in widget.resolved_label.text(), timeout=2000)
    widget.text_edit.setText("IVC")
    qtbot.waitUntil(lambda: "Postcava" in widget.resolved_label.text() or "Inferior" in widget.resolved_label.text(), timeout=2000)
    assert any(lbl.text() == FIXED_CONDITIONING_NOTE for lbl in widget.findChildren(QLabel))
    widget.run_button.click()
    assert "no image layer" in notes["error"][-1]
    assert widget.pick_at((0.0, 0.0, 0.0)) is None


@pytest.mark.gui
@needs_display
def test_weights_folder_and_offline_download(make_napari_viewer, qtbot, weights, notes, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("CDPDNET_OFFLINE", "1")
    viewer = make_napari_viewer()
    widget = add_segmentation_dock(viewer, qtbot)  # the default Segmenter: nothing anywhere
    assert "not found" in widget.weights_label.text()
    assert "cdpdnet.pth" in widget.weights_label.toolTip()
    folder = weights[0].parent
    widget.use_weights_folder(folder)
    qtbot.waitUntil(lambda: "ready" in widget.weights_label.text(), timeout=30_000)
    assert "explicit" in widget.weights_label.text()
    worker = widget.download_weights()
    assert worker is not None and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30_000)
    qtbot.waitUntil(lambda: "checking" not in widget.weights_label.text(), timeout=30_000)
    assert notes["error"] and "cdpdnet.pth" in notes["error"][-1]
    assert "Traceback" not in notes["error"][-1]

    # online (a fake hub serving the tiny files): progress reaches the bar, then the cache is used
    (tmp_path / "config.json").write_text('{"model_type": "dinov2"}')
    served = {"cdpdnet.pth": weights[0], "model.safetensors": weights[1], "config.json": tmp_path / "config.json"}

    def fake_hub(repo_id: str, filename: str, revision: str, dest: Path, progress) -> None:
        data = served[filename].read_bytes()
        with open(dest, "wb") as fh:
            for i in range(0, len(data), 1 << 16):
                fh.write(data[i:i + (1 << 16)])
                if progress:
                    progress(min(i + (1 << 16), len(data)), len(data), filename)
        return None

    monkeypatch.setattr("napari_cdpdnet.weights.download.downloads_disabled", lambda: None)  # "online"
    monkeypatch.setattr("napari_cdpdnet.weights.download.hf_downloader", fake_hub)
    progress: list[tuple[int, int, str]] = []
    widget.download_progressed.connect(lambda d, t, n: progress.append((d, t, n)))
    errors_before = len(notes["error"])
    widget.download_weights()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30_000)
    qtbot.waitUntil(lambda: "checking" not in widget.weights_label.text(), timeout=30_000)
    assert len(notes["error"]) == errors_before, notes["error"][errors_before:]
    assert {n for _, _, n in progress} == set(served)
    assert progress[-1][0] == progress[-1][1]  # the last file finished
    assert widget.weights_label.text() == "Weights: ready (cache)."
    assert (tmp_path / "cache" / "weights" / "cdpdnet" / "cdpdnet.pth").is_file()


@pytest.mark.gui
@needs_display
def test_manifest_docks_the_widget(make_napari_viewer, qtbot, monkeypatch, tmp_path: Path) -> None:
    from napari_cdpdnet._widget import SegmentationWidget

    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    pm = _register_manifest()
    widgets = pm.get_manifest("napari-cdpdnet").contributions.widgets
    assert "CDPDNet segmentation" in [w.display_name for w in widgets]
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cdpdnet", "CDPDNet segmentation")
    assert isinstance(widget, SegmentationWidget)
    qtbot.waitUntil(lambda: "checking" not in widget.weights_label.text(), timeout=30_000)


@pytest.mark.gui
@needs_display
def test_closing_the_dock_detaches_the_widget(make_napari_viewer, qtbot, segmenter) -> None:
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((3, 4, 5)), name="ct")
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    widget.pick_button.setChecked(True)
    assert widget.pick_panel.tool in viewer.mouse_drag_callbacks
    viewer.window.remove_dock_widget(widget)
    assert not widget.pick_button.isChecked()
    assert widget.pick_panel.tool not in viewer.mouse_drag_callbacks
    widget.deleteLater()
    qtbot.waitUntil(lambda: not widget.jobs.alive, timeout=5000)
    assert widget.jobs.cancel_event.is_set()
    image.name = "renamed"  # viewer events no longer reach the deleted widget
    viewer.add_image(np.zeros((3, 4, 5)), name="another")
