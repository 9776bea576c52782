"""The export format registry: every kind of file a segmentation can become, one entry each.

:data:`FORMATS` lists them in the order they are written: the label map and its label table
(always), then the optional DICOM-SEG, STL meshes and probability maps. Each entry says what it
writes (a file-name pattern beside the label map, one file or one per label), whether it needs a
DICOM source or probability maps, and the writer function that fills one file.
:func:`napari_cdpdnet.export.export_segmentation` is the only caller of the writers: it stages
every file, so a writer just writes its path and raises on any problem.

The faces are built from this table: ``cdpdnet segment`` and ``segment-by-example`` get one
``--<name>`` option per optional format, the structure-table dock one checkbox. Adding a format
is one writer function and one :class:`ExportFormat` entry here.

Light on purpose (the CLI reads it to build its options): the writers import SimpleITK,
highdicom and scikit-image only when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet.export.labeltable import LabelRow

__all__ = [
    "ExportJob", "ExportFormat", "FORMATS", "check_dicom_source", "optional_formats", "resolve_formats",
    "split_name",
]


@dataclass(frozen=True)
class ExportJob:
    """What every writer sees: the segmentation, its label table (measured once) and extras.

    Attributes:
        labels: ``[z, y, x]`` label map on ``geometry``.
        geometry: the source CT's grid (with DICOM references when read from a series).
        rows: the label table, one row per label value to describe.
        edited: label values a person painted on (DICOM-SEG algorithm type).
        probabilities: structure index → float ``[z, y, x]`` map, when the run kept them.
        smoothing_sigma: mesh smoothing in voxels (0: the exact voxel boundary).
    """

    labels: np.ndarray
    geometry: Geometry
    rows: tuple[LabelRow, ...]
    edited: frozenset[int] = frozenset()
    probabilities: Mapping[int, np.ndarray] = field(default_factory=dict)
    smoothing_sigma: float = 0.0


#: ``write(job, path, row)``: fill ``path``; ``row`` is the label of a per-label file, else None.
Writer = Callable[[ExportJob, Path, "LabelRow | None"], object]


def _rows_with_voxels(job: ExportJob) -> list[LabelRow]:
    return [row for row in job.rows if row.voxel_count]


@dataclass(frozen=True)
class ExportFormat:
    """One kind of output file.

    Attributes:
        name: identifier in ``export_segmentation(formats=...)``; the CLI option is ``--name``
            with dashes (:attr:`flag`).
        title: the structure-table checkbox text.
        help: what it writes, completing "also write ..." (CLI help, checkbox tooltip).
        pattern: file name beside the label map; ``{stem}`` is the label map's name without
            suffix, ``{suffix}`` its suffix, ``{key}`` (one file per label) the label's key.
        write: the writer.
        required: written by every export (no option).
        needs_dicom: only for CTs read from a DICOM series.
        needs_probabilities: needs the probability maps of a segmentation run (not offered by
            the structure table, which exports layers).
        per_label_rows: for per-label formats, the labels that get a file (default: labels with
            voxels).
    """

    name: str
    title: str
    help: str
    pattern: str
    write: Writer
    required: bool = False
    needs_dicom: bool = False
    needs_probabilities: bool = False
    per_label_rows: Callable[[ExportJob], Sequence[LabelRow]] = _rows_with_voxels

    @property
    def flag(self) -> str:
        """The CLI option, e.g. ``--dicom-seg``."""
        return "--" + self.name.replace("_", "-")

    @property
    def per_label(self) -> bool:
        return "{key}" in self.pattern

    def paths(self, out: Path, keys: Sequence[str] = ()) -> list[Path]:
        """The files written beside label map ``out``: one, or one per label key."""
        stem, suffix = split_name(out)
        if not self.per_label:
            return [out.with_name(self.pattern.format(stem=stem, suffix=suffix))]
        return [out.with_name(self.pattern.format(stem=stem, suffix=suffix, key=k)) for k in keys]

    def targets(self, job: ExportJob, out: Path) -> list[tuple[Path, LabelRow | None]]:
        """``(path, label row or None)`` for every file this format writes for ``job``."""
        if not self.per_label:
            return [(self.paths(out)[0], None)]
        rows = list(self.per_label_rows(job))
        return list(zip(self.paths(out, [r.key for r in rows]), rows, strict=True))


def split_name(out: Path) -> tuple[str, str]:
    """``liver.nii.gz`` → ``("liver", ".nii.gz")``; the suffix keeps the file's own case."""
    from napari_cdpdnet.fileutil import full_suffix

    suffix = full_suffix(out)
    n = len(suffix) if suffix and out.name.lower().endswith(suffix) else 0
    return out.name[: len(out.name) - n], out.name[len(out.name) - n :]


# ------------------------------------------------------------------ writers
def _write_label_map(job: ExportJob, path: Path, row: LabelRow | None) -> None:
    from napari_cdpdnet.io import write_label_map

    write_label_map(path, job.labels, job.geometry, label_names={r.value: r.name for r in job.rows})


def _write_table(job: ExportJob, path: Path, row: LabelRow | None) -> None:
    from napari_cdpdnet.export.labeltable import write_label_table

    write_label_table(path, job.rows)


def _write_dicom_seg(job: ExportJob, path: Path, row: LabelRow | None) -> None:
    from napari_cdpdnet.export.dicomseg import dicom_seg_specs, write_verified_dicom_seg

    if not any(r.voxel_count for r in job.rows):
        raise InputError("nothing to put in a DICOM-SEG: the label map is empty")
    write_verified_dicom_seg(path, job.labels, job.geometry, dicom_seg_specs(job.rows, edited=job.edited))


def _write_mesh(job: ExportJob, path: Path, row: LabelRow | None) -> None:
    from napari_cdpdnet.export.meshes import label_mesh, write_stl

    assert row is not None
    verts, faces = label_mesh(job.labels, row.value, job.geometry, smoothing_sigma=job.smoothing_sigma)
    write_stl(path, verts, faces, name=row.name)


def _write_probability(job: ExportJob, path: Path, row: LabelRow | None) -> None:
    from napari_cdpdnet.io import write_image

    assert row is not None
    write_image(path, job.probabilities[row.value], job.geometry)


def _rows_with_probabilities(job: ExportJob) -> list[LabelRow]:
    return [row for row in job.rows if row.value in job.probabilities]


#: Every export format, by name, in the order files are written (and listed).
FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("label_map", "Label map", "the label map on the CT's grid", "{stem}{suffix}",
                     _write_label_map, required=True),
        ExportFormat("table", "Label table", "the label table (<name>.csv)", "{stem}.csv", _write_table,
                     required=True),
        ExportFormat("dicom_seg", "DICOM-SEG",
                     "a DICOM-SEG referencing the source series, read back and checked before it is "
                     "kept (<name>.seg.dcm; DICOM inputs only)",
                     "{stem}.seg.dcm", _write_dicom_seg, needs_dicom=True),
        ExportFormat("stl", "STL meshes", "one surface mesh per structure, in LPS mm (<name>_<key>.stl)",
                     "{stem}_{key}.stl", _write_mesh),
        ExportFormat("probabilities", "Probability maps",
                     "one probability map per structure (<name>_<key>_prob.nii.gz)",
                     "{stem}_{key}_prob.nii.gz", _write_probability, needs_probabilities=True,
                     per_label_rows=_rows_with_probabilities),
    )
}


def optional_formats(*, probabilities: bool = True) -> list[ExportFormat]:
    """The formats a user chooses (CLI options, checkboxes); without ``probabilities`` those that
    need a run's probability maps are left out."""
    return [f for f in FORMATS.values() if not f.required and (probabilities or not f.needs_probabilities)]


def resolve_formats(names: Iterable[str]) -> list[ExportFormat]:
    """The required formats plus ``names``, in :data:`FORMATS` order.

    Raises:
        InputError: a name that is not an optional format.
    """
    wanted = set(names)
    unknown = wanted - {f.name for f in optional_formats()}
    if unknown:
        raise InputError(
            f"unknown export format {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(f.name for f in optional_formats())}"
        )
    return [f for f in FORMATS.values() if f.required or f.name in wanted]


def check_dicom_source(path: str | Path, geometry: Geometry, formats: Iterable[str]) -> None:
    """Refuse, before segmenting, a format that needs a DICOM source the CT cannot give.

    Shared by ``cdpdnet segment`` (one case or a cohort's loader) and ``segment-by-example`` so
    the refusal reads the same everywhere and comes before any compute.

    Raises:
        InputError: the CT was read from a file, or its series has blank UIDs (de-identified).
    """
    needs = [FORMATS[name] for name in formats if FORMATS[name].needs_dicom]
    if needs and geometry.dicom is None:
        raise InputError(f"{path}: {needs[0].flag} needs a DICOM series as input")
    if needs:  # blank UIDs (de-identified): say so before segmenting, not after
        from napari_cdpdnet.export.dicomseg import dicom_seg_problem

        problem = dicom_seg_problem(geometry)
        if problem:
            raise InputError(
                f"{path}: {needs[0].flag} cannot be written for this series: {problem}. Run again "
                "without it: the label map (NIfTI, or NRRD with --format .nrrd) and its table hold "
                "the same result"
            )
