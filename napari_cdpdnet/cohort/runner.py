"""Run a cohort: each process one device, a DataLoader reading ahead, a thread writing behind.

One process per device, started by ``torchrun`` (or one process without it). The ranks share a
gloo process group only to receive rank 0's :class:`~napari_cdpdnet.cohort.plan.RunPlan`
(``broadcast_object_list``), so every rank agrees on the cases and their split before any is
computed; from then on they never wait for each other. Per rank:

* a ``torch.utils.data.DataLoader`` over this rank's cases reads and prepares the next ones in
  worker processes (:mod:`.loading`);
* the main thread runs the device stage (:meth:`Segmenter.segment_prepared`): windows,
  post-processing, mapping back, the label table;
* a writer thread exports each result (all or nothing, the label table last) and logs its row.

A case that fails (unreadable file, out of memory, a bug) becomes a ``failed`` row and the run
goes on. SIGTERM (torchrun stopping a job, Slurm's time limit) and Ctrl-C stop the run cleanly:
the export in progress finishes or rolls back, queued results are dropped, nothing partial is
left, and rank 0 writes the report so far; rerunning with ``--skip-existing`` does the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from napari_cdpdnet.cohort.inputs import Case
from napari_cdpdnet.cohort.loading import CaseDataset, Failed, Loaded, make_loader, unpack
from napari_cdpdnet.cohort.plan import CohortJob, RunPlan, make_plan
from napari_cdpdnet.cohort.report import (
    CaseRow,
    LogReader,
    RankLog,
    ReportSummary,
    now_iso,
    write_report,
)
from napari_cdpdnet.cohort.sharding import JobPosition
from napari_cdpdnet.errors import CdpdnetError, InputError

__all__ = ["CohortOutcome", "run_cohort"]

logger = logging.getLogger(__name__)

#: How long ranks wait for rank 0's plan (discovering a large DICOM cohort takes a while).
PLAN_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class CohortOutcome:
    """What one process did: its rows, the report (rank 0) and the exit code."""

    rows: list[CaseRow]
    exit_code: int
    report: ReportSummary | None = None
    stats: dict[str, float] = field(default_factory=dict)


def run_cohort(segmenter: Any, job: CohortJob,
               window_progress: Callable[[str], Any] | None = None) -> CohortOutcome:
    """Plan and run a cohort in this process (one rank of a torchrun job, or the only one).

    Args:
        segmenter: a :class:`~napari_cdpdnet.inference.segmenter.Segmenter` (weights found).
        job: the request.
        window_progress: ``window_progress(name)`` makes a progress callback for one case's
            windows with a ``close()`` (used when the run has a single case).

    Raises:
        CdpdnetError: a bad request (before any compute), or the error of the only case.
        KeyboardInterrupt: stopped by Ctrl-C or SIGTERM (after cleaning up).
    """
    position = JobPosition.detect(job.shard)
    group = _init_group(position)
    try:
        plan = _shared_plan(job, position)
        if position.split and position.main:
            print(f"{position.describe()}: {len(plan.cases)} of {plan.total} cases", file=sys.stderr)
        return _RankRun(segmenter, job, position, plan, window_progress).run()
    finally:
        if group:
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()


def _init_group(position: JobPosition) -> bool:
    """Join torchrun's job (gloo: only small objects travel; devices never talk)."""
    dist = torch.distributed
    if not position.distributed or not dist.is_available() or dist.is_initialized():
        return False
    try:
        dist.init_process_group(backend="gloo", timeout=PLAN_TIMEOUT)
    except (ValueError, RuntimeError) as exc:
        raise InputError(
            f"WORLD_SIZE={position.world_size} is set but the torchrun rendezvous failed ({exc}); "
            "start several processes with torchrun (see docs/cohort.md), or unset WORLD_SIZE") from exc
    return True


def _shared_plan(job: CohortJob, position: JobPosition) -> RunPlan:
    """Rank 0 plans, every rank gets the same plan (or rank 0's error)."""
    plan: Any = None
    if position.main:
        try:
            plan = make_plan(job, position)
        except CdpdnetError as exc:
            plan = exc
        except Exception as exc:  # a bug on rank 0: the others must not wait for ever
            if position.distributed and torch.distributed.is_initialized():
                box = [CdpdnetError(f"rank 0 could not plan the run: {type(exc).__name__}: {exc}")]
                torch.distributed.broadcast_object_list(box, src=0)
            raise
    if position.distributed and torch.distributed.is_initialized():
        box = [plan]
        torch.distributed.broadcast_object_list(box, src=0)
        plan = box[0]
    if isinstance(plan, BaseException):
        raise plan
    return plan


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _versions() -> dict[str, str]:
    import platform

    import numpy
    import SimpleITK

    from napari_cdpdnet import __version__

    return {"napari-cdpdnet": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "python": platform.python_version(),
            "platform": platform.platform()}


class _Stop:
    """SIGTERM → KeyboardInterrupt in the main thread, once (a second signal is ignored)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            raise KeyboardInterrupt(f"stopped by {self.signal}")
        logger.warning("%s again: still cleaning up", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Result:
    """A segmented case on its way to the writer (the CT only for the table's HU columns)."""

    case: Case
    array: Any
    geometry: Any
    output: Any
    row: CaseRow


class _RankRun:
    """This process's share of the run."""

    def __init__(self, segmenter: Any, job: CohortJob, position: JobPosition, plan: RunPlan,
                 window_progress: Callable[[str], Any] | None) -> None:
        from napari_cdpdnet.inference.devices import resolve_device

        self.segmenter, self.job, self.pos, self.plan = segmenter, job, position, plan
        self.window_progress = window_progress
        self.mine = plan.todo[position.rank]
        self.device = resolve_device(job.settings.device,
                                     local_rank=position.local_rank if position.distributed else None)
        self.settings = replace(job.settings, device=str(self.device))
        self.host = socket.gethostname()
        self.rows: list[CaseRow] = []
        self.errors: dict[str, BaseException] = {}
        self._lock = threading.Lock()
        run_dir = plan.run_dir
        self.log = RankLog(run_dir / f"rank{position.rank}.jsonl") if run_dir is not None else None
        self.reader = LogReader(run_dir, position.world_size) if run_dir is not None else None
        self.bar: Any = None
        self.report: ReportSummary | None = None
        self.stop: _Stop | None = None
        self._order = {plan.name(c): i for i, c in enumerate(plan.cases)}
        self._last_poll = 0.0
        self.stats = {"inference_s": 0.0, "device_s": 0.0, "wait_s": 0.0}

    # ------------------------------------------------------------------ output
    def _say(self, text: str, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        if self.pos.distributed:
            text = f"[rank {self.pos.rank} of {self.pos.world_size}] {text}"
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def _record(self, row: CaseRow, error: BaseException | None = None) -> None:
        """Keep a finished case's row (writer thread or main thread)."""
        row.rank, row.host, row.run_id, row.finished = self.pos.rank, self.host, self.plan.run_id, now_iso()
        with self._lock:
            self.rows.append(row)
            if error is not None:
                self.errors[row.case] = error
            if self.log is not None:
                self.log.case(row)
        if row.status == "failed":
            self._say(f"cdpdnet segment: {row.input}: {row.error}", err=True)

    def _row(self, case: Case, index: int) -> CaseRow:
        return CaseRow(case=self.plan.name(case), input=str(case.source), series_uid=case.series_uid or "",
                       structures=";".join(self.plan.keys[index]), device=str(self.device),
                       cost_voxels=case.cost or None, input_bytes=case.input_bytes or None)

    def _fail(self, row: CaseRow, exc: BaseException, details: str = "") -> None:
        if isinstance(exc, CdpdnetError):
            row.exit_code, row.error = exc.exit_code, str(exc)
        else:
            row.exit_code, row.error = 70, f"internal error: {type(exc).__name__}: {exc}"
            logger.error("%s: %s\n%s", row.input, row.error, details)
        row.status = "failed"
        self._record(row, exc)

    # ------------------------------------------------------------------ progress
    def _poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.bar is None or self.reader is None or (not force and now - self._last_poll < 1.0):
            return
        self._last_poll = now
        done, _ = self.reader.poll()
        self.bar.n = done
        self.bar.refresh()

    def _on_window(self, name: str) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            if event.stage == "inference" and self.bar is not None:
                self.bar.set_postfix_str(f"{name}: window {event.done}/{event.total}", refresh=False)
                self._poll()
        return on_event

    # ------------------------------------------------------------------ run
    def run(self) -> CohortOutcome:
        plan, pos = self.plan, self.pos
        started = time.perf_counter()
        if pos.main:
            self._start_report()
        if self.log is not None:
            self.log.write("start", rank=pos.rank, local_rank=pos.local_rank, world_size=pos.world_size,
                           host=self.host, pid=os.getpid(), device=str(self.device), cases=len(self.mine))
        dataset = CaseDataset(plan.cases, self.settings, self.job.formats)
        workers = min(self.job.workers, len(self.mine) - 1) if len(self.mine) > 1 else 0
        loader = make_loader(dataset, self.mine, max(workers, 0))
        items = iter(loader)  # workers start here: before CUDA, the model and our threads exist
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        writer = _Writer(self, self.job.background_writer)
        stopped: str | None = None
        broken = False
        try:
            with _Stop() as stop:
                self.stop = stop
                try:
                    self.segmenter.model(self.device)
                    self._open_bar()
                    loop_start = time.perf_counter()
                    for index in self.mine:
                        self._one(index, items, writer)
                        self._poll()
                    writer.close()
                    self.stats["wall_s"] = time.perf_counter() - loop_start
                except KeyboardInterrupt:
                    stopped = stop.signal or "Ctrl-C"
                    _close_loader(items)
                    writer.abort()
                    raise
                except BaseException:
                    broken = True
                    _close_loader(items)
                    writer.abort()
                    raise
                finally:
                    _close_loader(items)
                    del items
        finally:
            self._finish(stopped, broken, time.perf_counter() - started)
        return self._outcome()

    def _one(self, index: int, items: Iterator[Any], writer: _Writer) -> None:
        case = self.plan.cases[index]
        row = self._row(case, index)
        t0 = time.perf_counter()
        try:
            item = next(items)
        except (KeyboardInterrupt, CdpdnetError):
            raise
        except Exception as exc:  # the loader itself broke (a worker killed, e.g. out of memory)
            self._stopping(exc)
            raise CdpdnetError(f"reading the inputs failed: {exc}; rerun with --skip-existing "
                               "(and fewer --workers if memory is short)") from exc
        row.wait_s = time.perf_counter() - t0
        self.stats["wait_s"] += row.wait_s
        if isinstance(item, Failed):
            row.read_s = item.read_s
            self._fail(row, item.error, item.details)
            return
        if not isinstance(item, Loaded) or item.index != index:  # pragma: no cover - a loader bug
            raise RuntimeError(f"the loader gave case {getattr(item, 'index', '?')} for case {index}")
        item = unpack(item)
        row.read_s, row.preprocess_s = item.read_s, item.preprocess_s
        for w in item.warnings:
            self._say(f"warning: {case.source}: {w}", err=True)
        request: Any = case.request if case.request is not None else list(self.job.request or ())
        bar = None
        if self.plan.single and self.window_progress is not None:
            bar = self.window_progress(case.source.name)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t1 = time.perf_counter()
        try:
            output = self.segmenter.segment_prepared(
                item.prepared, request, self.settings, progress=bar or self._on_window(case.source.name),
                force_task=self.job.force_task, clip_scorer=self.job.clip_scorer)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded; the cohort goes on
            import traceback

            self._stopping(exc)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._fail(row, exc, traceback.format_exc())
            return
        finally:
            if bar is not None:
                bar.close()
        r = output.result
        row.device_s = time.perf_counter() - t1
        row.inference_s, row.postprocess_s, row.invert_s = (
            r.timings.get(k) for k in ("inference", "postprocess", "invert"))
        row.windows, row.windows_total = r.windows, r.windows_total
        row.peak_memory_mb = _peak_memory_mb(self.device)
        self.stats["inference_s"] += row.inference_s or 0.0
        self.stats["device_s"] += row.device_s
        writer.put(_Result(case, item.prepared.array, item.prepared.geometry, output, row))

    def _stopping(self, exc: BaseException) -> None:
        """After a stop signal, whatever was raised is the stop, not the case's failure."""
        if self.stop is not None and self.stop.signal is not None:
            raise KeyboardInterrupt(f"stopped by {self.stop.signal}") from exc

    def _write(self, result: _Result) -> None:
        """Export one result (writer thread) and record its row."""
        from napari_cdpdnet.export import export_segmentation

        case, output, row = result.case, result.output, result.row
        t0 = time.perf_counter()
        try:
            written = export_segmentation(
                output.labels, result.geometry, result.array, case.output,
                formats=self.job.formats, rows=output.table, probabilities=output.result.probabilities,
                overwrite=self.job.overwrite)
        except Exception as exc:  # noqa: BLE001 - recorded; the cohort goes on
            import traceback

            row.write_s = time.perf_counter() - t0
            self._fail(row, exc, traceback.format_exc())
            return
        row.write_s = time.perf_counter() - t0
        row.total_s = sum(v or 0.0 for v in (row.read_s, row.preprocess_s, row.device_s, row.write_s))
        row.status = "ok"
        row.outputs = ";".join(str(p) for p in written)
        row.found = ";".join(t.key for t in output.table if t.voxel_count)
        row.volumes_ml = ";".join(f"{t.key}={t.volume_ml:.2f}" for t in output.table)
        self._record(row)
        for note in output.notes:
            self._say(f"note: {case.source}: {note}", err=True)
        self._say(f"{case.label} → {case.output}: "
                  f"{', '.join(f'{t.name} {t.volume_ml:.1f} mL' for t in output.table)} "
                  f"({output.result.windows} windows, {row.total_s:.1f} s on {output.result.device})")
        for w in written[1:]:
            self._say(f"  also wrote {w}")

    # ------------------------------------------------------------------ start and end
    def _start_report(self) -> None:
        """Rank 0: the plan file, skipped and refused rows, notes."""
        import json

        from napari_cdpdnet.errors import OutputExistsError
        from napari_cdpdnet.fileutil import atomic_output

        plan, job = self.plan, self.job
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
        if plan.run_dir is not None:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            info = {
                "run_id": plan.run_id, "started": now_iso(), "command": list(job.command),
                "output": str(job.output), "world_size": self.pos.world_size,
                "shard": [self.pos.shard + 1, self.pos.shards], "shard_source": self.pos.shard_source,
                "preset": job.settings.preset, "settings": asdict(job.settings),
                "formats": list(job.formats), "request": list(job.request or ()),
                "skip_existing": job.skip_existing, "overwrite": job.overwrite, "workers": job.workers,
                "device": str(self.device), "device_name": _device_name(self.device),
                "versions": _versions(), "weights": _weights_info(self.segmenter),
                "cases": {plan.name(c): str(c.source) for c in plan.cases},
            }
            with atomic_output(plan.run_dir / "plan.json", overwrite=True) as tmp:
                tmp.write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
        for i, state in plan.skipped:
            case = plan.cases[i]
            row = self._row(case, i)
            row.status, row.exit_code = "skipped", 0
            row.outputs = ";".join(str(p) for p in state.files)
            row.found = ";".join(r.key for r in state.rows if r.voxel_count)
            row.volumes_ml = ";".join(f"{r.key}={r.volume_ml:.2f}" for r in state.rows)
            self._record(row)
        if plan.skipped:
            print(f"skipping {len(plan.skipped)} case(s) whose outputs are complete (--skip-existing)",
                  file=sys.stderr)
        for i, message in plan.refused:
            self._fail(self._row(plan.cases[i], i), OutputExistsError(message))

    def _open_bar(self) -> None:
        total = sum(len(t) for t in self.plan.todo) + len(self.plan.refused)
        if self.pos.main and self.job.progress and self.reader is not None and total > 1:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", desc="cohort", file=sys.stderr, dynamic_ncols=True)

    def _finish(self, stopped: str | None, broken: bool, seconds: float) -> None:
        wall = self.stats.get("wall_s") or seconds
        stats = {**self.stats, "wall_s": wall, "cases": len(self.mine),
                 "device_busy": self.stats["inference_s"] / wall if wall > 0 else 0.0}
        self.stats = stats
        if self.log is not None:
            self.log.write("stopped" if stopped or broken else "finished", rank=self.pos.rank,
                           signal=stopped, **stats)
        if self.pos.main and self.plan.report_dir is not None:
            with contextlib.suppress(KeyboardInterrupt):
                if not (stopped or broken):
                    self._wait_for_ranks()
            self.report = write_report(self.plan.report_dir)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.report is not None:
            print(f"report: {self.report.json_path} ({self.report.line()})", file=sys.stderr)
        if self.log is not None:
            self.log.close()
        if stopped:
            done = sum(r.status == "ok" for r in self.rows)
            print(f"cdpdnet segment: {stopped}: {done} of {len(self.mine)} case(s) of this process were "
                  "finished; nothing partial was left. Rerun the same command with --skip-existing "
                  "to do the rest.", file=sys.stderr)

    def _wait_for_ranks(self) -> None:
        """Rank 0 waits (without a collective's timeout) until every rank logged its end."""
        if self.reader is None:
            return
        while True:
            _, ended = self.reader.poll()
            self._poll(force=True)
            if ended >= self.pos.world_size:
                return
            time.sleep(0.5)

    def _outcome(self) -> CohortOutcome:
        report = self.report
        failed = sorted((r for r in self.rows if r.status == "failed"), key=lambda r: self._order[r.case])
        if self.plan.single and failed and not self.pos.distributed:
            raise self.errors[failed[0].case]
        if report is not None and self.pos.distributed:
            code = report.exit_code
        else:
            code = failed[0].exit_code if failed else 0
        if failed and not self.pos.distributed:
            print(f"{len(failed)} of {self.plan.total} inputs failed", file=sys.stderr)
        if self.pos.distributed and not self.pos.main:
            code = 0  # a non-zero exit makes torchrun stop the other ranks; rank 0 reports
        return CohortOutcome(self.rows, code, report, self.stats)


class _Writer:
    """Exports results in a background thread (bounded queue: one result waits at most)."""

    def __init__(self, run: _RankRun, background: bool) -> None:
        self.run = run
        self.queue: queue.Queue[_Result | None] = queue.Queue(maxsize=1)
        self.dropping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cdpdnet-writer") if background else None
        if self.thread is not None:
            self.thread.start()

    def put(self, result: _Result) -> None:
        if self.thread is None:
            self.run._write(result)
        else:
            self.queue.put(result)

    def _loop(self) -> None:
        while (result := self.queue.get()) is not None:
            if not self.dropping.is_set():
                self.run._write(result)

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()

    def abort(self) -> None:
        """Finish the export in progress, drop the queued ones (their cases stay to do)."""
        self.dropping.set()
        if self.thread is None:
            return
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put(None)
        self.thread.join()


def _close_loader(items: Any) -> None:
    """Stop the DataLoader's workers now (idempotent), so none is reported dead later."""
    with contextlib.suppress(Exception):
        items._shutdown_workers()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _weights_info(segmenter: Any) -> dict[str, Any]:
    """Paths and SHA-256 of the weight files the run uses."""
    from napari_cdpdnet.weights.store import sha256_of

    try:
        files = segmenter.weights()
    except CdpdnetError:
        return {}
    out = {}
    for role in ("checkpoint", "dino_weights", "dino_config"):
        path = getattr(files, role, None)
        if path is not None:
            out[role] = {"path": str(path), "sha256": sha256_of(path), "source": files.sources.get(role, "")}
    return out
