"""The "Structures" box of the dock: type names or tick them, and see what they resolve to.

The request is read by the core's :func:`~napari_cdpdnet.inference.segmenter.parse_request`
(typed text, then the ticked structures), so the dock and ``cdpdnet segment --structures``
accept the same names; this box only collects them and shows the resolution (with
confidences, or why a name is refused) while the user types.

Resolution is live and never blocks typing: once typing pauses, the lexicon answers at once on
the GUI thread; phrases it does not cover go to CLIP through the dock's
:class:`~napari_cdpdnet._gui.clip_matcher.ClipMatcher` (a worker). Every text change bumps a
generation number, and a CLIP answer for an older generation is dropped, never shown. Run uses
the CLIP answer for exactly the current text (or says CLIP is still matching).
:class:`~napari_cdpdnet._gui.understanding.UnderstandingView` shows how each phrase was
understood, the alternatives as buttons and the task prompts.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QStringListModel, Qt
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QCompleter,
    QGroupBox,
    QLabel,
    QLineEdit,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
)
from superqt.utils import qdebounced

from napari_cdpdnet._gui.understanding import UnderstandingView
from napari_cdpdnet.errors import CdpdnetError, InputError
from napari_cdpdnet.inference.segmenter import parse_request
from napari_cdpdnet.vocabulary.catalog import (
    FIXED_CONDITIONING_NOTE,
    GROUPS,
    STRUCTURES,
    Structure,
    plan_passes,
)
from napari_cdpdnet.vocabulary.resolver import UnresolvedStructure

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet._gui.clip_matcher import ClipMatcher, ClipOutcome

__all__ = ["RequestBox", "completion_terms"]

_GROUP_TITLES = {"organ": "Organs", "vessel": "Vessels", "tumour": "Tumours and cysts"}
#: How long typing must pause before the request is resolved again (ms).
_RESOLVE_DELAY_MS = 150


def completion_terms() -> list[str]:
    """Every name the resolver knows exactly: display names, keys, synonyms, abbreviations."""
    terms: set[str] = set()
    for s in STRUCTURES:
        terms.update([s.name, s.key.replace("_", " "), *s.synonyms, *s.abbreviations])
        terms.update(phrase for _, phrase in s.other_languages)
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


def _needs_clip(exc: UnresolvedStructure) -> list[str]:
    """The refused phrases CLIP may still match: unknown to the lexicon, CLIP not yet asked."""
    return [f.text for f in exc.failures if f.kind == "unknown" and f.clip is None and f.text]


class RequestBox(QGroupBox):
    """Line edit with completion, a checklist by group, and the resolution line below.

    Args:
        matcher: runs CLIP for text the lexicon does not cover (None: the lexicon only).
    """

    def __init__(self, parent: Any = None, matcher: ClipMatcher | None = None) -> None:
        super().__init__("Structures", parent)
        self.matcher = matcher
        #: bumped by every change of the request; a CLIP answer for an older one is dropped
        self.generation = 0
        #: CLIP answers that arrived for a request that had changed meanwhile (not shown)
        self.dropped = 0
        self._outcome: ClipOutcome | None = None
        layout = QVBoxLayout(self)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("e.g. liver, left kidney, IVC")
        self.text_edit.setClearButtonEnabled(True)
        completer = _ListCompleter(QStringListModel(completion_terms(), self), self)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        self.text_edit.setCompleter(completer)
        self.completer = completer
        layout.addWidget(self.text_edit)

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
                item.setForeground(0, QBrush(QColor(*s.color)))
                top.addChild(item)
                self._items[s.index] = item
            self.tree.addTopLevelItem(top)
        layout.addWidget(self.tree)

        self.resolved_label = QLabel()
        self.resolved_label.setWordWrap(True)
        self.resolved_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.resolved_label)
        self.understanding = UnderstandingView(self.replace_phrase, self._download_clip)
        layout.addWidget(self.understanding)
        note = QLabel(FIXED_CONDITIONING_NOTE)
        note.setWordWrap(True)
        note.setStyleSheet("color: gray; font-size: small;")
        layout.addWidget(note)

        # Resolve once typing or ticking pauses, not on every key.
        resolve_soon = qdebounced(self.update_resolution, timeout=_RESOLVE_DELAY_MS, parent=self)
        self.text_edit.textChanged.connect(lambda _t: self._changed(resolve_soon))
        self.tree.itemChanged.connect(lambda *_a: self._changed(resolve_soon))
        self.update_resolution()

    def _changed(self, resolve_soon: Any) -> None:
        self.generation += 1  # at once: an answer in flight is stale from now on
        resolve_soon()

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

    def _items_requested(self) -> list[Any]:
        items: list[Any] = list(self.checked_structures())
        text = self.text_edit.text().strip()
        if text:
            items.append(text)
        return items

    @staticmethod
    def _key(items: list[Any]) -> Hashable:
        return tuple(i.key if isinstance(i, Structure) else " ".join(str(i).split()) for i in items)

    def resolve(self) -> list[Structure]:
        """The structures the current entry asks for (the lexicon, or CLIP's answer for exactly
        this entry; no model, no network here).

        Raises:
            VocabularyError: a typed phrase is not one of the 32 structures (says why, with
                CLIP's note when CLIP could not help).
            InputError: nothing requested, or CLIP is still matching this entry.
        """
        items = self._items_requested()
        try:
            structures, _ = parse_request(items)
            return structures
        except UnresolvedStructure as exc:
            waiting = _needs_clip(exc)
            if self.matcher is None or not waiting:
                raise
            outcome = self._outcome if self._outcome is not None and self._outcome.key == self._key(items) else None
            if outcome is None:
                raise InputError(
                    f"CLIP is still matching {', '.join(repr(w) for w in waiting)}: run again when "
                    "the Structures box shows what it found"
                ) from None
            if outcome.refusal is not None or outcome.error is not None:
                raise (outcome.refusal or outcome.error) from None  # type: ignore[misc]
            return outcome.structures

    def replace_phrase(self, old: str, new: str) -> None:
        """Put ``new`` in place of the typed phrase ``old`` (an alternative was chosen)."""
        pattern = r"\s+".join(re.escape(w) for w in old.split())
        text = self.text_edit.text()
        replaced = re.sub(pattern, lambda _m: new, text, count=1, flags=re.IGNORECASE)
        if replaced != text:
            self.text_edit.setText(replaced)

    def _download_clip(self) -> None:
        if self.matcher is not None:
            self.matcher.download(then=self._refresh_after_download)

    def _refresh_after_download(self) -> None:
        self._outcome = None
        self.generation += 1
        self.update_resolution()

    def update_resolution(self) -> None:
        """Show what will run, with confidences, or why the entry is refused; hand what the
        lexicon does not cover to CLIP (answer shown when it arrives, if still current)."""
        items = self._items_requested()
        view = self.understanding
        if not items:
            self.resolved_label.setText("resolved: nothing yet (type names or tick structures)")
            self.resolved_label.setStyleSheet("")
            view.clear()
            return
        key = self._key(items)
        try:
            structures, resolutions = parse_request(items)
        except UnresolvedStructure as exc:
            waiting = _needs_clip(exc)
            if self.matcher is not None and waiting:
                if self._outcome is not None and self._outcome.key == key:
                    self._show_outcome(self._outcome)
                    return
                # neutral while CLIP works: what the lexicon read, and what is being matched
                self.resolved_label.setText(
                    f"resolving: CLIP is matching {len(waiting)} phrase{'s' if len(waiting) != 1 else ''} "
                    "the lexicon does not know..."
                )
                self.resolved_label.setStyleSheet("")
                view.display(exc.resolved, None, None)
                view.set_matching(waiting)
                generation = self.generation
                self.matcher.match(items, key, lambda outcome: self._clip_answered(outcome, generation))
                return
            self._show_refused(exc)
            return
        except CdpdnetError as exc:
            self._show_refused(exc)
            return
        self._show_resolved(structures, resolutions)

    def _clip_answered(self, outcome: ClipOutcome, generation: int) -> None:
        if generation != self.generation:  # the text changed since: never show a stale answer
            self.dropped += 1
            return
        self._outcome = outcome
        self._show_outcome(outcome)

    def _show_outcome(self, outcome: ClipOutcome) -> None:
        failed = outcome.refusal or outcome.error
        if failed is not None:
            self._show_refused(failed)
        else:
            self._show_resolved(outcome.structures, outcome.resolutions)

    def _show_refused(self, exc: CdpdnetError) -> None:
        message = exc.message if isinstance(exc, UnresolvedStructure) else str(exc)
        self.resolved_label.setText(f"not resolved: {message}")
        self.resolved_label.setStyleSheet("color: #d9534f;")
        view = self.understanding
        if isinstance(exc, UnresolvedStructure):
            view.display(exc.resolved, None, exc)
            unavailable = exc.clip_unavailable
            view.set_note(
                unavailable.note if unavailable is not None else "",
                downloadable=unavailable is not None and unavailable.downloadable,
            )
        else:
            view.display([], None, None)

    def _show_resolved(self, structures: list[Structure], resolutions: list[Any]) -> None:
        try:
            plan = plan_passes(structures)
        except CdpdnetError as exc:
            self._show_refused(exc)
            return
        self.understanding.display(resolutions, plan)
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
