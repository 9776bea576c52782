"""The "Weights" box of the segmentation dock: are the weights usable, download them, or use a folder.

The dock never downloads on its own: the Download button does, in a worker, with progress on
the dock's shared progress bar. CLIP ViT-B/32 (optional: it matches wording the lexicon does not
know) has its own line and button here, and the Structures box offers the same download when a
phrase first needs it; it is checksummed and cached like the others. Checking the weights may hash large files, so it runs in a
worker too; only the latest check may update the line (an older one finishing late is ignored).
Where weights are looked for, and their terms, are the core's business
(:mod:`napari_cdpdnet.weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_cdpdnet._gui import notify
from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.inference.segmenter import Segmenter
from napari_cdpdnet.weights.registry import REGISTRY, spec

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet._widget import SegmentationWidget

__all__ = ["WeightsPanel"]

#: What a download fetches: every component a segmentation needs (the registry's non-optional
#: ones: the CDPDNet checkpoint and the DINOv2 backbone).
_COMPONENTS = [s.name for s in REGISTRY if not s.optional]
#: The optional text matcher, fetched by its own button.
_CLIP = "clip-vit-b-32"


class WeightsPanel(QGroupBox):
    """Weights status line, "Download weights" and "Use local folder..."."""

    def __init__(self, dock: SegmentationWidget) -> None:
        super().__init__("Weights")
        self._dock = dock
        self._check = 0  # generation of the latest weights check
        layout = QVBoxLayout(self)
        self.weights_label = QLabel("Weights: checking...")
        self.weights_label.setWordWrap(True)
        layout.addWidget(self.weights_label)
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
        layout.addLayout(row)
        clip_row = QHBoxLayout()
        self.clip_label = QLabel("CLIP text matching (optional): checking...")
        self.clip_label.setWordWrap(True)
        self.clip_label.setStyleSheet("color: gray; font-size: small;")
        self.clip_button = QPushButton("Download CLIP")
        self.clip_button.setToolTip(
            f"CLIP ViT-B/32 ({spec(_CLIP).approx_size}, {spec(_CLIP).terms}) matches wording the "
            "lexicon does not know to one of the 32 structures; it never adds a structure."
        )
        clip_row.addWidget(self.clip_label, 1)
        clip_row.addWidget(self.clip_button)
        layout.addLayout(clip_row)
        self.download_button.clicked.connect(self.download)
        self.folder_button.clicked.connect(self._choose_folder)
        self.clip_button.clicked.connect(lambda: self.download_clip())

    def set_busy(self, busy: bool) -> None:
        self.download_button.setEnabled(not busy)
        self.folder_button.setEnabled(not busy)
        self.clip_button.setEnabled(not busy)

    def refresh_clip_status(self) -> None:
        """Is CLIP's file here (a quick look, in a worker: it stats a few files)?"""
        from napari_cdpdnet.inference.clip_choice import clip_weights_present

        def shown(present: bool) -> None:
            self.clip_label.setText(
                "CLIP text matching (optional): ready." if present else
                f"CLIP text matching (optional, {spec(_CLIP).approx_size}): not downloaded; names, "
                "synonyms, typos and other languages work without it."
            )
            self.clip_button.setVisible(not present)

        self._dock.jobs.start(clip_weights_present, on_result=shown, exclusive=False)

    def refresh_status(self) -> None:
        """Check (in a worker: it may hash large files) whether the weights are usable."""
        self._check += 1
        generation = self._check
        segmenter = self._dock.segmenter
        self.refresh_clip_status()
        if segmenter.is_loaded():
            self.weights_label.setText("Weights: model loaded.")
            return
        self.weights_label.setText("Weights: checking...")

        def ok(files: Any) -> None:
            if generation != self._check:
                return
            where = ", ".join(sorted(set(files.sources.values())))
            self.weights_label.setText(f"Weights: ready ({where}).")
            self.weights_label.setToolTip(f"{files.checkpoint}\n{files.dino_weights}")

        def failed(exc: BaseException) -> None:
            if generation != self._check:
                return
            self.weights_label.setText(
                "Weights: not found. Download them (about 1 GB, third-party terms) or choose a "
                "local folder holding cdpdnet.pth and DINOv2-base."
            )
            self.weights_label.setToolTip(str(exc))

        self._dock.jobs.start(segmenter.weights, on_result=ok, on_error=failed, exclusive=False)

    def use_folder(self, folder: str | Path) -> None:
        """Use the weights in ``folder`` (flat, or the ``cdpdnet weights download`` layout)."""
        self._dock.segmenter = Segmenter(checkpoint=folder, dino=folder, allow_download=False)
        self._dock.probability_cache.clear()
        self.refresh_status()

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder with CDPDNet weights")
        if folder:
            self.use_folder(folder)

    def download(self) -> Any:
        """Download the checkpoint and DINOv2-base into the cache, with progress; returns the
        worker, or None when the dock is busy."""

        def ok() -> None:
            self._dock.segmenter = Segmenter(allow_download=False)

        return self._download(_COMPONENTS, "weights", ok)

    def download_clip(self, on_success: Callable[[], None] | None = None) -> Any:
        """Download CLIP ViT-B/32 into the cache (checksummed, with progress), then call
        ``on_success``; returns the worker, or None when the dock is busy."""

        def ok() -> None:
            self._dock.segmenter.reset_text_scorer()
            if on_success is not None:
                on_success()

        return self._download([_CLIP], "CLIP weights", ok)

    def _download(self, components: list[str], what: str, on_success: Callable[[], None]) -> Any:
        dock = self._dock
        if dock.jobs.refuse_if_busy():
            return None
        from napari_cdpdnet.weights import download_all

        def ok(_checks: Any) -> None:
            on_success()
            dock.status_label.setText(f"{what[0].upper()}{what[1:]} downloaded.")

        def failed(exc: BaseException) -> None:
            message = str(exc) if isinstance(exc, CdpdnetError) else f"download failed: {exc}"
            dock.status_label.setText("Download failed (see the notification).")
            notify.show_error(message)

        def finished() -> None:
            dock.run_panel.show_download_finished()
            self.refresh_status()

        dock.status_label.setText(f"Downloading {what}...")
        return dock.jobs.start(
            download_all,
            progress=dock.download_progressed.emit,
            components=components,
            on_result=ok,
            on_error=failed,
            on_finished=finished,
        )
