"""The plan of a cohort run, made once (by rank 0 under torchrun) before any case is computed.

:func:`make_plan` finds the cases, checks every request against the vocabulary, estimates the
costs, takes this job's shard of the whole cohort, decides per case from its outputs whether it
is to do, skipped (``--skip-existing``: complete) or refused (outputs in the way), and splits
what is to do between the ranks by cost. Everything a user can get wrong is refused here,
before weights are loaded or a window runs.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_cdpdnet.cohort.inputs import Case, discover_cases, estimate_cost
from napari_cdpdnet.cohort.outputs import OutputState, output_state, sweep_staging
from napari_cdpdnet.cohort.report import STATE_DIR
from napari_cdpdnet.cohort.sharding import JobPosition, balanced_partition
from napari_cdpdnet.errors import CdpdnetError, InputError, OutputExistsError

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet.inference.settings import SegmentationSettings

__all__ = ["CohortJob", "RunPlan", "make_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortJob:
    """What ``cdpdnet segment`` asks for (the command's arguments, checked).

    Attributes:
        inputs: files, folders, globs and manifests.
        output: ``-o``: a label map file (one case) or a folder (outputs mirror the inputs).
        request: the ``-s`` names (None: every case's manifest row names its structures).
        settings: preset, device, threads, box, ... (the device is made per rank).
        formats: optional export formats.
        label_suffix: label map format of derived names (``--format``).
        series_uid: ``--series-uid`` for folder inputs.
        force_task: ``--task``.
        skip_existing: complete cases are skipped, partial ones refused (or redone with
            ``overwrite``).
        overwrite: replace existing outputs.
        shard: ``--shard K/N`` (None: from a Slurm array, else the whole cohort).
        workers: DataLoader workers reading and preprocessing ahead (0: in the device loop).
        report: folder for ``run.json``/``run.csv`` (None: the output folder, when the run has
            more than one case or is split).
        progress: show progress bars.
        background_writer: write outputs in a thread (False only for benchmarks).
        command: the command line, for the report.
        clip_scorer: CLIP matching for unusual wording (passed to the resolver).
        clip_thresholds: when CLIP's answer is trusted (None: the resolver's defaults).
    """

    inputs: tuple[str, ...]
    output: Path
    request: tuple[str, ...] | None
    settings: SegmentationSettings
    formats: tuple[str, ...] = ()
    label_suffix: str = ".nii.gz"
    series_uid: str | None = None
    force_task: int | None = None
    skip_existing: bool = False
    overwrite: bool = False
    shard: str | None = None
    workers: int = 2
    report: Path | None = None
    progress: bool = True
    background_writer: bool = True
    command: tuple[str, ...] = ()
    clip_scorer: Any = None
    clip_thresholds: Any = None


@dataclass
class RunPlan:
    """The run as rank 0 planned it (broadcast to every rank).

    Attributes:
        run_id: names the run's log folder.
        cases: this job's cases (its shard of the cohort).
        keys: per case, the structure keys it asks for.
        todo: per rank, indices into ``cases`` to compute.
        skipped: ``(index, state)`` of complete cases (``--skip-existing``).
        refused: ``(index, message)`` of cases whose outputs are in the way (failed, exit 3).
        report_dir: where ``run.json``/``run.csv`` go (None: a single case, no report).
        notes: what discovery left out.
        total: cases in the whole cohort (before sharding).
    """

    run_id: str
    cases: list[Case]
    keys: list[tuple[str, ...]]
    todo: list[list[int]]
    skipped: list[tuple[int, OutputState]] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    report_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    total: int = 0

    @property
    def run_dir(self) -> Path | None:
        return None if self.report_dir is None else self.report_dir / STATE_DIR / self.run_id

    def name(self, case: Case) -> str:
        """The case's name in the report: its label map path, relative to the report folder
        when inside it (the same across runs, so a resumed run's rows replace the old ones)."""
        if self.report_dir is not None:
            try:
                return case.output.resolve().relative_to(self.report_dir.resolve()).as_posix()
            except ValueError:
                pass
        return str(case.output)

    @property
    def single(self) -> bool:
        """One case in all: errors are raised as before cohorts existed."""
        return self.total == 1


def _requests(cases: Sequence[Case], job: CohortJob) -> list[tuple[str, ...]]:
    """Structure keys per case; every distinct request read once (unknown names refused)."""
    from napari_cdpdnet.inference.segmenter import parse_request

    done: dict[Any, tuple[str, ...]] = {}
    out = []
    for case in cases:
        request: Any = case.request if case.request is not None else job.request
        if request is None:
            raise InputError(f"{case.origin or case.source}: no structures named: give -s NAME "
                             "(or a 'structures' column in the manifest)")
        key = request if isinstance(request, str) else tuple(request)
        if key not in done:
            try:
                structures, resolutions = parse_request(request, clip_scorer=job.clip_scorer,
                                                          clip_thresholds=job.clip_thresholds)
            except CdpdnetError as exc:
                if case.request is None:
                    raise
                raise type(exc)(f"{case.origin}: {exc}") from None
            for r in resolutions:
                if r.method != "exact" and case.request is not None:
                    logger.warning("%s: '%s' → %s (%s, confidence %.2f)", case.origin, r.text,
                                   r.structure.name, r.method, r.confidence)
            done[key] = tuple(s.key for s in structures)
        out.append(done[key])
    return out


def _existing(case: Case, keys: Sequence[str], formats: Sequence[str]) -> list[Path]:
    from napari_cdpdnet.export import export_paths

    return [p for p in export_paths(case.output, keys, formats=formats) if p.exists()]


def make_plan(job: CohortJob, position: JobPosition) -> RunPlan:
    """Plan the run (rank 0 only; the others receive it).

    Raises:
        InputError, VocabularyError: bad inputs, manifest or structure names.
        OutputExistsError: outputs exist and neither ``--skip-existing`` nor ``--overwrite``.
    """
    from napari_cdpdnet.fileutil import full_suffix
    from napari_cdpdnet.io.images import LABEL_MAP_SUFFIXES

    file_output = full_suffix(job.output) in LABEL_MAP_SUFFIXES
    out_root = job.output.parent if file_output else job.output
    exclude = [p for p in (None if file_output else job.output, job.report) if p is not None]
    found = discover_cases(job.inputs, job.output, label_suffix=job.label_suffix,
                           series_uid=job.series_uid, exclude=exclude)
    cases = found.cases
    total = len(cases)
    if position.split:  # the whole cohort is split, so jobs stay disjoint whatever they skip
        cases = [estimate_cost(c) for c in cases]
        part = balanced_partition([c.cost for c in cases], position.shards)[position.shard]
        cases = [cases[i] for i in part]
    keys = _requests(cases, job)
    wants_report = job.report is not None or total > 1 or position.distributed or position.split
    report_dir = (job.report or out_root) if wants_report else None
    if report_dir is not None:
        from napari_cdpdnet.export import export_paths

        reserved = {(report_dir / name).resolve() for name in ("run.json", "run.csv")}
        for case, k in zip(cases, keys, strict=True):
            clash = {p.resolve() for p in export_paths(case.output, k, formats=job.formats)} & reserved
            if clash:
                raise InputError(f"{case.label} would write {clash.pop()}, the run report's name; "
                                 "give --report another folder")

    todo: list[int] = []
    skipped: list[tuple[int, OutputState]] = []
    refused: list[tuple[int, str]] = []
    blocked: list[Path] = []
    for i, case in enumerate(cases):
        if job.skip_existing:
            state = output_state(case.output, keys[i], job.formats)
            if state.state == "complete":
                skipped.append((i, state))
            elif state.state == "absent" or job.overwrite:
                todo.append(i)
            else:
                refused.append((i, f"{state.detail}; not replaced without --overwrite"))
        elif job.overwrite:
            todo.append(i)
        else:
            present = _existing(case, keys[i], job.formats)
            blocked += present
            todo.append(i)
    if blocked:
        more = f" (and {len(blocked) - 1} more outputs)" if len(blocked) > 1 else ""
        raise OutputExistsError(
            f"{blocked[0]} already exists{more}; nothing was computed. Add --skip-existing to keep "
            "finished cases and do the rest, or --overwrite to replace them")
    sweep_staging(cases[i].output for i in todo)
    if position.distributed:
        for i in todo:
            cases[i] = estimate_cost(cases[i])
    parts = balanced_partition([cases[i].cost for i in todo], position.world_size)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    if position.split:
        run_id += f"-shard{position.shard + 1}of{position.shards}"
    return RunPlan(run_id, cases, keys, [[todo[j] for j in part] for part in parts], skipped, refused,
                   report_dir, found.notes, total)
