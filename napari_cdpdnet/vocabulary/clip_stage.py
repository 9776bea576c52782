"""The resolver's CLIP stage: rank the 32 fixed structures by CLIP text similarity, and decide
whether to trust the ranking.

A scorer (:class:`TextScorer`; the real one is :class:`napari_cdpdnet.model.text.ClipScorer`)
embeds "A computerized tomography of a {typed text}" with CLIP ViT-B/32's text tower and returns
its cosine similarity to each of the 32 organ embeddings. Those embeddings are the same tower's
embeddings of the same template filled with the official names (they are the checkpoint's
``organ_embedding`` buffer), so the two are directly comparable: the official name itself scores
1.0. CLIP only chooses among the 32 fixed outputs; it never adds a structure.

When to trust the top structure (:class:`ClipThresholds`, a setting everywhere a user types):

* ``min_cosine`` (default 0.88): the text must be at least as close to its best structure as the
  median pair of two *different* structures' official prompts are to each other. Measured on the
  official table (``txt_encoding.pth``, real CLIP ViT-B/32): the 496 pairs of distinct
  structures have cosines 0.756-0.993, quartiles 0.847 / 0.880 / 0.904. A text whose best cosine
  is below the median is no closer to "its" structure than unrelated structures are to each
  other, so it is refused.
* ``min_margin`` (default 0.01): the best structure must beat the runner-up by this much. On the
  same table a structure and its mirror image differ by only 0.007-0.011 (left/right kidney 0.989,
  adrenal glands 0.992, femoral heads 0.993): a smaller margin does not tell two structures apart,
  so the text is refused as ambiguous, naming both.

These are priors from the only real CLIP numbers available here (the official embeddings), not a
calibration: ``benchmarks/bench_resolver.py --clip WEIGHTS`` measures accuracy on a phrase set and
prints the threshold that maximises it (docs/resolver.md). A side the user typed ("right") is
respected: structures of the other side are not candidates.

No torch here: scorers are built by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, Structure

__all__ = [
    "TextScorer",
    "ClipUnavailable",
    "ClipThresholds",
    "ClipRanking",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_MARGIN",
    "DEFAULT_CLIP_THRESHOLDS",
]

#: See the module docstring for where these come from.
DEFAULT_MIN_COSINE = 0.88
DEFAULT_MIN_MARGIN = 0.01


class TextScorer(Protocol):
    """Cosine similarities of a text to the 32 structures, in structure order: the CLIP stage's
    input. May raise :class:`ClipUnavailable` (then resolution stays lexical, with its note)."""

    def similarities(self, text: str) -> Iterable[float]: ...


class ClipUnavailable(Exception):
    """A scorer cannot score (CLIP's weights absent, open_clip not installed): the resolver
    carries on without CLIP and passes ``note`` on to the user, once.

    ``downloadable`` is True when fetching the weights would help and is possible from here (the
    dock then offers the download).
    """

    def __init__(self, note: str, *, downloadable: bool = False) -> None:
        super().__init__(note)
        self.note = note
        self.downloadable = downloadable


@dataclass(frozen=True)
class ClipThresholds:
    """When the CLIP stage may answer: cosine of the best structure and its margin over the next."""

    min_cosine: float = DEFAULT_MIN_COSINE
    min_margin: float = DEFAULT_MIN_MARGIN

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise InputError(f"CLIP threshold {self.min_cosine}: a cosine, between -1 and 1")
        if not 0.0 <= self.min_margin <= 2.0:
            raise InputError(f"CLIP margin {self.min_margin}: a cosine difference, 0 or more")


DEFAULT_CLIP_THRESHOLDS = ClipThresholds()


@dataclass(frozen=True)
class ClipRanking:
    """The candidate structures of one text, best first, with their cosines."""

    text: str
    #: candidate channels (0..31), best first; a typed side excludes the other side's structures
    order: tuple[int, ...]
    #: cosine to each of the 32 structures, in channel order
    cosines: tuple[float, ...]
    #: the side the text named ("left"/"right"), which restricted the candidates
    side: str | None = None

    @classmethod
    def of(cls, text: str, scorer: TextScorer, *, side: str | None = None) -> ClipRanking:
        """Score ``text``; raises :class:`ClipUnavailable` when the scorer cannot."""
        cos = tuple(float(c) for c in scorer.similarities(text))
        if len(cos) != len(STRUCTURES):
            raise ValueError(f"a text scorer returned {len(cos)} scores, expected {len(STRUCTURES)}")
        other = {"left": "right", "right": "left"}.get(side or "")
        candidates = [i for i, s in enumerate(STRUCTURES) if other is None or s.laterality != other]
        order = sorted(candidates, key=lambda i: (-cos[i], i))
        return cls(text, tuple(order), cos, side)

    @property
    def best(self) -> Structure:
        return STRUCTURES[self.order[0]]

    @property
    def runner_up(self) -> Structure:
        return STRUCTURES[self.order[1]]

    @property
    def cosine(self) -> float:
        return self.cosines[self.order[0]]

    @property
    def margin(self) -> float:
        """How much the best structure beats the runner-up (cosine difference)."""
        return self.cosine - self.cosines[self.order[1]]

    def top(self, n: int = 3, *, skip: int = 0) -> list[tuple[Structure, float]]:
        """``n`` structures with their cosines, from rank ``skip`` on (best first)."""
        return [(STRUCTURES[i], self.cosines[i]) for i in self.order[skip : skip + n]]

    def structures(self, n: int = 3) -> list[Structure]:
        return [s for s, _ in self.top(n)]

    def refusal(self, thresholds: ClipThresholds) -> tuple[str, str] | None:
        """(kind, why) when the ranking must not be trusted, else None."""
        if self.cosine < thresholds.min_cosine:
            return "unknown", (
                f"CLIP: closest is {self.best.name} with cosine {self.cosine:.3f} < "
                f"{thresholds.min_cosine:.3f}, no closer than different structures are to each other"
            )
        if self.margin < thresholds.min_margin:
            return "ambiguous", (
                f"CLIP cannot tell {self.best.name} ({self.cosine:.3f}) from {self.runner_up.name} "
                f"({self.cosines[self.order[1]]:.3f}): margin {self.margin:.3f} < {thresholds.min_margin:.3f}"
            )
        return None

    def __str__(self) -> str:
        side = f"; only {self.side}-sided or unsided structures, as typed" if self.side else ""
        return (
            f"cosine {self.cosine:.3f} to the fixed embedding of '{self.best.prompt}', "
            f"margin {self.margin:.3f} over {self.runner_up.name}{side}"
        )
