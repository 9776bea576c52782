"""`cdpdnet segment` and the Segmenter end to end: tiny official-format weights, real CT."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from napari_cdpdnet.cli import main
from napari_cdpdnet.errors import Cancelled
from napari_cdpdnet.inference.segmenter import Segmenter
from napari_cdpdnet.inference.settings import SegmentationSettings
from napari_cdpdnet.io.images import read_ct, read_label_map

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def small_ct(shared_path) -> Path:
    return shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz")


def _run(args: list[str], weights: tuple[Path, Path]) -> int:
    return main(["segment", *args, "--checkpoint", str(weights[0]), "--dino", str(weights[1]),
                 "--offline", "--no-progress"])


def test_segment_writes_label_map_on_the_input_grid_and_a_label_table(
    small_ct: Path, weights, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "res" / "liver_kidney.nii.gz"
    assert _run([str(small_ct), "-s", "liver", "-s", "left kidney", "-o", str(out), "--preset", "fast"], weights) == 0
    labels, geom = read_label_map(out)
    assert geom.same_grid(read_ct(small_ct).geometry)
    assert set(np.unique(labels)) <= {0, 3, 6}  # only left kidney (3) and liver (6)
    with open(out.with_name("liver_kidney.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["value"], r["key"]) for r in rows] == [("6", "liver"), ("3", "left_kidney")]
    for r in rows:
        assert int(r["voxel_count"]) == int((labels == int(r["value"])).sum())
        assert float(r["volume_ml"]) == pytest.approx(int(r["voxel_count"]) * 27 / 1000, abs=0.01)
        assert r["reviewed"] == "false" and r["snomed_type"].endswith("^SCT^" + ("Liver" if r["value"] == "6" else "Kidney"))
    assert "liver_kidney.nii.gz" in capsys.readouterr().out


def test_unknown_structure_is_refused_before_any_work(small_ct: Path, tmp_path: Path, capsys) -> None:
    t0 = time.perf_counter()
    missing = tmp_path / "no-such-weights.pth"
    code = main(["segment", str(small_ct), "-s", "liver, brain", "-o", str(tmp_path / "x.nii.gz"),
                 "--checkpoint", str(missing), "--dino", str(missing), "--offline"])
    assert code == 5
    err = capsys.readouterr().err
    assert "brain" in err and "not one of" in err
    assert not (tmp_path / "x.nii.gz").exists()
    assert time.perf_counter() - t0 < 10


def test_existing_output_is_kept_unless_overwrite(small_ct: Path, weights, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine.nii.gz"
    out.write_bytes(b"my own file")
    assert _run([str(small_ct), "-s", "spleen", "-o", str(out)], weights) == 3
    assert out.read_bytes() == b"my own file"
    assert "--overwrite" in capsys.readouterr().err


def test_missing_weights_offline_name_the_files(small_ct: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CDPDNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CDPDNET_WEIGHTS_DIR", raising=False)
    code = main(["segment", str(small_ct), "-s", "liver", "-o", str(tmp_path / "o.nii.gz"), "--offline"])
    assert code == 4
    err = capsys.readouterr().err
    assert "cdpdnet.pth" in err and "dinov2" in err.lower()
    assert not (tmp_path / "o.nii.gz").exists()


def test_batch_continues_past_a_bad_input_and_reports_it(small_ct: Path, weights, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    box = ["--box", "-60", "-40", "-1000", "60", "40", "1000"]
    code = _run([str(bad), str(small_ct), "-s", "liver", "-o", str(tmp_path / "out"), *box], weights)
    assert code == 2
    assert (tmp_path / "out" / "example_ct_sm.nii.gz").is_file()
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    assert "broken.nii.gz" in capsys.readouterr().err


def test_dicom_series_to_dicom_seg(shared_path, weights, tmp_path: Path) -> None:
    from napari_cdpdnet.export.dicomseg import read_dicom_seg

    series = shared_path("data", "dcmqi", "ct-3slice")
    out = tmp_path / "liver.nii.gz"
    code = _run([str(series), "-s", "liver", "-s", "spleen", "-o", str(out), "--dicom-seg", "--preset", "fast"], weights)
    ct = read_ct(series)
    if code == 2:  # nothing segmented by the random tiny model: DICOM-SEG cannot hold empty segments
        pytest.skip("the random tiny model found nothing in the 3-slice series")
    assert code == 0
    labels, geom = read_label_map(out)
    assert geom.same_grid(ct.geometry)
    seg_labels, segments = read_dicom_seg(tmp_path / "liver.seg.dcm", ct.geometry)
    names = {s.number: s.label for s in segments}
    for number, name in names.items():
        value = {"Liver": 6, "Spleen": 1}[name]
        np.testing.assert_array_equal(seg_labels == number, labels == value)


def test_cancel_stops_within_a_window_and_returns_nothing(small_ct: Path, weights) -> None:
    ct = read_ct(small_ct)
    seg = Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False)
    seen: list[int] = []

    def progress(event) -> None:
        if event.stage == "inference":
            seen.append(event.done)

    with pytest.raises(Cancelled):
        seg.segment(ct.array, ct.geometry, "liver", SegmentationSettings(preset="fast"),
                    progress=progress, should_stop=lambda: bool(seen) and seen[-1] >= 1)
    assert max(seen) <= 2  # stopped right after the first window, not at the end
    assert seg.is_loaded()  # the model stays loaded for the next run
