"""Helpers for the tests that put the segmentation dock in a real napari viewer."""

from __future__ import annotations

from typing import Any


def add_segmentation_dock(viewer: Any, qtbot: Any, segmenter: Any = None) -> Any:
    """The segmentation widget docked in ``viewer``, once its weights check has finished."""
    from napari_cdpdnet._widget import SegmentationWidget

    widget = SegmentationWidget(viewer, segmenter=segmenter)
    viewer.window.add_dock_widget(widget, name="CDPDNet segmentation")
    qtbot.waitUntil(lambda: "checking" not in widget.weights_label.text(), timeout=30_000)
    return widget
