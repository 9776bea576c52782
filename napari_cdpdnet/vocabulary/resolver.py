"""Map what a user types ("IVC", "kidney left", "liver lesion") onto the 32 CDPDNet structures.

Matching runs offline, in this order, and stops at the first confident answer:

1. exact: the display name, official name, key or number ("Left Kidney", "Arota", "3");
2. synonym: curated synonyms, abbreviations, other spellings and languages ("IVC", "GB",
   "L kidney", "oesophagus", "rein gauche"), and parts of a structure ("portal vein");
3. fuzzy: typos ("pancraes", "gallblader"), scored by string similarity;
4. clip (only with a text scorer, see :mod:`.clip_stage`): cosine similarity of CLIP's embedding
   of "A computerized tomography of a {text}" to the 32 fixed organ embeddings, for what the
   lexicon does not cover ("main artery of the abdomen").

Below its threshold (``threshold`` for typos, ``clip_thresholds`` for CLIP) it refuses with
suggestions: a refusal is an answer ("brain" is not one of the 32 structures). Whatever is
typed, the network computes the same 32 outputs with the same fixed text conditioning
(SPEC §6.3); resolving only picks which outputs the user gets. CLIP here ranks the 32 fixed
structures and never adds one. A scorer that cannot score (weights absent and offline) raises
:class:`~.clip_stage.ClipUnavailable`: resolution stays lexical and the refusal carries its note.

Every :class:`Resolution` says how the text was understood (``source``: name, synonym,
abbreviation, part, language, typo or CLIP; CLIP's cosine and margin; the alternatives), which
:mod:`.explain` turns into the lines the CLI prints and the dock shows.

Every phrase and word matched here is data: :mod:`.terms` normalises text with
``resources/terms.json`` and builds the phrase table from ``resources/structures.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from difflib import SequenceMatcher

from napari_cdpdnet.errors import VocabularyError
from napari_cdpdnet.vocabulary.catalog import (
    LANGUAGES,
    STRUCTURES,
    Structure,
)
from napari_cdpdnet.vocabulary.clip_stage import (
    DEFAULT_CLIP_THRESHOLDS,
    ClipRanking,
    ClipThresholds,
    ClipUnavailable,
    TextScorer,
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
    "ClipThresholds",
    "ClipUnavailable",
    "DEFAULT_THRESHOLD",
    "METHODS",
    "SOURCES",
    "resolve",
    "resolve_many",
    "normalize",
]

logger = logging.getLogger(__name__)

#: String similarity below which a typo match is refused (CLIP has its own, see .clip_stage).
DEFAULT_THRESHOLD = 0.8
METHODS = ("exact", "synonym", "fuzzy", "clip")
#: How a text was understood, as users are told (``Resolution.source``).
SOURCES = ("name", "synonym", "abbreviation", "part", "language", "typo", "CLIP")
_SOURCE_OF_METHOD = {"exact": "name", "synonym": "synonym", "fuzzy": "typo", "clip": "CLIP"}

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
    """One resolved phrase: the structure, how sure, how it was found and why.

    ``confidence`` is 1 for names and synonyms, the string similarity for a typo and the cosine
    for CLIP. ``source`` is one of :data:`SOURCES`; ``language`` names the language of a
    translated name; ``cosine``/``margin`` are CLIP's (margin over the runner-up);
    ``alternatives`` are the next candidates with their scores, best first (typos, CLIP).
    """

    text: str
    structure: Structure
    confidence: float
    method: str  # one of METHODS
    reason: str
    source: str = ""
    language: str = ""
    cosine: float | None = None
    margin: float | None = None
    alternatives: tuple[tuple[Structure, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.source:
            object.__setattr__(self, "source", _SOURCE_OF_METHOD[self.method])

    def __str__(self) -> str:
        return f"{self.text!r} -> {self.structure.name} ({self.method}, {self.confidence:.2f}): {self.reason}"


class UnresolvedStructure(VocabularyError):
    """A phrase was refused. ``kind``: "unknown", "not_supported", "ambiguous", "group",
    "conflicting_laterality" or "empty"; ``suggestions``: structures the user may have meant.

    ``message`` is the refusal without ``note`` (why CLIP could not help, said once however many
    phrases were refused); ``clip`` is CLIP's ranking when it was asked; ``clip_unavailable`` the
    scorer's reason when it could not be. From :func:`resolve_many`, ``failures`` lists each
    refused phrase and ``resolved`` what the other phrases resolved to.
    """

    def __init__(
        self,
        message: str,
        *,
        text: str = "",
        kind: str = "unknown",
        suggestions: Sequence[Structure] = (),
        clip: ClipRanking | None = None,
        clip_unavailable: ClipUnavailable | None = None,
        failures: Sequence[UnresolvedStructure] = (),
        resolved: Sequence[Resolution] = (),
    ) -> None:
        note = clip_unavailable.note if clip_unavailable is not None else ""
        super().__init__(f"{message}\nnote: {note}" if note else message)
        self.message = message
        self.note = note
        self.text = text
        self.kind = kind
        self.suggestions = tuple(suggestions)
        self.clip = clip
        self.clip_unavailable = clip_unavailable
        self.failures = tuple(failures) or (self,)
        self.resolved = tuple(resolved)


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
            source="part",
        )
    if entry.source == "language":
        language = " or ".join(LANGUAGES.get(c, c) for c in entry.language.split(","))
        return Resolution(
            text, s, 1.0, "synonym", f"{entry.phrase!r} is {language} for {s.name}",
            source="language", language=language,
        )
    what = "an abbreviation" if entry.source == "abbreviation" else "a synonym"
    return Resolution(
        text, s, 1.0, "synonym", f"{entry.phrase!r} is {what} of {s.name}",
        source=entry.source or "synonym",
    )


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
    found = _accept(text, best, q, score=best_score, fuzzy=True)
    return replace(found, alternatives=_fuzzy_alternatives(ranked, found.structure)), ranked, None


def _fuzzy_alternatives(
    ranked: Sequence[tuple[float, str, Entry]], chosen: Structure, n: int = 3
) -> tuple[tuple[Structure, float], ...]:
    """The next ``n`` structures a typo was close to, with their similarity."""
    out: dict[Structure, float] = {}
    for score, _, entry in ranked:
        if entry.kind not in ("name", "synonym", "part"):
            continue
        s = entry.structures[0]
        if s != chosen and s not in out:
            out[s] = round(score, 3)
        if len(out) >= n:
            break
    return tuple(out.items())


def resolve(
    text: str,
    *,
    clip_scorer: TextScorer | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    clip_thresholds: ClipThresholds | None = None,
) -> Resolution:
    """Resolve one phrase to one of the 32 structures, or refuse with suggestions.

    Args:
        text: what the user typed ("IVC", "left kidney", "liver lesion").
        clip_scorer: enables the CLIP stage for phrases no name, synonym or typo match covers.
        threshold: minimum string similarity (0..1) to accept a typo match (never below 0.7).
        clip_thresholds: when CLIP's answer is trusted (default: :data:`DEFAULT_CLIP_THRESHOLDS`).

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
        # A known unsupported structure: CLIP's ranking is the only meaningful "nearest" (and
        # only a nicety: without CLIP the refusal stands as it is, with no note).
        try:
            ranking = ClipRanking.of(text, clip_scorer)
        except ClipUnavailable:
            raise exc from None
        nearest = ranking.structures()
        raise UnresolvedStructure(
            f"{exc} Nearest by CLIP: {_names(nearest)}.",
            text=text,
            kind="not_supported",
            suggestions=nearest,
            clip=ranking,
        ) from None
    if found is not None:
        logger.debug("%s", found)
        return found
    suggestions = _suggest(ranked)
    kind, ranking, unavailable = "unknown", None, None
    if clip_scorer is not None:
        try:
            ranking = ClipRanking.of(text, clip_scorer, side=q.laterality)
        except ClipUnavailable as exc:
            unavailable = exc
    if ranking is not None:
        refused = ranking.refusal(clip_thresholds or DEFAULT_CLIP_THRESHOLDS)
        if refused is None:
            found = Resolution(
                text,
                ranking.best,
                round(ranking.cosine, 3),
                "clip",
                f"CLIP text similarity: {ranking}",
                cosine=ranking.cosine,
                margin=ranking.margin,
                alternatives=tuple(ranking.top(3, skip=1)),
            )
            logger.debug("%s", found)
            return found
        kind, clip_why = refused
        clip_top = ranking.structures()
        suggestions = [*clip_top, *[s for s in suggestions if s not in clip_top]][:3]
        why = f"{why}; {clip_why}" if why else clip_why
    nearest = f" Nearest: {_names(suggestions)}." if suggestions else ""
    raise UnresolvedStructure(
        f"{text!r} is not one of the {len(STRUCTURES)} structures CDPDNet segments ({why}).{nearest} "
        "Run `cdpdnet structures` for the list.",
        text=text,
        kind=kind,
        suggestions=suggestions,
        clip=ranking,
        clip_unavailable=unavailable,
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
    clip_thresholds: ClipThresholds | None = None,
) -> list[Resolution]:
    """Resolve a list ("liver, left kidney and spleen") into structures, in order, without repeats.

    Splits on commas, semicolons, "and", "+", "&" and new lines, but keeps a name that contains
    "and" whole ("portal vein and splenic vein"). Groups expand ("kidneys", "all tumors"), and
    "left and right kidney" gives both. Every phrase that fails is reported in one error.

    Raises:
        UnresolvedStructure: naming each refused phrase with its reason (``failures``), what the
            others resolved to (``resolved``), CLIP's note once; ``suggestions`` merges theirs.
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
                else [
                    resolve(
                        piece,
                        clip_scorer=clip_scorer,
                        threshold=threshold,
                        clip_thresholds=clip_thresholds,
                    )
                ]
            )
        except UnresolvedStructure as exc:
            failures.append(exc)
        i += 1
    if failures:
        if len(failures) == 1 and len(pieces) == 1:
            raise failures[0]
        msg = f"{len(failures)} of {len(pieces)} names could not be used:\n" + "\n".join(
            f"  - {f.message}" for f in failures
        )
        suggestions = [s for f in failures for s in f.suggestions]
        raise UnresolvedStructure(
            msg,
            text="; ".join(f.text for f in failures),
            kind="unknown",
            suggestions=list(dict.fromkeys(suggestions)),
            clip_unavailable=next(
                (f.clip_unavailable for f in failures if f.clip_unavailable), None
            ),
            failures=failures,
            resolved=results,
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
