"""The resolver benchmark: its phrase set, its scoring and calibration, and the docs' numbers."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from clip_support import StubScorer
from conftest import REPO_ROOT

from napari_cdpdnet.vocabulary.catalog import STRUCTURES


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_resolver", REPO_ROOT / "benchmarks" / "bench_resolver.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_resolver"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_phrase_set_is_large_varied_and_valid(bench) -> None:
    phrases = bench.load_phrases()
    assert len(phrases) >= 150
    keys = {s.key for s in STRUCTURES} | {"refuse"}
    assert {p.expected for p in phrases} <= keys
    assert len({p.text.casefold() for p in phrases}) == len(phrases)
    counts = {c: sum(p.category == c for p in phrases) for c in {p.category for p in phrases}}
    for category in ("clinical", "lay", "misspelling", "language", "abbreviation", "description", "refuse"):
        assert counts.get(category, 0) >= 15, counts
    assert all((p.expected == "refuse") == (p.category == "refuse") for p in phrases)


def test_scoring_and_calibration_find_the_threshold_that_separates(bench) -> None:
    phrases = bench.load_phrases()
    lexical = bench.score(bench.outcomes(phrases), 2.0, 2.0)
    with_clip = bench.outcomes(phrases, StubScorer())
    # the stub knows two of the descriptions and gives everything else flat, untrustworthy scores
    by_text = {o.phrase.text: o for o in with_clip}
    assert by_text["main artery of the abdomen"].key == "aorta"
    assert by_text["the big organ under the right ribs"].key == "liver"
    assert by_text["main artery of the abdomen"].source == "CLIP"
    accept_all = bench.score(with_clip, -1.0, 0.0)
    assert accept_all.refused < lexical.refused  # accepting every CLIP answer refuses nothing more
    c, m, best = bench.sweep(with_clip)[0]
    assert best.right == lexical.right + 2 and best.refused == lexical.refused and best.wrong == lexical.wrong
    assert not (c <= 0.802 and m <= 0.001)  # the flat scores are not trusted
    assert best.overall > lexical.overall


def test_the_lexical_numbers_in_the_docs_are_the_measured_ones(bench, capsys: pytest.CaptureFixture) -> None:
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    row = re.search(r"lexical only\s+(\d+)/(\d+)\s+[\d.]+%\s+(\d+)/(\d+)\s+[\d.]+%\s+(\d+)\s+(\d+)\s+([\d.]+)%", out)
    assert row, out
    right, n, refused, n_refuse, wrong, false_refusals, overall = row.groups()
    docs = (Path(REPO_ROOT) / "docs" / "resolver.md").read_text()
    expected = (f"| lexical only | {right}/{n} ({100 * int(right) / int(n):.1f} %) | {refused}/{n_refuse} "
                f"({100 * int(refused) / int(n_refuse):.0f} %) | {wrong} | {false_refusals} | {overall} % |")
    assert expected in docs, f"docs/resolver.md must show the measured row:\n{expected}"
