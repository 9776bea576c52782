"""The export half of the "CDPDNet structures" dock: format checkboxes, CSV and Export buttons.

:class:`TableExport` is mixed into :class:`napari_cdpdnet._table_widget.StructureTableWidget`,
which keeps the layer choice, the table and its measuring. It writes only through
:func:`napari_cdpdnet.export.export_segmentation` and offers one checkbox per optional format of
the registry (:data:`napari_cdpdnet.export.FORMATS`) that a Labels layer can feed (probability
maps need a segmentation run, so they are not offered).

The host provides ``status`` (a QLabel), ``thread_voxels``, ``labels_layer()`` and ``_inputs()``
(labels, geometry, image, describe options), and calls :meth:`TableExport._export_controls`
once while building its layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QCheckBox, QFileDialog, QHBoxLayout, QMessageBox, QPushButton, QWidget

from napari_cdpdnet.errors import CdpdnetError

__all__ = ["TableExport", "hex_color"]

logger = logging.getLogger(__name__)


def hex_color(rgba: Any) -> str:
    """``#rrggbb`` of a napari RGBA colour (floats 0..1); empty for None."""
    if rgba is None:
        return ""
    r, g, b = (int(round(float(c) * 255)) for c in list(rgba)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _ask_save_path(parent: QWidget, caption: str, file_filter: str) -> str | None:
    path, _ = QFileDialog.getSaveFileName(
        parent, caption, str(Path.home()), file_filter,
        options=QFileDialog.Option.DontConfirmOverwrite,  # we ask ourselves, listing every file
    )
    return path or None


def _offer_without_dicom_seg(parent: QWidget, reason: str) -> bool:
    answer = QMessageBox.question(
        parent, "DICOM-SEG cannot be written",
        f"{reason}\n\nExport the label map and its table without the DICOM-SEG?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes,
    )
    return answer == QMessageBox.StandardButton.Yes


def _confirm_overwrite(parent: QWidget, paths: Sequence[Path]) -> bool:
    names = "\n".join(str(p) for p in paths)
    answer = QMessageBox.question(
        parent, "Replace files?", f"These files exist already:\n{names}\n\nReplace them?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes


class TableExport:
    """Export actions of the structure table (a mixin for the QWidget that hosts them)."""

    # provided by the host widget
    status: Any
    thread_voxels: int
    labels_layer: Callable[[], Any]
    _inputs: Callable[[], tuple[Any, Any, Any, dict[str, Any]]]

    def _export_controls(self) -> tuple[QHBoxLayout, QHBoxLayout]:
        """Make the checkboxes and buttons; returns (options row, buttons row) for the layout."""
        from napari_cdpdnet.export import optional_formats

        #: ``ask_save_path(caption, filter) -> path or None``; replace to bypass the file dialog.
        self.ask_save_path: Callable[[str, str], str | None] = lambda c, f: _ask_save_path(self, c, f)
        #: ``confirm_overwrite(existing paths) -> bool``; replace to bypass the question.
        self.confirm_overwrite: Callable[[Sequence[Path]], bool] = lambda p: _confirm_overwrite(self, p)
        #: ``offer_without_dicom_seg(reason) -> bool``: DICOM-SEG was asked for but its source
        #: cannot be referenced (blank UIDs); True exports the label map and table without it.
        self.offer_without_dicom_seg: Callable[[str], bool] = lambda r: _offer_without_dicom_seg(self, r)
        #: Paths written by the last export (also when a worker wrote them), else None.
        self.last_export: list[Path] | None = None
        self._export_worker: Any = None
        #: One checkbox per optional export format, by format name (``dicom_seg``, ``stl``).
        self.format_checks: dict[str, QCheckBox] = {}
        options = QHBoxLayout()
        for fmt in optional_formats(probabilities=False):
            check = QCheckBox(fmt.title)
            check.setToolTip(f"also write {fmt.help}")
            self.format_checks[fmt.name] = check
            options.addWidget(check)
        options.addStretch()
        self.csv_button = QPushButton("Export CSV...")
        self.export_button = QPushButton("Export...")
        self.csv_button.clicked.connect(self._csv_clicked)
        self.export_button.clicked.connect(self._export_clicked)
        buttons = QHBoxLayout()
        buttons.addWidget(self.csv_button)
        buttons.addWidget(self.export_button)
        return options, buttons

    def _may_write(self, paths: Sequence[Path], overwrite: bool) -> bool | None:
        """None: stop (the user declined); else the overwrite flag to pass on."""
        existing = [p for p in paths if os.path.lexists(p)]
        if not existing or overwrite:
            return overwrite
        if self.confirm_overwrite(existing):
            return True
        self.status.setText("not exported: the files exist and were kept")
        return None

    def export_csv_to(self, path: str | Path, *, overwrite: bool = False) -> Path | None:
        """Write the label table (measured now, with the reviewed column) to ``path``.

        Asks through :attr:`confirm_overwrite` before replacing a file. Returns the path, or None
        when nothing was written (declined, or an error shown as a notification).
        """
        from napari_cdpdnet.export import describe_labels
        from napari_cdpdnet.export.labeltable import write_label_table

        try:
            path = Path(path).expanduser()
            flag = self._may_write([path], overwrite)
            if flag is None:
                return None
            labels, geometry, image, options = self._inputs()
            rows = describe_labels(labels, geometry, image, **options)
            written = write_label_table(path, rows, overwrite=flag)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a notification
            self._notify_error(exc)
            return None
        self.status.setText(f"wrote {written}")
        return written

    def export_to(
        self, path: str | Path, *, formats: Iterable[str] | None = None, overwrite: bool = False,
        background: bool | None = False,
    ) -> list[Path] | None:
        """Export the label map on its CT grid + table (+ the chosen formats) to ``path``.

        ``formats`` (names of :data:`~napari_cdpdnet.export.FORMATS`, e.g. ``{"dicom_seg",
        "stl"}``) defaults to the ticked checkboxes. Asks through :attr:`confirm_overwrite`
        before replacing any file. ``background``: write in a worker thread (True), here
        (False), or in a worker for volumes over ``thread_voxels`` (None, what the button does);
        a worker exports a copy of the labels taken now.

        Returns:
            The written paths; None when nothing was written (declined, or an error shown as a
            notification) or when a worker does the writing (its result lands in
            :attr:`last_export` and the status line).
        """
        from napari_cdpdnet.export import (
            export_paths,
            export_segmentation,
            label_key,
            present_values,
        )

        if formats is None:
            formats = [name for name, check in self.format_checks.items() if check.isChecked()]
        formats = list(formats)
        self.last_export = None
        try:
            labels, geometry, image, options = self._inputs()
            formats = self._without_impossible_dicom_seg(formats, geometry)
            if formats is None:
                return None
            values = present_values(labels)
            keys = [label_key(v, cdpdnet=options["cdpdnet"]) for v in values]
            flag = self._may_write(export_paths(path, keys, formats=formats), overwrite)
            if flag is None:
                return None
            layer = self.labels_layer()
            self._export_layer = layer
            colors = {v: hex_color(layer.get_color(v)) for v in values}
            kwargs = dict(formats=formats, colors=colors, overwrite=flag, **options)
            if background is None:
                background = labels.size > self.thread_voxels
            if not background:
                written = export_segmentation(labels, geometry, image, path, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a notification
            self._notify_error(exc)
            return None
        if background:
            from napari.qt.threading import create_worker

            self.status.setText(f"exporting {Path(path).name}...")
            self.export_button.setEnabled(False)
            worker = create_worker(export_segmentation, labels.copy(), geometry, image, path, **kwargs,
                                   _start_thread=False)
            worker.returned.connect(self._exported)
            worker.errored.connect(self._notify_error)
            worker.finished.connect(self._export_finished)
            self._export_worker = worker
            worker.start()
            return None
        self._exported(written)
        return written

    def _without_impossible_dicom_seg(self, formats: list[str], geometry: Any) -> list[str] | None:
        """DICOM-SEG asked for a source it cannot reference (blank UIDs): say so plainly and offer
        the label map and table alone (NIfTI/NRRD); None when the user declines."""
        from napari_cdpdnet.export.dicomseg import dicom_seg_problem

        if "dicom_seg" not in formats or geometry.dicom is None:
            return formats  # no DICOM source at all: export_segmentation says so
        problem = dicom_seg_problem(geometry)
        if problem is None:
            return formats
        reason = f"DICOM-SEG cannot be written: {problem}."
        if self.offer_without_dicom_seg(reason):
            logger.info("exporting without DICOM-SEG: %s", problem)
            return [f for f in formats if f != "dicom_seg"]
        self.status.setText(f"not exported: {reason} Untick DICOM-SEG to export the label map and table.")
        return None

    def _exported(self, written: list[Path]) -> None:
        from napari_cdpdnet._gui.recovery import note_export

        self.last_export = written
        layer = getattr(self, "_export_layer", None)
        if layer is not None:
            note_export(layer, written)  # its autosaved copy is no longer offered back
        self.status.setText(f"exported {len(written)} files: {', '.join(p.name for p in written)}")

    def _export_finished(self) -> None:
        self._export_worker = None
        self.export_button.setEnabled(True)

    def _csv_clicked(self) -> None:
        path = self.ask_save_path("Export structure table", "CSV table (*.csv)")
        if path:
            self.export_csv_to(path)

    def _export_clicked(self) -> None:
        path = self.ask_save_path(
            "Export label map (table, DICOM-SEG and meshes are written beside it)",
            "Label map (*.nii.gz *.nii *.nrrd *.seg.nrrd *.mha)",
        )
        if path:
            self.export_to(path, background=None)

    def _notify_error(self, exc: BaseException) -> None:
        """A CdpdnetError's message as it is; anything else is a bug: logged with its traceback,
        shown as one line."""
        from napari.utils.notifications import show_error

        if isinstance(exc, CdpdnetError):
            message = str(exc)
        else:
            logger.error("export failed", exc_info=exc)
            message = f"export failed: {type(exc).__name__}: {exc}"
        self.status.setText(message)
        show_error(message)
