"""The "Structures" box of the dock: type names or tick them, and see what they resolve to.

The request is read by the core's :func:`~napari_cdpdnet.inference.segmenter.parse_request`
(typed text, then the ticked structures), so the dock and ``cdpdnet segment --structures``
accept the same names; this box only collects them and shows the resolution (with
confidences, or why a name is refused) while the user types.
"""

from __future__ import annotations

from typing import Any

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

from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.inference.segmenter import parse_request
from napari_cdpdnet.vocabulary.catalog import (
    FIXED_CONDITIONING_NOTE,
    GROUPS,
    STRUCTURES,
    Structure,
    plan_passes,
)

__all__ = ["RequestBox", "completion_terms"]

_GROUP_TITLES = {"organ": "Organs", "vessel": "Vessels", "tumour": "Tumours and cysts"}
#: How long typing must pause before the request is resolved again (ms).
_RESOLVE_DELAY_MS = 150


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


class RequestBox(QGroupBox):
    """Line edit with completion, a checklist by group, and the resolution line below."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__("Structures", parent)
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
        note = QLabel(FIXED_CONDITIONING_NOTE)
        note.setWordWrap(True)
        note.setStyleSheet("color: gray; font-size: small;")
        layout.addWidget(note)

        # Resolve once typing or ticking pauses, not on every key.
        resolve_soon = qdebounced(self.update_resolution, timeout=_RESOLVE_DELAY_MS, parent=self)
        self.text_edit.textChanged.connect(lambda _t: resolve_soon())
        self.tree.itemChanged.connect(lambda *_a: resolve_soon())
        self.update_resolution()

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

    def resolve(self) -> list[Structure]:
        """The structures the current entry asks for (no model, no network).

        Raises:
            VocabularyError: a typed phrase is not one of the 32 structures (says why).
            InputError: nothing requested.
        """
        structures, _ = parse_request(self._items_requested())
        return structures

    def update_resolution(self) -> None:
        """Show what will run, with confidences, or why the entry is refused."""
        items = self._items_requested()
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
