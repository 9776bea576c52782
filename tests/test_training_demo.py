"""A short run of the partial-label vs naive demonstration on the real TotalSegmentator CT.

The CT is cut into the patient's right and left side, two pseudo datasets labelling disjoint
halves of the structures; structures crossing the midline are present but unlabelled on the
other side ("unseen"). The first test runs the whole demo for one epoch (one step on each side,
``CDPDNetConfig.tiny()``) and checks its data and report; after so few steps the models'
probabilities say nothing about the losses (tried: the direction flips between runs). The second
checks the mechanism exactly, on a real training crop through the trainer's loss path. Dice is
compared only in the full-length runs (scripts/train_demo.py, recorded in docs/training.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from napari_cdpdnet.vocabulary.catalog import structure

# The demo is an experiment in scripts/, not in the package. Its folder goes on sys.path (not a
# one-off module load) because the demo's parallel mode re-imports it in spawned processes.
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from train_demo import HALF_A, HALF_B, _config, format_tables, run_demo, split_sides  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.shared]

#: Structures of the demo's halves that cross the body's midline (present on both sides).
CROSSING = {"liver", "small_intestine", "urinary_bladder", "stomach", "colon"}


def test_short_demo_partial_keeps_what_naive_suppresses(shared_path, tmp_path: Path) -> None:
    from napari_cdpdnet.io.images import read_ct, read_label_map

    ct = shared_path("data", "totalsegmentator", "example_ct.nii.gz")
    ref = shared_path("data", "totalsegmentator", "example_seg_full.nii.gz")
    result = run_demo(ct, ref, tmp_path, steps=2, lr=1e-2, spacing=6.0, threads=1, parallel=True,
                      widths=None)
    names = [structure(k).name for k in (*HALF_A, *HALF_B)]
    assert [r.name for r in result.partial] == names and [r.name for r in result.naive] == names
    assert all(r.ref_voxels > 0 for r in result.partial)

    # "unseen" is defined exactly for the structures reaching into the other side's image
    for key in (*HALF_A, *HALF_B):
        name = structure(key).name
        for unseen in (result.partial_unseen, result.naive_unseen, result.partial_unseen_prob):
            assert np.isfinite(unseen[name]) == (key in CROSSING), (key, unseen[name])

    table = format_tables(result)
    assert all(n in table for n in names) and "naive loss" in table and "CDPDNetConfig.tiny()" in table
    assert "A right" in table and "B left" in table

    # the two side images tile the source grid: right side (lower LPS x) for A, left for B, each
    # with its own half's labels only (the other half is left out, not painted as background)
    scan = read_ct(ct)
    full, geometry = read_label_map(ref)
    a_img, b_img = read_ct(tmp_path / "labels" / "image_A_right.nii.gz"), read_ct(tmp_path / "labels" / "image_B_left.nii.gz")
    assert a_img.array.shape[:2] == b_img.array.shape[:2] == full.shape[:2]
    assert a_img.array.shape[2] + b_img.array.shape[2] == full.shape[2]
    centre = [img.geometry.index_to_world((np.asarray(img.array.shape) - 1) / 2)[0] for img in (a_img, b_img)]
    assert centre[0] < centre[1]  # LPS: +x is the patient's left
    starts = [float(geometry.world_to_index(np.asarray(img.geometry.origin))[2]) for img in (a_img, b_img)]
    (s0, first), (s1, _) = sorted(zip(starts, (a_img, b_img), strict=True), key=lambda t: t[0])
    assert s0 == pytest.approx(0, abs=1e-3) and s1 == pytest.approx(first.array.shape[2], abs=1e-3)
    together = np.concatenate([img.array for img in ((a_img, b_img) if starts[0] < starts[1] else (b_img, a_img))], axis=2)
    np.testing.assert_array_equal(together, scan.array)
    a, a_geo = read_label_map(tmp_path / "labels" / "partial_A.nii.gz")
    b, _ = read_label_map(tmp_path / "labels" / "partial_B.nii.gz")
    assert a_geo.same_grid(a_img.geometry)
    assert set(np.unique(a)) - {0} == {structure(k).index for k in HALF_A}
    assert set(np.unique(b)) - {0} == {structure(k).index for k in HALF_B}


def test_what_each_loss_teaches_on_a_real_training_crop(shared_path, tmp_path: Path) -> None:
    """The mechanism on the demo's own data and training path: on a crop of the right side image
    (pseudo dataset A) the naive loss pushes every half-B channel down, the right colon included;
    the partial-label loss sends those channels nothing."""
    import torch

    from napari_cdpdnet.io.images import read_ct, read_label_map
    from napari_cdpdnet.training.config import parse_config
    from napari_cdpdnet.training.data import build_dataset
    from napari_cdpdnet.training.trainer import train_step
    from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap

    scan = read_ct(shared_path("data", "totalsegmentator", "example_ct.nii.gz"))
    raw, geometry = read_label_map(shared_path("data", "totalsegmentator", "example_seg_full.nii.gz"))
    full = remap(raw, TOTALSEGMENTATOR_TOTAL)
    parts = split_sides(scan.array, full, geometry, tmp_path / "labels")
    colon = structure("colon").index
    assert (full[parts[0].region] == colon).sum() > 1000  # the right colon is in image A, unlabelled
    cfg = parse_config(_config(tmp_path, parts, "partial", steps=2, spacing=6.0, lr=1e-2, seed=0,
                               halves=(HALF_A, HALF_B), tasks=(0, 1)))
    assert [c.labelled for d in cfg.datasets for c in d.cases] == [
        frozenset(structure(k).index for k in half) for half in (HALF_A, HALF_B)]
    sample = build_dataset(cfg.datasets[0], cfg)[0]
    sample = sample[0] if isinstance(sample, list) else sample
    batch = {"image": sample["image"][None], "target": sample["target"][None],
             "labelled": sample["labelled"][None], "task_id": torch.tensor([sample["task_id"]])}
    assert int(batch["target"][0, colon - 1].sum()) == 0  # not labelled: no colon in A's targets

    class Logits(torch.nn.Module):
        """Stands in for the network: its output is the parameter whose gradient we read."""

        def __init__(self) -> None:
            super().__init__()
            self.out = torch.nn.Parameter(torch.zeros(1, 32, *batch["image"].shape[2:]))
            self.device = torch.device("cpu")

        def forward(self, image: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
            return self.out

    union = torch.zeros(32, dtype=torch.bool)
    union[[structure(k).index - 1 for k in (*HALF_A, *HALF_B)]] = True
    grads = {}
    for loss in ("partial", "naive"):
        model = Logits()
        train_step(model, batch, loss, naive_channels=union)
        grads[loss] = model.out.grad[0]
    for k in HALF_B:  # unlabelled in A
        c = structure(k).index - 1
        assert torch.count_nonzero(grads["partial"][c]) == 0, k
        assert bool((grads["naive"][c] > 0).all()), k  # d loss / d logit > 0: pushed towards 0
    for k in HALF_A:  # labelled in A: both losses teach them alike
        c = structure(k).index - 1
        assert torch.count_nonzero(grads["partial"][c]) > 0, k
    assert torch.count_nonzero(grads["naive"][~union]) == 0  # structures of neither half: untouched
