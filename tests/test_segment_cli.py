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


# --------------------------------------------------------------------------- export through the registry
_BOX = ["--box", "-60", "-40", "-1000", "60", "40", "1000"]  # a few windows of the small CT


def _files(folder: Path) -> set[str]:
    """Every name in ``folder``, hidden ones (staging folders) included."""
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_stl_and_probabilities_are_written_with_the_label_map(
    small_ct: Path, weights, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import struct

    import SimpleITK as sitk

    from napari_cdpdnet.geometry import Geometry

    out = tmp_path / "res" / "abdomen.nii.gz"
    code = _run([str(small_ct), "-s", "liver", "-s", "left kidney", "-o", str(out), *_BOX, "--stl",
                 "--probabilities"], weights)
    assert code == 0
    with open(out.with_name("abdomen.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    found = [r["key"] for r in rows if int(r["voxel_count"])]
    assert found, "the tiny model found nothing in the box; nothing to mesh"
    expected = {"abdomen.nii.gz", "abdomen.csv"} | {f"abdomen_{k}.stl" for k in found} | {
        f"abdomen_{r['key']}_prob.nii.gz" for r in rows}
    assert _files(out.parent) == expected  # no staging folder left, nothing else
    printed = capsys.readouterr().out
    for name in expected - {"abdomen.nii.gz"}:
        assert f"  also wrote {out.parent / name}" in printed
    geometry = read_ct(small_ct).geometry
    for key in found:
        data = out.with_name(f"abdomen_{key}.stl").read_bytes()
        (n,) = struct.unpack("<I", data[80:84])
        assert n > 0 and len(data) == 84 + 50 * n
        vertices = np.frombuffer(data[84:], dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")])["v"]
        corners = geometry.index_to_world(np.array([[0, 0, 0], np.array(geometry.shape) - 1], float))
        assert np.all(vertices.reshape(-1, 3) >= corners.min(axis=0) - 3)  # in the CT, LPS mm
        assert np.all(vertices.reshape(-1, 3) <= corners.max(axis=0) + 3)
    prob = sitk.ReadImage(str(out.with_name(f"abdomen_{rows[0]['key']}_prob.nii.gz")))
    assert Geometry.from_sitk(prob).same_grid(geometry)
    values = sitk.GetArrayFromImage(prob)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1


def test_dicom_seg_that_fails_its_read_back_leaves_nothing(
    shared_path, weights, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_cdpdnet.export.dicomseg as dicomseg

    real = dicomseg.read_dicom_seg

    def one_voxel_lost(path, geometry):
        back, segments = real(path, geometry)
        back[np.unravel_index(np.argmax(back), back.shape)] = 0
        return back, segments

    monkeypatch.setattr(dicomseg, "read_dicom_seg", one_voxel_lost)
    folder = tmp_path / "out"
    code = _run([str(shared_path("data", "dcmqi", "ct-3slice")), "-s", "liver", "-s", "spleen", "-o",
                 str(folder), "--dicom-seg", "--stl", "--preset", "fast"], weights)
    assert code == 1
    assert "DICOM-SEG check failed: 1 voxels differ" in capsys.readouterr().err
    assert _files(folder) == set()  # no label map, no table, no meshes, no staging folder


def test_a_failure_midway_leaves_no_partial_file_and_keeps_the_users(
    small_ct: Path, weights, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_cdpdnet.export.meshes as meshes
    from napari_cdpdnet.errors import InputError

    out = tmp_path / "mine.nii.gz"
    out.write_bytes(b"my label map")
    out.with_name("mine.csv").write_text("my table")
    real, calls = meshes.write_stl, []

    def second_fails(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise InputError(f"cannot write {path}: No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(meshes, "write_stl", second_fails)
    code = _run([str(small_ct), "-s", "liver", "-s", "left kidney", "-o", str(out), *_BOX, "--stl",
                 "--overwrite"], weights)
    if len(calls) < 2:
        pytest.skip("the tiny model found fewer than two structures in the box")
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert calls[0].parent != tmp_path  # the first mesh was written, but only into the staging folder
    assert _files(tmp_path) == {"mine.nii.gz", "mine.csv"}
    assert out.read_bytes() == b"my label map" and out.with_name("mine.csv").read_text() == "my table"


def test_export_options_come_from_the_format_registry(tmp_path: Path, capsys) -> None:
    from napari_cdpdnet.cli import build_parser
    from napari_cdpdnet.export import optional_formats

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command, formats in (("segment", optional_formats()),
                             ("segment-by-example", optional_formats(probabilities=False))):
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        assert {f.flag for f in formats} <= flags
        assert ("--probabilities" in flags) == (command == "segment")
    # a DICOM-only format on a file input is refused before weights are even looked for
    from napari_cdpdnet.geometry import Geometry
    from napari_cdpdnet.io import write_image

    missing = tmp_path / "no-such-weights.pth"
    ct = tmp_path / "ct.nii.gz"
    write_image(ct, np.full((4, 5, 6), -1000, np.int16), Geometry.identity((4, 5, 6)))
    code = main(["segment-by-example", str(ct), "--voxel", "--click", "1", "1", "1", "-o",
                 str(tmp_path / "o.nii.gz"), "--dicom-seg", "--checkpoint", str(missing), "--dino", str(missing),
                 "--offline"])
    assert code == 2 and "--dicom-seg needs a DICOM series" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_model_whose_outputs_do_not_match_the_vocabulary_is_refused(
    weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edited structures.json (or a checkpoint of another label set) must not mislabel masks."""
    import napari_cdpdnet.vocabulary.catalog as catalog
    from napari_cdpdnet.errors import WeightsError
    from napari_cdpdnet.inference.segmenter import Segmenter

    monkeypatch.setattr(catalog, "STRUCTURES", catalog.STRUCTURES[:-1])
    with pytest.raises(WeightsError, match="predicts 32 structures but the vocabulary"):
        Segmenter(checkpoint=weights[0], dino=weights[1], allow_download=False).model("cpu")
