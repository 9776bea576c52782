"""CLIP matching for the Structures box, off the GUI thread: :class:`ClipMatcher`.

The box resolves what it can with the lexicon at once (microseconds, on the GUI thread); text the
lexicon does not cover is handed here. Each match runs the core's ``parse_request`` with the
segmenter's text scorer in a non-exclusive worker of the dock's
:class:`~napari_cdpdnet._gui.worker.Jobs` (the first one loads CLIP, seconds; later ones take
milliseconds), so typing never waits. One match runs at a time: requests made meanwhile are
coalesced into the latest, which runs next, so fast typing cannot pile up workers (the thread
pool has as many threads as cores, and a run needs one). The box drops a result whose text has
changed since it asked (:class:`ClipOutcome` carries the request it answers).

CLIP's weights are fetched like the others, through the Weights panel, with progress; afterwards
the scorer is made anew.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.inference.segmenter import parse_request
from napari_cdpdnet.vocabulary.resolver import UnresolvedStructure

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet._widget import SegmentationWidget
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.vocabulary.catalog import Structure
    from napari_cdpdnet.vocabulary.resolver import Resolution

__all__ = ["ClipMatcher", "ClipOutcome"]


@dataclass
class ClipOutcome:
    """What one match produced for the request ``key``: structures and resolutions, or the
    refusal (which carries CLIP's note when CLIP could not be had), or another error."""

    key: Hashable
    structures: list[Structure] = field(default_factory=list)
    resolutions: list[Resolution] = field(default_factory=list)
    refusal: UnresolvedStructure | None = None
    error: CdpdnetError | None = None


def _match_job(segmenter: Segmenter, items: list[Any], key: Hashable) -> ClipOutcome:
    """Worker body: resolve with the segmenter's text scorer (CLIP loads on first need)."""
    try:
        structures, resolutions = parse_request(
            items, clip_scorer=segmenter.text_scorer, clip_thresholds=segmenter.clip_thresholds
        )
    except UnresolvedStructure as exc:
        return ClipOutcome(key, refusal=exc)
    except CdpdnetError as exc:  # e.g. clip="on" and CLIP's weights are damaged
        return ClipOutcome(key, error=exc)
    return ClipOutcome(key, structures, resolutions)


class ClipMatcher:
    """Runs CLIP matches for the Structures box, one at a time, latest request wins."""

    def __init__(self, dock: SegmentationWidget) -> None:
        self._dock = dock
        self._running = False
        self._next: tuple[list[Any], Hashable, Callable[[ClipOutcome], None]] | None = None

    @property
    def running(self) -> bool:
        return self._running

    def match(self, items: list[Any], key: Hashable, on_done: Callable[[ClipOutcome], None]) -> None:
        """Resolve ``items`` with CLIP in a worker; ``on_done(outcome)`` runs on the GUI thread."""
        if self._running:
            self._next = (items, key, on_done)
            return
        self._running = True
        segmenter = self._dock.segmenter  # the dock may swap it while the worker runs

        def failed(exc: BaseException) -> None:  # a bug: say so in the box, never a traceback
            on_done(ClipOutcome(key, error=CdpdnetError(f"CLIP matching failed unexpectedly: {exc}")))

        self._dock.jobs.start(
            _match_job, segmenter, items, key,
            on_result=on_done, on_error=failed, on_finished=self._finished, exclusive=False,
        )

    def _finished(self) -> None:
        self._running = False
        if self._next is not None:
            items, key, on_done = self._next
            self._next = None
            self.match(items, key, on_done)

    def download(self, then: Callable[[], None]) -> Any:
        """Fetch CLIP's weights with the Weights panel (progress on the dock's bar), then make the
        text scorer anew and call ``then``; returns the worker or None when the dock is busy."""

        def done() -> None:
            self._dock.segmenter.reset_text_scorer()
            then()

        return self._dock.weights_panel.download_clip(on_success=done)
