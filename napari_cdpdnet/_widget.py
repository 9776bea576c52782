"""The "CDPDNet segmentation" dock widget: pick structures, run, cancel, click to add.

The widget stays thin: it collects input, starts napari thread workers and shows results;
resolving names, planning, weights and inference live in the core (:mod:`~napari_cdpdnet.inference.segmenter`)
and layer rules in :mod:`~napari_cdpdnet._gui.layers`. Heavy work (weight checks, downloads,
inference, probability quantisation) never runs on the GUI thread; errors the user can act on
(:class:`~napari_cdpdnet.errors.CdpdnetError`) arrive as napari notifications with their
message, and a cancelled run adds nothing.
"""

from __future__ import annotations

# Must run before anything can import triton: it crashes next to napari's OpenGL canvas on
# machines without CUDA (see _triton_guard).
from napari_cdpdnet._gui.triton_guard import block_triton_without_cuda

block_triton_without_cuda()

import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import numpy as np  # noqa: E402
from napari.qt.threading import create_worker  # noqa: E402
from napari.utils.notifications import show_error, show_info, show_warning  # noqa: E402
from qtpy.QtCore import QEvent, QStringListModel, Qt, QTimer, Signal  # noqa: E402
from qtpy.QtWidgets import (  # noqa: E402
    QCheckBox,
    QComboBox,
    QCompleter,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_cdpdnet._gui import layers as _layers  # noqa: E402
from napari_cdpdnet.errors import Cancelled, CdpdnetError, InputError, WeightsError  # noqa: E402
from napari_cdpdnet.geometry import Geometry  # noqa: E402
from napari_cdpdnet.inference.devices import available_devices, resolve_device  # noqa: E402
from napari_cdpdnet.inference.pipeline import ProgressEvent  # noqa: E402
from napari_cdpdnet.inference.segmenter import SegmentationOutput, Segmenter, parse_request  # noqa: E402
from napari_cdpdnet.inference.settings import PRESETS, SegmentationSettings, preset_help  # noqa: E402
from napari_cdpdnet.vocabulary.catalog import (  # noqa: E402
    FIXED_CONDITIONING_NOTE,
    GROUPS,
    STRUCTURES,
    Structure,
    plan_passes,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image

__all__ = ["SegmentationWidget", "completion_terms", "available_devices"]

logger = logging.getLogger(__name__)

#: Largest float32 probability maps (bytes, source grid, all requested structures) a run keeps
#: for point and click; beyond it the run skips them (a 512x512x600 CT is 0.6 GB per structure).
PROBABILITY_BUDGET = 1_500_000_000

#: The dock's minimum width (px), enough for the structure names and the buttons' labels.
MIN_WIDTH = 360

_GROUP_TITLES = {"organ": "Organs", "vessel": "Vessels", "tumour": "Tumours and cysts"}
_NEW_LAYER = "New layer"


def completion_terms() -> list[str]:
    """Every name the resolver knows exactly: display names, keys, synonyms, abbreviations."""
    terms: set[str] = set()
    for s in STRUCTURES:
        terms.update([s.name, s.key.replace("_", " "), *s.synonyms, *s.abbreviations])
    return sorted((t for t in terms if t), key=str.casefold)


class _ListCompleter(QCompleter):
    """Completes the last comma-separated name of a list ("liver, left ki" -> "left kidney")."""

    def splitPath(self, path: str) -> list[str]:  # noqa: N802 - Qt override
        return [path.split(",")[-1].strip()]

    def pathFromIndex(self, index: Any) -> str:  # noqa: N802 - Qt override
        completion = super().pathFromIndex(index)
        widget = self.widget()
        text = widget.text() if widget is not None else ""
        head = text.rsplit(",", 1)[0] + ", " if "," in text else ""
        return head + completion


@dataclass
class _RunContext:
    """What the GUI thread knew when a run started (the layers may change meanwhile)."""

    image_layer: str
    geometry: Geometry
    source_path: str | None
    request: str
    structures: list[Structure]
    preset: str
    merge_into: str | None


@dataclass
class _RunOutput:
    """The worker's result: the segmenter's output and the compact probability cache."""

    output: SegmentationOutput
    probabilities: _layers.ProbabilityCache | None


class SegmentationWidget(QWidget):
    """Dock widget: choose a CT layer and structures, run CDPDNet, get a Labels layer.

    Args:
        napari_viewer: the viewer (napari passes it).
        segmenter: a ready :class:`Segmenter` (tests, scripts); default: one that finds the
            weights locally and never downloads on its own (the Download button does).
    """

    #: A :class:`ProgressEvent` from the running segmentation (delivered on the GUI thread).
    progressed = Signal(object)
    #: ``(done_bytes, total_bytes_or_None, filename)`` while downloading weights.
    download_progressed = Signal(object, object, str)
    #: ``"done"``, ``"merged"``, ``"cancelled"`` or ``"error"`` once a run is over and the
    #: widget is idle again.
    run_finished = Signal(str)

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        segmenter: Segmenter | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._injected = segmenter is not None
        self.segmenter = segmenter if segmenter is not None else Segmenter(allow_download=False)
        self._cancel = threading.Event()
        self._worker: Any = None
        self._weights_worker: Any = None
        self._last_status = "idle"
        self._started = 0.0
        self._trackers: dict[int, _layers.EditTracker] = {}
        #: image layer name -> probabilities of its last run.
        self.probability_cache: dict[str, _layers.ProbabilityCache] = {}
        self._weights_check = 0
        # Workers report after the dock may have been closed: their callbacks check this first.
        # Closing the dock also cancels a running segmentation (nothing would show its result).
        self._alive = alive = {"yes": True}
        cancel = self._cancel
        callbacks = self.viewer.mouse_drag_callbacks
        mouse_handlers = (self._on_mouse, self._on_example_mouse)

        def closed(*_a: Any) -> None:
            alive.update(yes=False)
            cancel.set()
            for handler in mouse_handlers:
                if handler in callbacks:
                    callbacks.remove(handler)

        self.destroyed.connect(closed)
        # Everything is in a scroll area, whose minimum width is tiny: without this, a dock
        # beside a wide canvas is squeezed until nothing in it can be read.
        self.setMinimumWidth(MIN_WIDTH)
        self._build()
        self._connect_viewer()
        self.refresh_layers()
        self._update_resolution()
        self.refresh_weights_status()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        # Everything sits in a scroll area: on short screens the dock scrolls instead of
        # squeezing the structure list over the lines below it.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The CT to segment (opened with the napari-cdpdnet reader)")
        form.addRow("Image:", self.image_combo)
        layout.addLayout(form)

        box = QGroupBox("Structures")
        bl = QVBoxLayout(box)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("e.g. liver, left kidney, IVC")
        self.text_edit.setClearButtonEnabled(True)
        completer = _ListCompleter(QStringListModel(completion_terms(), self), self)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.text_edit.setCompleter(completer)
        self.completer = completer
        bl.addWidget(self.text_edit)

        self.tree = QTreeWidget()
        self.tree.setHeaderHidden(True)
        self.tree.setMinimumHeight(140)
        self._items: dict[int, QTreeWidgetItem] = {}
        for group in GROUPS:
            top = QTreeWidgetItem([_GROUP_TITLES.get(group, group)])
            top.setFlags(top.flags() | Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsAutoTristate)
            top.setCheckState(0, Qt.CheckState.Unchecked)
            for s in STRUCTURES:
                if s.group != group:
                    continue
                item = QTreeWidgetItem([s.name])
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(0, Qt.CheckState.Unchecked)
                item.setData(0, Qt.ItemDataRole.UserRole, s.index)
                item.setForeground(0, _brush(s))
                top.addChild(item)
                self._items[s.index] = item
            self.tree.addTopLevelItem(top)
        bl.addWidget(self.tree)

        self.resolved_label = QLabel()
        self.resolved_label.setWordWrap(True)
        self.resolved_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bl.addWidget(self.resolved_label)
        note = QLabel(FIXED_CONDITIONING_NOTE)
        note.setWordWrap(True)
        note.setStyleSheet("color: gray; font-size: small;")
        bl.addWidget(note)
        layout.addWidget(box)

        opts = QFormLayout()
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        opts.addRow("Device:", self.device_combo)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(PRESETS))
        self.preset_combo.setToolTip(preset_help())
        opts.addRow("Preset:", self.preset_combo)
        self.merge_combo = QComboBox()
        self.merge_combo.setToolTip(
            "Where results go. A new layer by default; merging into an earlier result only fills "
            "background voxels and never changes voxels you edited."
        )
        opts.addRow("Results to:", self.merge_combo)
        layout.addLayout(opts)

        self.box_check = QCheckBox("Limit to box (last rectangle on a Shapes layer)")
        layout.addWidget(self.box_check)
        # Run, progress and status right under the request: visible without scrolling.
        run_row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        layout.addLayout(run_row)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.eta_label = QLabel("")
        layout.addWidget(self.eta_label)
        self.status_label = QLabel("Ready.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        wbox = QGroupBox("Weights")
        wl = QVBoxLayout(wbox)
        self.weights_label = QLabel("Weights: checking...")
        self.weights_label.setWordWrap(True)
        wl.addWidget(self.weights_label)
        row = QHBoxLayout()
        self.download_button = QPushButton("Download weights")
        self.download_button.setToolTip(
            "Downloads the CDPDNet checkpoint and DINOv2-base (third-party weights with their own "
            "terms, about 1 GB) into the local cache; see `cdpdnet weights info`."
        )
        self.folder_button = QPushButton("Use local folder...")
        self.folder_button.setToolTip("A folder holding cdpdnet.pth and DINOv2-base (offline sites)")
        row.addWidget(self.download_button)
        row.addWidget(self.folder_button)
        wl.addLayout(row)
        layout.addWidget(wbox)

        self.pick_button = QPushButton("Pick structure by click")
        self.pick_button.setCheckable(True)
        self.pick_button.setToolTip(
            "After a run: click the image to add the most probable structure there (p > 0.5, "
            "its connected region) from the cached probabilities, without rerunning."
        )
        layout.addWidget(self.pick_button)

        layout.addWidget(self._build_example())
        layout.addStretch(1)

        self._resolve_timer = QTimer(self)
        self._resolve_timer.setSingleShot(True)
        self._resolve_timer.setInterval(150)
        self._resolve_timer.timeout.connect(self._update_resolution)
        self.text_edit.textChanged.connect(lambda _t: self._resolve_timer.start())
        self.tree.itemChanged.connect(lambda *_a: self._resolve_timer.start())
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.download_button.clicked.connect(self.download_weights)
        self.folder_button.clicked.connect(self._choose_folder)
        self.pick_button.toggled.connect(self._set_pick_mode)
        self.example_click_button.toggled.connect(self._set_example_click_mode)
        self.example_box_button.clicked.connect(lambda: self.segment_by_example_from("box"))
        self.example_scribble_button.clicked.connect(lambda: self.segment_by_example_from("scribble"))
        self.mapper_button.clicked.connect(self._choose_mapper)
        self.image_combo.currentTextChanged.connect(lambda _t: self._refresh_merge_targets())
        self.progressed.connect(self._on_progress)
        self.download_progressed.connect(self._on_download_progress)

    def _build_example(self) -> QGroupBox:
        """The "Segment by example" section: mark a structure instead of naming it (issue 8)."""
        box = QGroupBox("Segment by example")
        bl = QVBoxLayout(box)
        hint = QLabel(
            "Mark a structure without naming it: click it, draw a rectangle on a Shapes layer, or "
            "scribble on it (a Labels layer, or a path/line on a Shapes layer)."
        )
        hint.setWordWrap(True)
        hint.setStyleSheet("color: gray; font-size: small;")
        bl.addWidget(hint)
        self.example_click_button = QPushButton("Mark by click")
        self.example_click_button.setCheckable(True)
        self.example_click_button.setToolTip(
            "While on, a click on the image ranks the 32 structures at that voxel and segments "
            "the best one (the components the click touches) into a new layer."
        )
        row = QHBoxLayout()
        self.example_box_button = QPushButton("From rectangle")
        self.example_box_button.setToolTip("The last rectangle on a Shapes layer (the active one first)")
        self.example_scribble_button = QPushButton("From scribble")
        self.example_scribble_button.setToolTip(
            "The painted voxels of the active (or last) Labels layer that is not a CDPDNet result, "
            "or the last path/line on a Shapes layer"
        )
        row.addWidget(self.example_click_button)
        row.addWidget(self.example_box_button)
        row.addWidget(self.example_scribble_button)
        bl.addLayout(row)
        mrow = QHBoxLayout()
        self.mapper_edit = QLineEdit()
        self.mapper_edit.setPlaceholderText("no mapper: probability dominance (official checkpoint)")
        self.mapper_edit.setClearButtonEnabled(True)
        self.mapper_edit.setToolTip(
            "Learned ROI prompt mapper weights (cdpdnet train-roi-prompts). Empty: the structure "
            "whose probability dominates inside the mark, from the CDPDNet checkpoint alone."
        )
        self.mapper_button = QPushButton("Mapper...")
        mrow.addWidget(QLabel("Mapper:"))
        mrow.addWidget(self.mapper_edit, 1)
        mrow.addWidget(self.mapper_button)
        bl.addLayout(mrow)
        self.example_label = QLabel("")
        self.example_label.setWordWrap(True)
        self.example_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bl.addWidget(self.example_label)
        return box

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        events.inserted.connect(self.refresh_layers)
        events.removed.connect(self.refresh_layers)
        events.moved.connect(self.refresh_layers)

    def event(self, e: QEvent) -> bool:  # noqa: N802 - Qt override
        """napari closes a dock by un-parenting the widget: stop a run and picking then."""
        if e.type() == QEvent.Type.ParentChange and self.parent() is None:
            self.cancel()
            self.pick_button.setChecked(False)
            self.example_click_button.setChecked(False)
        return super().event(e)

    # ------------------------------------------------------------------ layers
    def refresh_layers(self, event: Any = None) -> None:
        """Refill the image chooser (keeping the choice) and the merge targets."""
        from napari.layers import Image

        if not self._alive["yes"]:  # viewer events can outlive a closed dock
            return
        for lyr in self.viewer.layers:  # renamed layers must show up renamed (connect is idempotent)
            lyr.events.name.connect(self.refresh_layers)
        current = self.image_combo.currentText()
        names = [lyr.name for lyr in self.viewer.layers if isinstance(lyr, Image)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        active = self.viewer.layers.selection.active
        if current in names:
            self.image_combo.setCurrentText(current)
        elif active is not None and active.name in names:
            self.image_combo.setCurrentText(active.name)
        self.image_combo.blockSignals(False)
        self._refresh_merge_targets()

    def _refresh_merge_targets(self) -> None:
        from napari.layers import Labels

        current = self.merge_combo.currentText()
        image = self.image_combo.currentText()
        names = [
            lyr.name
            for lyr in self.viewer.layers
            if isinstance(lyr, Labels)
            and _layers.is_cdpdnet_layer(lyr.metadata)
            and lyr.metadata.get("image_layer") == image
        ]
        self.merge_combo.blockSignals(True)
        self.merge_combo.clear()
        self.merge_combo.addItems([_NEW_LAYER, *names])
        if current in names:
            self.merge_combo.setCurrentText(current)
        self.merge_combo.blockSignals(False)

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def image_layer(self) -> Image:
        """The chosen image layer.

        Raises:
            InputError: none chosen, or it carries no patient geometry.
        """
        name = self.image_combo.currentText()
        layer = self._layer(name) if name else None
        if layer is None:
            raise InputError("no image layer: open a CT first (File > Open, napari-cdpdnet reader)")
        geometry = layer.metadata.get("geometry")
        if not isinstance(geometry, Geometry):
            raise InputError(
                f"layer {name!r} has no patient geometry: open the CT with the napari-cdpdnet "
                "reader so that results can be placed and measured in millimetres"
            )
        modality = str((layer.metadata.get("info") or {}).get("modality") or "CT")
        if modality != "CT":
            raise InputError(f"layer {name!r} is {modality}, not CT: CDPDNet segments CT only")
        if tuple(np.shape(layer.data)) != geometry.shape:
            raise InputError(f"layer {name!r}: data shape does not match its geometry")
        return layer

    # ------------------------------------------------------------------ request
    def checked_structures(self) -> list[Structure]:
        """Structures ticked in the checklist, in vocabulary order."""
        return [
            STRUCTURES[i - 1]
            for i, item in sorted(self._items.items())
            if item.checkState(0) == Qt.CheckState.Checked
        ]

    def set_checked(self, keys: list[str]) -> None:
        """Tick these structures (keys or names) and untick the others."""
        from napari_cdpdnet.vocabulary.catalog import structure

        wanted = {structure(k).index for k in keys}
        for i, item in self._items.items():
            item.setCheckState(0, Qt.CheckState.Checked if i in wanted else Qt.CheckState.Unchecked)

    def request_text(self) -> str:
        """The request as one line: typed text, then ticked structures not typed."""
        parts = [self.text_edit.text().strip()] if self.text_edit.text().strip() else []
        parts += [s.name for s in self.checked_structures()]
        return ", ".join(parts)

    def resolve_request(self) -> list[Structure]:
        """The structures the current entry asks for (no model, no network).

        Raises:
            VocabularyError: a typed phrase is not one of the 32 structures (says why).
            InputError: nothing requested.
        """
        items: list[Any] = list(self.checked_structures())
        text = self.text_edit.text().strip()
        if text:
            items.append(text)
        structures, _ = parse_request(items)
        return structures

    def _update_resolution(self) -> None:
        """Show what will run, with confidences, or why the entry is refused."""
        items: list[Any] = list(self.checked_structures())
        text = self.text_edit.text().strip()
        if text:
            items.append(text)
        if not items:
            self.resolved_label.setText("resolved: nothing yet (type names or tick structures)")
            self.resolved_label.setStyleSheet("")
            return
        try:
            structures, resolutions = parse_request(items)
            plan = plan_passes(structures)
        except CdpdnetError as exc:
            self.resolved_label.setText(f"not resolved: {exc}")
            self.resolved_label.setStyleSheet("color: #d9534f;")
            return
        by_index = {r.structure.index: r for r in resolutions}
        parts = []
        for s in structures:
            r = by_index.get(s.index)
            how = "ticked" if r is None else f"{r.method} {r.confidence:.2f}"
            if r is not None and r.text.casefold() != s.name.casefold():
                how = f"'{r.text}', {how}"
            parts.append(f"{s.name} ({how})")
        n = len(plan.passes)
        self.resolved_label.setText(
            f"resolved: {'; '.join(parts)} - {n} pass{'es' if n != 1 else ''}"
        )
        self.resolved_label.setToolTip(plan.describe())
        self.resolved_label.setStyleSheet("")

    # ------------------------------------------------------------------ box
    def roi_from_shapes(self, image: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The ROI (LPS mm) of the last rectangle on a Shapes layer (the active one first).

        Raises:
            InputError: no Shapes layer holds a rectangle, or it misses the image.
        """
        from napari.layers import Shapes

        shapes = [lyr for lyr in self.viewer.layers if isinstance(lyr, Shapes)]
        active = self.viewer.layers.selection.active
        if active in shapes:
            shapes.remove(active)
            shapes.append(active)
        for layer in reversed(shapes):
            rects = [i for i, t in enumerate(layer.shape_type) if t == "rectangle"]
            if not rects:
                continue
            verts = np.asarray(layer.data[rects[-1]], dtype=float)
            world = np.array([layer.data_to_world(v) for v in verts], dtype=float)
            ndim = image.ndim
            if world.shape[1] < ndim:  # a 2D shapes layer: leading axes span the image
                pad = np.full((world.shape[0], ndim - world.shape[1]), np.nan)
                world = np.hstack([pad, world])
            idx = []
            for w in world:
                finite = np.where(np.isfinite(w), w, 0.0)
                d = np.asarray(image.world_to_data(finite), dtype=float)
                d[~np.isfinite(w)] = np.nan
                idx.append(d[-3:])
            return _layers.roi_from_index_points(np.array(idx), image.metadata["geometry"])
        raise InputError(
            "'Limit to box' is on but no Shapes layer holds a rectangle: draw one with the "
            "rectangle tool of a Shapes layer, or untick 'Limit to box'"
        )

    # ------------------------------------------------------------------ run
    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def settings(self, image: Any, n_structures: int = 1) -> SegmentationSettings:
        """Settings from the controls; probabilities are kept for point and click when they fit
        in :data:`PROBABILITY_BUDGET`."""
        roi = self.roi_from_shapes(image) if self.box_check.isChecked() else None
        voxels = int(np.prod(image.metadata["geometry"].shape))
        return SegmentationSettings(
            preset=self.preset_combo.currentText(),
            device=self.device_combo.currentText(),
            roi=roi,
            return_probabilities=voxels * 4 * max(1, n_structures) <= PROBABILITY_BUDGET,
        )

    def run(self) -> Any:
        """Start a segmentation in a thread worker; returns the worker, or None if refused.

        Refusals (no image, unknown structure, bad box, bad device) are shown as notifications
        before anything starts.
        """
        if self.is_running or self._weights_worker is not None:
            show_info("CDPDNet is busy: wait for the current job or cancel it")
            return None
        try:
            image = self.image_layer()
            structures = self.resolve_request()
            settings = self.settings(image, len(structures))
            resolve_device(settings.device)
            merge = self.merge_combo.currentText()
            merge_into = None if merge in ("", _NEW_LAYER) else merge
        except CdpdnetError as exc:
            self._refuse(exc)
            return None
        ctx = _RunContext(
            image_layer=image.name,
            geometry=image.metadata["geometry"],
            source_path=image.metadata.get("source_path"),
            request=self.request_text(),
            structures=structures,
            preset=settings.preset,
            merge_into=merge_into,
        )
        array = np.asarray(image.data)
        return self._start_worker(
            _segment_job,
            (self.segmenter, array, ctx.geometry, structures, settings),
            lambda out: self._on_result(out, ctx),
            f"Running: {', '.join(s.name for s in structures)}...",
        )

    def _start_worker(
        self, job: Callable[..., Any], args: tuple[Any, ...], on_result: Callable[[Any], None], status: str
    ) -> Any:
        """Run ``job(*args, progress, cancelled)`` in a thread worker, the dock busy until it ends.

        Results, errors and the end reach the dock only while it is alive (closing it detaches).
        """
        self._cancel.clear()
        worker = create_worker(
            job, *args, self._emit_progress, self._cancel.is_set, _start_thread=False, _ignore_errors=True
        )
        alive = self._alive
        worker.returned.connect(lambda out: alive["yes"] and on_result(out))
        worker.errored.connect(lambda exc: alive["yes"] and self._on_error(exc))
        worker.finished.connect(lambda: alive["yes"] and self._on_finished())
        self._worker = worker
        self._last_status = "error"
        self._started = time.perf_counter()
        self._set_busy(True)
        self.status_label.setText(status)
        self.progress_bar.setRange(0, 0)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running segmentation to stop (within one window); nothing will be added."""
        if not self.is_running:
            return
        self._cancel.set()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("Cancelling...")

    def _refuse(self, exc: Exception) -> None:
        self.status_label.setText(f"Not started: {exc}")
        show_error(str(exc))

    def _set_busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy and self.is_running)
        self.download_button.setEnabled(not busy)
        self.folder_button.setEnabled(not busy)
        self.example_box_button.setEnabled(not busy)
        self.example_scribble_button.setEnabled(not busy)

    def _emit_progress(self, event: ProgressEvent) -> None:
        """Called in the worker thread: hand the event to the GUI thread."""
        self.progressed.emit(event)

    def _on_progress(self, event: ProgressEvent) -> None:
        if event.stage == "inference" and event.total > 0:
            self.progress_bar.setRange(0, event.total)
            self.progress_bar.setValue(event.done)
        elif event.total > 0 and event.done >= event.total:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
        else:
            self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat(f"{event.stage}: %v/%m" if event.stage == "inference" else event.stage)
        eta = "" if event.eta_s is None else f" - about {_duration(event.eta_s)} left"
        self.eta_label.setText(f"{event.message}{eta}")

    def _on_result(self, out: _RunOutput, ctx: _RunContext) -> None:
        output = out.output
        try:
            layer, added = self._place_result(output, ctx)
        except CdpdnetError as exc:
            show_error(str(exc))
            self._last_status = "error"
            return
        if out.probabilities is not None:
            out.probabilities.layer_name = layer.name
            self.probability_cache[ctx.image_layer] = out.probabilities
        else:  # too large to keep: an older cache would point at another run's structures
            self.probability_cache.pop(ctx.image_layer, None)
        found = output.result.structures
        summary = ", ".join(
            f"{s.name} {found.get(s.index, 0):,} voxels" for s in ctx.structures
        )
        where = f"merged {added:,} voxels into {layer.name!r}" if ctx.merge_into else f"added {layer.name!r}"
        extra = "" if out.probabilities is not None else (
            " Probabilities were too large to keep: pick by click needs a smaller request or image."
        )
        self.status_label.setText(f"Done in {_duration(output.seconds)}: {where}. {summary}.{extra}")
        for note in output.notes:
            show_warning(note)
        self._last_status = "merged" if ctx.merge_into else "done"
        self._refresh_merge_targets()

    def _place_result(self, output: SegmentationOutput, ctx: _RunContext) -> tuple[Any, int]:
        """Add a new layer, or merge into the chosen one (only if still there and on the grid)."""
        target = self._layer(ctx.merge_into) if ctx.merge_into else None
        if ctx.merge_into and (target is None or tuple(target.data.shape) != ctx.geometry.shape):
            show_warning(f"{ctx.merge_into!r} is gone or not on this image's grid: adding a new layer")
            target = None
        if target is not None:
            tracker = self._trackers.get(id(target))
            protected = tracker.protected() if tracker is not None else False
            data = target.data
            added = _layers.merge_labels_into(data, output.labels, protected=protected)
            info = target.metadata.setdefault("cdpdnet", {})
            info["structures"] = list(
                dict.fromkeys([*info.get("structures", []), *(s.key for s in ctx.structures)])
            )
            target.refresh()
            return target, added
        run = _layers.next_run_number((lyr.metadata for lyr in self.viewer.layers), ctx.image_layer)
        data, kwargs, _ = _layers.labels_layer_data(
            output.labels,
            ctx.geometry,
            ctx.structures,
            image_layer=ctx.image_layer,
            source_path=ctx.source_path,
            request=ctx.request,
            preset=ctx.preset,
            run=run,
        )
        layer = self.viewer.add_labels(data, **kwargs)
        self._trackers[id(layer)] = _layers.EditTracker(layer)
        found = [s.index for s in ctx.structures if output.result.structures.get(s.index)]
        if found:
            layer.selected_label = found[0]  # ready to correct the first structure
        return layer, int(np.count_nonzero(data))

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._last_status = "cancelled"
            self.status_label.setText("Cancelled: no layer was added.")
            return
        self._last_status = "error"
        if isinstance(exc, CdpdnetError):
            message = str(exc)
        else:  # a bug: keep the traceback in the log, give the user the gist
            logger.error("segmentation failed", exc_info=(type(exc), exc, exc.__traceback__))
            message = f"CDPDNet failed unexpectedly ({type(exc).__name__}: {exc}); see the log"
        if isinstance(exc, WeightsError) and not self.segmenter.is_loaded():
            self.status_label.setText(
                "Failed: the model weights are missing or damaged. Press 'Download weights' "
                "(about 1 GB, third-party terms) or 'Use local folder...'; the notification lists "
                "each file."
            )
        else:
            self.status_label.setText(f"Failed: {message}")
        show_error(message)

    def _on_finished(self) -> None:
        self._worker = None
        self._set_busy(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if self._last_status in ("done", "merged") else 0)
        self.progress_bar.setFormat("%p%")
        self.eta_label.setText("")
        self.run_finished.emit(self._last_status)

    # ------------------------------------------------------------------ point and click
    def _set_click_tool(self, on: bool, callback: Any, other_button: Any) -> None:
        """Install or remove a click tool on the viewer; only one click tool is on at a time."""
        from napari.layers import Labels

        callbacks = self.viewer.mouse_drag_callbacks
        active = self.viewer.layers.selection.active
        if on and isinstance(active, Labels) and active.mode != "pan_zoom":
            active.mode = "pan_zoom"  # a tool's click must not also paint
        if on:
            other_button.setChecked(False)
        if on and callback not in callbacks:
            callbacks.append(callback)
        elif not on and callback in callbacks:
            callbacks.remove(callback)

    def _is_left_press(self, event: Any) -> bool:
        """A left-button press on a live widget (drags and other buttons are ignored)."""
        return (self._alive["yes"] and getattr(event, "type", "mouse_press") == "mouse_press"
                and getattr(event, "button", 1) in (1, None))

    def _set_pick_mode(self, on: bool) -> None:
        self._set_click_tool(on, self._on_mouse, self.example_click_button)

    def _on_mouse(self, viewer: Any, event: Any) -> None:
        if self._is_left_press(event):
            self.pick_at(event.position)

    def pick_at(self, world_position: Any) -> int | None:
        """Add (or select) the structure under a world position from the cached probabilities.

        Returns the structure index added or selected, or None (with a message) when there is
        nothing to pick there.
        """
        try:
            image = self.image_layer()
        except CdpdnetError as exc:
            show_info(str(exc))
            return None
        cache = self.probability_cache.get(image.name)
        if cache is None:
            show_info("Run a segmentation on this image first: clicks use its probabilities")
            return None
        target = self._layer(cache.layer_name)
        if target is None:
            show_info(f"The result layer {cache.layer_name!r} is gone; run again to pick")
            return None
        idx = np.asarray(image.world_to_data(np.asarray(world_position, dtype=float)), dtype=float)[-3:]
        zyx = tuple(int(round(i)) for i in idx)
        picked = _layers.pick_component(cache, zyx)
        if picked is None:
            self.status_label.setText("Pick: no requested structure above 0.5 probability there.")
            return None
        index, region = picked
        name = STRUCTURES[index - 1].name
        if int(target.data[zyx]) == index:
            target.selected_label = index
            self.status_label.setText(f"Pick: selected {name} (already in {target.name!r}).")
            return index
        data = np.asarray(target.data)
        write = region & ((data == 0) | (data == index))
        coords = np.nonzero(write)
        if coords[0].size:
            target.data_setitem(coords, index)  # an undoable edit, like a brush stroke
        target.selected_label = index
        info = target.metadata.setdefault("cdpdnet", {})
        if isinstance(info, dict):
            info["structures"] = list(dict.fromkeys([*info.get("structures", []), STRUCTURES[index - 1].key]))
        self.status_label.setText(f"Pick: added {name} ({coords[0].size:,} voxels) to {target.name!r}.")
        return index

    # ------------------------------------------------------------------ segment by example
    def _set_example_click_mode(self, on: bool) -> None:
        self._set_click_tool(on, self._on_example_mouse, self.pick_button)

    def _on_example_mouse(self, viewer: Any, event: Any) -> None:
        if self._is_left_press(event):
            self.segment_by_example_at(event.position)

    def _choose_mapper(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "ROI prompt mapper weights", "", "Mapper weights (*.pt *.pth);;All files (*)"
        )
        if path:
            self.mapper_edit.setText(path)

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

    def _index_points(self, image: Any, layer: Any, vertices: np.ndarray) -> np.ndarray:
        """``[z, y, x]`` voxel coordinates on ``image`` of a layer's data vertices.

        A 2-D layer's missing leading axes take the slice the viewer shows.
        """
        world = np.array([layer.data_to_world(v) for v in np.asarray(vertices, float)], dtype=float)
        if world.shape[1] < image.ndim:
            here = np.asarray(self.viewer.dims.point, dtype=float)[-image.ndim:]
            pad = np.tile(here[: image.ndim - world.shape[1]], (len(world), 1))
            world = np.hstack([pad, world])
        return np.array([np.asarray(image.world_to_data(w), dtype=float)[-3:] for w in world])

    def example_roi(self, image: Any, kind: str) -> Any:
        """The ROI of the last rectangle (``kind="box"``) or scribble (``"scribble"``).

        Raises:
            InputError: nothing of that kind is drawn, or it misses the image.
        """
        from napari.layers import Labels, Shapes

        from napari_cdpdnet.example.ranking import ROI

        shape = image.metadata["geometry"].shape
        active = self.viewer.layers.selection.active
        ordered = [lyr for lyr in self.viewer.layers if lyr is not active]
        if active is not None:
            ordered.append(active)  # the active layer wins
        if kind == "scribble":
            for layer in reversed(ordered):
                if (isinstance(layer, Labels) and not _layers.is_cdpdnet_layer(layer.metadata)
                        and tuple(layer.data.shape) == tuple(shape) and np.any(layer.data)):
                    return ROI.from_mask(np.asarray(layer.data)).check(shape)
                if isinstance(layer, Shapes):
                    lines = [i for i, t in enumerate(layer.shape_type) if t in ("path", "line")]
                    if lines:
                        pts = self._index_points(image, layer, layer.data[lines[-1]])
                        return _layers.example_scribble_roi([pts], shape)
            raise InputError(
                "no scribble: paint the structure on a Labels layer of the image's size (not a "
                "CDPDNet result), or draw a path or line on a Shapes layer"
            )
        for layer in reversed(ordered):
            if isinstance(layer, Shapes):
                rects = [i for i, t in enumerate(layer.shape_type) if t == "rectangle"]
                if rects:
                    pts = self._index_points(image, layer, layer.data[rects[-1]])
                    return _layers.example_box_roi(pts, shape)
        raise InputError("no rectangle: draw one around the structure with the rectangle tool of a Shapes layer")

    def segment_by_example_at(self, world_position: Any) -> Any:
        """Segment by example from a click at a world position; returns the worker or None."""
        from napari_cdpdnet.example.ranking import ROI

        try:
            image = self.image_layer()
            idx = np.asarray(image.world_to_data(np.asarray(world_position, dtype=float)), dtype=float)[-3:]
            roi = ROI.click(idx).check(image.metadata["geometry"].shape)
        except CdpdnetError as exc:
            self._refuse(exc)
            return None
        return self.segment_by_example(roi, image)

    def segment_by_example_from(self, kind: str) -> Any:
        """Segment by example from the last rectangle or scribble; returns the worker or None."""
        try:
            image = self.image_layer()
            roi = self.example_roi(image, kind)
        except CdpdnetError as exc:
            self._refuse(exc)
            return None
        return self.segment_by_example(roi, image)

    def segment_by_example(self, roi: Any, image: Any = None) -> Any:
        """Rank the 32 structures for ``roi`` and segment the best into a new layer, in a worker.

        The core does the work (:func:`napari_cdpdnet.example.run.segment_by_example`); the
        mapper file, when given, is loaded in the worker too. Returns the worker, or None when
        refused (with a notification).
        """
        if self.is_running or self._weights_worker is not None:
            show_info("CDPDNet is busy: wait for the current job or cancel it")
            return None
        try:
            image = image if image is not None else self.image_layer()
            geometry: Geometry = image.metadata["geometry"]
            roi.check(geometry.shape)
            mapper = self.mapper_path()
            settings = SegmentationSettings(
                preset=self.preset_combo.currentText(), device=self.device_combo.currentText()
            )
            resolve_device(settings.device)
        except CdpdnetError as exc:
            self._refuse(exc)
            return None
        ctx = _RunContext(
            image_layer=image.name,
            geometry=geometry,
            source_path=image.metadata.get("source_path"),
            request=f"by example: {roi.describe()}",
            structures=[],
            preset=settings.preset,
            merge_into=None,
        )
        how = "learned mapper" if mapper is not None else "probability dominance"
        self.example_label.setText("")
        return self._start_worker(
            _example_job,
            (self.segmenter, np.asarray(image.data), geometry, roi, settings, mapper),
            lambda res: self._on_example_result(res, ctx),
            f"Segment by example ({how}): {roi.describe()}...",
        )

    def _on_example_result(self, res: Any, ctx: _RunContext) -> None:
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
            show_warning(note)
        if not res.mask.any():
            self.status_label.setText(f"Segment by example: no {res.structure.name} found; no layer added.")
            self._last_status = "done"
            return
        structure = res.structure
        run = _layers.next_run_number((lyr.metadata for lyr in self.viewer.layers), ctx.image_layer)
        try:
            data, kwargs, _ = _layers.labels_layer_data(
                _layers.example_labels(res.mask, structure),
                ctx.geometry,
                [structure],
                image_layer=ctx.image_layer,
                source_path=ctx.source_path,
                request=ctx.request,
                preset=ctx.preset,
                run=run,
            )
        except CdpdnetError as exc:
            show_error(str(exc))
            self._last_status = "error"
            return
        kwargs["metadata"]["cdpdnet"]["example"] = {
            "method": res.ranking.method,
            "top": [(c.structure.key, round(float(c.confidence), 4)) for c in res.ranking.top(3)],
            "prompt": res.prompt,
            "touched": bool(res.touched),
        }
        layer = self.viewer.add_labels(data, **kwargs)
        self._trackers[id(layer)] = _layers.EditTracker(layer)
        layer.selected_label = structure.index
        voxels = int(np.count_nonzero(data))
        self.status_label.setText(
            f"Done in {_duration(res.seconds)}: added {layer.name!r}, {structure.name} {voxels:,} voxels."
        )
        self._last_status = "done"
        self._refresh_merge_targets()

    # ------------------------------------------------------------------ weights
    def refresh_weights_status(self) -> None:
        """Check (in a worker: it may hash large files) whether the weights are usable."""
        self._weights_check += 1
        generation = self._weights_check
        if self.segmenter.is_loaded():
            self.weights_label.setText("Weights: model loaded.")
            return
        self.weights_label.setText("Weights: checking...")
        worker = create_worker(self.segmenter.weights, _start_thread=False, _ignore_errors=True)
        alive = self._alive

        def current() -> bool:
            return alive["yes"] and generation == self._weights_check

        def ok(files: Any) -> None:
            if not current():
                return
            where = ", ".join(sorted(set(files.sources.values())))
            self.weights_label.setText(f"Weights: ready ({where}).")
            self.weights_label.setToolTip(f"{files.checkpoint}\n{files.dino_weights}")

        def failed(exc: BaseException) -> None:
            if not current():
                return
            self.weights_label.setText(
                "Weights: not found. Download them (about 1 GB, third-party terms) or choose a "
                "local folder holding cdpdnet.pth and DINOv2-base."
            )
            self.weights_label.setToolTip(str(exc))

        worker.returned.connect(ok)
        worker.errored.connect(failed)
        worker.start()

    def use_weights_folder(self, folder: str | Path) -> None:
        """Use the weights in ``folder`` (flat, or the ``cdpdnet weights download`` layout)."""
        self.segmenter = Segmenter(checkpoint=folder, dino=folder, allow_download=False)
        self._injected = False
        self.probability_cache.clear()
        self.refresh_weights_status()

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder with CDPDNet weights")
        if folder:
            self.use_weights_folder(folder)

    def download_weights(self) -> Any:
        """Download the checkpoint and DINOv2-base into the cache, with progress; returns the worker."""
        if self.is_running or self._weights_worker is not None:
            return None
        from napari_cdpdnet.weights import download_all

        worker = create_worker(
            download_all,
            None,
            lambda done, total, name: self.download_progressed.emit(done, total, name),
            components=["cdpdnet", "dinov2-base"],
            _start_thread=False,
            _ignore_errors=True,
        )

        def ok(_checks: Any) -> None:
            self.segmenter = Segmenter(allow_download=False)
            self.status_label.setText("Weights downloaded.")

        def failed(exc: BaseException) -> None:
            message = str(exc) if isinstance(exc, CdpdnetError) else f"download failed: {exc}"
            self.status_label.setText("Download failed (see the notification).")
            show_error(message)

        def done() -> None:
            self._weights_worker = None
            self._set_busy(False)
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setFormat("%p%")
            self.refresh_weights_status()

        alive = self._alive
        worker.returned.connect(lambda r: alive["yes"] and ok(r))
        worker.errored.connect(lambda e: alive["yes"] and failed(e))
        worker.finished.connect(lambda: alive["yes"] and done())
        self._weights_worker = worker
        self._set_busy(True)
        self.status_label.setText("Downloading weights...")
        worker.start()
        return worker

    def _on_download_progress(self, done: int, total: int | None, name: str) -> None:
        if total:
            self.progress_bar.setRange(0, 1000)
            self.progress_bar.setValue(int(1000 * done / total))
            self.progress_bar.setFormat(f"{name}: %p%")
        else:
            self.progress_bar.setRange(0, 0)
        self.eta_label.setText(f"{name}: {done / 1e6:,.0f} MB" + (f" of {total / 1e6:,.0f} MB" if total else ""))


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


def _example_job(
    segmenter: Segmenter,
    array: np.ndarray,
    geometry: Geometry,
    roi: Any,
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


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _brush(s: Structure) -> Any:
    from qtpy.QtGui import QBrush, QColor

    return QBrush(QColor(*s.color))
