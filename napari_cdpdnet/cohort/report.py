"""The run report: one row per case in ``run.csv`` and ``run.json``, assembled from per-rank logs.

Every process of a run appends to its own log, ``<report>/.cdpdnet-run/<run id>/rank<R>.jsonl``
(one JSON object per line: ``start``, one ``case`` per finished case, then ``finished`` or
``stopped``), and rank 0 writes ``plan.json`` beside them (the run's cases, settings, versions,
device, weights and their SHA-256). Nothing is shared in memory, so ranks never wait for each
other, a killed rank loses at most the line it was writing, and independent jobs (``--shard``,
Slurm arrays) writing into the same folder add their own run folders.

:func:`write_report` (rank 0 at the end of a run, or ``cdpdnet report DIR``) merges every run
folder: the latest row of each case wins, cases planned but never reached are ``pending``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import InputError

__all__ = [
    "CaseRow",
    "CSV_COLUMNS",
    "RankLog",
    "ReportSummary",
    "STATE_DIR",
    "LogReader",
    "read_runs",
    "write_report",
]

logger = logging.getLogger(__name__)

#: Hidden folder under the report folder that holds the per-run logs.
STATE_DIR = ".cdpdnet-run"
REPORT_FORMAT = "cdpdnet-run-report/1"


@dataclass
class CaseRow:
    """One case of a run (a row of ``run.csv``).

    ``status`` is ``ok``, ``failed``, ``skipped`` (complete outputs from an earlier run;
    structures and volumes are read from its label table) or ``pending`` (planned, not reached).
    Seconds per stage: ``read`` and ``preprocess`` happen in a DataLoader worker, ``wait`` is
    the time the device loop waited for this case, ``inference`` (the sliding windows),
    ``postprocess`` and ``invert`` are the device stage, ``write`` the export (in the writer
    thread). ``peak_memory_mb`` is CUDA's peak allocation for the case on a GPU, else the
    process's peak resident memory so far.
    """

    case: str
    input: str
    series_uid: str = ""
    status: str = "pending"
    exit_code: int = 0
    error: str = ""
    structures: str = ""
    found: str = ""
    volumes_ml: str = ""
    outputs: str = ""
    windows: int | None = None
    windows_total: int | None = None
    read_s: float | None = None
    preprocess_s: float | None = None
    wait_s: float | None = None
    inference_s: float | None = None
    postprocess_s: float | None = None
    invert_s: float | None = None
    device_s: float | None = None
    write_s: float | None = None
    total_s: float | None = None
    peak_memory_mb: float | None = None
    cost_voxels: float | None = None
    input_bytes: int | None = None
    device: str = ""
    rank: int | None = None
    host: str = ""
    run_id: str = ""
    finished: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseRow:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_cells(cls, cells: dict[str, str]) -> CaseRow:
        """Inverse of :meth:`cells` (a ``run.csv`` row: empty cells are None)."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            text = cells.get(f.name, "")
            kind = str(f.type)
            if kind.startswith(("int", "float")):
                number = float if kind.startswith("float") else int
                out[f.name] = number(text) if text != "" else (None if "None" in kind else 0)
            else:
                out[f.name] = text
        return cls(**out)

    def cells(self) -> list[str]:
        out = []
        for value in asdict(self).values():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                out.append("")
            elif isinstance(value, float):
                out.append(f"{value:.3f}")
            else:
                out.append(str(value))
        return out


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CaseRow))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RankLog:
    """Append-only JSON-lines log of one process of a run (thread-safe; flushed per line)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
        self._lock = threading.Lock()

    def write(self, event: str, **data: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **data}, default=str)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._fh.fileno())

    def case(self, row: CaseRow) -> None:
        self.write("case", **asdict(row))

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def _lines(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` from byte ``start``; the offset after the last one."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
    except OSError:
        return [], start
    end = data.rfind(b"\n") + 1  # a line still being written (or cut by a kill) is not read
    out = []
    for raw in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(raw))
    return out, start + end


class LogReader:
    """Follows the rank logs of one run (rank 0's progress bar and its wait for the others)."""

    def __init__(self, run_dir: Path, world_size: int) -> None:
        self.paths = [run_dir / f"rank{r}.jsonl" for r in range(world_size)]
        self.offsets = [0] * world_size
        self.cases = [0] * world_size
        self.ended = [False] * world_size

    def poll(self) -> tuple[int, int]:
        """(cases finished by all ranks, ranks that have ended)."""
        for r, path in enumerate(self.paths):
            events, self.offsets[r] = _lines(path, self.offsets[r])
            for e in events:
                if e.get("event") == "case" and e.get("status") != "skipped":
                    self.cases[r] += 1
                elif e.get("event") in ("finished", "stopped"):
                    self.ended[r] = True
        return sum(self.cases), sum(self.ended)


def run_dirs(report_dir: Path) -> list[Path]:
    state = report_dir / STATE_DIR
    return sorted(p for p in state.iterdir() if p.is_dir()) if state.is_dir() else []


def read_runs(report_dir: Path) -> tuple[list[dict[str, Any]], dict[str, CaseRow], dict[str, str]]:
    """Every run under ``report_dir``: their plans (with rank summaries), the latest row per
    case, and every planned case (key → input) in plan order."""
    runs: list[dict[str, Any]] = []
    latest: dict[str, tuple[float, CaseRow]] = {}
    order: dict[str, str] = {}
    for folder in run_dirs(report_dir):
        try:
            plan = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s: no readable plan.json; its rows are still used", folder)
            plan = {"run_id": folder.name}
        for key, source in plan.pop("cases", {}).items():
            order.setdefault(key, source)
        ranks: dict[int, dict[str, Any]] = {}
        for log in sorted(folder.glob("rank*.jsonl")):
            for e in _lines(log)[0]:
                kind = e.pop("event", "")
                stamp = float(e.pop("time", 0.0))
                if kind == "case":
                    row = CaseRow.from_dict(e)
                    order.setdefault(row.case, row.input)
                    if row.case not in latest or stamp >= latest[row.case][0]:
                        latest[row.case] = (stamp, row)
                elif kind in ("start", "finished", "stopped"):
                    info = ranks.setdefault(int(e.get("rank", 0)), {})
                    info.update(e)
                    if kind != "start":
                        info["ended"] = kind
        plan["ranks"] = [ranks[r] for r in sorted(ranks)]
        plan["status"] = _run_status(plan)
        runs.append(plan)
    return runs, {k: row for k, (_, row) in latest.items()}, order


def _run_status(plan: dict[str, Any]) -> str:
    ended = [r.get("ended") for r in plan["ranks"]]
    if "stopped" in ended:
        return "interrupted"
    if ended and all(e == "finished" for e in ended) and len(ended) == plan.get("world_size", len(ended)):
        return "finished"
    return "running or killed"


@dataclass(frozen=True)
class ReportSummary:
    """Counts of the merged report and where it was written."""

    counts: dict[str, int]
    exit_code: int
    json_path: Path
    csv_path: Path

    def line(self) -> str:
        parts = [f"{n} {s}" for s, n in self.counts.items() if n]
        return f"{sum(self.counts.values())} cases: {', '.join(parts) or 'none'}"


def _write_atomic(path: Path, write: Any) -> None:
    from napari_cdpdnet.fileutil import atomic_output

    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        write(fh)


def write_report(report_dir: Path, *, extra: dict[str, Any] | None = None) -> ReportSummary:
    """Merge every run under ``report_dir`` into ``run.json`` and ``run.csv`` there.

    Raises:
        InputError: no run logs under ``report_dir``.
    """
    report_dir = Path(report_dir)
    runs, latest, order = read_runs(report_dir)
    if not runs:
        raise InputError(f"{report_dir}: no cohort run logs here ({STATE_DIR}/); give the -o folder "
                         "(or --report folder) of a 'cdpdnet segment' run")
    rows = [latest.get(key) or CaseRow(case=key, input=source) for key, source in order.items()]
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "skipped", "pending")}
    failed = [r.exit_code for r in rows if r.status == "failed"]
    exit_code = failed[0] if failed else 0
    document = {
        "format": REPORT_FORMAT,
        "written": now_iso(),
        "summary": {**counts, "cases": len(rows), "exit_code": exit_code},
        **(extra or {}),
        "runs": runs,
        "cases": [asdict(r) for r in rows],
    }
    json_path, csv_path = report_dir / "run.json", report_dir / "run.csv"
    _write_atomic(json_path, lambda fh: json.dump(document, fh, indent=1, default=str))

    def table(fh: Any) -> None:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(r.cells() for r in rows)

    _write_atomic(csv_path, table)
    return ReportSummary(counts, exit_code, json_path, csv_path)


def iter_case_rows(report_dir: Path) -> Iterator[CaseRow]:
    """The rows of ``run.csv`` (for scripts and tests)."""
    with open(Path(report_dir) / "run.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            yield CaseRow.from_cells(r)
