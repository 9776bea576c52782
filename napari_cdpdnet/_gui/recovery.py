"""Autosave of edited result layers, the offer to restore them, and a question before closing.

Corrections a person paints on a result layer exist only in napari's memory until exported. This
module keeps a copy on disk (:class:`napari_cdpdnet.export.recovery.RecoveryStore`, in
``<cache>/recovery`` beside the weights cache; ``$CDPDNET_CACHE_DIR`` moves both,
``$CDPDNET_RECOVERY_DIR`` only this folder):

* **Autosave, throttled.** An edit (brush, fill, polygon, undo, data replaced) marks the layer;
  ``interval_ms`` after the first unsaved edit its label map, edit mask and label table are copied
  on the GUI thread and written by one background thread (atomically, see the store), so painting
  never waits on the disk and at most one save per layer runs at a time.
* **Restore.** When an image is added whose content matches a CT with saved, unexported edits,
  :attr:`Recovery.ask_restore` asks (Restore / Discard / Not now) and restores the layers voxel for
  voxel, with their edit marks, so a later merge still spares the edited voxels.
* **Closing.** Closing the window (its close button, or napari's Close Window / Exit) with edits
  not exported since they were made saves them and asks through :attr:`Recovery.confirm_close`.
  Programmatic closes (scripts, tests) and off-screen sessions are never asked: nothing blocks a
  headless run, and the autosave is flushed either way.

Exports report through :func:`note_export`, which the structure table calls. The dialogs are
attributes, so tests and scripts answer them.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import QApplication, QMessageBox

from napari_cdpdnet._gui import notify
from napari_cdpdnet.export.recovery import (
    RecoveryEntry,
    RecoveryStore,
    ct_fingerprint,
    new_entry_id,
)
from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Image, Labels

    from napari_cdpdnet._gui.layers import EditTracker

__all__ = ["Recovery", "default_folder", "note_export", "AUTOSAVE_MS", "ENV_RECOVERY_DIR"]

logger = logging.getLogger(__name__)

#: Quiet time after the first unsaved edit before the copy is written (at most one save per
#: layer per interval).
AUTOSAVE_MS = 5000

#: id(layer) -> the Recovery watching it (so an export anywhere can tell it).
_WATCHERS: weakref.WeakValueDictionary[int, Recovery] = weakref.WeakValueDictionary()


ENV_RECOVERY_DIR = "CDPDNET_RECOVERY_DIR"


def default_folder() -> Path:
    """``$CDPDNET_RECOVERY_DIR``, else ``<cache>/recovery`` beside the weights cache."""
    import os

    from napari_cdpdnet.weights.store import cache_dir

    env = os.environ.get(ENV_RECOVERY_DIR)
    return Path(env).expanduser() if env else cache_dir() / "recovery"


def note_export(layer: Any, paths: list[Path]) -> None:
    """An export of ``layer`` succeeded: its edits so far are safe (called by the structure table)."""
    layer.metadata["exported"] = {"paths": [str(p) for p in paths], "time": time.time()}
    recovery = _WATCHERS.get(id(layer))
    if recovery is not None:
        recovery.exported(layer)


@dataclass
class _Watched:
    layer: Any
    tracker: EditTracker | None
    entry_id: str
    image: Any = None  # the image layer (its array and geometry give the CT key)
    key: str | None = None
    last_edit: float = 0.0
    last_saved: float = 0.0
    saving: Future | None = None
    entry: RecoveryEntry | None = None
    connections: list[tuple[Any, Callable]] = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return self.last_edit > self.last_saved

    @property
    def unexported(self) -> bool:
        exported = (self.layer.metadata.get("exported") or {}).get("time", 0.0)
        return self.last_edit > exported


def _ask_restore(parent: Any, entries: list[RecoveryEntry], image_name: str) -> str:
    box = QMessageBox(parent)
    box.setWindowTitle("Restore unsaved edits?")
    box.setIcon(QMessageBox.Icon.Question)
    listing = "\n".join(f"  • {e.describe()}" for e in entries)
    box.setText(f"Edits made on this CT ({image_name}) were kept but never exported:")
    box.setInformativeText(f"{listing}\n\nRestore them as layers?")
    restore = box.addButton("Restore", QMessageBox.ButtonRole.AcceptRole)
    discard = box.addButton("Discard", QMessageBox.ButtonRole.DestructiveRole)
    box.addButton("Not now", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(restore)
    box.exec_() if hasattr(box, "exec_") else box.exec()
    clicked = box.clickedButton()
    return "restore" if clicked is restore else "discard" if clicked is discard else "later"


def _confirm_close(parent: Any, names: list[str]) -> bool:
    listing = "\n".join(f"  • {n}" for n in names)
    answer = QMessageBox.question(
        parent, "Close with unexported edits?",
        f"These layers have edits that were not exported:\n{listing}\n\nA copy is kept in the recovery "
        "folder and offered again when you open this CT. Close anyway?",
        QMessageBox.StandardButton.Close | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Cancel,
    )
    return answer == QMessageBox.StandardButton.Close


class _Messenger(QObject):
    """Carries a background save's failure to the GUI thread (Qt queues cross-thread signals)."""

    failed = Signal(str)


class _CloseFilter(QObject):
    """Sees the main window's close event before napari does (the window's close button)."""

    def __init__(self, recovery: Recovery, parent: QObject) -> None:
        super().__init__(parent)
        self._recovery = weakref.ref(recovery)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        recovery = self._recovery()
        if (recovery is not None and event.type() == QEvent.Type.Close
                and not recovery.may_close(asked_by_user=event.spontaneous())):
            event.ignore()
            return True
        return False


class Recovery:
    """Autosave and restore for one viewer's result layers (owned by the segmentation dock).

    Args:
        viewer: the napari viewer.
        trackers: the dock's ``id(layer) -> EditTracker`` map (restored layers are added to it).
        store: where copies go (default: :func:`default_folder`).
        interval_ms: throttle of the autosave.
    """

    def __init__(self, viewer: Any, trackers: dict[int, Any], *, store: RecoveryStore | None = None,
                 interval_ms: int = AUTOSAVE_MS, parent: QObject | None = None) -> None:
        self.viewer = viewer
        self.trackers = trackers
        self.store = store if store is not None else RecoveryStore(default_folder())
        self.interval_ms = interval_ms
        #: ``ask_restore(entries, image_name) -> "restore" | "discard" | "later"``; off screen
        #: (scripts, headless runs) the default answers "later" and says so in a notification.
        self.ask_restore: Callable[[list[RecoveryEntry], str], str] = self._ask_restore
        #: ``confirm_close(layer names) -> bool`` (True: close).
        self.confirm_close: Callable[[list[str]], bool] = lambda names: _confirm_close(self._window(), names)
        #: ``interactive() -> bool``: may a dialog be shown (a visible window on a real screen)?
        self.interactive: Callable[[], bool] = self._on_screen
        self._watched: dict[int, _Watched] = {}
        self._offered: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdpdnet-autosave")
        self._timer = QTimer(parent)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.save_now)
        self._closed = False
        self._messenger = _Messenger()
        self._messenger.failed.connect(notify.show_warning)
        with_errors(self.store.prune)
        viewer.layers.events.inserted.connect(self._layer_inserted)
        viewer.layers.events.removed.connect(self._layer_removed)
        self._guard_window()
        QTimer.singleShot(0, self._offer_for_open_images)

    # ------------------------------------------------------------------ window
    def _window(self) -> Any:
        """napari's main window (unwrapped: plugins get the viewer through a public-only proxy,
        and Qt needs the real object to parent an event filter)."""
        viewer = getattr(self.viewer, "__wrapped__", self.viewer)  # wrapt's public API
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        return getattr(window, "__wrapped__", window)

    def _ask_restore(self, entries: list[RecoveryEntry], image_name: str) -> str:
        if not self.interactive():
            notify.show_info(
                f"{len(entries)} layer(s) of unexported edits on {image_name} are kept in "
                f"{self.store.folder}; open the CT in a napari window to restore them."
            )
            return "later"
        return _ask_restore(self._window(), entries, image_name)

    def _on_screen(self) -> bool:
        window = self._window()
        platform = QApplication.platformName() if QApplication.instance() else ""
        return window is not None and window.isVisible() and platform not in ("offscreen", "minimal")

    def _guard_window(self) -> None:
        window = self._window()
        if window is None:
            return
        self._filter = _CloseFilter(self, window)
        window.installEventFilter(self._filter)
        original = window.close
        me = weakref.ref(self)

        def close(*args: Any, **kwargs: Any) -> Any:  # napari's Close Window / Exit pass confirm_need
            confirm_need = kwargs.get("confirm_need", args[1] if len(args) > 1 else False)
            recovery = me()
            if confirm_need and recovery is not None and not recovery.may_close(asked_by_user=True):
                return None
            return original(*args, **kwargs)

        try:
            window.close = close  # napari's own confirmation runs after ours
        except (AttributeError, TypeError):  # pragma: no cover - a napari whose window refuses it
            logger.debug("cannot guard the window's close()", exc_info=True)

    def may_close(self, *, asked_by_user: bool) -> bool:
        """Save every pending edit; when a person closes the window with unexported edits on
        screen, ask. Returns False to keep the window open."""
        if self._closed:  # the dock is gone; what it held was saved when it closed
            return True
        self.flush()
        names = self.unexported()
        if not names or not asked_by_user or not self.interactive():
            return True
        return bool(self.confirm_close(names))

    # ------------------------------------------------------------------ watching
    def watch(self, layer: Labels, tracker: EditTracker | None, *, image: Image | None = None,
              entry_id: str | None = None, key: str | None = None) -> None:
        """Autosave ``layer`` whenever a person edits it."""
        if id(layer) in self._watched:
            return
        recovery_meta = layer.metadata.setdefault("recovery", {})
        entry_id = entry_id or recovery_meta.get("id") or new_entry_id()
        recovery_meta["id"] = entry_id
        watched = _Watched(layer, tracker, entry_id, image=image or self._image_of(layer), key=key)
        for name in ("paint", "data", "labels_update"):
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                def slot(event: Any = None, w: _Watched = watched) -> None:
                    self._edited(w)

                emitter.connect(slot)
                watched.connections.append((emitter, slot))
        self._watched[id(layer)] = watched
        _WATCHERS[id(layer)] = self

    def _image_of(self, layer: Any) -> Any:
        name = layer.metadata.get("image_layer")
        for lyr in self.viewer.layers:
            if lyr.name == name and "geometry" in lyr.metadata and lyr is not layer:
                return lyr
        return None

    def _edited(self, watched: _Watched) -> None:
        if self._closed:
            return
        watched.last_edit = time.time()
        self._start_timer(restart=False)

    def _start_timer(self, *, restart: bool = True) -> None:
        try:
            if restart or not self._timer.isActive():
                self._timer.start(self.interval_ms)
        except RuntimeError:  # the dock (and its timer) is gone: save now instead
            self.save_now()

    def _layer_removed(self, event: Any) -> None:
        """A removed layer is saved one last time (removing is not exporting) and let go."""
        layer = getattr(event, "value", None)
        watched = self._watched.get(id(layer)) if layer is not None else None
        if watched is None:
            return
        self._save(watched)
        for emitter, slot in watched.connections:
            emitter.disconnect(slot)
        del self._watched[id(layer)]

    def unexported(self) -> list[str]:
        """Names of watched layers with edits not exported since."""
        return [w.layer.name for w in self._watched.values() if w.unexported]

    def exported(self, layer: Any) -> None:
        """Called by :func:`note_export`: the copy on disk is marked exported (no longer offered)."""
        watched = self._watched.get(id(layer))
        if watched is None:
            return
        if watched.dirty:
            self._save(watched)
        if watched.saving is not None:
            watched.saving.add_done_callback(lambda f, w=watched: with_errors(self._mark_exported, w))
        else:
            with_errors(self._mark_exported, watched)

    def _mark_exported(self, watched: _Watched) -> None:
        if watched.entry is not None and not watched.unexported:
            self.store.mark_exported(watched.entry)

    # ------------------------------------------------------------------ saving
    def save_now(self) -> None:
        """Save every layer edited since its last copy (the throttle timer calls this)."""
        for watched in list(self._watched.values()):
            if watched.dirty:
                self._save(watched)

    def flush(self, timeout: float = 60.0) -> None:
        """Save what is pending and wait until it is on disk (before closing)."""
        with contextlib.suppress(RuntimeError):  # the timer may be gone with the dock
            self._timer.stop()
        self.save_now()
        for watched in list(self._watched.values()):
            if watched.saving is not None:
                with contextlib.suppress(Exception):  # a failure is reported by the job itself
                    watched.saving.result(timeout)

    def _save(self, watched: _Watched) -> None:
        """Copy the layer on this (GUI) thread; write it in the background thread."""
        if self._closed:
            return
        if watched.saving is not None and not watched.saving.done():
            self._start_timer()  # one save at a time; try again later
            return
        layer = watched.layer
        geometry = layer.metadata.get("geometry")
        if isinstance(geometry, dict):
            geometry = Geometry.from_dict(geometry)
        if not isinstance(geometry, Geometry):
            logger.info("%s has no CT geometry; not autosaved", layer.name)
            watched.last_saved = watched.last_edit
            return
        labels = np.array(layer.data, copy=True)
        tracker = watched.tracker
        edited = None
        if tracker is not None:
            edited = np.ones(labels.shape, bool) if tracker.everything else (
                None if tracker.mask is None else tracker.mask.copy())
        image = watched.image
        image_array = None if image is None else np.asarray(image.data)
        metadata = dict(layer.metadata)
        stamp = watched.last_edit
        watched.last_saved = stamp
        job = _SaveJob(self.store, watched, labels, edited, geometry, image_array, metadata, layer.name,
                       exported=not watched.unexported, failed=self._messenger.failed.emit)
        watched.saving = self._pool.submit(job.run)

    # ------------------------------------------------------------------ restoring
    def _layer_inserted(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and _is_image(layer) and "geometry" in layer.metadata:
            QTimer.singleShot(0, lambda: with_errors(self.offer, layer))

    def _offer_for_open_images(self) -> None:
        for layer in list(self.viewer.layers):
            if _is_image(layer) and "geometry" in layer.metadata:
                with_errors(self.offer, layer)

    def offer(self, image: Image) -> list[Labels]:
        """Offer the saved, unexported edits of ``image``'s CT; returns the layers restored."""
        if self._closed or image not in self.viewer.layers:
            return []
        key = ct_fingerprint(np.asarray(image.data), _geometry(image))
        watched_ids = {w.entry_id for w in self._watched.values()}
        entries = [e for e in self.store.entries(key) if e.entry_id not in watched_ids]
        if not entries or key in self._offered:
            return []
        self._offered.add(key)
        answer = self.ask_restore(entries, image.name)
        if answer == "discard":
            for entry in entries:
                self.store.discard(entry)
            notify.show_info(f"Discarded {len(entries)} saved edit(s) of {image.name}.")
            return []
        if answer != "restore":
            return []
        restored = [self.restore(entry, image) for entry in entries[::-1]]
        notify.show_info(f"Restored {len(restored)} layer(s) of unexported edits on {image.name}.")
        return restored

    def restore(self, entry: RecoveryEntry, image: Image) -> Labels:
        """Add ``entry`` as a Labels layer on ``image``, with its edit marks, and keep saving it."""
        from napari_cdpdnet._gui.layers import EditTracker, features_table, label_colormap

        saved = self.store.load(entry)
        geometry = _geometry(image)
        meta = dict(saved.meta.get("metadata") or {})
        meta.update(geometry=geometry, image_layer=image.name, recovery={"id": entry.entry_id})
        layer = self.viewer.add_labels(
            saved.labels, name=entry.layer_name, metadata=meta, features=features_table(),
            colormap=label_colormap(), opacity=0.5, **geometry.napari_layer_kwargs(),
        )
        tracker = EditTracker(layer)
        if saved.edited is not None:
            tracker.mask = saved.edited.copy()
        self.trackers[id(layer)] = tracker
        self.watch(layer, tracker, image=image, entry_id=entry.entry_id, key=entry.key)
        watched = self._watched[id(layer)]
        watched.entry = entry
        watched.last_edit = entry.saved_at  # restored edits are not exported yet
        watched.last_saved = entry.saved_at
        return layer

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Save what is pending, stop watching (the dock is closing)."""
        if self._closed:
            return
        with_errors(self.flush)
        self._closed = True
        self._pool.shutdown(wait=True)


class _SaveJob:
    """One background save: measure the table, fingerprint the CT once, write atomically."""

    def __init__(self, store: RecoveryStore, watched: _Watched, labels: np.ndarray, edited: np.ndarray | None,
                 geometry: Geometry, image: np.ndarray | None, metadata: dict[str, Any], name: str,
                 exported: bool, failed: Callable[[str], Any]) -> None:
        self.store, self.watched, self.labels, self.edited = store, watched, labels, edited
        self.geometry, self.image, self.metadata, self.name, self.exported = geometry, image, metadata, name, exported
        self.failed = failed

    def run(self) -> RecoveryEntry | None:
        from napari_cdpdnet.export import describe_labels

        try:
            watched = self.watched
            if watched.key is None:
                if self.image is None or self.image.shape != self.labels.shape:
                    logger.info("%s: its CT is not open; not autosaved", self.name)
                    return None
                watched.key = ct_fingerprint(self.image, self.geometry)
            image = self.image if self.image is not None and self.image.shape == self.labels.shape else None
            rows = describe_labels(
                self.labels, self.geometry, image, cdpdnet="cdpdnet" in self.metadata,
                reviewed=self.metadata.get("reviewed_labels") or (), edited=self.metadata.get("edited_labels") or (),
            )
            entry = self.store.save(
                watched.key, watched.entry_id, self.labels, self.geometry, layer_name=self.name,
                metadata=self.metadata, rows=rows, edited=self.edited, exported=self.exported,
            )
            watched.entry = entry
            return entry
        except Exception as exc:  # noqa: BLE001 - a failed autosave must be said, not crash a thread
            logger.error("autosave of %s failed", self.name, exc_info=exc)
            self.failed(f"Autosave of {self.name} failed ({type(exc).__name__}: {exc}); export it to keep "
                        "your edits.")
            return None


def _geometry(layer: Any) -> Geometry:
    g = layer.metadata["geometry"]
    return Geometry.from_dict(g) if isinstance(g, dict) else g


def _is_image(layer: Any) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image)


def with_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn``; a failure is logged and shown, never raised into Qt's event loop."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - recovery must never take the viewer down
        logger.error("recovery: %s failed", getattr(fn, "__name__", fn), exc_info=exc)
        notify.show_warning(f"Recovery: {type(exc).__name__}: {exc}")
        return None
