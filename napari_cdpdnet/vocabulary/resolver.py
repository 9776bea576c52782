"""Map what a user types ("IVC", "kidney left", "liver lesion") onto the 32 CDPDNet structures.

Matching runs offline, in this order, and stops at the first confident answer:

1. exact: the display name, official name, key or number ("Left Kidney", "Arota", "3");
2. synonym: curated synonyms, abbreviations, other spellings and languages ("IVC", "GB",
   "L kidney", "oesophagus", "rein gauche"), and parts of a structure ("portal vein");
3. fuzzy: typos ("pancraes", "gallblader"), scored by string similarity;
4. clip (only with a :class:`~napari_cdpdnet.model.text.ClipScorer`): cosine similarity of CLIP's
   embedding of "A computerized tomography of a {text}" to the checkpoint's 32 fixed organ embeddings.

Below ``threshold`` it refuses with suggestions: a refusal is an answer ("brain" is not one of
the 32 structures). Whatever is typed, the network computes the same 32 outputs with the same
fixed text conditioning (SPEC §6.3); resolving only picks which outputs the user gets. CLIP
here ranks the 32 fixed structures and never adds one.

Every phrase and word matched here is data: :mod:`.terms` normalises text with
``resources/terms.json`` and builds the phrase table from ``resources/structures.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Protocol

from napari_cdpdnet.errors import VocabularyError
from napari_cdpdnet.vocabulary.catalog import (
    STRUCTURES,
    Structure,
)
from napari_cdpdnet.vocabulary.terms import (
    LIST_SEPARATOR,
    Entry,
    Query,
    analyse,
    compact_table,
    normalize,
    phrase_table,
    rank,
)

__all__ = [
    "Resolution",
    "UnresolvedStructure",
    "TextScorer",
    "DEFAULT_THRESHOLD",
    "METHODS",
    "resolve",
    "resolve_many",
    "normalize",
]

logger = logging.getLogger(__name__)

#: Confidence below which a match is refused (fuzzy similarity or CLIP probability).
DEFAULT_THRESHOLD = 0.8
METHODS = ("exact", "synonym", "fuzzy", "clip")

#: Confidence of a curated part term ("portal vein" -> Portal Vein and Splenic Vein): certain
#: about the structure, but the result is larger than what was asked for.
_PART_CONFIDENCE = 0.9
#: Two fuzzy candidates closer than this are a tie: ask instead of guessing.
_FUZZY_TIE = 0.02
_MIN_FUZZY_LENGTH = 4
#: Fuzzy matches need at least this similarity whatever the threshold: below it string
#: similarity says nothing, and a low ``threshold`` is meant for the CLIP stage.
_FUZZY_FLOOR = 0.7


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Resolution:
    """One resolved phrase: the structure, how sure, how it was found and why."""

    text: str
    structure: Structure
    confidence: float
    method: str  # one of METHODS
    reason: str

    def __str__(self) -> str:
        return f"{self.text!r} -> {self.structure.name} ({self.method}, {self.confidence:.2f}): {self.reason}"


class UnresolvedStructure(VocabularyError):
    """A phrase was refused. ``kind``: "unknown", "not_supported", "ambiguous", "group",
    "conflicting_laterality" or "empty"; ``suggestions``: structures the user may have meant."""

    def __init__(
        self,
        message: str,
        *,
        text: str = "",
        kind: str = "unknown",
        suggestions: Sequence[Structure] = (),
    ) -> None:
        super().__init__(message)
        self.text = text
        self.kind = kind
        self.suggestions = tuple(suggestions)


def _names(items: Iterable[Structure]) -> str:
    return ", ".join(s.name for s in items)


def _similarity(q: Query, key: str) -> float:
    a, b = q.text, key
    if q.laterality and b.startswith(q.laterality + " "):
        # compare what follows the side: "left liver" is not close to "left niere"
        a, b = a[len(q.laterality) + 1 :], b[len(q.laterality) + 1 :]
    scores = [
        SequenceMatcher(None, a, b).ratio(),
        SequenceMatcher(None, a.replace(" ", ""), b.replace(" ", "")).ratio(),
        SequenceMatcher(None, " ".join(sorted(a.split())), " ".join(sorted(b.split()))).ratio(),
    ]
    return max(scores)


def _fuzzy(q: Query) -> list[tuple[float, str, Entry]]:
    """Candidates by similarity, best first, respecting a stated side."""
    out = []
    for key, entry in phrase_table().items():
        if not entry.fuzzy:
            continue
        sides = {s.laterality for s in entry.structures}
        if q.laterality and entry.kind != "not_supported" and sides and q.laterality not in sides:
            continue
        out.append((_similarity(q, key), key, entry))
    out.sort(key=lambda t: (-t[0], rank(t[2]), t[1]))
    return out


def _suggest(ranked: Sequence[tuple[float, str, Entry]], n: int = 3) -> list[Structure]:
    seen: list[Structure] = []
    for _, _, entry in ranked:
        for s in entry.structures:
            if s not in seen:
                seen.append(s)
        if len(seen) >= n:
            break
    return seen[:n]


def _accept(text: str, entry: Entry, q: Query, *, score: float, fuzzy: bool) -> Resolution:
    """Turn a matched entry into a Resolution, or refuse it with the entry's reason."""
    kind = entry.kind
    if (
        kind == "ambiguous"
        and q.bilateral
        and len(entry.structures) == 2
        and {s.laterality for s in entry.structures} == {"left", "right"}
    ):
        kind = "group"
    if kind == "not_supported":
        note = f": {entry.note}" if entry.note else ""
        nearest = entry.structures
        hint = f" Nearest: {_names(nearest)}." if nearest else ""
        raise UnresolvedStructure(
            f"{text!r} is not one of the {len(STRUCTURES)} structures CDPDNet segments{note}.{hint} "
            "Run `cdpdnet structures` for the list.",
            text=text,
            kind="not_supported",
            suggestions=nearest,
        )
    if kind == "ambiguous" and len(entry.structures) == 1:
        raise UnresolvedStructure(
            f"{text!r} is not specific enough ({entry.note}); did you mean {entry.structures[0].name}?",
            text=text,
            kind="ambiguous",
            suggestions=entry.structures,
        )
    if kind == "ambiguous":
        raise UnresolvedStructure(
            f"{text!r} could mean several structures ({entry.note}): {_names(entry.structures)}. "
            "Name the one you want.",
            text=text,
            kind="ambiguous",
            suggestions=entry.structures,
        )
    if kind == "group":
        raise UnresolvedStructure(
            f"{text!r} names {len(entry.structures)} structures ({_names(entry.structures)}); "
            "use resolve_many() (or list them) to get all of them.",
            text=text,
            kind="group",
            suggestions=entry.structures,
        )
    s = entry.structures[0]
    if fuzzy:
        conf = score * (_PART_CONFIDENCE if kind == "part" else 1.0)
        return Resolution(
            text,
            s,
            round(conf, 3),
            "fuzzy",
            f"closest known name {entry.phrase!r} (similarity {score:.2f})",
        )
    if kind == "name":
        return Resolution(
            text, s, 1.0, "exact", f"matches the name {entry.phrase!r} (structure {s.index})"
        )
    if kind == "part":
        return Resolution(
            text,
            s,
            _PART_CONFIDENCE,
            "synonym",
            f"{entry.phrase!r} is part of {s.name}, which CDPDNet segments as one structure",
        )
    return Resolution(text, s, 1.0, "synonym", f"{entry.phrase!r} is a synonym of {s.name}")


def _lexical(text: str, q: Query, threshold: float) -> tuple[Resolution | None, list, str | None]:
    """(resolution, ranked fuzzy candidates, why refused) for the offline stages."""
    if q.text.isdigit():
        n = int(q.text)
        if 1 <= n <= len(STRUCTURES):
            s = STRUCTURES[n - 1]
            return Resolution(text, s, 1.0, "exact", f"structure number {n}"), [], None
        return None, [], f"structure numbers run from 1 to {len(STRUCTURES)}"
    entry = phrase_table().get(q.text) or compact_table().get(q.compact)
    if entry is not None:
        return _accept(text, entry, q, score=1.0, fuzzy=False), [], None
    if len(q.compact) < _MIN_FUZZY_LENGTH:
        return None, _fuzzy(q), f"{text!r} is too short to match approximately"
    ranked = _fuzzy(q)
    if not ranked:
        return None, ranked, None
    best_score, _, best = ranked[0]
    needed = max(threshold, _FUZZY_FLOOR)
    if best_score < needed:
        return (
            None,
            ranked,
            f"best match {best.phrase!r} has similarity {best_score:.2f} < {needed:.2f}",
        )
    rival = next((r for r in ranked[1:] if r[2].target != best.target), None)
    if rival is not None and best_score - rival[0] < _FUZZY_TIE and best_score < 1.0:
        raise UnresolvedStructure(
            f"{text!r} is equally close to {best.phrase!r} and {rival[1]!r}; say which you mean.",
            text=text,
            kind="ambiguous",
            suggestions=_suggest(ranked),
        )
    return _accept(text, best, q, score=best_score, fuzzy=True), ranked, None


def resolve(
    text: str,
    *,
    clip_scorer: TextScorer | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> Resolution:
    """Resolve one phrase to one of the 32 structures, or refuse with suggestions.

    Args:
        text: what the user typed ("IVC", "left kidney", "liver lesion").
        clip_scorer: enables the CLIP stage for phrases no name, synonym or typo match covers.
        threshold: minimum confidence (0..1) to accept a fuzzy or CLIP match (fuzzy matches
            also need a similarity of at least 0.7).

    Raises:
        UnresolvedStructure (a VocabularyError): unknown, ambiguous, a group of several
        structures, or not something CDPDNet segments; ``suggestions`` lists likely structures.
    """
    if not isinstance(text, str):
        raise UnresolvedStructure(f"{text!r} is not text", text=str(text), kind="empty")
    text = " ".join(text.split())
    q = analyse(text)
    if not q.text:
        raise UnresolvedStructure(
            "no structure name given: type one, e.g. 'liver' or 'left kidney'",
            text=text,
            kind="empty",
        )
    if q.conflicting:
        raise UnresolvedStructure(
            f"{text!r} names both the left and the right side; ask for each separately "
            "(e.g. 'left kidney, right kidney') or use the plural ('kidneys')",
            text=text,
            kind="conflicting_laterality",
        )
    try:
        found, ranked, why = _lexical(text, q, threshold)
    except UnresolvedStructure as exc:
        if exc.kind != "not_supported" or exc.suggestions or clip_scorer is None:
            raise
        # A known unsupported structure: CLIP's ranking is the only meaningful "nearest".
        nearest = _ClipRanking.of(text, clip_scorer).structures()
        raise UnresolvedStructure(
            f"{exc} Nearest by CLIP: {_names(nearest)}.",
            text=text,
            kind="not_supported",
            suggestions=nearest,
        ) from None
    if found is not None:
        logger.debug("%s", found)
        return found
    suggestions = _suggest(ranked)
    if clip_scorer is not None:
        ranking = _ClipRanking.of(text, clip_scorer)
        if ranking.confidence >= threshold:
            return Resolution(
                text, ranking.best, ranking.confidence, "clip", f"CLIP text similarity: {ranking}"
            )
        clip_top = ranking.structures()
        suggestions = [*clip_top, *[s for s in suggestions if s not in clip_top]][:3]
        clip_why = f"CLIP: best {ranking.best.name} below the threshold ({ranking})"
        why = f"{why}; {clip_why}" if why else clip_why
    nearest = f" Nearest: {_names(suggestions)}." if suggestions else ""
    raise UnresolvedStructure(
        f"{text!r} is not one of the {len(STRUCTURES)} structures CDPDNet segments ({why}).{nearest} "
        "Run `cdpdnet structures` for the list.",
        text=text,
        kind="unknown",
        suggestions=suggestions,
    )


class TextScorer(Protocol):
    """Scores of a text against the 32 structures, in structure order: the CLIP stage's input.

    :class:`napari_cdpdnet.model.text.ClipScorer` is the one in use; the caller builds it (and
    so loads CLIP), which keeps this module torch-free.
    """

    def similarities(self, text: str) -> Iterable[float]: ...

    def probabilities(self, text: str) -> Iterable[float]: ...


@dataclass(frozen=True)
class _ClipRanking:
    """The 32 structures ordered by CLIP probability for one text."""

    order: tuple[int, ...]
    probs: tuple[float, ...]
    cosines: tuple[float, ...]

    @classmethod
    def of(cls, text: str, scorer: TextScorer) -> _ClipRanking:
        probs = [float(p) for p in scorer.probabilities(text)]
        cos = [float(c) for c in scorer.similarities(text)]
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        return cls(tuple(order), tuple(probs), tuple(cos))

    @property
    def best(self) -> Structure:
        return STRUCTURES[self.order[0]]

    @property
    def confidence(self) -> float:
        return round(self.probs[self.order[0]], 3)

    def structures(self, n: int = 3) -> list[Structure]:
        return [STRUCTURES[i] for i in self.order[:n]]

    def __str__(self) -> str:
        top, second = self.order[0], self.order[1]
        return (
            f"cosine {self.cosines[top]:.3f} to the fixed embedding of '{self.best.prompt}', "
            f"probability {self.probs[top]:.2f} among the 32 structures "
            f"(next: {STRUCTURES[second].name} {self.probs[second]:.2f})"
        )


# --------------------------------------------------------------------------- many
def _pieces(text: str) -> list[str]:
    return [p.strip() for p in LIST_SEPARATOR.split(text) if p and p.strip()]


def _exact_only(phrase: str) -> list[Structure] | None:
    """Structures a phrase names exactly (a name, synonym or group), else None."""
    q = analyse(phrase)
    if not q.text or q.conflicting:
        return None
    entry = phrase_table().get(q.text) or compact_table().get(q.compact)
    if entry is None:
        return None
    if entry.kind in ("name", "synonym", "part"):
        return [entry.structures[0]]
    if entry.kind == "group" or (entry.kind == "ambiguous" and q.bilateral):
        try:
            _accept(phrase, entry, q, score=1.0, fuzzy=False)
        except UnresolvedStructure as exc:
            if exc.kind == "group":
                return list(entry.structures)
    return None


def _expand_sides(pieces: list[str]) -> list[str]:
    """ "left and right kidney" / "kidney left and right" -> one phrase per side."""
    out = list(pieces)
    for i, piece in enumerate(pieces):
        q = analyse(piece)
        bare = q.laterality is not None and q.text == q.laterality
        if not bare:
            continue
        neighbours = [j for j in (i + 1, i - 1) if 0 <= j < len(pieces)]
        for j in neighbours:
            nq = analyse(pieces[j])
            if nq.laterality and nq.laterality != q.laterality and nq.text != nq.laterality:
                out[i] = f"{q.laterality} {nq.text.split(' ', 1)[1]}"
                break
    return out


def resolve_many(
    text_or_list: str | Iterable[str],
    *,
    clip_scorer: TextScorer | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Resolution]:
    """Resolve a list ("liver, left kidney and spleen") into structures, in order, without repeats.

    Splits on commas, semicolons, "and", "+", "&" and new lines, but keeps a name that contains
    "and" whole ("portal vein and splenic vein"). Groups expand ("kidneys", "all tumors"), and
    "left and right kidney" gives both. Every phrase that fails is reported in one error.

    Raises:
        UnresolvedStructure: naming each refused phrase with its reason; ``suggestions`` merges
            theirs.
    """
    phrases = [text_or_list] if isinstance(text_or_list, str) else [str(t) for t in text_or_list]
    pieces = [p for phrase in phrases for p in _expand_sides(_pieces(phrase))]
    if not pieces:
        raise UnresolvedStructure("no structure names given", kind="empty")
    results: list[Resolution] = []
    failures: list[UnresolvedStructure] = []
    i = 0
    while i < len(pieces):
        taken = False
        for j in range(len(pieces), i + 1, -1):  # longest run of pieces that is one exact name
            joined = " and ".join(pieces[i:j])
            hits = _exact_only(joined)
            if hits:
                results += _resolved(joined, hits)
                i, taken = j, True
                break
        if taken:
            continue
        piece = pieces[i]
        hits = _exact_only(piece)
        try:
            results += (
                _resolved(piece, hits)
                if hits
                else [resolve(piece, clip_scorer=clip_scorer, threshold=threshold)]
            )
        except UnresolvedStructure as exc:
            failures.append(exc)
        i += 1
    if failures:
        if len(failures) == 1 and len(pieces) == 1:
            raise failures[0]
        msg = f"{len(failures)} of {len(pieces)} names could not be used:\n" + "\n".join(
            f"  - {f}" for f in failures
        )
        suggestions = [s for f in failures for s in f.suggestions]
        raise UnresolvedStructure(
            msg,
            text="; ".join(f.text for f in failures),
            kind="unknown",
            suggestions=list(dict.fromkeys(suggestions)),
        )
    unique: dict[int, Resolution] = {}
    for r in results:
        unique.setdefault(r.structure.index, r)
    return list(unique.values())


def _resolved(phrase: str, hits: list[Structure]) -> list[Resolution]:
    """Resolutions for an exactly named phrase: itself, or each member of a group."""
    if len(hits) == 1:
        return [resolve(phrase)]
    return [
        Resolution(
            phrase,
            s,
            1.0,
            "synonym",
            f"{phrase!r} names {len(hits)} structures, including {s.name}",
        )
        for s in hits
    ]
