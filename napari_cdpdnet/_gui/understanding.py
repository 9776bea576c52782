"""How the typed request was understood, under the Structures box: :class:`UnderstandingView`.

One line per typed phrase with its source (name, synonym, abbreviation, part, language, typo or
CLIP with its cosine and margin over the runner-up); the top three alternatives, or for a
refused phrase the nearest structures, as buttons that replace that phrase in the text; the TTPG
task prompt sentence of each pass; CLIP's note when it could not be had (with a button to fetch
its weights when that is possible); and "matching..." while CLIP works. The words come from the
core (:mod:`napari_cdpdnet.vocabulary.explain`), so the CLI prints the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QFlowLayout

from napari_cdpdnet.vocabulary.catalog import SegmentationPlan, Structure
from napari_cdpdnet.vocabulary.explain import CLIP_SCOPE_NOTE, how, task_prompt_line
from napari_cdpdnet.vocabulary.resolver import Resolution, UnresolvedStructure

__all__ = ["UnderstandingView"]

_SMALL = "color: gray; font-size: small;"


def _label(text: str, style: str = "", rich: bool = False) -> QLabel:
    lbl = QLabel(text)
    lbl.setWordWrap(True)
    lbl.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
    lbl.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    if style:
        lbl.setStyleSheet(style)
    return lbl


class UnderstandingView(QWidget):
    """The "understood as" lines, alternative buttons, task prompts, CLIP's note and download.

    Args:
        replace_phrase: ``replace_phrase(old_text, new_text)`` when an alternative is clicked.
        download_clip: called by the "Download CLIP" button.
    """

    def __init__(
        self, replace_phrase: Callable[[str, str], None], download_clip: Callable[[], None]
    ) -> None:
        super().__init__()
        self._replace = replace_phrase
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.setSpacing(2)
        #: the phrase lines, in order (tests and scripts read them)
        self.lines: list[QLabel] = []
        #: (phrase, structure) -> the button that puts the structure in place of the phrase
        self.choices: dict[tuple[str, str], QPushButton] = {}
        self.prompt_labels: list[QLabel] = []
        self.status_label = _label("", _SMALL)
        self.note_label = _label("", "color: #b8860b;")
        self.download_button = QPushButton("Download CLIP (0.6 GB)")
        self.download_button.setToolTip(
            "CLIP ViT-B/32 (OpenAI, MIT licence), a third-party file checksummed into the weights "
            "cache; it matches wording the lexicon does not know to one of the 32 structures."
        )
        self.download_button.clicked.connect(download_clip)
        self._dynamic: list[QWidget] = []
        for w in (self.status_label, self.note_label, self.download_button):
            self._layout.addWidget(w)
        self.clear()

    # ------------------------------------------------------------------ what the box calls
    def clear(self) -> None:
        """Nothing typed: an empty view."""
        for w in self._dynamic:
            self._layout.removeWidget(w)
            w.deleteLater()
        self._dynamic = []
        self.lines, self.prompt_labels, self.choices = [], [], {}
        self.set_matching([])
        self.set_note("", downloadable=False)

    def display(
        self,
        resolutions: Sequence[Resolution],
        plan: SegmentationPlan | None = None,
        refusal: UnresolvedStructure | None = None,
    ) -> None:
        """Lines for the resolved phrases, the refused ones (with their nearest structures) and
        the plan's task prompts. CLIP's note is set separately (:meth:`set_note`)."""
        self.clear()
        for r in resolutions:
            self._add(_label(
                f"<b>'{escape(r.text)}'</b> &rarr; {escape(r.structure.name)} "
                f"<span style='color: gray'>[{escape(how(r))}]</span>", rich=True,
            ), line=True)
            if r.alternatives:
                self._choices(r.text, "instead:", [s for s, _ in r.alternatives],
                              [f"{score:.3f}" for _, score in r.alternatives])
        for f in refusal.failures if refusal is not None else ():
            if not f.text:
                continue
            self._add(_label(
                f"<b>'{escape(f.text)}'</b> <span style='color: #d9534f'>not resolved "
                f"({escape(f.kind.replace('_', ' '))})</span>", rich=True,
            ), line=True)
            if f.suggestions:
                scores = [f"{f.clip.cosines[s.channel]:.3f}" if f.clip is not None else "" for s in f.suggestions]
                self._choices(f.text, "nearest:", list(f.suggestions), scores)
        if any(r.source == "CLIP" for r in resolutions):
            self._add(_label(CLIP_SCOPE_NOTE, _SMALL))
        if plan is not None:
            for i, p in enumerate(plan.passes, start=1):
                lbl = _label(f"pass {i}, task {p.task.id} ({p.task.name}): {task_prompt_line(p.task)}", _SMALL)
                self.prompt_labels.append(lbl)
                self._add(lbl)

    def set_matching(self, phrases: Sequence[str]) -> None:
        """ "CLIP: matching 'x'..." while a match runs (empty: hidden)."""
        quoted = ", ".join(f"'{p}'" for p in phrases)
        self.status_label.setText(f"CLIP: matching {quoted}..." if phrases else "")
        self.status_label.setVisible(bool(phrases))

    def set_note(self, note: str, *, downloadable: bool) -> None:
        """CLIP's one note (why it could not help); the download button when that would help."""
        self.note_label.setText(note)
        self.note_label.setVisible(bool(note))
        self.download_button.setVisible(downloadable)

    # ------------------------------------------------------------------ helpers
    def _add(self, widget: QWidget, *, line: bool = False) -> None:
        index = self._layout.indexOf(self.status_label)
        self._layout.insertWidget(index, widget)
        self._dynamic.append(widget)
        if line:
            self.lines.append(widget)  # type: ignore[arg-type]

    def _choices(self, phrase: str, title: str, structures: list[Structure], scores: list[str]) -> None:
        row = QWidget()
        layout = QFlowLayout(row)  # wraps: a narrow dock keeps every choice visible
        layout.setContentsMargins(12, 0, 0, 0)
        layout.setSpacing(4)
        layout.addWidget(_label(title, _SMALL))
        for s, score in zip(structures, scores, strict=True):
            button = QPushButton(f"{s.name} {score}".strip())
            button.setToolTip(f"Use {s.name} instead of '{phrase}'")
            button.setStyleSheet("padding: 1px 6px;")
            button.clicked.connect(lambda _c=False, p=phrase, n=s.name: self._replace(p, n))
            self.choices[(phrase, s.key)] = button
            layout.addWidget(button)
        self._add(row)
