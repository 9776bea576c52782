"""The "CDPDNet segmentation" dock (npe2 entry point): a column of panels and what they share.

The panels live in :mod:`napari_cdpdnet._gui`, stacked in this order: the run panel (image,
structures, options, Run/Cancel, progress and status, all above the fold), weights, pick by
click, and segment by example. This module composes them and owns what they share: the viewer,
the :class:`~napari_cdpdnet.inference.segmenter.Segmenter`, the probabilities of each image's
last run (for pick by click), the edit trackers of result layers, and the one
:class:`~napari_cdpdnet._gui.worker.Jobs` (busy guard, Cancel, nothing after close). It also runs
the end of a model job (status, errors, :attr:`SegmentationWidget.run_finished`) and adds result
layers, for the run and segment-by-example panels alike. Everything else is forwarded: the
handles tests and scripts use (``widget.text_edit``, ``widget.run()``,
``widget.segment_by_example_at(...)`` ...) belong to the panels.

Resolving names, planning, weights and inference live in the core; heavy work never runs on the
GUI thread. Errors the user can act on (:class:`~napari_cdpdnet.errors.CdpdnetError`) arrive as
napari notifications (:mod:`~napari_cdpdnet._gui.notify`) with their message, and a cancelled
run adds nothing.
"""

from __future__ import annotations

# Must run before anything can import triton: it crashes next to napari's OpenGL canvas on
# machines without CUDA (see _gui/triton_guard).
from napari_cdpdnet._gui.triton_guard import block_triton_without_cuda

block_triton_without_cuda()

import logging  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Literal  # noqa: E402

import numpy as np  # noqa: E402
from qtpy.QtCore import QEvent, Signal  # noqa: E402
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget  # noqa: E402

from napari_cdpdnet._gui import layers as _layers  # noqa: E402
from napari_cdpdnet._gui import notify  # noqa: E402
from napari_cdpdnet._gui.example_panel import ExamplePanel  # noqa: E402
from napari_cdpdnet._gui.layer_input import ImageSnapshot  # noqa: E402
from napari_cdpdnet._gui.pick_panel import PickPanel  # noqa: E402
from napari_cdpdnet._gui.recovery import Recovery  # noqa: E402
from napari_cdpdnet._gui.run_panel import RunPanel  # noqa: E402
from napari_cdpdnet._gui.weights_panel import WeightsPanel  # noqa: E402
from napari_cdpdnet._gui.worker import Jobs  # noqa: E402
from napari_cdpdnet.errors import Cancelled, CdpdnetError, WeightsError  # noqa: E402
from napari_cdpdnet.inference.segmenter import Segmenter  # noqa: E402
from napari_cdpdnet.vocabulary.catalog import Structure  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels

    from napari_cdpdnet.example.marks import ROI
    from napari_cdpdnet.inference.settings import SegmentationSettings

__all__ = ["SegmentationWidget"]

logger = logging.getLogger(__name__)

#: The dock's minimum width (px), enough for the structure names and the buttons' labels.
MIN_WIDTH = 360


class SegmentationWidget(QWidget):
    """Dock widget: choose a CT layer and structures, run CDPDNet, get a Labels layer.

    Args:
        napari_viewer: the viewer (napari passes it).
        segmenter: a ready :class:`Segmenter` (tests, scripts); default: one that finds the
            weights locally and never downloads on its own (the Download button does).
    """

    #: A :class:`ProgressEvent` from the running model job (delivered on the GUI thread).
    progressed = Signal(object)
    #: ``(done_bytes, total_bytes_or_None, filename)`` while downloading weights.
    download_progressed = Signal(object, object, str)
    #: ``"done"``, ``"merged"``, ``"cancelled"`` or ``"error"`` once a run (or segment by
    #: example) is over and the widget is idle again.
    run_finished = Signal(str)

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        segmenter: Segmenter | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.segmenter = segmenter if segmenter is not None else Segmenter(allow_download=False)
        #: image layer name -> probabilities of its last run (pick by click).
        self.probability_cache: dict[str, _layers.ProbabilityCache] = {}
        #: id(result layer) -> the user's edits in it (a merge spares those voxels).
        self.trackers: dict[int, _layers.EditTracker] = {}
        self.jobs = Jobs(on_busy=self._set_busy)
        #: autosave of edited result layers, restore offers, the question before closing.
        self.recovery = Recovery(napari_viewer, self.trackers, parent=self)
        self._last_status = "idle"
        self.run_panel = RunPanel(self)
        self.weights_panel = WeightsPanel(self)
        self.pick_panel = PickPanel(self)
        self.example_panel = ExamplePanel(self)
        self._build()
        self._expose_handles()
        self._connect()
        self.refresh_layers()
        self.refresh_weights_status()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        # Everything sits in a scroll area: on short screens the dock scrolls instead of
        # squeezing the structure list over the lines below it. A scroll area's minimum width
        # is tiny: without a minimum, a dock beside a wide canvas is squeezed unreadable.
        self.setMinimumWidth(MIN_WIDTH)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)
        for panel in (self.run_panel, self.weights_panel, self.pick_panel, self.example_panel):
            layout.addWidget(panel)
        layout.addStretch(1)

    def _expose_handles(self) -> None:
        """The panels' widgets that tests and scripts reach as ``widget.<name>``."""
        run, request, example = self.run_panel, self.run_panel.request, self.example_panel
        self.image_combo = run.image_combo
        self.text_edit = request.text_edit
        self.completer = request.completer
        self.tree = request.tree
        self.resolved_label = request.resolved_label
        self.understanding = request.understanding  # how each phrase was read (CLIP included)
        self.clip_button = self.weights_panel.clip_button
        self.device_combo = run.device_combo
        self.preset_combo = run.preset_combo
        self.merge_combo = run.merge_combo
        self.box_check = run.box_check
        self.run_button = run.run_button
        self.cancel_button = run.cancel_button
        self.progress_bar = run.progress_bar
        self.eta_label = run.eta_label
        self.status_label = run.status_label
        self.weights_label = self.weights_panel.weights_label
        self.download_button = self.weights_panel.download_button
        self.folder_button = self.weights_panel.folder_button
        self.pick_button = self.pick_panel.pick_button
        self.example_click_button = example.click_button
        self.example_box_button = example.box_button
        self.example_scribble_button = example.scribble_button
        self.mapper_edit = example.mapper_edit
        self.example_label = example.example_label

    def _connect(self) -> None:
        events = self.viewer.layers.events
        events.inserted.connect(self.refresh_layers)
        events.removed.connect(self.refresh_layers)
        events.moved.connect(self.refresh_layers)
        self.cancel_button.clicked.connect(self.cancel)
        self.progressed.connect(self.run_panel.show_progress)
        self.download_progressed.connect(self.run_panel.show_download_progress)
        # One click tool at a time: turning one on turns the other off.
        self.pick_button.toggled.connect(lambda on: on and self.example_click_button.setChecked(False))
        self.example_click_button.toggled.connect(lambda on: on and self.pick_button.setChecked(False))
        # Workers and viewer events report after the dock may have been closed; closing it
        # also cancels a running job (nothing would show its result) and removes click tools.
        jobs, tools, recovery = self.jobs, (self.pick_panel.tool, self.example_panel.tool), self.recovery

        def closed(*_a: Any) -> None:
            jobs.close()
            recovery.close()
            for tool in tools:
                tool.set_on(False)

        self.destroyed.connect(closed)

    def event(self, e: QEvent) -> bool:  # noqa: N802 - Qt override
        """napari closes a dock by un-parenting the widget: stop a run and the click tools then."""
        if e.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.cancel()
            self.pick_button.setChecked(False)
            self.example_click_button.setChecked(False)
        return super().event(e)

    def refresh_layers(self, event: Any = None) -> None:
        """Refill the image chooser (keeping the choice) and the merge targets."""
        if not self.jobs.alive:  # viewer events can outlive a closed dock
            return
        for lyr in self.viewer.layers:  # renamed layers must show up renamed (connect is idempotent)
            lyr.events.name.connect(self.refresh_layers)
        self.run_panel.refresh_images()

    # ------------------------------------------------------------------ shared by the panels
    def _set_busy(self, busy: bool) -> None:
        self.run_panel.set_busy(busy, cancellable=self.jobs.running)
        self.weights_panel.set_busy(busy)
        self.example_panel.set_busy(busy)

    def start_model_job(
        self, job: Callable[..., Any], args: tuple[Any, ...], on_result: Callable[[Any], str], status: str
    ) -> Any:
        """Run ``job(*args, progress, should_stop)`` (a segmentation or segment by example) in a
        cancellable worker; returns it.

        ``on_result`` places the result and returns the run's status (``"done"``, ``"merged"``
        or ``"error"``), which :attr:`run_finished` reports once the dock is idle again.
        """
        self._last_status = "error"
        self.run_panel.show_started(status)

        def result(out: Any) -> None:
            self._last_status = on_result(out)

        return self.jobs.start(
            job, *args, self.progressed.emit, self.jobs.should_stop,
            on_result=result, on_error=self._on_job_error, on_finished=self._on_job_finished,
            cancellable=True,
        )

    def _on_job_error(self, exc: BaseException) -> None:
        status = self.status_label
        if isinstance(exc, Cancelled):
            self._last_status = "cancelled"
            status.setText("Cancelled: no layer was added.")
            return
        self._last_status = "error"
        if isinstance(exc, CdpdnetError):
            message = str(exc)
        else:  # a bug: keep the traceback in the log, give the user the gist
            logger.error("segmentation failed", exc_info=(type(exc), exc, exc.__traceback__))
            message = f"CDPDNet failed unexpectedly ({type(exc).__name__}: {exc}); see the log"
        if isinstance(exc, WeightsError) and not self.segmenter.is_loaded():
            status.setText(
                "Failed: the model weights are missing or damaged. Press 'Download weights' "
                "(about 1 GB, third-party terms) or 'Use local folder...'; the notification lists "
                "each file."
            )
        else:
            status.setText(f"Failed: {message}")
        notify.show_error(message)

    def _on_job_finished(self) -> None:
        self.run_panel.show_finished(self._last_status in ("done", "merged"))
        self.run_finished.emit(self._last_status)

    def add_result_layer(
        self,
        labels: np.ndarray,
        structures: Sequence[Structure],
        source: ImageSnapshot,
        *,
        request: str,
        preset: str,
        example: dict[str, Any] | None = None,
    ) -> Labels:
        """Add a result as a new Labels layer (numbered per image), tracking the user's edits.

        Raises:
            InputError: ``labels`` is not on the image's grid.
        """
        run = _layers.next_run_number((lyr.metadata for lyr in self.viewer.layers), source.name)
        data, kwargs, _ = _layers.labels_layer_data(
            labels, source.geometry, structures, image_layer=source.name,
            source_path=source.source_path, request=request, preset=preset, run=run,
        )
        if example is not None:  # segment by example: how the structure was chosen
            kwargs["metadata"]["cdpdnet"]["example"] = example
        layer = self.viewer.add_labels(data, **kwargs)
        self.trackers[id(layer)] = _layers.EditTracker(layer)
        self.recovery.watch(layer, self.trackers[id(layer)])
        return layer

    # ------------------------------------------------------------------ forwarded to the panels
    @property
    def is_running(self) -> bool:
        """A segmentation (or segment by example) is running."""
        return self.jobs.running

    def image_layer(self) -> Image:
        """The chosen image layer (raises InputError: none, or no patient geometry)."""
        return self.run_panel.image_layer()

    def checked_structures(self) -> list[Structure]:
        return self.run_panel.request.checked_structures()

    def set_checked(self, keys: list[str]) -> None:
        """Tick these structures (keys or names) and untick the others."""
        self.run_panel.request.set_checked(keys)

    def settings(self, image: Any, n_structures: int = 1) -> SegmentationSettings:
        return self.run_panel.settings(image, n_structures)

    def run(self) -> Any:
        """Start a segmentation; returns the worker, or None if refused (with a notification)."""
        return self.run_panel.run()

    def cancel(self) -> None:
        """Ask the running job to stop (within one window); nothing will be added."""
        if self.jobs.cancel():
            self.run_panel.show_cancelling()

    def pick_at(self, world_position: Sequence[float]) -> int | None:
        """Add the structure under a world position from the last run's probabilities."""
        return self.pick_panel.pick_at(world_position)

    def segment_by_example_at(self, world_position: Sequence[float]) -> Any:
        """Segment by example from a click at a world position; returns the worker or None."""
        return self.example_panel.segment_at(world_position)

    def segment_by_example_from(self, kind: Literal["box", "scribble"]) -> Any:
        """Segment by example from the last rectangle or scribble; returns the worker or None."""
        return self.example_panel.segment_from(kind)

    def segment_by_example(self, roi: ROI, image: Image | None = None) -> Any:
        """Segment by example from an ROI; returns the worker or None."""
        return self.example_panel.segment(roi, image)

    def refresh_weights_status(self) -> None:
        """Check, in a worker, whether the weights are usable; the Weights line shows it."""
        self.weights_panel.refresh_status()

    def use_weights_folder(self, folder: str | Path) -> None:
        """Use the weights in ``folder`` (flat, or the ``cdpdnet weights download`` layout)."""
        self.weights_panel.use_folder(folder)

    def download_weights(self) -> Any:
        """Download the weights into the cache, with progress; returns the worker or None."""
        return self.weights_panel.download()
