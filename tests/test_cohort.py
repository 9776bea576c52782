"""Cohort runs: inputs at scale, shards, resume, torchrun ranks, the run report (tiny model, CPU).

The cohort (tests/cohort_support.py) is crops of the real example CT as NIfTI/NRRD/MHA in a folder
tree, a DICOM series written from a crop, and a damaged file; each crop is one window of the tiny
model, so a case costs about a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cohort_support import BAD, expected_outputs, make_cohort

from napari_cdpdnet.cli import main
from napari_cdpdnet.cohort.inputs import discover_cases, estimate_cost, read_manifest
from napari_cdpdnet.cohort.outputs import output_state, sweep_staging
from napari_cdpdnet.cohort.plan import CohortJob, make_plan
from napari_cdpdnet.cohort.report import CSV_COLUMNS, iter_case_rows
from napari_cdpdnet.cohort.sharding import JobPosition, balanced_partition, parse_shard
from napari_cdpdnet.errors import InputError, OutputExistsError, VocabularyError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.inference.settings import SegmentationSettings


@pytest.fixture(scope="module")
def cohort(shared_path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("cohort") / "data"
    return root, make_cohort(root, shared_path("data", "totalsegmentator", "example_ct_sm.nii.gz"))


def _job(inputs, output: Path, **over) -> CohortJob:
    fields = dict(inputs=tuple(str(i) for i in inputs), output=output, request=("liver",),
                  settings=SegmentationSettings())
    fields.update(over)
    return CohortJob(**fields)


def _tree(root: Path) -> set[str]:
    """Every path under ``root``, hidden ones included, relative."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ============================================================================ inputs
@pytest.mark.shared
def test_a_folder_is_searched_for_every_ct_file_and_dicom_series_and_mirrored(cohort, tmp_path) -> None:
    root, cases = cohort
    out = tmp_path / "results"
    found = discover_cases([root], out)
    by_source = {c.source: c for c in found.cases}
    assert set(by_source) == set(cases.values())  # not notes.txt, not the hidden copy
    expected = expected_outputs(out)
    for name, source in cases.items():
        assert by_source[source].output == expected[name]
    series = by_source[cases["patient9/ct"]]
    assert series.series_uid and series.source.is_dir()
    # an output folder inside the input folder is never searched (a rerun must not eat its outputs)
    inside = root / "results"
    (inside / "sub").mkdir(parents=True)
    (inside / "sub" / "x.nii.gz").write_bytes(cases["a.nii.gz"].read_bytes())
    try:
        again = discover_cases([root], inside, exclude=[inside])
        assert {c.source for c in again.cases} == set(cases.values())
    finally:
        import shutil

        shutil.rmtree(inside)


@pytest.mark.shared
def test_a_folder_that_is_one_series_stays_one_case_named_after_it(cohort, tmp_path) -> None:
    root, cases = cohort
    [case] = discover_cases([cases["patient9/ct"]], tmp_path / "o").cases
    assert case.output == tmp_path / "o" / "ct.nii.gz" and case.series_uid
    [case] = discover_cases([cases["patient9/ct"]], tmp_path / "ct_liver.nrrd").cases
    assert case.output == tmp_path / "ct_liver.nrrd"
    with pytest.raises(InputError, match="single file: give a folder"):
        discover_cases([root], tmp_path / "one.nii.gz")


@pytest.mark.shared
def test_globs_mirror_below_their_fixed_part_and_clashes_are_refused(cohort, tmp_path) -> None:
    root, cases = cohort
    found = discover_cases([f"{root}/**/*.nii.gz"], tmp_path / "o")
    assert {c.output.relative_to(tmp_path / "o").as_posix() for c in found.cases} == {
        "a.nii.gz", "d.nii.gz", "e/e.nii.gz", "broken/scan.nii.gz"}
    with pytest.raises(InputError, match="no file or folder matches"):
        discover_cases([f"{root}/*.nothing"], tmp_path / "o")
    # explicit files keep the flat names of earlier versions: two "scan" files clash
    other = tmp_path / "elsewhere" / "scan.nii.gz"
    other.parent.mkdir()
    other.write_bytes(cases[BAD].read_bytes())
    with pytest.raises(InputError, match="would both write"):
        discover_cases([cases[BAD], other], tmp_path / "o")


@pytest.mark.shared
def test_manifest_gives_each_case_its_structures_and_output(cohort, tmp_path) -> None:
    root, cases = cohort
    manifest = root.parent / "cases.csv"
    manifest.write_text(
        "input,output,structures\n"
        "# a comment line\n"
        "data/a.nii.gz,,liver\n"
        f"{cases['sub/b.nrrd']},named/b_out.nrrd,\"spleen; left kidney\"\n"
        "data/patient9/ct,,\n"
        "data/missing.nii.gz,,liver\n")
    found = discover_cases([manifest], tmp_path / "o")
    got = {c.source.name: (c.output.relative_to(tmp_path / "o").as_posix(), c.request) for c in found.cases}
    assert got == {"a.nii.gz": ("data/a.nii.gz", "liver"), "b.nrrd": ("named/b_out.nrrd", "spleen; left kidney"),
                   "ct": ("data/patient9/ct.nii.gz", None), "missing.nii.gz": ("data/missing.nii.gz", "liver")}
    plan = make_plan(_job([manifest], tmp_path / "o", request=("pancreas",)), JobPosition())
    assert [list(k) for k in plan.keys] == [["liver"], ["spleen", "left_kidney"], ["pancreas"], ["liver"]]
    # errors name the manifest and the line
    bad = root.parent / "bad.csv"
    bad.write_text("input,structures\ndata/a.nii.gz,liver\ndata/d.nii.gz,livr; brain\n")
    with pytest.raises(VocabularyError, match="(?s)bad.csv line 3: .*brain"):
        make_plan(_job([bad], tmp_path / "o"), JobPosition())
    bad.write_text("path,structures\nx.nii.gz,liver\n")
    with pytest.raises(InputError, match="no 'input' column"):
        read_manifest(bad)
    bad.write_text("input;organ\nx.nii.gz;liver\n")
    with pytest.raises(InputError, match="unknown column.*organ"):
        read_manifest(bad)
    bad.write_text("input\ndata/a.nii.gz\n")
    with pytest.raises(InputError, match="no structures named: give -s"):
        make_plan(_job([bad], tmp_path / "o", request=None), JobPosition())


# ============================================================================ shards and ranks
def test_shard_and_slurm_positions() -> None:
    assert parse_shard("2/8") == (1, 8)
    for bad in ("0/4", "5/4", "3", "a/b"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
             "SLURM_ARRAY_TASK_STEP": "2"}  # --array=1-7:2 → tasks 1,3,5,7
    pos = JobPosition.detect(None, slurm)
    assert (pos.shard, pos.shards, pos.shard_source) == (3, 4, "Slurm array")
    assert JobPosition.detect("1/2", slurm).shard == 0  # explicit wins
    pos = JobPosition.detect(None, {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (pos.rank, pos.local_rank, pos.world_size, pos.split) == (3, 1, 4, False)
    with pytest.raises(InputError, match="not one of 4 tasks"):
        JobPosition.detect(None, {**slurm, "SLURM_ARRAY_TASK_ID": "9"})


def test_balanced_partition_splits_by_size_not_count() -> None:
    rng = np.random.default_rng(0)
    costs = list(rng.lognormal(0, 1, 200))
    for parts in (2, 3, 7):
        split = balanced_partition(costs, parts)
        assert sorted(i for p in split for i in p) == list(range(200))  # each index exactly once
        loads = [sum(costs[i] for i in p) for p in split]
        assert max(loads) - min(loads) <= max(costs)  # greedy bound
        by_count = [sum(costs[i::parts]) for i in range(parts)]
        assert max(loads) - min(loads) < max(by_count) - min(by_count)
        assert balanced_partition(costs, parts) == split  # deterministic


@pytest.mark.shared
def test_shards_of_a_cohort_are_disjoint_cover_it_and_balance_its_size(cohort, tmp_path) -> None:
    from napari_cdpdnet.io import write_image

    root, _ = cohort
    big = tmp_path / "big"  # four scans much larger than the crops
    for i, n in enumerate((60, 70, 80, 90)):
        write_image(big / f"big{i}.nii.gz", np.full((n, n, n), -1000, np.int16),
                    Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3).ravel(), (n, n, n)))
    everything = discover_cases([root, big], tmp_path / "o").cases
    costs = {c.key: estimate_cost(c).cost for c in everything}
    for shards in (2, 3):
        parts = [make_plan(_job([root, big], tmp_path / "o"), JobPosition(shard=k, shards=shards))
                 for k in range(shards)]
        keys = [[c.key for c in p.cases] for p in parts]
        flat = [k for part in keys for k in part]
        assert sorted(flat) == sorted(costs) and len(set(flat)) == len(flat)
        loads = [sum(costs[k] for k in part) for part in keys]
        assert max(loads) - min(loads) <= max(costs.values())
        assert all(p.total == len(everything) for p in parts)
    # torchrun: rank 0's plan gives each rank its part of what is left to do
    plan = make_plan(_job([root, big], tmp_path / "o"), JobPosition(world_size=2))
    assert sorted(i for part in plan.todo for i in part) == list(range(len(plan.cases)))
    assert all(plan.todo)


# ============================================================================ outputs and resume
def _export(out: Path, keys=("liver", "spleen"), formats=("stl",)) -> None:
    from napari_cdpdnet.export import export_segmentation
    from napari_cdpdnet.export.labeltable import build_label_table
    from napari_cdpdnet.vocabulary.catalog import structure

    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2:5, 2:6, 2:7] = structure("liver").index
    g = Geometry.identity(labels.shape)
    table = build_label_table(labels, g, None, values=[structure(k).index for k in keys])
    export_segmentation(labels, g, None, out, formats=formats, rows=table)


def test_the_label_table_is_published_last_and_marks_a_complete_case(tmp_path, monkeypatch) -> None:
    import napari_cdpdnet.fileutil as fileutil

    moved: list[str] = []
    real = fileutil._publish
    monkeypatch.setattr(fileutil, "_publish", lambda src, dst, overwrite: (moved.append(dst.name), real(src, dst, overwrite)))
    out = tmp_path / "case.nii.gz"
    _export(out)
    assert moved[-1] == "case.csv" and set(moved) == {"case.nii.gz", "case.csv", "case_liver.stl"}
    assert output_state(out, ["liver", "spleen"], ["stl"]).state == "complete"
    state = output_state(out, ["liver", "spleen"], [])
    assert state.state == "complete" and [r.volume_ml for r in state.rows] == [0.06, 0.0]
    assert output_state(out, ["liver"], ["stl"]).state == "different"
    assert output_state(out, ["liver", "spleen"], ["stl", "probabilities"]).state == "partial"
    (tmp_path / "case_liver.stl").unlink()
    assert output_state(out, ["liver", "spleen"], ["stl"]).state == "partial"
    (tmp_path / "case.csv").unlink()  # a crash between two moves: the map without its table
    state = output_state(out, ["liver", "spleen"], [])
    assert state.state == "partial" and "case.csv" in state.detail
    out.unlink()
    assert output_state(out, ["liver", "spleen"], []).state == "absent"


@pytest.mark.shared
def test_skip_existing_plans_only_the_rest_and_refuses_partial_outputs(cohort, tmp_path) -> None:
    root, cases = cohort
    out = tmp_path / "o"
    outputs = expected_outputs(out)
    _export(outputs["a.nii.gz"], keys=("liver",), formats=())  # a finished case
    outputs["d.nii.gz"].write_bytes(b"label map of a run killed before its table")
    with pytest.raises(OutputExistsError, match="--skip-existing"):
        make_plan(_job([root], out), JobPosition())
    plan = make_plan(_job([root], out, skip_existing=True), JobPosition())
    names = [c.output for c in plan.cases]
    assert [names[i] for i, _ in plan.skipped] == [outputs["a.nii.gz"]]
    [(refused, message)] = plan.refused
    assert names[refused] == outputs["d.nii.gz"] and "--overwrite" in message
    assert len(plan.todo[0]) == len(cases) - 2
    plan = make_plan(_job([root], out, skip_existing=True, overwrite=True), JobPosition())
    assert len(plan.todo[0]) == len(cases) - 1 and not plan.refused


def test_staging_left_by_a_killed_process_is_swept_only_when_it_is_the_cases(tmp_path) -> None:
    out = tmp_path / "ct.nii.gz"
    mine = tmp_path / ".tmp-export-aaaa"
    mine.mkdir()
    (mine / "ct.nii.gz").write_bytes(b"x")
    (mine / ".tmp-1234abcd-ct.csv").write_bytes(b"x")
    theirs = tmp_path / ".tmp-export-bbbb"
    theirs.mkdir()
    (theirs / "ct_1.nii.gz").write_bytes(b"x")  # another case's work in progress
    empty = tmp_path / ".tmp-export-cccc"
    empty.mkdir()
    assert sweep_staging([out, tmp_path / "other.nii.gz"]) == [mine]
    assert theirs.exists() and empty.exists() and not mine.exists()


# ============================================================================ the device stage
@pytest.mark.slow
@pytest.mark.shared
def test_prepare_then_segment_prepared_equals_segment(cohort, segmenter) -> None:
    import pickle

    from napari_cdpdnet.io.images import read_ct

    _, cases = cohort
    ct = read_ct(cases["a.nii.gz"])
    settings = SegmentationSettings(preset="fast")
    whole = segmenter.segment(ct.array, ct.geometry, "liver, spleen", settings)
    prepared = pickle.loads(pickle.dumps(segmenter.prepare(ct.array, ct.geometry, settings)))
    split = segmenter.segment_prepared(prepared, "liver, spleen")
    np.testing.assert_array_equal(split.labels, whole.labels)
    assert [(r.key, r.voxel_count) for r in split.table] == [(r.key, r.voxel_count) for r in whole.table]
    assert split.result.windows == whole.result.windows
    with pytest.raises(InputError, match="prepare it again"):
        segmenter.segment_prepared(prepared, "liver", SegmentationSettings(preset="exact"))


# ============================================================================ whole runs
@pytest.mark.slow
@pytest.mark.shared
def test_manifest_run_segments_each_case_for_its_own_structures(cohort, weights, tmp_path, capsys) -> None:
    root, cases = cohort
    manifest = tmp_path / "cases.tsv"
    manifest.write_text(f"input\tstructures\toutput\n{cases['d.nii.gz']}\tliver\t\n"
                        f"{cases['e/e.nii.gz']}\tspleen, left kidney\tpatient_e.nii.gz\n")
    out = tmp_path / "res"
    code = main(["segment", str(manifest), "-o", str(out), "--checkpoint", str(weights[0]), "--dino",
                 str(weights[1]), "--offline", "--no-progress", "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    import csv

    def keys(table: Path) -> list[str]:
        with open(table, newline="") as fh:
            return [r["key"] for r in csv.DictReader(fh)]

    assert keys(out / "d.csv") == ["liver"]
    assert keys(out / "patient_e.csv") == ["spleen", "left_kidney"]
    rows = {r.case: r for r in iter_case_rows(out)}
    assert rows["patient_e.nii.gz"].structures == "spleen;left_kidney"
    assert {r.status for r in rows.values()} == {"ok"}


def _torchrun(args: list[str], weights, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_cdpdnet.cli", "segment", *args, "--checkpoint", str(weights[0]),
           "--dino", str(weights[1]), "--offline", "--no-progress", "--workers", "1"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _our_tracebacks(log: str) -> list[str]:
    """Traceback lines in our code (torchrun's own report of a failed rank is not one)."""
    return [line for line in log.splitlines() if line.strip().startswith("File ") and "napari_cdpdnet" in line]


def _events(out: Path, rank: int | None = None) -> list[dict]:
    found = []
    for log in sorted(out.glob(f".cdpdnet-run/*/rank{'*' if rank is None else rank}.jsonl")):
        found += [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return found


@pytest.mark.slow
@pytest.mark.shared
def test_torchrun_cohort_killed_midway_then_resumed(cohort, weights, tmp_path) -> None:
    root, cases = cohort
    out = tmp_path / "results"
    args = [str(root), "-s", "liver", "-o", str(out), "--skip-existing"]
    # 1. two ranks; once rank 1 has finished a case, it is sent SIGTERM (as torchrun or Slurm would)
    first = _torchrun(args, weights, tmp_path / "first.log")
    killed_at = None
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        events = _events(out, rank=1)
        if killed_at is None and any(e["event"] == "case" and e["status"] == "ok" for e in events):
            os.kill(events[0]["pid"], signal.SIGTERM)
            killed_at = time.monotonic()
        time.sleep(0.05)
    assert first.wait(timeout=60) != 0 and killed_at is not None, (tmp_path / "first.log").read_text()
    log = (tmp_path / "first.log").read_text()
    assert not _our_tracebacks(log), log  # torchrun prints its own summary of the failed ranks
    assert "--skip-existing to do the rest" in log
    # nothing partial anywhere: each case has its whole set (map + table) or nothing; no temp files
    expected = expected_outputs(out)
    done_first = set()
    for name, label_map in expected.items():
        table = label_map.with_suffix("").with_suffix(".csv")
        assert label_map.exists() == table.exists(), name
        if label_map.exists():
            done_first.add(name)
    assert not [p for p in _tree(out) if "/.tmp" in f"/{p}" and ".cdpdnet-run" not in p]
    stopped = [e for e in _events(out) if e["event"] in ("stopped", "finished")]
    assert any(e["event"] == "stopped" and e["signal"] == "SIGTERM" for e in stopped)
    report = json.loads((out / "run.json").read_text())
    assert report["runs"][0]["status"] == "interrupted"
    assert 1 <= len(done_first) < len(cases) - 1, "the kill did not land midway"
    stamps = {name: expected[name].stat().st_mtime_ns for name in done_first}

    # 2. the same command again: only what is left is computed, once, split over the two ranks
    second = _torchrun(args, weights, tmp_path / "second.log")
    assert second.wait(timeout=300) != 0  # one case is damaged: the run says so
    log = (tmp_path / "second.log").read_text()
    assert "exitcode  : 2" in log and not _our_tracebacks(log), log
    rows = list(iter_case_rows(out))
    assert list(CSV_COLUMNS) == list(json.loads((out / "run.json").read_text())["cases"][0])
    by_case = {r.case: r for r in rows}
    assert len(rows) == len(by_case) == len(cases)  # one row per case
    rel = {name: p.relative_to(out).as_posix() for name, p in expected.items()}
    for name in cases:
        row = by_case[rel[name]]
        if name == BAD:
            assert row.status == "failed" and row.exit_code == 2 and "not a readable NIfTI" in row.error
        elif name in done_first:
            assert row.status == "skipped" and row.volumes_ml.startswith("liver=")
            assert expected[name].stat().st_mtime_ns == stamps[name]  # not rewritten
        else:
            assert row.status == "ok" and row.exit_code == 0 and not row.error
            assert row.windows == 1 and row.inference_s > 0 and row.write_s > 0 and row.peak_memory_mb > 0
            assert row.outputs.split(";") == [str(expected[name]), str(expected[name].with_suffix("").with_suffix(".csv"))]
            assert row.volumes_ml.startswith("liver=") and row.structures == "liver"
    # every good case was computed exactly once over both runs, by one rank
    computed = [e["case"] for e in _events(out) if e["event"] == "case" and e["status"] == "ok"]
    assert sorted(computed) == sorted(rel[n] for n in cases if n != BAD)
    ranks = {e["rank"] for e in _events(out) if e["event"] == "case" and e["status"] != "skipped"}
    assert ranks == {0, 1}
    run = json.loads((out / "run.json").read_text())["runs"][-1]
    assert run["status"] == "finished" and run["world_size"] == 2 and run["weights"]["checkpoint"]["sha256"]
    assert all(0 <= r["device_busy"] <= 1 for r in run["ranks"]) and max(r["device_busy"] for r in run["ranks"]) > 0
    assert not [p for p in _tree(out) if "/.tmp" in f"/{p}" and ".cdpdnet-run" not in p]

    # 3. `cdpdnet report` assembles the same report from the logs
    before = (out / "run.csv").read_text()
    (out / "run.csv").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "run.csv").read_text() == before
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.slow
@pytest.mark.shared
def test_shards_run_as_independent_jobs_and_the_report_merges_them(
    cohort, weights, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root, cases = cohort
    out = tmp_path / "results"
    args = ["segment", f"{root}/**/*.nii.gz", "-s", "liver", "-o", str(out), "--checkpoint", str(weights[0]),
            "--dino", str(weights[1]), "--offline", "--no-progress", "--workers", "0", "--preset", "fast"]
    written: list[set[str]] = []
    for task in ("1", "2"):  # a Slurm job array of two tasks, one after the other
        before = {p for p in _tree(out) if p.endswith(".nii.gz")} if out.exists() else set()
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
        code = main(args)
        written.append({p for p in _tree(out) if p.endswith(".nii.gz")} - before)
        assert f"shard {task}/2 (Slurm array)" in capsys.readouterr().err
        assert code in (0, 2)
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == {"a.nii.gz", "d.nii.gz", "e/e.nii.gz"}
    rows = {r.case: r.status for r in iter_case_rows(out)}  # the last job's report holds both
    assert rows == {"a.nii.gz": "ok", "d.nii.gz": "ok", "e/e.nii.gz": "ok", "broken/scan.nii.gz": "failed"}
