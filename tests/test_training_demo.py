"""A short run of the partial-label vs naive demonstration on the real TotalSegmentator CT.

Two pseudo datasets share the image and label disjoint halves of the structures. Even after one
epoch (one step on each), the naive loss has already pushed down the structures a dataset did
not label, while the partial-label loss has not: the mean probability the model gives inside
the reference structures is higher with the partial-label loss, for both halves. The test uses
``CDPDNetConfig.tiny()`` (half the demo's widths, about half the step cost); the full-length run
with the demo's wider model (scripts/train_demo.py, recorded in docs/training.md) is where Dice
is compared; it needs far more steps than a test can afford on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.training.demo import HALF_A, HALF_B, format_tables, run_demo
from napari_cdpdnet.vocabulary import structure

pytestmark = [pytest.mark.slow, pytest.mark.shared]


def test_short_demo_partial_keeps_what_naive_suppresses(shared_path, tmp_path: Path) -> None:
    ct = shared_path("data", "totalsegmentator", "example_ct.nii.gz")
    ref = shared_path("data", "totalsegmentator", "example_seg_full.nii.gz")
    result = run_demo(ct, ref, tmp_path, steps=2, lr=1e-2, spacing=6.0, threads=1, parallel=True,
                      widths=None)
    names = [structure(k).name for k in (*HALF_A, *HALF_B)]
    assert [r.name for r in result.partial] == names and [r.name for r in result.naive] == names
    assert all(r.ref_voxels > 0 for r in result.partial)
    for half in (HALF_A, HALF_B):
        keys = [structure(k).name for k in half]
        partial = np.mean([result.partial_prob[k] for k in keys])
        naive = np.mean([result.naive_prob[k] for k in keys])
        assert partial > naive, f"half {half}: partial {partial:.4f} <= naive {naive:.4f}"
    table = format_tables(result)
    assert all(n in table for n in names) and "naive loss" in table and "CDPDNetConfig.tiny()" in table
    # the partial label maps hold only their half (unlabelled is left out, not painted as 0 = background
    # of a labelled structure)
    from napari_cdpdnet.io import read_label_map

    a, _ = read_label_map(tmp_path / "labels" / "partial_A.nii.gz")
    b, _ = read_label_map(tmp_path / "labels" / "partial_B.nii.gz")
    assert set(np.unique(a)) - {0} == {structure(k).index for k in HALF_A}
    assert set(np.unique(b)) - {0} == {structure(k).index for k in HALF_B}
