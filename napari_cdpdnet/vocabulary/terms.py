"""What a typed phrase means: normalising text, and the table of every phrase the vocabulary knows.

The words around structure names (sides in several languages, filler words, British spellings,
list separators) are data in ``resources/terms.json``; the phrases themselves come from
``resources/structures.json`` through :mod:`.catalog` (names, synonyms, abbreviations, part
terms of each structure, and group / ambiguous / unsupported terms). :mod:`.resolver` matches
typed text against :func:`phrase_table`. Adding a synonym is one line of JSON; the table refuses
a phrase that would mean two different things (a packaging bug, raised on first use).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace
from functools import lru_cache

from napari_cdpdnet._resources import load_json
from napari_cdpdnet.vocabulary.catalog import SPECIAL_TERMS, STRUCTURES, Structure

__all__ = [
    "Query",
    "Entry",
    "STRUCTURE_KINDS",
    "LIST_SEPARATOR",
    "normalize",
    "analyse",
    "phrase_table",
    "compact_table",
    "rank",
]


@dataclass(frozen=True)
class _Words:
    """resources/terms.json, as sets for lookups."""

    left: frozenset[str]
    right: frozenset[str]
    both_sides: frozenset[str]
    filler: frozenset[str]
    spellings: dict[str, str]
    list_words: tuple[str, ...]
    sides: frozenset[str]  # left | right | both_sides: dropped from the phrase once read


def _load_words() -> _Words:
    data = load_json("terms.json")
    words = _Words(
        left=frozenset(data["left"]),
        right=frozenset(data["right"]),
        both_sides=frozenset(data["both_sides"]),
        filler=frozenset(data["filler"]),
        spellings=dict(data["spellings"]),
        list_words=tuple(data["list_words"]),
        sides=frozenset([*data["left"], *data["right"], *data["both_sides"]]),
    )
    every = [*words.left, *words.right, *words.both_sides, *words.filler, *words.spellings,
             *words.spellings.values(), *words.list_words]
    bad = [w for w in every if not re.fullmatch(r"[a-z0-9]+", w)]
    if bad:  # matching sees lower-case ASCII words only: anything else could never match
        raise RuntimeError(f"terms.json: {bad} are not lower-case words without accents")
    if words.left & words.right:
        raise RuntimeError(f"terms.json: {sorted(words.left & words.right)} are both left and right")
    return words


_WORDS = _load_words()

#: Splits a list of phrases: punctuation, new lines and the list words of terms.json.
LIST_SEPARATOR = re.compile(
    r"\s*(?:[,;\n/+&]|" + "|".join(rf"\b{re.escape(w)}\b" for w in _WORDS.list_words) + r")\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Query:
    """A phrase reduced to comparable form: ``text`` has the laterality word first."""

    text: str
    laterality: str | None
    bilateral: bool
    conflicting: bool

    @property
    def compact(self) -> str:
        return self.text.replace(" ", "")


def normalize(text: str) -> str:
    """Comparable form of a phrase: lower case, no accents or punctuation, American spelling,
    filler words dropped, laterality first ("Kidney (L)" -> "left kidney")."""
    return analyse(text).text


def analyse(text: str) -> Query:
    """The :class:`Query` of a phrase: its comparable text and what its side words said."""
    decomposed = unicodedata.normalize("NFKD", text.replace("œ", "oe").replace("Œ", "oe"))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    plain = plain.replace("ß", "ss")
    words = [_WORDS.spellings.get(w, w) for w in re.findall(r"[a-z0-9]+", plain)]
    side_words = [w for w in words if w in _WORDS.left or w in _WORDS.right]
    sides = {"left" if w in _WORDS.left else "right" for w in side_words}
    bilateral = any(w in _WORDS.both_sides for w in words)
    rest = [w for w in words if w not in _WORDS.sides]
    kept = [w for w in rest if w not in _WORDS.filler]
    laterality = next(iter(sides)) if len(sides) == 1 else None
    body = " ".join(kept)
    return Query(
        text=f"{laterality} {body}".strip() if laterality else body,
        laterality=laterality,
        bilateral=bilateral,
        conflicting=len(sides) > 1,
    )


STRUCTURE_KINDS = ("name", "synonym", "part")


@dataclass(frozen=True)
class Entry:
    """What a normalised phrase means."""

    kind: str  # "name" | "synonym" | "part" | "group" | "ambiguous" | "not_supported"
    structures: tuple[Structure, ...]
    phrase: str  # the curated phrase it came from (for reasons)
    note: str = ""
    fuzzy: bool = True  # short abbreviations only match exactly
    #: Where the phrase comes from, for users: "name", "synonym", "abbreviation", "part" or
    #: "language" (then ``language`` is its code in catalog.LANGUAGES, or several joined by
    #: commas when one spelling is shared); "" for special terms.
    source: str = ""
    language: str = ""

    @property
    def target(self) -> tuple[str, tuple[int, ...]]:
        """What it resolves to; names, synonyms and parts of one structure share a target."""
        kind = "structure" if self.kind in STRUCTURE_KINDS else self.kind
        return kind, tuple(s.index for s in self.structures)


@lru_cache(maxsize=1)
def phrase_table() -> dict[str, Entry]:
    """Normalised phrase -> meaning; built once, validated against contradictions."""
    table: dict[str, Entry] = {}

    def put(phrase: str, entry: Entry) -> None:
        key = analyse(phrase).text
        if not key:
            raise RuntimeError(f"vocabulary phrase {phrase!r} normalises to nothing")
        old = table.get(key)
        if old is not None and old.target != entry.target:
            raise RuntimeError(
                f"vocabulary phrase {phrase!r} (as {key!r}) means both {old.target} and {entry.target}"
            )
        if old is None or rank(entry) < rank(old):
            table[key] = entry
        elif old.source == entry.source == "language" and entry.language not in old.language.split(","):
            # one spelling, two languages ("esofago": Spanish and Italian, once accents are gone)
            table[key] = replace(old, language=f"{old.language},{entry.language}")

    for s in STRUCTURES:
        for phrase in (s.name, s.official_name, s.key.replace("_", " ")):
            put(phrase, Entry("name", (s,), phrase, source="name"))
        for phrase in s.synonyms:
            put(phrase, Entry("synonym", (s,), phrase, source="synonym"))
        for code, phrase in s.other_languages:
            put(phrase, Entry("synonym", (s,), phrase, source="language", language=code))
        for phrase in s.abbreviations:
            put(phrase, Entry("synonym", (s,), phrase, fuzzy=len(phrase) > 3, source="abbreviation"))
        for phrase in s.part_terms:
            put(phrase, Entry("part", (s,), phrase, source="part"))
    for t in SPECIAL_TERMS:
        put(t.term, Entry(t.kind, t.structures, t.term, t.note))
    # "kidney", "renal", "adrenal": a lateral phrase without its side names a pair.
    pairs: dict[str, set[int]] = {}
    for s in STRUCTURES:
        if s.laterality is None:
            continue
        for phrase in (s.name, s.official_name, *s.synonyms, *(p for _, p in s.other_languages)):
            q = analyse(phrase)
            if q.laterality and q.text.split(" ", 1)[1:]:
                pairs.setdefault(q.text.split(" ", 1)[1], set()).add(s.index)
    for base, members in pairs.items():
        if base not in table and len(members) == 2:
            put(
                base,
                Entry(
                    "ambiguous",
                    tuple(STRUCTURES[i - 1] for i in sorted(members)),
                    base,
                    "left or right?",
                ),
            )
    return table


def rank(entry: Entry) -> int:
    """Precedence when one phrase is listed twice with the same meaning (lower wins)."""
    return ("name", "synonym", "part", "group", "ambiguous", "not_supported").index(entry.kind)


@lru_cache(maxsize=1)
def compact_table() -> dict[str, Entry]:
    """Same table keyed without spaces ("gall bladder" == "gallbladder"); unambiguous keys only."""
    out: dict[str, Entry] = {}
    clash: set[str] = set()
    for key, entry in phrase_table().items():
        c = key.replace(" ", "")
        if c in out and out[c].target != entry.target:
            clash.add(c)
        out.setdefault(c, entry)
    for c in clash:
        del out[c]
    return out
