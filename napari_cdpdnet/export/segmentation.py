"""Export a (possibly hand-corrected) segmentation: the one way a segmentation reaches disk.

:func:`export_segmentation` writes the label map and its label table plus the optional formats of
:data:`~napari_cdpdnet.export.formats.FORMATS` (DICOM-SEG, STL meshes, probability maps) that a
caller asks for, all or nothing: every file is first written into a hidden staging folder beside
the destination (the DICOM-SEG is read back and compared voxel by voxel with the label map there),
and only then are the files moved onto their names. Existing files are refused unless
``overwrite`` is given; when they are replaced and a later move fails, the old files are put back.

Label values are CDPDNet structure indices (1..32) for layers this plugin made; labels from
elsewhere (a TotalSegmentator map, a hand-drawn layer) are "plain" labels named ``label N``.

Used by ``cdpdnet segment``, ``cdpdnet segment-by-example``, the structure-table widget and the
napari DICOM-SEG writer; no napari or Qt here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.export.formats import FORMATS, ExportJob, resolve_formats
from napari_cdpdnet.export.labeltable import LabelRow, plain_label_row, structure_row
from napari_cdpdnet.geometry import Geometry

__all__ = [
    "describe_labels",
    "is_structure_value",
    "export_paths",
    "label_key",
    "present_values",
    "export_segmentation",
    "export_dicom_seg",
    "with_reviewed",
]

logger = logging.getLogger(__name__)


def is_structure_value(value: int) -> bool:
    """True when ``value`` can be a CDPDNet structure index."""
    from napari_cdpdnet.vocabulary.catalog import STRUCTURES

    return 1 <= int(value) <= len(STRUCTURES)


def _check_shapes(labels: np.ndarray, geometry: Geometry, image: np.ndarray | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"only 3-D label maps can be exported; this one is {labels.ndim}-D")
    if labels.shape != geometry.shape:
        raise InputError(
            f"the label map has shape {labels.shape} but its CT grid is {geometry.shape}; "
            "it no longer matches the image it was made for"
        )
    if image is not None and np.shape(image) != labels.shape:
        raise InputError(
            f"the image has shape {np.shape(image)} but the label map {labels.shape}; choose the "
            "image the labels were drawn on (or none) for the HU columns"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"a label map must hold integers, not {labels.dtype}")
    return labels


def describe_labels(
    labels: np.ndarray,
    geometry: Geometry,
    image: np.ndarray | None = None,
    *,
    cdpdnet: bool = True,
    reviewed: Iterable[int] = (),
    edited: Iterable[int] = (),
    colors: Mapping[int, str] | None = None,
    names: Mapping[int, str] | None = None,
) -> list[LabelRow]:
    """The label-table rows of every non-zero value present (one measuring pass).

    Args:
        labels: ``[z, y, x]`` label map on ``geometry``.
        geometry: its grid.
        image: CT in HU on the same grid, for the density columns (NaN without it).
        cdpdnet: values 1..32 are CDPDNet structure indices (layers made by this plugin); other
            values, and all values when False, become plain ``label N`` rows.
        reviewed: values a person has checked (the ``reviewed`` column; training reads it).
        edited: values a person has painted on; their source reads ``CDPDNet+edited``.
        colors: ``#rrggbb`` per value for plain labels (e.g. the napari layer's colours).
        names: names for plain labels (default ``label N``).
    """
    from napari_cdpdnet.export.measure import label_statistics

    labels = _check_shapes(labels, geometry, image)
    stats = label_statistics(labels, geometry, image)
    reviewed = {int(v) for v in reviewed}
    edited = {int(v) for v in edited}
    colors = colors or {}
    names = names or {}
    rows = []
    for st in stats:
        done = st.value in reviewed
        if cdpdnet and is_structure_value(st.value):
            row = structure_row(st, reviewed=done, source="CDPDNet+edited" if st.value in edited else "CDPDNet")
        else:
            row = plain_label_row(
                st, name=names.get(st.value), color=colors.get(st.value, ""), reviewed=done,
                source="edited" if st.value in edited else "",
            )
        rows.append(row)
    return rows


def label_key(value: int, *, cdpdnet: bool = True) -> str:
    """The key naming a label's files: the structure key (``left_kidney``) or ``label_N``."""
    if cdpdnet and is_structure_value(value):
        from napari_cdpdnet.vocabulary.catalog import structure

        return structure(int(value)).key
    return f"label_{int(value)}"


def present_values(labels: np.ndarray) -> list[int]:
    """The non-zero values in ``labels`` (one counting pass; no sort of the whole volume)."""
    flat = np.asarray(labels).reshape(-1)
    if not flat.size:
        return []
    if flat.min() < 0:
        raise InputError("a label map cannot hold negative values")
    return [int(v) for v in np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False))) if v]


def export_paths(out_path: str | os.PathLike[str], keys: Sequence[str] = (), *,
                 formats: Iterable[str] = ()) -> list[Path]:
    """The files :func:`export_segmentation` would write, in order (for asking before overwriting).

    ``liver.nii.gz`` → ``liver.nii.gz``, ``liver.csv``, then per chosen format e.g.
    ``liver.seg.dcm``, ``liver_<key>.stl`` for each of ``keys`` (see :func:`label_key`).

    Raises:
        InputError: ``out_path`` is not a label-map file name, or an unknown format.
    """
    from napari_cdpdnet.fileutil import full_suffix
    from napari_cdpdnet.io.images import LABEL_MAP_SUFFIXES

    out = Path(out_path).expanduser()
    suffix = full_suffix(out)
    if suffix not in LABEL_MAP_SUFFIXES:
        raise InputError(
            f"{out}: cannot write a label map as {suffix or '(no suffix)'!r}; use one of "
            f"{', '.join(LABEL_MAP_SUFFIXES)} (DICOM-SEG is written beside it)"
        )
    return [path for fmt in resolve_formats(formats) for path in fmt.paths(out, keys)]


class _Staging:
    """Files written under a hidden folder beside the destination, published all together."""

    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=folder))
        except OSError as exc:
            raise InputError(f"cannot write to {folder}: {exc.strerror or exc}") from exc
        self.targets: dict[Path, Path] = {}

    def path(self, final: Path) -> Path:
        """Where to write the file that becomes ``final``."""
        staged = self.dir / final.name
        self.targets[staged] = final
        return staged

    def publish(self, overwrite: bool, last: Path | None = None) -> None:
        """Move every staged file (and companions such as an .mhd's .zraw) onto its name.

        ``last`` (the label table) is moved after all others: where it exists, so does every
        file of the set (``cdpdnet segment --skip-existing`` relies on it after a crash).
        """
        from napari_cdpdnet.errors import OutputExistsError
        from napari_cdpdnet.fileutil import _publish

        final_folder = next(iter(self.targets.values())).parent
        moves = [(p, self.targets.get(p, final_folder / p.name)) for p in sorted(self.dir.iterdir())]
        moves = [(src, dst) for src, dst in moves if not src.name.startswith(".")]
        moves.sort(key=lambda move: move[1] == last)
        backups: list[tuple[Path, Path]] = []
        done: list[Path] = []
        try:
            for src, dst in moves:
                if os.path.lexists(dst):
                    if not overwrite:
                        raise OutputExistsError(
                            f"{dst} appeared while exporting; nothing was written or replaced"
                        )
                    keep = self.dir / f".old-{len(backups)}-{dst.name}"
                    os.replace(dst, keep)
                    backups.append((keep, dst))
                _publish(src, dst, overwrite=False)
                done.append(dst)
        except BaseException:
            for dst in done:
                with contextlib.suppress(OSError):
                    dst.unlink()
            for keep, dst in backups:
                with contextlib.suppress(OSError):
                    os.replace(keep, dst)
            raise

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[_Staging]:
    stage = _Staging(folder)
    try:
        yield stage
    finally:
        stage.close()


def _need_dicom(geometry: Geometry) -> None:
    """Refuse a DICOM-SEG whose source cannot be referenced (no DICOM, or blank UIDs)."""
    from napari_cdpdnet.export.dicomseg import require_dicom_seg_source

    require_dicom_seg_source(geometry)


def export_segmentation(
    labels: np.ndarray,
    geometry: Geometry,
    image: np.ndarray | None,
    out_path: str | os.PathLike[str],
    *,
    formats: Iterable[str] = (),
    rows: Sequence[LabelRow] | None = None,
    probabilities: Mapping[int, np.ndarray] | None = None,
    cdpdnet: bool = True,
    reviewed: Iterable[int] = (),
    edited: Iterable[int] = (),
    colors: Mapping[int, str] | None = None,
    names: Mapping[int, str] | None = None,
    smoothing_sigma: float = 0.0,
    overwrite: bool = False,
) -> list[Path]:
    """Write the label map on ``geometry`` plus its label table and the chosen ``formats``.

    Args:
        labels: ``[z, y, x]`` label map on ``geometry``.
        geometry: the source CT's grid; must carry DICOM references for ``dicom_seg``.
        image: CT in HU on the same grid for the HU columns of the table, or None.
        out_path: the label map file (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ``.mha``, ...);
            the other files go beside it (``<name>.csv``, ``<name>.seg.dcm``,
            ``<name>_<key>.stl``, ...; see :func:`export_paths`).
        formats: names of optional formats of :data:`~napari_cdpdnet.export.formats.FORMATS`:
            ``dicom_seg`` (verified by reading it back), ``stl`` (one mesh per non-empty label),
            ``probabilities`` (one map per structure in ``probabilities``).
        rows: the label table when the caller has measured it already (``cdpdnet segment``
            lists the requested structures in request order, absent ones with zero volume);
            default: measured here with :func:`describe_labels`.
        probabilities: structure index → probability map on ``geometry``, for ``probabilities``.
        cdpdnet, reviewed, edited, colors, names: as in :func:`describe_labels`.
        smoothing_sigma: mesh smoothing in voxels (0: exact voxel boundary).
        overwrite: replace existing files; otherwise any existing output refuses the export
            before anything is computed.

    Returns:
        The written paths, label map first, in :data:`FORMATS` order.

    Raises:
        InputError: bad shapes, suffix or format name, a format's source missing (DICOM-SEG
            without DICOM references, probability maps not given), nothing to put in a DICOM-SEG.
        OutputExistsError: an output exists and ``overwrite`` is false.
    """
    from napari_cdpdnet.fileutil import check_writable

    labels = _check_shapes(labels, geometry, image)
    chosen = resolve_formats(formats)
    for fmt in chosen:
        if fmt.needs_dicom:
            _need_dicom(geometry)
        if fmt.needs_probabilities and not probabilities:
            raise InputError(f"{fmt.title} need the probability maps of a segmentation run; none were given")
    out = Path(out_path).expanduser()
    export_paths(out)  # suffix check before measuring anything
    if rows is None:
        rows = describe_labels(labels, geometry, image, cdpdnet=cdpdnet, reviewed=reviewed, edited=edited,
                               colors=colors, names=names)
    job = ExportJob(labels, geometry, tuple(rows), frozenset(int(v) for v in edited), probabilities or {},
                    smoothing_sigma)
    targets = [(fmt, path, row) for fmt in chosen for path, row in fmt.targets(job, out)]
    for _, path, _ in targets:
        check_writable(path, overwrite=overwrite)

    with _staging(out.parent) as stage:
        for fmt, path, row in targets:
            fmt.write(job, stage.path(path), row)
        stage.publish(overwrite, last=FORMATS["table"].paths(out)[0])
    logger.info("exported %s (%d files)", out, len(targets))
    return [path for _, path, _ in targets]


def export_dicom_seg(
    labels: np.ndarray,
    geometry: Geometry,
    out_path: str | os.PathLike[str],
    *,
    cdpdnet: bool = True,
    edited: Iterable[int] = (),
    colors: Mapping[int, str] | None = None,
    names: Mapping[int, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write only a DICOM-SEG (verified by reading it back), e.g. from napari's Save dialog.

    The same writer and staging as :func:`export_segmentation`, at a path of the caller's.

    Raises:
        InputError: no DICOM references, empty label map, bad shape.
        OutputExistsError: ``out_path`` exists and ``overwrite`` is false.
    """
    from napari_cdpdnet.fileutil import check_writable

    labels = _check_shapes(labels, geometry, None)
    _need_dicom(geometry)
    out = check_writable(Path(out_path).expanduser(), overwrite=overwrite)
    rows = describe_labels(labels, geometry, cdpdnet=cdpdnet, edited=edited, colors=colors, names=names)
    job = ExportJob(labels, geometry, tuple(rows), frozenset(int(v) for v in edited))
    with _staging(out.parent) as stage:
        FORMATS["dicom_seg"].write(job, stage.path(out), None)
        stage.publish(overwrite)
    return out


# Rows are frozen dataclasses; the widget updates the reviewed column without re-measuring.
def with_reviewed(rows: Sequence[LabelRow], reviewed: Iterable[int]) -> list[LabelRow]:
    """Copies of ``rows`` with the ``reviewed`` column set from ``reviewed`` values."""
    reviewed = {int(v) for v in reviewed}
    return [replace(r, reviewed=r.value in reviewed) for r in rows]
