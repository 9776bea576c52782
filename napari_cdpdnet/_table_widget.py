"""Dock widget "CDPDNet structures": per-label measurements that follow the user's edits, and export.

Thin on purpose: measuring and writing live in :mod:`napari_cdpdnet.export`; this widget picks
the layers and keeps the table current; its export buttons and format checkboxes (one per optional
format of the export registry) come from :class:`napari_cdpdnet._gui.table_export.TableExport`.

* The table is re-measured a short while after the last edit (paint strokes, fills, undo/redo,
  data replaced), so painting stays smooth; big volumes are measured in a worker thread.
* The ``reviewed`` checkboxes are kept in the Labels layer's ``metadata["reviewed_labels"]`` and
  the label values a person painted on in ``metadata["edited_labels"]``; both go into the
  exported label table (fine-tuning reads ``reviewed``) and the DICOM-SEG algorithm type.
* Dialogs are attributes (:attr:`StructureTableWidget.ask_save_path`,
  :attr:`StructureTableWidget.confirm_overwrite`) so tests and scripts can replace them; the
  buttons call :meth:`export_csv_to` and :meth:`export_to`, which can be called directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_cdpdnet._gui.table_export import TableExport, hex_color
from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels

    from napari_cdpdnet.export.labeltable import LabelRow

__all__ = ["StructureTableWidget", "layer_geometry"]

logger = logging.getLogger(__name__)

_NO_IMAGE = "(none: no HU columns)"
#: Table columns as shown.
HEADERS = ("", "Structure", "Voxels", "Volume (mL)", "HU mean", "HU SD", "Reviewed")
_REVIEWED_COLUMN = HEADERS.index("Reviewed")


def _stored_geometry(layer: Any) -> Geometry | None:
    g = (layer.metadata or {}).get("geometry")
    if isinstance(g, dict):
        g = Geometry.from_dict(g)
    return g if isinstance(g, Geometry) else None


def layer_geometry(labels: Labels, image: Image | None = None) -> Geometry:
    """The CT grid of a Labels layer, with the DICOM references of its image where it has none.

    ``metadata["geometry"]`` when present (layers from this plugin), else the grid the layer's
    own transform describes (as the napari writer does). If that grid is the chosen image's
    grid, the image's geometry is used, so labels drawn on a DICOM series can become DICOM-SEG.

    Raises:
        InputError: the layer is not 3-D, or its transform is not a scaled rotation.
    """
    import warnings

    from napari_cdpdnet._writer import geometry_for_layer

    shape = tuple(np.shape(labels.data))
    attributes = {
        "metadata": labels.metadata,
        "scale": labels.scale,
        "translate": labels.translate,
        "rotate": labels.rotate,
        "shear": labels.shear,
        "affine": labels.affine.affine_matrix,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no CT geometry": expected for drawn layers
        geometry = geometry_for_layer(shape, attributes)
    image_geometry = None if image is None else _stored_geometry(image)
    if geometry.dicom is None and image_geometry is not None and image_geometry.same_grid(geometry, atol=1e-3):
        geometry = image_geometry
    return geometry


def _edited_values(atoms: Iterable[Any]) -> set[int]:
    """Label values touched by one napari paint history item (both the old and the new ones)."""
    out: set[int] = set()
    for atom in atoms:
        if hasattr(atom, "new_value"):  # napari's _MaskedPaintAtom
            old, new = atom.old_values, atom.new_value
        else:  # (indices, old values, new value(s))
            _, old, new = atom
        out.update(int(v) for v in np.unique(np.asarray(old)))
        out.update(int(v) for v in np.unique(np.asarray(new)))
    out.discard(0)
    return out


class StructureTableWidget(TableExport, QWidget):
    """Per-label name, colour, voxel count, volume, HU mean/SD and a reviewed checkbox; export.

    Args:
        napari_viewer: the viewer (napari injects it).
        debounce_ms: quiet time after the last edit before re-measuring.
        thread_voxels: volumes with more voxels are measured (and exported, from the button) in
            a worker thread; measuring costs about 0.1 s per million voxels with HU columns.
    """

    def __init__(
        self, napari_viewer: napari.viewer.Viewer, *, debounce_ms: int = 300, thread_voxels: int = 2_000_000
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.thread_voxels = thread_voxels
        self.rows: list[LabelRow] = []
        self._layer: Labels | None = None
        self._history_state: tuple[int, int] | None = None
        self._generation = 0
        self._worker: Any = None
        self._rerun = False

        self.labels_combo = QComboBox()
        self.image_combo = QComboBox()
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        options, buttons = self._export_controls()

        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)
        form.addRow("Image (HU)", self.image_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.table)
        layout.addWidget(self.status)
        layout.addLayout(options)
        layout.addLayout(buttons)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(debounce_ms)
        self._timer.timeout.connect(self.refresh)

        self.labels_combo.currentIndexChanged.connect(self._labels_chosen)
        self.image_combo.currentIndexChanged.connect(self.schedule_refresh)
        self.table.itemChanged.connect(self._item_changed)
        layers = self.viewer.layers.events
        layers.inserted.connect(self._layers_changed)
        layers.removed.connect(self._layers_changed)
        layers.moved.connect(self._layers_changed)
        self._layers_changed()

    # ------------------------------------------------------------------ layer choice
    def labels_layer(self) -> Labels | None:
        """The chosen Labels layer."""
        return self._find(self.labels_combo.currentText(), "labels")

    def image_layer(self) -> Image | None:
        """The chosen image (for HU columns), or None."""
        return self._find(self.image_combo.currentText(), "image")

    def _find(self, name: str, kind: str) -> Any:
        for layer in self.viewer.layers:
            if layer.name == name and _is(layer, kind):
                return layer
        return None

    def _layers_changed(self, event: Any = None) -> None:
        """Keep the choosers in step with the viewer's layers (and their names)."""
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self._layers_changed)
            layer.events.name.connect(self._layers_changed)
        current = self.labels_combo.currentText()
        labels = [ly.name for ly in self.viewer.layers if _is(ly, "labels")]
        with _blocked(self.labels_combo):
            self.labels_combo.clear()
            self.labels_combo.addItems(labels)
            if current in labels:
                self.labels_combo.setCurrentText(current)
            elif labels:  # the newest Labels layer, most likely the one just made
                self.labels_combo.setCurrentIndex(len(labels) - 1)
        self._labels_chosen()

    def _fill_images(self, keep: bool) -> None:
        """List the images; keep the current choice (``keep``, the same Labels layer) when it
        still exists, else choose the labels' own image or one of the same shape."""
        layer = self.labels_layer()
        current = self.image_combo.currentText()
        images = [ly for ly in self.viewer.layers if _is(ly, "image")]
        names = [_NO_IMAGE] + [ly.name for ly in images]
        choice = current if keep and current in names else None
        if layer is not None and choice is None:
            wanted = (layer.metadata or {}).get("image_layer")
            same_shape = [ly.name for ly in images if np.shape(ly.data) == np.shape(layer.data)]
            choice = wanted if wanted in names else (same_shape[0] if same_shape else None)
        with _blocked(self.image_combo):
            self.image_combo.clear()
            self.image_combo.addItems(names)
            self.image_combo.setCurrentText(choice or _NO_IMAGE)

    def _labels_chosen(self, *_: Any) -> None:
        layer = self.labels_layer()
        same = layer is self._layer
        if not same:
            self._connect(layer)
        self._fill_images(keep=same)
        self.schedule_refresh()

    def _connect(self, layer: Labels | None) -> None:
        old = self._layer
        if old is not None:
            for name, slot in self._slots():
                getattr(old.events, name).disconnect(slot)
        self._layer = layer
        if layer is not None:
            for name, slot in self._slots():
                getattr(layer.events, name).connect(slot)
            self._history_state = self._history(layer)

    def _slots(self) -> list[tuple[str, Callable]]:
        return [("paint", self._painted), ("data", self.schedule_refresh),
                ("labels_update", self.schedule_refresh), ("set_data", self._maybe_undone)]

    # ------------------------------------------------------------------ edits
    @staticmethod
    def _history(layer: Labels) -> tuple[int, int] | None:
        """Lengths of napari's undo/redo queues, or None where this napari has none to read.

        The viewer hands plugins a proxy that warns on private attributes; the wrapped layer
        is read directly (``__wrapped__`` is public wrapt API)."""
        raw = getattr(layer, "__wrapped__", layer)
        undo, redo = getattr(raw, "_undo_history", None), getattr(raw, "_redo_history", None)
        if undo is None or redo is None:
            return None
        return len(undo), len(redo)

    def _painted(self, event: Any) -> None:
        """A finished stroke, fill or data_setitem: remember which labels a person changed."""
        layer = self._layer
        if layer is not None:
            touched = _edited_values(getattr(event, "value", None) or ())
            edited = set(layer.metadata.get("edited_labels") or ()) | touched
            layer.metadata["edited_labels"] = sorted(edited)
            self._history_state = self._history(layer)
        self.schedule_refresh()

    def _maybe_undone(self, event: Any = None) -> None:
        """napari's undo/redo only refresh the layer; a changed history length tells them apart
        from mere slicing, which must not trigger a re-measure."""
        layer = self._layer
        if layer is None:
            return
        state = self._history(layer)
        if state is None or state != self._history_state:  # unknown: re-measure to be safe
            self._history_state = state
            self.schedule_refresh()

    def schedule_refresh(self, *_: Any) -> None:
        """Re-measure after ``debounce_ms`` without further edits."""
        self._timer.start()

    # ------------------------------------------------------------------ measuring
    def _inputs(self) -> tuple[np.ndarray, Geometry, np.ndarray | None, dict[str, Any]]:
        layer = self.labels_layer()
        if layer is None:
            raise CdpdnetError("choose a Labels layer first")
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        labels = np.asarray(data)
        image_layer = self.image_layer()
        geometry = layer_geometry(layer, image_layer)
        image = None
        if (
            image_layer is not None
            and not getattr(image_layer, "multiscale", False)
            and np.shape(image_layer.data) == labels.shape
        ):
            image = np.asarray(image_layer.data)
        meta = layer.metadata or {}
        options = {
            "cdpdnet": "cdpdnet" in meta,
            "reviewed": set(meta.get("reviewed_labels") or ()),
            "edited": set(meta.get("edited_labels") or ()),
        }
        return labels, geometry, image, options

    def refresh(self) -> None:
        """Re-measure the chosen layer now (in a worker thread for big volumes)."""
        from napari_cdpdnet.export import describe_labels

        self._timer.stop()
        if self._worker is not None:  # one measurement at a time; redo when it ends
            self._rerun = True
            return
        try:
            labels, geometry, image, options = self._inputs()
        except CdpdnetError as exc:
            self._show_rows([], str(exc))
            return
        self._generation += 1
        generation = self._generation
        if labels.size <= self.thread_voxels:
            try:
                rows = describe_labels(labels, geometry, image, **options)
            except Exception as exc:  # noqa: BLE001 - shown in the status line, never raised into Qt
                if not isinstance(exc, CdpdnetError):
                    logger.error("measuring %s failed", self.labels_combo.currentText(), exc_info=exc)
                self._show_rows([], str(exc))
                return
            self._show_rows(rows, with_hu=image is not None)
            return
        from napari.qt.threading import create_worker

        self.status.setText("measuring...")
        worker = create_worker(describe_labels, labels, geometry, image, **options, _start_thread=False)
        worker.returned.connect(lambda rows: self._worker_done(generation, rows, image))
        worker.errored.connect(lambda exc: self._worker_failed(generation, exc))
        worker.finished.connect(self._worker_finished)
        self._worker = worker
        worker.start()

    def _worker_done(self, generation: int, rows: list[LabelRow], image: np.ndarray | None) -> None:
        if generation == self._generation:
            self._show_rows(rows, with_hu=image is not None)

    def _worker_failed(self, generation: int, exc: BaseException) -> None:
        if generation == self._generation:
            self._show_rows([], str(exc))

    def _worker_finished(self) -> None:
        self._worker = None
        if self._rerun:
            self._rerun = False
            self.refresh()

    def wait_idle(self, timeout_ms: int = 10_000) -> None:
        """Block until pending or running measurements and exports are done (tests, scripts)."""
        from qtpy.QtCore import QCoreApplication, QElapsedTimer

        clock = QElapsedTimer()
        clock.start()
        if self._timer.isActive():
            self.refresh()
        while (
            self._worker is not None or self._export_worker is not None or self._timer.isActive()
        ) and clock.elapsed() < timeout_ms:
            QCoreApplication.processEvents()

    def _show_rows(self, rows: list[LabelRow], error: str | None = None, *, with_hu: bool = True) -> None:
        """Fill the table; the status line says what is shown (or why nothing is)."""
        from napari_cdpdnet.export import with_reviewed

        layer = self._layer
        reviewed = set((layer.metadata or {}).get("reviewed_labels") or ()) if layer is not None else set()
        self.rows = with_reviewed(rows, reviewed)
        with _blocked(self.table):
            self.table.setRowCount(len(self.rows))
            for i, row in enumerate(self.rows):
                color = hex_color(layer.get_color(row.value)) if layer is not None else row.color
                swatch = QTableWidgetItem("")
                swatch.setBackground(QColor(color or row.color or "#000000"))
                swatch.setToolTip(color or row.color)
                cells = [
                    swatch,
                    QTableWidgetItem(row.name),
                    _number(row.voxel_count, f"{row.voxel_count:d}"),
                    _number(row.volume_ml, f"{row.volume_ml:.2f}"),
                    _number(row.hu_mean, "" if np.isnan(row.hu_mean) else f"{row.hu_mean:.1f}"),
                    _number(row.hu_sd, "" if np.isnan(row.hu_sd) else f"{row.hu_sd:.1f}"),
                ]
                check = QTableWidgetItem("")
                check.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                check.setCheckState(Qt.CheckState.Checked if row.reviewed else Qt.CheckState.Unchecked)
                check.setData(Qt.ItemDataRole.UserRole, row.value)
                cells.append(check)
                cells[1].setToolTip(f"value {row.value}" + (f", {row.key}" if row.key else ""))
                for column, item in enumerate(cells):
                    self.table.setItem(i, column, item)
        if error:
            status = error
        elif rows:
            total = sum(r.volume_ml for r in rows)
            status = f"{len(rows)} labels, {total:.1f} mL in total"
        else:
            status = "no labels painted yet"
        if not error and not with_hu:
            status += "; choose the image for HU columns"
        self.status.setText(status)

    def _item_changed(self, item: QTableWidgetItem) -> None:
        """A reviewed checkbox was toggled: store it on the layer, no re-measure needed."""
        from napari_cdpdnet.export import with_reviewed

        if item.column() != _REVIEWED_COLUMN or self._layer is None:
            return
        value = int(item.data(Qt.ItemDataRole.UserRole))
        reviewed = set(self._layer.metadata.get("reviewed_labels") or ())
        if item.checkState() == Qt.CheckState.Checked:
            reviewed.add(value)
        else:
            reviewed.discard(value)
        self._layer.metadata["reviewed_labels"] = sorted(reviewed)
        self.rows = with_reviewed(self.rows, reviewed)

    def set_reviewed(self, value: int, reviewed: bool = True) -> None:
        """Tick or clear the reviewed box of label ``value`` (as a click would)."""
        for i, row in enumerate(self.rows):
            if row.value == value:
                state = Qt.CheckState.Checked if reviewed else Qt.CheckState.Unchecked
                self.table.item(i, _REVIEWED_COLUMN).setCheckState(state)
                return
        raise KeyError(f"label {value} is not in the table")


def _is(layer: Any, kind: str) -> bool:
    """Is ``layer`` a napari Labels (``kind="labels"``) or Image layer (works through proxies)."""
    from napari.layers import Image, Labels

    return isinstance(layer, Labels if kind == "labels" else Image)


class _blocked:
    """Context manager: a Qt object's signals are blocked inside."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __enter__(self) -> None:
        self.previous = self.obj.blockSignals(True)

    def __exit__(self, *_: Any) -> None:
        self.obj.blockSignals(self.previous)


def _number(value: float, text: str) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
    item.setData(Qt.ItemDataRole.UserRole, value)
    return item
