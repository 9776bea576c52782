"""Dice and HD95 in mm (evaluation.py) and the `cdpdnet evaluate` command on real label maps."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.cli import main
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io import read_label_map, write_label_map
from napari_cdpdnet.training.evaluation import (
    SCORE_COLUMNS,
    _surface,
    dice,
    evaluate_labels,
    hd95_mm,
    parse_pred_ref,
)

SEG = ("data", "totalsegmentator", "example_seg_full.nii.gz")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_plates_shifted_along_z_give_the_shift_in_mm() -> None:
    # two one-voxel-thick plates 3 slices apart: every surface voxel is 3 * 2.5 mm from the other
    a = np.zeros((12, 20, 20), bool)
    b = np.zeros_like(a)
    a[4, 5:15, 5:15] = True
    b[7, 5:15, 5:15] = True
    assert hd95_mm(a, b, (2.5, 0.7, 0.7)) == pytest.approx(7.5)
    assert hd95_mm(a, a, (2.5, 0.7, 0.7)) == 0.0
    assert dice(a, b) == 0.0 and dice(a, a) == 1.0
    assert math.isnan(hd95_mm(a, np.zeros_like(a), (1, 1, 1)))
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))


def test_dice_has_no_smoothing_term() -> None:
    a = np.zeros((5, 5, 5), bool)
    a[2, 2, 2:4] = True  # 2 voxels; the official +1 would give 4/5
    b = np.zeros_like(a)
    b[2, 2, 2] = True
    assert dice(a, b) == pytest.approx(2 / 3)


def test_real_liver_shifted_two_slices(shared_path) -> None:
    from scipy.spatial import cKDTree

    labels, geom = read_label_map(shared_path(*SEG))
    liver = labels == 5
    shifted = np.zeros_like(liver)
    shifted[2:] = liver[:-2]  # 2 slices of 3 mm along z
    spacing_zyx = tuple(reversed(geom.spacing))
    h = hd95_mm(shifted, liver, spacing_zyx)
    # a translation by d moves every surface point onto the other surface: HD <= |d| = 6 mm
    assert 0 < h <= 6.0 + 1e-9
    # brute force: nearest surface point in mm with a k-d tree, both directions pooled
    pa = np.argwhere(_surface(np.pad(shifted, 1))) * spacing_zyx
    pb = np.argwhere(_surface(np.pad(liver, 1))) * spacing_zyx
    d = np.hstack((cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]))
    assert h == pytest.approx(np.percentile(d, 95))
    expected_dice = 2 * np.count_nonzero(shifted & liver) / (shifted.sum() + liver.sum())
    rows = evaluate_labels(shifted.astype(np.uint8) * 6, geom, labels, geom, {6: [5]})
    assert rows[0].name == "Liver"
    assert rows[0].dice == pytest.approx(expected_dice) and 0.5 < rows[0].dice < 1
    assert rows[0].hd95_mm == pytest.approx(h)


def test_cli_reference_against_itself(shared_path, tmp_path: Path, capsys) -> None:
    seg = shared_path(*SEG)
    out, png = tmp_path / "scores.csv", tmp_path / "scores.png"
    rc = main(["evaluate", "--pred", str(seg), "--ref", str(seg), "--numbering", "other",
               "--map", "5:5", "--map", "1:1", "--map", "20:20", "-o", str(out), "--plot", str(png)])
    assert rc == 0
    rows = _rows(out)
    assert tuple(rows[0]) == SCORE_COLUMNS
    assert [r["pred_values"] for r in rows] == ["5", "1", "20"]
    for r in rows:
        assert float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0
        assert int(r["pred_voxels"]) == int(r["ref_voxels"]) > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean" in capsys.readouterr().out
    # no overwrite without --overwrite
    rc = main(["evaluate", "--pred", str(seg), "--ref", str(seg), "-o", str(out)])
    assert rc == 3


def test_cli_other_numbering_with_merged_lobes(shared_path, tmp_path: Path) -> None:
    """A CDPDNet-numbered prediction against TotalSegmentator values (lobes merged into lungs)."""
    from napari_cdpdnet.vocabulary.labelmaps import TOTALSEGMENTATOR_TOTAL, remap

    seg = shared_path(*SEG)
    labels, geom = read_label_map(seg)
    pred = tmp_path / "pred.nii.gz"
    write_label_map(pred, remap(labels, TOTALSEGMENTATOR_TOTAL), geom)
    out = tmp_path / "s.csv"
    rc = main(["evaluate", "--pred", str(pred), "--ref", str(seg), "--map", "liver:5",
               "--map", "16:12,13,14", "--map", "right_kidney:2", "-o", str(out)])
    assert rc == 0
    rows = {r["name"]: r for r in _rows(out)}
    assert set(rows) == {"Liver", "Right Lung", "Right Kidney"}
    assert rows["Right Lung"]["ref_values"] == "12+13+14"
    assert all(float(r["dice"]) == 1.0 for r in rows.values())


def test_cli_errors(shared_path, tmp_path: Path, capsys) -> None:
    seg = shared_path(*SEG)
    assert main(["evaluate", "--pred", str(seg), "--ref", str(seg), "--map", "5", "-o", str(tmp_path / "a.csv")]) == 2
    assert "expected PRED:REF" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(seg), "--ref", str(seg), "-o", str(tmp_path / "a.txt")]) == 2
    # a prediction on another grid is refused, not silently compared voxel by voxel
    other = tmp_path / "other.nii.gz"
    write_label_map(other, np.zeros((4, 5, 6), np.uint8), Geometry.identity((4, 5, 6)))
    assert main(["evaluate", "--pred", str(other), "--ref", str(seg), "-o", str(tmp_path / "b.csv")]) == 2
    assert "different grids" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


def test_parse_pred_ref() -> None:
    assert parse_pred_ref(["6:5", "16:12,13,14", "spleen:1"]) == {6: [5], 16: [12, 13, 14], 1: [1]}
    with pytest.raises(Exception, match="mapped twice"):
        parse_pred_ref(["6:5", "liver:7"])
    with pytest.raises(Exception, match="not a CDPDNet structure"):
        parse_pred_ref(["kidneys:2"])
