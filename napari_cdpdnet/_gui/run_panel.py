"""The top of the segmentation dock: image, structures, options, Run/Cancel, progress, status.

It owns the "run" feature: read the request and the options, start a segmentation through the
dock's :class:`~napari_cdpdnet._gui.worker.Jobs`, and place the result (a new layer, or a merge
into an earlier result that never touches the user's edits). The progress bar and the status
line below Run are shared: segment by example and weight downloads report there too.

The options are magicgui value widgets (napari's convention for plugin forms): "Results to"
reads its choices from the viewer whenever they are reset, keeping the user's choice. Their Qt
widgets stay reachable as ``device_combo``, ``preset_combo``, ``merge_combo`` and ``box_check``
for tests and scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import signals_blocked

from napari_cdpdnet._gui import layer_input, notify
from napari_cdpdnet._gui import layers as _layers
from napari_cdpdnet._gui.clip_matcher import ClipMatcher
from napari_cdpdnet._gui.layer_input import ImageSnapshot
from napari_cdpdnet._gui.request_box import RequestBox
from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.inference.devices import available_devices, resolve_device
from napari_cdpdnet.inference.pipeline import ProgressEvent
from napari_cdpdnet.inference.segmenter import SegmentationOutput, Segmenter
from napari_cdpdnet.inference.settings import PRESETS, SegmentationSettings, preset_help
from napari_cdpdnet.vocabulary.catalog import Structure

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Image

    from napari_cdpdnet._widget import SegmentationWidget

__all__ = ["RunPanel", "PROBABILITY_BUDGET", "NEW_LAYER", "duration"]

#: Largest float32 probability maps (bytes, source grid, all requested structures) a run keeps
#: for point and click; beyond it the run skips them (a 512x512x600 CT is 0.6 GB per structure).
PROBABILITY_BUDGET = 1_500_000_000

#: The "Results to" choice that makes a new layer (the default).
NEW_LAYER = "New layer"


def duration(seconds: float) -> str:
    """``"42 s"`` or ``"3 min"``: how long a run took or has left."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


@dataclass
class _RunContext:
    """What the GUI thread knew when a run started (the layers may change meanwhile)."""

    image: ImageSnapshot
    request: str
    structures: list[Structure]
    preset: str
    merge_into: str | None


@dataclass
class _RunOutput:
    """The worker's result: the segmenter's output and the compact probability cache."""

    output: SegmentationOutput
    probabilities: _layers.ProbabilityCache | None


def _segment_job(
    segmenter: Segmenter,
    array: np.ndarray,
    geometry: Geometry,
    structures: list[Structure],
    settings: SegmentationSettings,
    progress: Any,
    should_stop: Any,
) -> _RunOutput:
    """Worker-thread body: segment, then shrink the probabilities for point and click."""
    output = segmenter.segment(
        array, geometry, structures, settings, progress=progress, should_stop=should_stop
    )
    probs = output.result.probabilities
    cache = None
    if probs:
        cache = _layers.ProbabilityCache.from_probabilities(geometry, probs, "")
        output.result.probabilities = None  # float32 maps are 4x larger: keep only the cache
    return _RunOutput(output, cache)


class RunPanel(QWidget):
    """Choose a CT and structures, set the options, run or cancel, follow the progress."""

    def __init__(self, dock: SegmentationWidget) -> None:
        super().__init__()
        self._dock = dock
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The CT to segment (opened with the napari-cdpdnet reader)")
        form.addRow("Image:", self.image_combo)
        layout.addLayout(form)

        self.request = RequestBox(matcher=ClipMatcher(dock))
        layout.addWidget(self.request)

        # magicgui value widgets in a Qt form: QFormLayout sizes the labels in napari's font
        # (a magicgui Container measures them in the application's, and misaligns the rows).
        self.device = ComboBox(choices=available_devices())
        self.preset = ComboBox(choices=list(PRESETS), tooltip=preset_help())
        self.merge = ComboBox(
            choices=self._merge_choices,
            tooltip="Where results go. A new layer by default; merging into an earlier result only "
            "fills background voxels and never changes voxels you edited.",
        )
        self.box = CheckBox(text="Limit to box (last rectangle on a Shapes layer)")
        options = QFormLayout()
        options.addRow("Device:", self.device.native)
        options.addRow("Preset:", self.preset.native)
        options.addRow("Results to:", self.merge.native)
        layout.addLayout(options)
        layout.addWidget(self.box.native)
        self.device_combo = self.device.native
        self.preset_combo = self.preset.native
        self.merge_combo = self.merge.native
        self.box_check = self.box.native

        # Run, progress and status right under the request: visible without scrolling.
        row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.eta_label = QLabel("")
        layout.addWidget(self.eta_label)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

        self.run_button.clicked.connect(self.run)
        self.image_combo.currentTextChanged.connect(lambda _t: self.refresh_merge_targets())

    # ------------------------------------------------------------------ layers
    def refresh_images(self) -> None:
        """Refill the image chooser (keeping the choice, else the active layer) and the targets."""
        from napari.layers import Image

        layers = self._dock.viewer.layers
        current = self.image_combo.currentText()
        names = [lyr.name for lyr in layers if isinstance(lyr, Image)]
        with signals_blocked(self.image_combo):
            self.image_combo.clear()
            self.image_combo.addItems(names)
            active = layers.selection.active
            if current in names:
                self.image_combo.setCurrentText(current)
            elif active is not None and active.name in names:
                self.image_combo.setCurrentText(active.name)
        self.refresh_merge_targets()

    def refresh_merge_targets(self) -> None:
        """Offer the chosen image's earlier results as merge targets (the choice is kept)."""
        self.merge.reset_choices()

    def _merge_choices(self, _widget: Any = None) -> list[str]:
        """"Results to": a new layer, or one of the chosen image's earlier results."""
        from napari.layers import Labels

        image = self.image_combo.currentText()
        return [NEW_LAYER] + [
            lyr.name
            for lyr in self._dock.viewer.layers
            if isinstance(lyr, Labels)
            and _layers.is_cdpdnet_layer(lyr.metadata)
            and lyr.metadata.get("image_layer") == image
        ]

    def image_layer(self) -> Image:
        """The chosen image layer.

        Raises:
            InputError: none chosen, or it carries no patient geometry (see
                :func:`~napari_cdpdnet._gui.layer_input.chosen_image`).
        """
        return layer_input.chosen_image(self._dock.viewer, self.image_combo.currentText())

    # ------------------------------------------------------------------ options
    def model_settings(self) -> SegmentationSettings:
        """Preset and device as chosen (what every model job shares).

        Raises:
            InputError: the device is not usable here.
        """
        settings = SegmentationSettings(preset=self.preset.value, device=self.device.value)
        resolve_device(settings.device)
        return settings

    def settings(self, image: Any, n_structures: int = 1) -> SegmentationSettings:
        """Settings from the controls; probabilities are kept for point and click when they fit
        in :data:`PROBABILITY_BUDGET`."""
        box = layer_input.limit_box(self._dock.viewer, image) if self.box.value else None
        voxels = int(np.prod(image.metadata["geometry"].shape))
        return SegmentationSettings(
            preset=self.preset.value,
            device=self.device.value,
            box=box,
            return_probabilities=voxels * 4 * max(1, n_structures) <= PROBABILITY_BUDGET,
        )

    # ------------------------------------------------------------------ run
    def run(self) -> Any:
        """Start a segmentation in a thread worker; returns the worker, or None if refused.

        Refusals (busy, no image, unknown structure, bad box, bad device) are shown as
        notifications before anything starts.
        """
        dock = self._dock
        if dock.jobs.refuse_if_busy():
            return None
        try:
            image = self.image_layer()
            structures = self.request.resolve()
            settings = self.settings(image, len(structures))
            resolve_device(settings.device)
            merge = self.merge.value
            merge_into = None if merge in (None, "", NEW_LAYER) else merge
        except CdpdnetError as exc:
            self.refuse(exc)
            return None
        ctx = _RunContext(
            image=ImageSnapshot.of(image),
            request=self.request.request_text(),
            structures=structures,
            preset=settings.preset,
            merge_into=merge_into,
        )
        return dock.start_model_job(
            _segment_job,
            (dock.segmenter, ctx.image.array, ctx.image.geometry, structures, settings),
            lambda out: self._on_result(out, ctx),
            f"Running: {', '.join(s.name for s in structures)}...",
        )

    def refuse(self, exc: Exception) -> None:
        """A job did not start: say why, on the status line and as a notification."""
        self.status_label.setText(f"Not started: {exc}")
        notify.show_error(str(exc))

    def _on_result(self, out: _RunOutput, ctx: _RunContext) -> str:
        output = out.output
        try:
            layer, added = self._place_result(output, ctx)
        except CdpdnetError as exc:
            notify.show_error(str(exc))
            return "error"
        cache = self._dock.probability_cache
        if out.probabilities is not None:
            out.probabilities.layer_name = layer.name
            cache[ctx.image.name] = out.probabilities
        else:  # too large to keep: an older cache would point at another run's structures
            cache.pop(ctx.image.name, None)
        found = output.result.structures
        summary = ", ".join(f"{s.name} {found.get(s.index, 0):,} voxels" for s in ctx.structures)
        where = f"merged {added:,} voxels into {layer.name!r}" if ctx.merge_into else f"added {layer.name!r}"
        extra = "" if out.probabilities is not None else (
            " Probabilities were too large to keep: pick by click needs a smaller request or image."
        )
        self.status_label.setText(f"Done in {duration(output.seconds)}: {where}. {summary}.{extra}")
        for note in output.notes:
            notify.show_warning(note)
        self.refresh_merge_targets()
        return "merged" if ctx.merge_into else "done"

    def _place_result(self, output: SegmentationOutput, ctx: _RunContext) -> tuple[Any, int]:
        """Add a new layer, or merge into the chosen one (only if still there and on the grid)."""
        target = layer_input.layer_named(self._dock.viewer, ctx.merge_into)
        if ctx.merge_into and (target is None or tuple(target.data.shape) != ctx.image.geometry.shape):
            notify.show_warning(f"{ctx.merge_into!r} is gone or not on this image's grid: adding a new layer")
            target = None
        if target is not None:
            tracker = self._dock.trackers.get(id(target))
            protected = tracker.protected() if tracker is not None else False
            added = _layers.merge_labels_into(target.data, output.labels, protected=protected)
            _layers.record_structures(target.metadata, [s.key for s in ctx.structures])
            target.refresh()
            return target, added
        layer = self._dock.add_result_layer(
            output.labels, ctx.structures, ctx.image, request=ctx.request, preset=ctx.preset
        )
        found = [s.index for s in ctx.structures if output.result.structures.get(s.index)]
        if found:
            layer.selected_label = found[0]  # ready to correct the first structure
        return layer, int(np.count_nonzero(output.labels))

    # ------------------------------------------------------------------ progress and status
    def set_busy(self, busy: bool, cancellable: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy and cancellable)

    def show_started(self, status: str) -> None:
        self.status_label.setText(status)
        self.progress_bar.setRange(0, 0)

    def show_cancelling(self) -> None:
        self.cancel_button.setEnabled(False)
        self.status_label.setText("Cancelling...")

    def show_progress(self, event: ProgressEvent) -> None:
        """A model job's progress: windows done of total, stage, time left."""
        if event.stage == "inference" and event.total > 0:
            self.progress_bar.setRange(0, event.total)
            self.progress_bar.setValue(event.done)
        elif event.total > 0 and event.done >= event.total:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
        else:
            self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat(f"{event.stage}: %v/%m" if event.stage == "inference" else event.stage)
        eta = "" if event.eta_s is None else f" - about {duration(event.eta_s)} left"
        self.eta_label.setText(f"{event.message}{eta}")

    def show_finished(self, ok: bool) -> None:
        """A model job has ended: a full bar if it added something, else an empty one."""
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if ok else 0)
        self.progress_bar.setFormat("%p%")
        self.eta_label.setText("")

    def show_download_progress(self, done: int, total: int | None, name: str) -> None:
        """A weights download's progress: per file, in MB (indeterminate without a size)."""
        if total:
            self.progress_bar.setRange(0, 1000)
            self.progress_bar.setValue(int(1000 * done / total))
            self.progress_bar.setFormat(f"{name}: %p%")
        else:
            self.progress_bar.setRange(0, 0)
        self.eta_label.setText(f"{name}: {done / 1e6:,.0f} MB" + (f" of {total / 1e6:,.0f} MB" if total else ""))

    def show_download_finished(self) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setFormat("%p%")
