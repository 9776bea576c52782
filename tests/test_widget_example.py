"""Segment by example in the segmentation dock (issue 8): click, rectangle, scribble, mapper file.

A real CT crop (around the left kidney of the TotalSegmentator example) keeps each run to one
model window per pass. The tiny random model (official-format weights, ``write_tiny_weights``)
runs the real inference path: progress, Cancel, the method shown. Its probabilities hover near
chance, so the structure it ranks first is usually empty after post-processing; the tests that
need a result layer therefore use an intensity "oracle" network (soft tissue = left kidney), as
``test_roi_fallback`` does, which also makes the expected answer known.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gui_support import add_segmentation_dock

from napari_cdpdnet.example.mapper import MAPPER_METHOD
from napari_cdpdnet.example.ranking import FALLBACK_METHOD
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, structure


def _gui(test):
    """GUI tests: a display and the shared real CT."""
    for mark in (
        pytest.mark.gui,
        pytest.mark.shared,
        pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs a display: run under xvfb-run -a"),
    ):
        test = mark(test)
    return test


#: Around the left kidney (value 3 after mapping; voxels z 72..104, y 27..49, x 23..44 at 3 mm).
CROP = (slice(66, 106), slice(18, 58), slice(14, 54))
LEFT_KIDNEY = structure("left_kidney")


class _SoftTissueOracle:
    """A network whose left-kidney channel is soft tissue and every other channel fat: a click
    on the kidney ranks Left Kidney first, and any structure a mapper picks is found somewhere.
    (Disjoint on purpose: in the all-structures label map a later structure would paint over an
    overlapping earlier one.)"""

    def __new__(cls):
        import torch

        class Oracle(torch.nn.Module):
            def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
                v = x[:, :1]  # 0..1 for -175..250 HU
                soft = (v > 0.3) & (v < 0.75)  # about -47..144 HU
                fat = (v > 0.05) & (v <= 0.3)  # about -150..-47 HU
                out = torch.where(fat, 10.0, -10.0).expand(x.shape[0], 32, *x.shape[2:]).clone()
                out[:, LEFT_KIDNEY.index - 1] = torch.where(soft[:, 0], 10.0, -10.0)
                return out

        return Oracle()


@pytest.fixture(scope="module")
def oracle():
    from napari_cdpdnet.inference.segmenter import Segmenter

    return Segmenter(module=_SoftTissueOracle())


@pytest.fixture(scope="module")
def crop(shared_path) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """CT crop, its geometry and the reference labels (mapped to CDPDNet) on the same grid."""
    from napari_cdpdnet.example.ranking import crop_geometry
    from napari_cdpdnet.io.images import read_ct, read_label_map
    from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap

    ct = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    seg, g = read_label_map(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    assert g.same_grid(ct.geometry)
    labels = remap(seg, TOTALSEGMENTATOR_TOTAL)[CROP]
    return np.ascontiguousarray(ct.array[CROP]), crop_geometry(ct.geometry, CROP), labels


def _setup(make_napari_viewer, qtbot, segmenter, crop) -> tuple[Any, Any, Any]:
    array, geometry, _ = crop
    viewer = make_napari_viewer()
    image = viewer.add_image(array, name="ct crop", metadata={"geometry": geometry},
                             **geometry.napari_transform())
    widget = add_segmentation_dock(viewer, qtbot, segmenter)
    widget.preset_combo.setCurrentText("fast")
    return viewer, image, widget


def _finish(qtbot, widget, start) -> str:
    """Start a run with ``start()`` and wait for it; returns the run status."""
    with qtbot.waitSignal(widget.run_finished, timeout=100_000) as blocker:
        assert start() is not None, widget.status_label.text()
    return blocker.args[0]


def _results(viewer) -> list[Any]:
    from napari.layers import Labels

    from napari_cdpdnet._gui.layers import is_cdpdnet_layer

    return [lyr for lyr in viewer.layers if isinstance(lyr, Labels) and is_cdpdnet_layer(lyr.metadata)]


# ================================================================== ROI from drawn shapes, no window
def test_example_box_keeps_its_slice_and_refuses_outside() -> None:
    from napari_cdpdnet._gui import layer_input
    from napari_cdpdnet.errors import InputError

    roi = layer_input.example_box_roi(np.array([[4, 2, 3], [4, 9, 3], [4, 9, 8], [4, 2, 8]], float), (10, 12, 14))
    assert roi.kind == "box" and roi.points.tolist() == [[4, 2, 3], [4, 9, 8]]  # z stays on slice 4
    with pytest.raises(InputError, match="outside the image"):
        layer_input.example_box_roi(np.array([[4, 20, 30], [4, 25, 35]], float), (10, 12, 14))
    with pytest.raises(InputError, match="usable corners"):
        layer_input.example_box_roi(np.array([[np.nan, 2, 3], [np.nan, 5, 6]]), (10, 12, 14))


def test_example_scribble_is_densified_and_clipped() -> None:
    from napari_cdpdnet._gui import layer_input
    from napari_cdpdnet._gui import layers as _layers
    from napari_cdpdnet.errors import InputError

    roi = layer_input.example_scribble_roi([np.array([[2, 1, 1], [2, 1, 9], [2, 15, 9]], float)], (5, 12, 12))
    pts = {tuple(p) for p in roi.points.tolist()}
    assert {(2, 1, x) for x in range(1, 10)} <= pts  # every voxel along the first stroke
    assert {(2, y, 9) for y in range(1, 12)} <= pts and max(p[1] for p in pts) == 11  # clipped
    with pytest.raises(InputError, match="outside the image"):
        layer_input.example_scribble_roi([np.array([[9, 1, 1], [9, 2, 2]], float)], (5, 12, 12))
    with pytest.raises(InputError, match="no usable points"):
        layer_input.example_scribble_roi([np.full((2, 3), np.nan)], (5, 12, 12))
    labels = _layers.example_labels(np.eye(3, dtype=bool)[None], LEFT_KIDNEY)
    assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) == {0, LEFT_KIDNEY.index}


def _check_result(layer, image, geometry: Geometry) -> int:
    """One structure, on the image's grid; returns its index."""
    values = set(np.unique(layer.data).tolist()) - {0}
    assert len(values) == 1, values
    [value] = values
    info = layer.metadata["cdpdnet"]
    assert info["structures"] == [STRUCTURES[value - 1].key]
    assert info["example"]["top"][0][0] == STRUCTURES[value - 1].key
    assert layer.metadata["geometry"].same_grid(geometry)
    idx = np.array([3, 10, 20])
    np.testing.assert_allclose(layer.data_to_world(idx), image.data_to_world(idx), atol=1e-6)
    return value


@_gui
def test_tiny_model_click_progress_and_cancel(make_napari_viewer, qtbot, segmenter, crop, notes) -> None:
    _array, geometry, labels = crop
    viewer, image, widget = _setup(make_napari_viewer, qtbot, segmenter, crop)
    events: list[Any] = []
    widget.progressed.connect(events.append)
    kidney = np.argwhere(labels == LEFT_KIDNEY.index)
    world = image.data_to_world(kidney[len(kidney) // 2])
    assert _finish(qtbot, widget, lambda: widget.segment_by_example_at(world)) == "done"
    inference = [e for e in events if e.stage == "inference"]
    assert len({e.total for e in inference}) >= 1 and inference[-1].done == inference[-1].total
    shown = widget.example_label.text()
    assert f"Answered by: {FALLBACK_METHOD}" in shown and "3. " in shown
    results = _results(viewer)
    if results:  # the random network found its top structure: one layer, one structure
        [layer] = results
        _check_result(layer, image, geometry)
    else:  # ... or not: the note says so and nothing was added
        assert "not found in this scan" in shown and any("not found" in n for n in notes["warning"])
        assert "no layer added" in widget.status_label.text()

    # ---- Cancel after the first model window: nothing added, the widget is idle again
    before = len(viewer.layers)
    events.clear()

    def cancel_after_first_window(event) -> None:
        if event.stage == "inference" and event.done >= 1:
            widget.cancel_button.click()

    widget.progressed.connect(cancel_after_first_window)
    assert _finish(qtbot, widget, lambda: widget.segment_by_example_at(world)) == "cancelled"
    widget.progressed.disconnect(cancel_after_first_window)
    assert len(viewer.layers) == before and "Cancelled" in widget.status_label.text()
    assert sum(e.stage == "inference" for e in events) < 7  # 7 task passes would follow
    assert not widget.is_running and widget.example_box_button.isEnabled()
    assert notes["error"] == []


@_gui
def test_click_then_rectangle_fallback(make_napari_viewer, qtbot, oracle, crop, notes, MouseEvent) -> None:
    array, geometry, labels = crop
    viewer, image, widget = _setup(make_napari_viewer, qtbot, oracle, crop)

    # ---- click tool: a toggle like the pick button, exclusive with it
    widget.pick_button.setChecked(True)
    widget.example_click_button.setChecked(True)
    assert not widget.pick_button.isChecked()
    assert widget.pick_panel.tool not in viewer.mouse_drag_callbacks
    [on_click] = [cb for cb in viewer.mouse_drag_callbacks if cb == widget.example_panel.tool]
    kidney = np.argwhere(labels == LEFT_KIDNEY.index)
    voxel = kidney[len(kidney) // 2]
    event = MouseEvent(type="mouse_press", position=tuple(image.data_to_world(voxel)), button=1)
    status = _finish(qtbot, widget, lambda: on_click(viewer, event) or widget.jobs.worker)
    assert status == "done", widget.status_label.text()
    [first] = _results(viewer)
    value = _check_result(first, image, geometry)
    assert value == LEFT_KIDNEY.index and first.name == "CDPDNet: left_kidney"
    assert first.data[tuple(voxel)] == value  # the component the click touches
    shown = widget.example_label.text()
    assert f"Answered by: {FALLBACK_METHOD}" in shown
    assert all(f"{i}. " in shown for i in (1, 2, 3)) and shown.count("%") >= 3
    assert f"1. {STRUCTURES[value - 1].name}:" in shown
    assert "ROI: A computerized tomography of" in shown  # (laterality: relative to the crop's body)
    assert first.metadata["cdpdnet"]["example"]["method"] == FALLBACK_METHOD
    assert first.metadata["cdpdnet"]["example"]["prompt"] in shown
    assert first.selected_label == value and "added" in widget.status_label.text()
    widget.example_click_button.setChecked(False)
    assert widget.example_panel.tool not in viewer.mouse_drag_callbacks

    # ---- the user edits the result; a rectangle run makes a new layer and leaves the edit alone
    first.paint((5, 5, 5), 30)
    edited = first.data.copy()
    z = int(voxel[0])
    corners = np.array([[z, 25 - 18, 22 - 14], [z, 25 - 18, 46 - 14], [z, 52 - 18, 46 - 14], [z, 52 - 18, 22 - 14]], float)
    viewer.add_shapes([np.array([image.data_to_world(c) for c in corners])], shape_type="rectangle", name="box")
    assert _finish(qtbot, widget, lambda: (widget.example_box_button.click(), widget.jobs.worker)[1]) == "done"
    first_again, second = _results(viewer)
    assert first_again is first and second.name.endswith("#2")
    np.testing.assert_array_equal(first.data, edited)
    assert _check_result(second, image, geometry) == LEFT_KIDNEY.index
    assert second.metadata["cdpdnet"]["request"].startswith(f"by example: box z {z}..{z},")
    assert f"Answered by: {FALLBACK_METHOD}" in widget.example_label.text()
    assert notes["error"] == []


@_gui
def test_mapper_file_and_scribble(make_napari_viewer, qtbot, oracle, crop, notes, tmp_path: Path) -> None:
    from napari_cdpdnet.example.mapper import (
        RoiMapper,
        TrainingConfig,
        sample_rois,
        train_mapper,
        training_set,
    )

    array, geometry, labels = crop
    # an attributes-only mapper trained in a second on this crop (teacher: random CLIP-sized)
    x, y = training_set(sample_rois(labels, np.random.default_rng(0), per_kind=2), array, geometry)
    teacher = np.random.default_rng(1).normal(size=(32, 512)).astype(np.float32)
    path = train_mapper(x, y, teacher, uses_model_features=False, config=TrainingConfig(epochs=20)).save(tmp_path / "m.pt")
    assert not RoiMapper.load(path).uses_model_features

    viewer, image, widget = _setup(make_napari_viewer, qtbot, oracle, crop)
    widget.mapper_edit.setText(str(tmp_path / "missing.pt"))
    assert widget.segment_by_example_from("scribble") is None
    assert "no scribble" in notes["error"][-1]
    scribble = viewer.add_labels(np.zeros(array.shape, np.uint8), name="marks",
                                 **geometry.napari_transform())
    kidney = np.argwhere(labels == LEFT_KIDNEY.index)
    for zyx in kidney[:: max(1, len(kidney) // 20)][:20]:
        scribble.data[tuple(zyx)] = 1
    assert widget.segment_by_example_from("scribble") is None  # the mapper file does not exist
    assert "missing.pt" in notes["error"][-1] and "no such file" in notes["error"][-1]
    assert _results(viewer) == [] and not widget.is_running

    widget.mapper_edit.setText(str(path))
    assert _finish(qtbot, widget, lambda: widget.segment_by_example_from("scribble")) == "done"
    [layer] = _results(viewer)
    _check_result(layer, image, geometry)
    assert f"Answered by: {MAPPER_METHOD}" in widget.example_label.text()
    assert layer.metadata["cdpdnet"]["example"]["method"] == MAPPER_METHOD
    assert "scribble of" in layer.metadata["cdpdnet"]["request"]

    # a file that is not a mapper: the worker's WeightsError becomes a notification, no layer
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    widget.mapper_edit.setText(str(bad))
    assert _finish(qtbot, widget, lambda: widget.segment_by_example_from("scribble")) == "error"
    assert "bad.pt" in notes["error"][-1] and "Traceback" not in notes["error"][-1]
    assert len(_results(viewer)) == 1 and widget.run_button.isEnabled()


@_gui
def test_bad_input_is_a_notification_and_no_layer(make_napari_viewer, qtbot, segmenter, crop, notes) -> None:
    _array, geometry, _ = crop
    viewer, image, widget = _setup(make_napari_viewer, qtbot, segmenter, crop)
    assert widget.segment_by_example_from("box") is None
    assert "no rectangle" in notes["error"][-1]
    outside = image.data_to_world(np.array(geometry.shape) + 5)
    assert widget.segment_by_example_at(outside) is None
    assert "outside the image" in notes["error"][-1]
    far = np.array([[0, 200, 200], [0, 200, 260], [0, 260, 260], [0, 260, 200]], float)
    viewer.add_shapes([np.array([image.data_to_world(c) for c in far])], shape_type="rectangle")
    assert widget.segment_by_example_from("box") is None
    assert "outside the image" in notes["error"][-1]
    assert _results(viewer) == [] and not widget.is_running and widget.run_button.isEnabled()
    viewer.layers.remove(image)
    assert widget.segment_by_example_from("box") is None and "no image layer" in notes["error"][-1]
    assert "Traceback" not in " ".join(notes["error"])
