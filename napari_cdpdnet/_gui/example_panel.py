""""Segment by example": mark a structure (click, rectangle, scribble) instead of naming it.

The core does the work (:func:`napari_cdpdnet.example.run.segment_by_example`): rank the 32
structures for the mark and segment the best one into a new layer. This panel turns the marks
into an :class:`~napari_cdpdnet.example.marks.ROI` (through
:mod:`~napari_cdpdnet._gui.layer_input`), starts the job on the dock's shared run machinery
(busy guard, Cancel, progress, status) and shows the ranking. The optional learned mapper is a
magicgui :class:`~magicgui.widgets.FileEdit`; its file is loaded in the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from magicgui.widgets import FileEdit
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_cdpdnet._gui import layer_input, notify
from napari_cdpdnet._gui import layers as _layers
from napari_cdpdnet._gui.layer_input import ClickTool, ImageSnapshot
from napari_cdpdnet._gui.run_panel import duration
from napari_cdpdnet.errors import CdpdnetError, InputError
from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.inference.segmenter import Segmenter
from napari_cdpdnet.inference.settings import SegmentationSettings

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Image

    from napari_cdpdnet._widget import SegmentationWidget

__all__ = ["ExamplePanel"]


def _example_job(
    segmenter: Segmenter,
    array: np.ndarray,
    geometry: Any,
    roi: ROI,
    settings: SegmentationSettings,
    mapper_path: Path | None,
    progress: Any,
    should_stop: Any,
) -> Any:
    """Worker-thread body of segment by example: load the mapper (if any), then the core run."""
    from napari_cdpdnet.example.mapper import RoiMapper
    from napari_cdpdnet.example.run import segment_by_example

    mapper = RoiMapper.load(mapper_path) if mapper_path is not None else None
    return segment_by_example(segmenter, array, geometry, roi, settings, mapper=mapper,
                              progress=progress, should_stop=should_stop)


class ExamplePanel(QGroupBox):
    """Mark by click (a toggle), from rectangle, from scribble; the mapper file; the answer."""

    def __init__(self, dock: SegmentationWidget) -> None:
        super().__init__("Segment by example")
        self._dock = dock
        layout = QVBoxLayout(self)
        hint = QLabel(
            "Mark a structure without naming it: click it, draw a rectangle on a Shapes layer, or "
            "scribble on it (a Labels layer, or a path/line on a Shapes layer)."
        )
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray; font-size: small;")
        layout.addWidget(hint)
        self.click_button = QPushButton("Mark by click")
        self.click_button.setCheckable(True)
        self.click_button.setToolTip(
            "While on, a click on the image ranks the 32 structures at that voxel and segments "
            "the best one (the components the click touches) into a new layer."
        )
        self.box_button = QPushButton("From rectangle")
        self.box_button.setToolTip("The last rectangle on a Shapes layer (the active one first)")
        self.scribble_button = QPushButton("From scribble")
        self.scribble_button.setToolTip(
            "The painted voxels of the active (or last) Labels layer that is not a CDPDNet result, "
            "or the last path/line on a Shapes layer"
        )
        row = QHBoxLayout()
        for button in (self.click_button, self.box_button, self.scribble_button):
            row.addWidget(button)
        layout.addLayout(row)

        self.mapper = FileEdit(mode="r", filter="Mapper weights (*.pt *.pth);;All files (*)")
        self.mapper.choose_btn.text = "Mapper..."
        self.mapper_edit = self.mapper.line_edit.native
        self.mapper_edit.setPlaceholderText("no mapper: probability dominance (official checkpoint)")
        self.mapper_edit.setClearButtonEnabled(True)
        self.mapper_edit.setToolTip(
            "Learned ROI prompt mapper weights (cdpdnet train-roi-prompts). Empty: the structure "
            "whose probability dominates inside the mark, from the CDPDNet checkpoint alone."
        )
        mapper_row = QHBoxLayout()
        mapper_row.addWidget(QLabel("Mapper:"))
        mapper_row.addWidget(self.mapper.native, 1)
        layout.addLayout(mapper_row)

        self.example_label = QLabel("")
        self.example_label.setWordWrap(True)
        self.example_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.example_label)

        #: The viewer mouse callback while "Mark by click" is on.
        self.tool = ClickTool(dock.viewer, self.segment_at, alive=lambda: dock.jobs.alive)
        self.click_button.toggled.connect(self.tool.set_on)
        self.box_button.clicked.connect(lambda: self.segment_from("box"))
        self.scribble_button.clicked.connect(lambda: self.segment_from("scribble"))

    def set_busy(self, busy: bool) -> None:
        self.box_button.setEnabled(not busy)
        self.scribble_button.setEnabled(not busy)

    def mapper_path(self) -> Path | None:
        """The chosen mapper weights file, or None for the fallback.

        Raises:
            InputError: a path is given but is not a file.
        """
        text = self.mapper_edit.text().strip()
        if not text:
            return None
        path = Path(text).expanduser()
        if not path.is_file():
            raise InputError(f"mapper weights {str(path)!r}: no such file (clear the field to use the fallback)")
        return path

    # ------------------------------------------------------------------ marks
    def segment_at(self, world_position: Sequence[float]) -> Any:
        """Segment by example from a click at a world position; returns the worker or None."""
        try:
            image = self._dock.image_layer()
            roi = layer_input.click_roi(image, world_position)
        except CdpdnetError as exc:
            self._dock.run_panel.refuse(exc)
            return None
        return self.segment(roi, image)

    def segment_from(self, kind: Literal["box", "scribble"]) -> Any:
        """Segment by example from the last rectangle or scribble; returns the worker or None."""
        try:
            image = self._dock.image_layer()
            roi = layer_input.example_roi(self._dock.viewer, image, kind)
        except CdpdnetError as exc:
            self._dock.run_panel.refuse(exc)
            return None
        return self.segment(roi, image)

    def segment(self, roi: ROI, image: Image | None = None) -> Any:
        """Rank the 32 structures for ``roi`` and segment the best into a new layer, in a worker.

        Returns the worker, or None when refused (with a notification).
        """
        dock = self._dock
        if dock.jobs.refuse_if_busy():
            return None
        try:
            image = image if image is not None else dock.image_layer()
            source = ImageSnapshot.of(image)
            roi.check(source.geometry.shape)
            mapper = self.mapper_path()
            settings = dock.run_panel.model_settings()
        except CdpdnetError as exc:
            dock.run_panel.refuse(exc)
            return None
        request = f"by example: {roi.describe()}"
        how = "learned mapper" if mapper is not None else "probability dominance"
        self.example_label.setText("")
        return dock.start_model_job(
            _example_job,
            (dock.segmenter, source.array, source.geometry, roi, settings, mapper),
            lambda res: self._on_result(res, source, request, settings.preset),
            f"Segment by example ({how}): {roi.describe()}...",
        )

    def _on_result(self, res: Any, source: ImageSnapshot, request: str, preset: str) -> str:
        """Show the ranking, the method and the ROI's sentence; add the mask as a new layer."""
        top = "\n".join(
            f"{i}. {c.structure.name}: {c.confidence:.0%}" for i, c in enumerate(res.ranking.top(3), 1)
        )
        lines = [f"Answered by: {res.ranking.method}", top]
        if res.prompt:
            lines.append(f"ROI: {res.prompt}")
        lines += res.notes
        self.example_label.setText("\n".join(lines))
        for note in res.notes:
            notify.show_warning(note)
        status = self._dock.status_label
        structure = res.structure
        if not res.mask.any():
            status.setText(f"Segment by example: no {structure.name} found; no layer added.")
            return "done"
        example = {
            "method": res.ranking.method,
            "top": [(c.structure.key, round(float(c.confidence), 4)) for c in res.ranking.top(3)],
            "prompt": res.prompt,
            "touched": bool(res.touched),
        }
        labels = _layers.example_labels(res.mask, structure)
        try:
            layer = self._dock.add_result_layer(
                labels, [structure], source, request=request, preset=preset, example=example
            )
        except CdpdnetError as exc:
            notify.show_error(str(exc))
            return "error"
        layer.selected_label = structure.index
        voxels = int(np.count_nonzero(labels))
        status.setText(
            f"Done in {duration(res.seconds)}: added {layer.name!r}, {structure.name} {voxels:,} voxels."
        )
        self._dock.run_panel.refresh_merge_targets()
        return "done"
