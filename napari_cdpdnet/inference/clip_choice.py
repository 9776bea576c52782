"""Which text scorer resolves typed names: ``--clip auto|on|off``, shared by the CLI, the dock and
the Python API (:class:`~napari_cdpdnet.inference.segmenter.Segmenter`, ``parse_request``).

* ``off``: the lexicon only (names, synonyms, abbreviations, typos, other languages).
* ``on``: CLIP must work. Its extra (open_clip) is imported and its weights are found, or
  downloaded where downloading is allowed, *before* anything is computed; otherwise a
  :class:`~napari_cdpdnet.errors.WeightsError` (exit 4) or an InputError naming the extra.
* ``auto`` (the default): CLIP when it can be had (weights on disk, or downloadable here, and
  open_clip installed); otherwise resolution stays lexical and a refusal carries ONE note saying
  why. Nothing is imported, loaded or downloaded until a phrase the lexicon does not cover needs
  CLIP, so names the lexicon knows never wait for CLIP nor fail because of it.

A scorer object may be given instead of a mode (tests, another text model). The scorer built
here is torch-free until its first score; the model itself is
:class:`napari_cdpdnet.model.text.ClipScorer`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from napari_cdpdnet.errors import InputError, WeightsError
from napari_cdpdnet.vocabulary.clip_stage import ClipUnavailable, TextScorer

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet.model.text import ClipScorer

__all__ = ["CLIP_MODES", "ClipChoice", "DeferredClipScorer", "clip_scorer_for", "clip_weights_present"]

logger = logging.getLogger(__name__)

CLIP_MODES = ("auto", "on", "off")
#: A mode ("auto", "on", "off"), a ready scorer, or None (= "off").
ClipChoice = Union[str, TextScorer, None]  # noqa: UP007 - a runtime alias, kept for Python 3.10

_COMPONENT = "clip-vit-b-32"
_STILL_WORKS = "names, synonyms, abbreviations, typos and other languages still work"


def clip_weights_present(path: str | os.PathLike[str] | None = None) -> bool:
    """Are CLIP's weights on this machine (a cheap look: no hashing, no network)?"""
    if path is not None:
        return Path(path).expanduser().exists()
    from napari_cdpdnet.weights import locate, spec

    component = spec(_COMPONENT)
    return all(locate(component, wf, quick=True) for wf in component.files if not wf.optional)


def clip_scorer_for(
    choice: ClipChoice = "auto",
    *,
    clip_weights: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    progress: Callable[[int, int | None, str], None] | None = None,
) -> TextScorer | None:
    """The scorer for ``choice``: None for "off", the object itself for a scorer.

    Args:
        clip_weights: an open_clip ViT-B/32 weights file or folder (else the weights registry).
        checkpoint: a CDPDNet checkpoint whose fixed organ embeddings CLIP is compared with
            (else one found on disk, else computed by CLIP from the official prompts).
        allow_download: may fetch CLIP's weights (0.6 GB) when they are nowhere on disk.

    Raises:
        InputError: an unknown mode, or "on" without the [clip] extra.
        WeightsError: "on" and the weights cannot be had (exit 4).
    """
    if choice is None or choice == "off":
        return None
    if not isinstance(choice, str):
        return choice
    if choice not in CLIP_MODES:
        raise InputError(f"--clip {choice!r}: choose one of {', '.join(CLIP_MODES)}")
    scorer = DeferredClipScorer(
        clip_weights=clip_weights,
        checkpoint=checkpoint,
        allow_download=allow_download,
        progress=progress,
        required=choice == "on",
    )
    if choice == "on":
        scorer.check()
    return scorer


class DeferredClipScorer:
    """A :class:`~napari_cdpdnet.model.text.ClipScorer` made on first use, and what to say when
    it cannot be (``required=False``: :class:`ClipUnavailable` with one note, remembered)."""

    def __init__(
        self,
        *,
        clip_weights: str | os.PathLike[str] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        allow_download: bool = True,
        progress: Callable[[int, int | None, str], None] | None = None,
        required: bool = False,
    ) -> None:
        self.clip_weights = clip_weights
        self.checkpoint = checkpoint
        self.allow_download = allow_download
        self.progress = progress
        self.required = required
        self._scorer: ClipScorer | None = None
        self._unavailable: ClipUnavailable | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._scorer is not None

    @property
    def organ_source(self) -> str:
        return self._scorer.organ_source if self._scorer is not None else ""

    def check(self) -> Path:
        """For "on": the extra imports and the weights are here (downloaded now if allowed).

        Raises:
            InputError: open_clip is not installed. WeightsError: no usable weights.
        """
        from napari_cdpdnet.extras import import_extra
        from napari_cdpdnet.weights import resolve_clip

        import_extra("open_clip", "clip", "matching typed names with CLIP (--clip on)")
        return resolve_clip(self.clip_weights, allow_download=self.allow_download, progress=self.progress)

    def similarities(self, text: str) -> Any:
        return self.load().similarities(text)

    def load(self) -> ClipScorer:
        """The loaded scorer (loads, or downloads if allowed, on the first call).

        Raises:
            ClipUnavailable: when not required and CLIP cannot be had (the same one each time).
        """
        with self._lock:
            if self._scorer is not None:
                return self._scorer
            if self._unavailable is not None:
                raise self._unavailable
            try:
                self._scorer = self._build()
            except (InputError, WeightsError) as exc:
                if self.required:
                    raise
                self._unavailable = self._why_unavailable(exc)
                logger.info("CLIP unavailable: %s", self._unavailable.note)
                raise self._unavailable from None
            return self._scorer

    def _build(self) -> ClipScorer:
        from napari_cdpdnet.weights import downloads_disabled, spec

        if importlib.util.find_spec("open_clip") is None:  # before any download, cheaply
            from napari_cdpdnet.extras import import_extra

            import_extra("open_clip", "clip", "matching typed names with CLIP")
        if not clip_weights_present(self.clip_weights):
            if not self.required and (not self.allow_download or downloads_disabled()):
                raise _Absent()
            component = spec(_COMPONENT)
            logger.warning(
                "fetching %s (%s) to match wording the lexicon does not know", component.title,
                component.approx_size,
            )
        from napari_cdpdnet.model.text import ClipScorer

        return ClipScorer(
            clip_weights=self.clip_weights,
            checkpoint=self.checkpoint,
            allow_download=self.allow_download,
            progress=self.progress,
        ).load()

    def _why_unavailable(self, exc: Exception) -> ClipUnavailable:
        from napari_cdpdnet.weights import downloads_disabled, spec

        if isinstance(exc, InputError) and "open_clip" in str(exc):
            return ClipUnavailable(f"CLIP text matching is unavailable: {exc}; {_STILL_WORKS}.")
        component = spec(_COMPONENT)
        if isinstance(exc, _Absent):
            disabled = downloads_disabled()
            return ClipUnavailable(
                f"CLIP text matching is unavailable: its weights ({component.title}, "
                f"{component.approx_size}) are not on this machine and "
                f"{disabled or 'downloading was not allowed'}; {_STILL_WORKS}. `cdpdnet weights "
                "download` fetches them (`--to DIR` makes the offline bundle, CLIP included).",
                downloadable=disabled is None,
            )
        first = str(exc).splitlines()[0].rstrip(". :").removesuffix(". Missing")
        return ClipUnavailable(f"CLIP text matching is unavailable ({first}); {_STILL_WORKS}.")


class _Absent(WeightsError):
    """CLIP's weights are not on disk and may not be downloaded (auto mode; never shown)."""
