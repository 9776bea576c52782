"""Is a case done? Its complete set of output files exists, judged from the label table.

:func:`~napari_cdpdnet.export.export_segmentation` writes every file of a case into a staging
folder and moves the label table onto its name **last**, so the table is the completion record:
where it exists, every other file of the set was moved before it. A crash between two moves
leaves a label map without its table: "partial", never "complete". The table also says which
structures the case was made for and which of them were found, so the expected file names of
the per-structure formats (``--stl``, ``--probabilities``) follow from it through the format
registry, and ``--skip-existing`` can report the volumes of a skipped case without opening the
label map.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cdpdnet.export.formats import FORMATS, ExportJob, resolve_formats
from napari_cdpdnet.export.labeltable import COLUMNS, LabelRow
from napari_cdpdnet.geometry import Geometry

__all__ = ["OutputState", "output_state", "read_label_table", "sweep_staging"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputState:
    """What exists of a case's outputs.

    Attributes:
        state: ``"absent"`` (nothing), ``"complete"`` (every file of the set, for these
            structures), ``"partial"`` (some files, e.g. after a crash) or ``"different"`` (a
            complete set made for other structures).
        detail: one line for people (what exists, what is missing).
        rows: the label table, when it could be read.
        files: the files of the set that exist.
    """

    state: str
    detail: str = ""
    rows: tuple[LabelRow, ...] = ()
    files: tuple[Path, ...] = ()


def _float(text: str) -> float:
    return float(text) if text.strip() else math.nan


def read_label_table(path: Path) -> tuple[LabelRow, ...]:
    """The rows of a label table written by :func:`~napari_cdpdnet.export.labeltable.write_label_table`.

    Raises:
        ValueError: not such a table (other columns, bad numbers).
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: not a label table (columns {reader.fieldnames})")
        return tuple(
            LabelRow(
                value=int(r["value"]), key=r["key"], name=r["name"], color=r["color"], group=r["group"],
                laterality=r["laterality"], snomed_category=r["snomed_category"],
                snomed_type=r["snomed_type"], snomed_modifier=r["snomed_modifier"],
                voxel_count=int(r["voxel_count"]), volume_ml=_float(r["volume_ml"]),
                hu_mean=_float(r["hu_mean"]), hu_sd=_float(r["hu_sd"]),
                reviewed=r["reviewed"].strip().lower() == "true", source=r["source"],
            )
            for r in reader
        )


def _expected(out: Path, rows: Sequence[LabelRow], formats: Sequence[str]) -> list[Path]:
    """The files :func:`export_segmentation` writes for this table (via the format registry)."""
    job = ExportJob(np.zeros((1, 1, 1), np.uint8), Geometry.identity((1, 1, 1)), tuple(rows),
                    probabilities={r.value: np.zeros((1, 1, 1), np.float32) for r in rows})
    return [path for fmt in resolve_formats(formats) for path, _ in fmt.targets(job, out)]


def output_state(out: Path, keys: Sequence[str], formats: Sequence[str]) -> OutputState:
    """The state of the outputs of a case whose label map is ``out``.

    Args:
        out: the label map path.
        keys: the structure keys the case asks for (the table must list exactly these).
        formats: the optional export formats of the run.
    """
    from napari_cdpdnet.export import export_paths

    table = FORMATS["table"].paths(out)[0]
    if not table.exists():
        present = [p for p in export_paths(out, keys, formats=formats) if p.exists()]
        if present:
            return OutputState("partial", f"{present[0]} exists but not its table {table.name}",
                               files=tuple(present))
        return OutputState("absent")
    try:
        rows = read_label_table(table)
    except (OSError, ValueError, KeyError) as exc:
        return OutputState("partial", f"{table} cannot be read as a label table ({exc})", files=(table,))
    made_for = [r.key for r in rows]
    if sorted(made_for) != sorted(keys):
        return OutputState("different", f"{table} was made for {', '.join(made_for) or 'nothing'}, "
                                        f"not {', '.join(keys)}", rows, (table,))
    expected = _expected(out, rows, formats)
    missing = [p for p in expected if not p.exists()]
    present = tuple(p for p in expected if p.exists())
    if missing:
        return OutputState("partial", f"{missing[0].name}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} "
                                      f"missing beside {table.name} (made with other export options?)",
                           rows, present)
    return OutputState("complete", "", rows, present)


def sweep_staging(outputs: Iterable[Path]) -> list[Path]:
    """Remove staging folders a killed run left beside these label maps, when they hold only
    one case's files.

    :func:`export_segmentation` stages into ``.tmp-export-*`` folders and removes them itself;
    only a process killed outright (SIGKILL, power loss) leaves one. Each case of a run belongs
    to one process, so a folder holding nothing but a to-do case's file names cannot be another
    process's work in progress. Empty folders, and folders holding a backup of a replaced file
    (``.old-*``, from ``--overwrite``), are left alone. Each folder is listed once.
    """
    from napari_cdpdnet.vocabulary.catalog import STRUCTURES

    keys = [s.key for s in STRUCTURES]
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for out in outputs:
        by_folder[out.parent].append(out)
    removed = []
    for folder, outs in by_folder.items():
        try:
            stale = [p for p in folder.glob(".tmp-export-*") if p.is_dir()]
        except OSError:
            continue
        if not stale:
            continue
        cases = [{p.name for fmt in FORMATS.values() for p in fmt.paths(out, keys)} for out in outs]
        for staging in stale:
            with contextlib.suppress(OSError):
                # atomic_output's temporary files inside are ".tmp-<hex>-<name>"
                names = {n.split("-", 2)[-1] if n.startswith(".tmp-") else n
                         for n in (p.name for p in staging.iterdir())}
                if names and any(names <= ours for ours in cases):
                    shutil.rmtree(staging, ignore_errors=True)
                    removed.append(staging)
                    logger.warning("removed %s, left by an interrupted run", staging)
    return removed
