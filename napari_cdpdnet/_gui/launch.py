"""Open napari ready to work: the CDPDNet docks at a usable size and the given CTs loaded.

What ``cdpdnet view`` and ``scripts/start.sh`` run. napari's own command line cannot do this in
one step: its ``-w`` option takes any number of values (so a CT path after it is read as a
widget name), a ``.nii.gz`` opened without naming a reader raises the "Choose reader" dialog (the
builtins claim every suffix), and a docked widget in a scroll area is squeezed to its minimum
width. Here each path is opened with this plugin's reader, both docks are added and sized, and
the slice slider starts in the middle of the CT.

A path that cannot be read becomes a notification (and a line on stderr); the viewer still opens.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["launch", "DOCK_MIN_WIDTH", "PLUGIN"]

logger = logging.getLogger(__name__)

PLUGIN = "napari-cdpdnet"
SEGMENTATION_DOCK = "CDPDNet segmentation"
TABLE_DOCK = "CDPDNet structures"
#: The segmentation dock is never narrower than this (px): its lines stay readable.
DOCK_MIN_WIDTH = 400


def _root_message(exc: BaseException) -> str:
    """The message of the innermost error (napari wraps reader errors in its own)."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return str(seen) or type(seen).__name__


def open_paths(viewer: Any, paths: Sequence[str | Path]) -> list[str]:
    """Open each path with this plugin's reader; returns the error messages (empty when all opened)."""
    from napari.utils.notifications import show_error

    from napari_cdpdnet import _reader
    from napari_cdpdnet.io.images import check_input_path

    errors = []
    for path in paths:
        try:
            # our own checks first: napari would only say "No compatible readers are available"
            refused = len(_reader.REFUSALS)
            viewer.open(str(check_input_path(path)), plugin=PLUGIN)
            if len(_reader.REFUSALS) > refused:  # the reader notified already; report it here too
                message = f"could not open {path}: {_reader.REFUSALS[-1]}"
                print(f"cdpdnet view: {message}", file=sys.stderr)
                errors.append(message)
        except Exception as exc:  # noqa: BLE001 - a bad path must not stop the viewer from opening
            message = f"could not open {path}: {_root_message(exc)}"
            logger.debug("open failed", exc_info=True)
            print(f"cdpdnet view: {message}", file=sys.stderr)
            show_error(message)
            errors.append(message)
    return errors


def dock_widgets(viewer: Any, front: str = "segmentation") -> tuple[Any, Any]:
    """Dock the segmentation and structure-table widgets on the right; returns the two widgets.

    The table shares the segmentation dock's place as a second tab, so each gets the full
    height of napari's (small, 1089x630 by default) first window. ``front`` names the tab shown
    ("segmentation" or "structures").
    """
    from qtpy.QtCore import Qt, QTimer

    seg_dock, seg = viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENTATION_DOCK)
    table_dock, table = viewer.window.add_plugin_dock_widget(PLUGIN, TABLE_DOCK, tabify=True)
    width = max(DOCK_MIN_WIDTH, seg.sizeHint().width())
    main_window = viewer.window._qt_window  # napari exposes no public handle for resizeDocks
    main_window.resizeDocks([seg_dock], [width], Qt.Orientation.Horizontal)
    shown = table_dock if front == "structures" else seg_dock
    QTimer.singleShot(0, shown.raise_)  # tabs are only raised once the window is shown
    return seg, table


def size_first_window(viewer: Any) -> None:
    """Give a first-time user a window that fits a CT and the dock (napari opens at 1089x630).

    Only when napari has no saved window size: a size the user chose is kept.
    """
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    if get_settings().application.window_size:
        return
    screen = QApplication.primaryScreen()
    if screen is None:
        return
    area = screen.availableGeometry()
    viewer.window._qt_window.resize(min(1600, int(area.width() * 0.9)), min(1000, int(area.height() * 0.9)))


def centre_slices(viewer: Any) -> None:
    """Put every non-displayed axis in the middle of the data (napari starts at the first slice)."""
    dims = viewer.dims
    for axis in dims.not_displayed:
        low, high, _step = dims.range[axis]
        dims.set_point(axis, (low + high) / 2)


def _state(viewer: Any, seg: Any, table: Any, errors: list[str]) -> dict[str, Any]:
    """What a person would see, for the journey tests (``--smoke-report``)."""
    from qtpy.QtWidgets import QApplication, QDialog

    dialogs = [
        w.windowTitle() for w in QApplication.topLevelWidgets() if isinstance(w, QDialog) and w.isVisible()
    ]
    return {
        "layers": [
            {
                "name": lyr.name,
                "type": type(lyr).__name__,
                "shape": list(lyr.data.shape),
                "has_geometry": "geometry" in lyr.metadata,
                "source_path": lyr.metadata.get("source_path"),
            }
            for lyr in viewer.layers
        ],
        "dialogs": dialogs,
        "segmentation_width": seg.width(),
        "segmentation_height": seg.height(),
        "table_width": table.width(),
        "window": [viewer.window._qt_window.width(), viewer.window._qt_window.height()],
        "image_choice": seg.image_combo.currentText(),
        "dims_point": [float(p) for p in viewer.dims.point],
        "dims_range": [[float(v) for v in r] for r in viewer.dims.range],
        "errors": errors,
    }


def launch(paths: Sequence[str | Path] = (), *, smoke_report: Path | None = None) -> int:
    """Start napari with the docks and ``paths`` opened; returns when the window is closed.

    Args:
        paths: CT files or DICOM folders.
        smoke_report: write what the window shows (layers, dock sizes, open dialogs, slider) as
            JSON here, a screenshot beside it (``.png``), and quit once the window has settled.
    """
    from napari_cdpdnet._gui.triton_guard import block_triton_without_cuda

    block_triton_without_cuda()
    import napari

    viewer = napari.Viewer(title="napari-cdpdnet")
    size_first_window(viewer)
    seg, table = dock_widgets(viewer)
    errors = open_paths(viewer, paths)
    if len(viewer.layers):
        centre_slices(viewer)
    if smoke_report is not None:
        from qtpy.QtCore import QTimer

        def report() -> None:
            state = _state(viewer, seg, table, errors)
            png = smoke_report.with_suffix(".png")
            try:
                from PIL import Image

                Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)[..., :3]).save(png)
                state["screenshot"] = str(png)
            except Exception as exc:  # noqa: BLE001 - the report matters more than the picture
                state["screenshot_error"] = repr(exc)
            smoke_report.write_text(json.dumps(state, indent=2))
            viewer.close()

        QTimer.singleShot(2500, report)
    napari.run()
    return 0
