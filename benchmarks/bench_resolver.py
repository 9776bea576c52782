#!/usr/bin/env python
"""How well typed text is understood: lexical-only vs lexical + CLIP on a phrase set (not a test).

Reads ``benchmarks/phrases.tsv`` (phrase, expected structure key or ``refuse``, category) and
resolves every phrase the way the CLI and the dock do (:func:`napari_cdpdnet.vocabulary.resolver.resolve`):

* lexical only: names, synonyms, abbreviations, parts, other languages, typos;
* lexical + CLIP (with ``--clip FILE``: real open_clip ViT-B/32 weights, e.g.
  ``open_clip_model.safetensors`` from ``cdpdnet weights download``): CLIP ranks the 32 structures
  for what the lexicon does not cover, accepted at the thresholds given (default: the product's).

A phrase counts as right when it resolves to its expected structure, or, for ``refuse``, when
it is refused (kind does not matter). The table gives top-1 accuracy on the structure phrases,
the share of ``refuse`` phrases refused, wrong structures, false refusals and overall accuracy
(refusals counted right), overall and per category. With ``--clip`` the script also calibrates:
it sweeps the cosine threshold (and the margin) and prints the pair with the best overall
accuracy (ties: fewer wrong structures, then the higher threshold).

The organ embeddings CLIP compares with come from ``--organ-embeddings`` (a CDPDNet checkpoint
or the official ``txt_encoding.pth``), else from a checkpoint on disk, else CLIP computes them
from the official prompts (the same computation the authors made).

Examples::

    python benchmarks/bench_resolver.py                               # lexical only
    python benchmarks/bench_resolver.py --clip ~/.cache/napari-cdpdnet/weights/clip-vit-b-32/open_clip_model.safetensors
    python benchmarks/bench_resolver.py --clip W.safetensors --organ-embeddings txt_encoding.pth --errors
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from napari_cdpdnet.vocabulary.clip_stage import (  # noqa: E402
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_MARGIN,
    ClipThresholds,
)
from napari_cdpdnet.vocabulary.resolver import Resolution, UnresolvedStructure, resolve  # noqa: E402
from napari_cdpdnet.vocabulary.terms import LIST_SEPARATOR  # noqa: E402

PHRASES = REPO / "benchmarks" / "phrases.tsv"
REFUSE = "refuse"
#: Accepts every CLIP answer: the sweep then decides offline from the recorded cosine and margin.
_ACCEPT_ALL = ClipThresholds(min_cosine=-1.0, min_margin=0.0)


@dataclass(frozen=True)
class Phrase:
    text: str
    expected: str  # structure key or "refuse"
    category: str


@dataclass(frozen=True)
class Outcome:
    """One phrase resolved with CLIP accepting everything: what it became and CLIP's evidence."""

    phrase: Phrase
    key: str  # structure key or "refuse"
    source: str  # resolution source, or the refusal kind
    cosine: float | None = None
    margin: float | None = None

    def at(self, min_cosine: float, min_margin: float) -> str:
        """The answer at these thresholds (only CLIP answers depend on them)."""
        if self.source != "CLIP":
            return self.key
        assert self.cosine is not None and self.margin is not None
        return self.key if self.cosine >= min_cosine and self.margin >= min_margin else REFUSE


def load_phrases(path: Path = PHRASES) -> list[Phrase]:
    """The phrase set (comment lines start with #)."""
    with open(path, encoding="utf-8", newline="") as fh:
        lines = [line for line in fh if line.strip() and not line.startswith("#")]
    rows = list(csv.DictReader(lines, delimiter="\t"))
    phrases = [Phrase(r["phrase"], r["expected"], r["category"]) for r in rows]
    split = [p.text for p in phrases if len(LIST_SEPARATOR.split(p.text)) > 1]
    if split:  # the CLI and the dock would read these as lists: resolve() alone would mislead
        raise SystemExit(f"{path}: phrases containing a list separator: {split}")
    return phrases


def outcomes(phrases: Sequence[Phrase], scorer: Any = None) -> list[Outcome]:
    """Resolve every phrase (with the scorer: CLIP accepting all, evidence recorded)."""
    out = []
    for p in phrases:
        try:
            r: Resolution = resolve(p.text, clip_scorer=scorer, clip_thresholds=_ACCEPT_ALL)
        except UnresolvedStructure as exc:
            out.append(Outcome(p, REFUSE, exc.kind))
            continue
        out.append(Outcome(p, r.structure.key, r.source, r.cosine, r.margin))
    return out


@dataclass
class Score:
    n_struct: int = 0
    right: int = 0
    wrong: int = 0
    false_refusals: int = 0
    n_refuse: int = 0
    refused: int = 0

    def add(self, expected: str, got: str) -> None:
        if expected == REFUSE:
            self.n_refuse += 1
            self.refused += got == REFUSE
        else:
            self.n_struct += 1
            self.right += got == expected
            self.wrong += got not in (expected, REFUSE)
            self.false_refusals += got == REFUSE

    @property
    def overall(self) -> float:
        n = self.n_struct + self.n_refuse
        return (self.right + self.refused) / n if n else 0.0


def score(results: Sequence[Outcome], min_cosine: float, min_margin: float, category: str | None = None) -> Score:
    s = Score()
    for o in results:
        if category is None or o.phrase.category == category:
            s.add(o.phrase.expected, o.at(min_cosine, min_margin))
    return s


def _pct(k: int, n: int) -> str:
    return f"{k:>3}/{n:<3} {100 * k / n:5.1f}%" if n else f"{'-':>14}"


def table(rows: Sequence[tuple[str, Score]]) -> str:
    head = f"{'':<34} {'top-1 (structures)':>18} {'refused (refuse)':>18} {'wrong structure':>16} {'false refusal':>14} {'overall':>8}"
    lines = [head]
    for name, s in rows:
        lines.append(
            f"{name:<34} {_pct(s.right, s.n_struct):>18} {_pct(s.refused, s.n_refuse):>18} "
            f"{s.wrong:>16} {s.false_refusals:>14} {100 * s.overall:>7.1f}%"
        )
    return "\n".join(lines)


def sweep(results: Sequence[Outcome]) -> list[tuple[float, float, Score]]:
    """Every (min_cosine, min_margin) tried, best first."""
    cosines = [round(0.70 + 0.005 * i, 3) for i in range(61)]  # 0.70 ... 1.00
    margins = [0.0, 0.005, 0.01, 0.02, 0.03, 0.05]
    tried = [(c, m, score(results, c, m)) for c in cosines for m in margins]
    tried.sort(key=lambda t: (-t[2].overall, t[2].wrong, -t[0], -t[1]))
    return tried


def _clip_scorer(args: argparse.Namespace) -> Any:
    from napari_cdpdnet.model.text import ClipScorer, load_organ_embeddings

    organ = load_organ_embeddings(args.organ_embeddings) if args.organ_embeddings else None
    scorer = ClipScorer(organ_embeddings=organ, clip_weights=args.clip).load() if organ is not None else (
        ClipScorer(clip_weights=args.clip).load()
    )
    print(f"CLIP: {args.clip}; organ embeddings: {scorer.organ_source}")
    return scorer


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phrases", type=Path, default=PHRASES)
    ap.add_argument("--clip", type=Path, metavar="FILE", help="open_clip ViT-B/32 weights (real ones)")
    ap.add_argument("--organ-embeddings", type=Path, metavar="FILE",
                    help="CDPDNet checkpoint or txt_encoding.pth (default: found or computed)")
    ap.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE)
    ap.add_argument("--min-margin", type=float, default=DEFAULT_MIN_MARGIN)
    ap.add_argument("--errors", action="store_true", help="list every phrase answered wrongly")
    args = ap.parse_args(argv)

    phrases = load_phrases(args.phrases)
    categories = list(dict.fromkeys(p.category for p in phrases))
    n_refuse = sum(p.expected == REFUSE for p in phrases)
    print(f"phrase set: {args.phrases} ({len(phrases)} phrases: {len(phrases) - n_refuse} naming a "
          f"structure, {n_refuse} to refuse)")
    lexical = outcomes(phrases)
    runs = [("lexical only", lexical, 2.0, 2.0)]
    if args.clip is not None:
        with_clip = outcomes(phrases, _clip_scorer(args))
        runs.append((f"lexical + CLIP ({args.min_cosine:.3f}, {args.min_margin:.3f})", with_clip,
                     args.min_cosine, args.min_margin))
    print()
    print(table([(name, score(res, c, m)) for name, res, c, m in runs]))
    for name, res, c, m in runs:
        print(f"\nper category, {name}:")
        print(table([(cat, score(res, c, m, cat)) for cat in categories]))
    if args.clip is not None:
        _, with_clip, _, _ = runs[1]
        reached = sum(o.source == "CLIP" for o in with_clip)
        print(f"\nCLIP was asked for {reached} phrases the lexicon did not cover.")
        best = sweep(with_clip)
        print("calibration (overall accuracy with refusals counted right), best first:")
        for c, m, s in best[:8]:
            print(f"  min_cosine {c:.3f}  min_margin {m:.3f}  overall {100 * s.overall:5.1f}%  "
                  f"top-1 {s.right}/{s.n_struct}  refused {s.refused}/{s.n_refuse}  wrong {s.wrong}")
        c, m, _ = best[0]
        print(f"best threshold: --clip-threshold {c:.3f} --clip-margin {m:.3f}")
    if args.errors:
        for name, res, c, m in runs:
            print(f"\nwrong answers, {name}:")
            for o in res:
                got = o.at(c, m)
                if (got == REFUSE) != (o.phrase.expected == REFUSE) or (got != REFUSE and got != o.phrase.expected):
                    extra = f" (cosine {o.cosine:.3f}, margin {o.margin:.3f})" if o.cosine is not None else ""
                    print(f"  [{o.phrase.category}] {o.phrase.text!r}: expected {o.phrase.expected}, got {got} via {o.source}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
