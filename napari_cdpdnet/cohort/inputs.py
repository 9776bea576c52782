"""What a cohort run segments: its cases, from files, folders, globs and manifests.

``cdpdnet segment`` takes any mix of

* CT files (NIfTI, NRRD, MHA/MHD) and DICOM folders, as before;
* folders, searched recursively: every CT file and every CT DICOM series in them is a case
  (series are grouped by SeriesInstanceUID across sub-folders; non-CT series such as SEG or SR
  are left out with one note). A folder that is a single series stays one case, as before;
* globs (``"data/*/ct.nii.gz"``, ``"data/**/*.nrrd"``; quote them so the shell leaves them);
* manifests, ``.csv`` / ``.tsv`` files whose header names the columns ``input`` (required),
  ``output``, ``structures`` (e.g. ``liver; spleen``: each case may ask for other structures)
  and ``series_uid``. Relative inputs are relative to the manifest's folder, relative outputs
  to ``-o``.

Outputs mirror the input tree under ``-o DIR``: ``data/p1/ct.nii.gz`` (folder ``data/``) →
``DIR/p1/ct.nii.gz``; a DICOM series in ``data/p2/series/`` → ``DIR/p2/series.nii.gz``.
Explicit file arguments keep the flat ``DIR/<name>`` of earlier versions. Two cases that would
write the same file are refused before anything runs.

Each case carries an estimated cost for balancing shards (:func:`estimate_cost`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.fileutil import full_suffix
from napari_cdpdnet.io.images import LABEL_MAP_SUFFIXES

__all__ = [
    "Case",
    "Discovery",
    "MANIFEST_SUFFIXES",
    "discover_cases",
    "estimate_cost",
    "is_pattern",
    "read_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv")
#: CT file types looked for in folders (a Slicer ``.seg.nrrd`` is a segmentation, not a CT).
_CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_MANIFEST_COLUMNS = ("input", "output", "structures", "series_uid")
#: Model grid spacing (mm) and window size: costs are voxels of the 1.5 mm grid, at least a window.
_GRID_MM = 1.5
_MIN_COST = 96.0**3


@dataclass(frozen=True)
class Case:
    """One CT to segment and the label map it becomes.

    Attributes:
        source: the CT file or the folder holding its DICOM series.
        output: the label map path (the table and other files go beside it).
        series_uid: the DICOM series to read from ``source`` (None: files, or the folder's
            only CT series).
        request: the structures asked for this case (a manifest's ``structures``); None means
            the run's ``-s``.
        origin: where the case came from, for messages (``manifest.csv line 4``).
        cost: estimated work (voxels of the 1.5 mm model grid), for balancing shards.
        input_bytes: size of the input on disk.
    """

    source: Path
    output: Path
    series_uid: str | None = None
    request: str | None = None
    origin: str = ""
    cost: float = 0.0
    input_bytes: int = 0

    @property
    def key(self) -> str:
        """Identifies the case across runs: its label map path."""
        return str(self.output)

    @property
    def label(self) -> str:
        """The input as a person would name it (with the series when one was picked)."""
        return f"{self.source} (series {self.series_uid})" if self.series_uid else str(self.source)


@dataclass
class Discovery:
    """The cases found, and notes about what was left out."""

    cases: list[Case]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    """A case before its output path is known: ``parts`` name it relative to the output root."""

    source: Path
    parts: tuple[str, ...]
    series_uid: str | None = None
    request: str | None = None
    origin: str = ""
    output: Path | None = None  # explicit (manifest)
    input_bytes: int | None = None
    cost: float | None = None


def is_pattern(text: str) -> bool:
    """True for a glob (``*``, ``?`` or ``[``) that does not name an existing path."""
    return any(c in text for c in "*?[") and not Path(text).expanduser().exists()


def is_manifest(text: str) -> bool:
    return full_suffix(text) in MANIFEST_SUFFIXES


def _stem(path: Path) -> str:
    """The name without its image suffix (a folder keeps its whole name)."""
    suffix = full_suffix(path)
    if suffix in (*_CT_SUFFIXES, ".seg.nrrd", ".dcm", ".dicom", ".ima") and not path.is_dir():
        return path.name[: len(path.name) - len(suffix)]
    return path.name


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


# ------------------------------------------------------------------------------ folders
def _dicom_series_items(dirs: Iterable[Path], base: Path, notes: list[str]) -> list[_Item]:
    """One item per CT series found in ``dirs`` (a series may span several of them)."""
    from napari_cdpdnet.io.dicom_scan import CT_MODALITIES, list_dicom_series

    by_uid: dict[str, list] = defaultdict(list)
    folders: dict[str, list[Path]] = defaultdict(list)
    for d in sorted(dirs):
        for s in list_dicom_series(d, recursive=False):
            by_uid[s.uid].append(s)
            folders[s.uid].append(d)
    skipped: dict[str, int] = defaultdict(int)
    found = []
    for uid, infos in by_uid.items():
        first = infos[0]
        if first.modality not in CT_MODALITIES or sum(i.num_slices for i in infos) == 0:
            skipped[first.modality or "unknown modality"] += 1
            continue
        source = Path(os.path.commonpath([str(f) for f in folders[uid]]))
        files = [f for i in infos for f in i.files]
        found.append((source, uid, first, files, sum(i.num_slices for i in infos)))
    if skipped:
        what = ", ".join(f"{n} {m}" for m, n in sorted(skipped.items()))
        notes.append(f"left out DICOM series that are not CT images: {what}")
    per_folder: dict[Path, int] = defaultdict(int)
    for source, *_ in found:
        per_folder[source] += 1
    items = []
    for source, uid, first, files, slices in sorted(found, key=lambda f: (str(f[0]), f[2].series_number or 0, f[1])):
        rel = source.relative_to(base).parts if source != base else (source.name,)
        if per_folder[source] > 1:
            rel = (*rel, _series_label(first, uid))
        items.append(_Item(source, tuple(rel), uid, input_bytes=sum(_size(f) for f in files),
                           cost=_series_cost(files[0], slices)))
    return items


def _series_label(info, uid: str) -> str:
    number = f"series{info.series_number}" if info.series_number is not None else "series"
    return f"{number}_{uid.rsplit('.', 1)[-1][-8:]}"


def _folder_items(root: Path, base: Path, exclude: Sequence[Path], notes: list[str]) -> list[_Item]:
    """Every CT file and CT DICOM series under ``root`` (hidden entries and ``exclude`` skipped)."""
    from napari_cdpdnet.io.dicom_scan import is_dicom_file

    items: list[_Item] = []
    dicom_dirs: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not _under((here / d).resolve(), exclude))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            if full_suffix(name) in _CT_SUFFIXES:
                rel = path.parent.relative_to(base).parts if path.parent != base else ()
                items.append(_Item(path, (*rel, _stem(path))))
            elif here not in dicom_dirs and is_dicom_file(path):
                dicom_dirs.add(here)
    items += _dicom_series_items(dicom_dirs, base, notes)
    if not items:  # read as before, so the reader says what is wrong with the folder
        items.append(_Item(root, (root.name,)))
    return items


def _path_items(path: Path, base: Path | None, series_uid: str | None, exclude: Sequence[Path],
                notes: list[str]) -> list[_Item]:
    """Items for one path: a file, or a folder (searched unless a series is named)."""
    if path.is_dir():
        if series_uid is not None:
            rel = path.relative_to(base).parts if base is not None and path != base else (path.name,)
            return [_Item(path, tuple(rel), series_uid)]
        return _folder_items(path, base if base is not None else path.parent, exclude, notes)
    rel = path.parent.relative_to(base).parts if base is not None and path.parent != base else ()
    return [_Item(path, (*rel, _stem(path)), series_uid)]


def _glob_items(pattern: str, exclude: Sequence[Path], notes: list[str]) -> list[_Item]:
    import glob

    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
        raise InputError(f"{pattern}: no file or folder matches this pattern")
    fixed = []
    for part in Path(pattern).expanduser().parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    out: list[_Item] = []
    for m in matches:
        p = Path(m)
        if not _under(p.resolve(), exclude) and not any(x.startswith(".") for x in p.relative_to(base).parts):
            out += _path_items(p, base, None, exclude, notes)
    return out


# ------------------------------------------------------------------------------ manifests
def read_manifest(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, {column: value})`` for every row of a CSV/TSV manifest.

    Raises:
        InputError: missing file, no ``input`` column, an unknown column name.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"manifest {path}: cannot read it ({exc.strerror or exc})") from None
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), None)
    if header_at is None:
        raise InputError(f"manifest {path}: empty; its first line names the columns, e.g. input,output,structures")
    header = lines[header_at]
    delimiter = "\t" if full_suffix(path) == ".tsv" or "\t" in header else (";" if ";" in header and "," not in header else ",")
    reader = csv.reader(lines[header_at:], delimiter=delimiter)
    columns = [c.strip().lower() for c in next(reader)]
    if "input" not in columns:
        raise InputError(
            f"manifest {path}: no 'input' column in its first line ({', '.join(columns) or 'empty'}); "
            f"name the columns, e.g. input,output,structures")
    unknown = [c for c in columns if c and c not in _MANIFEST_COLUMNS]
    if unknown:
        raise InputError(f"manifest {path}: unknown column(s) {', '.join(unknown)}; use "
                         f"{', '.join(_MANIFEST_COLUMNS)}")
    rows = []
    for offset, cells in enumerate(reader):
        number = header_at + 2 + offset
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        row = {c: (cells[i].strip() if i < len(cells) else "") for i, c in enumerate(columns) if c}
        if not row.get("input"):
            raise InputError(f"manifest {path} line {number}: the input is empty")
        rows.append((number, row))
    return rows


def _manifest_items(path: Path, output_root: Path, label_suffix: str, exclude: Sequence[Path],
                    notes: list[str]) -> list[_Item]:
    base = path.parent
    out: list[_Item] = []
    for number, row in read_manifest(path):
        origin = f"{path.name} line {number}"
        source = Path(row["input"]).expanduser()
        source = source if source.is_absolute() else base / source
        request = row.get("structures") or None
        uid = row.get("series_uid") or None
        inside = source == base or base in source.parents
        # a missing input is one case that fails (and is reported), not a reason to stop the cohort
        items = _path_items(source, base if inside else None, uid, exclude, notes)
        explicit = row.get("output") or None
        if explicit is not None:
            if len(items) > 1:
                raise InputError(f"{origin}: {source} holds {len(items)} CT series or files but "
                                 "names one output; leave the output empty to name them after the inputs")
            target = Path(explicit).expanduser()
            target = target if target.is_absolute() else output_root / target
            if full_suffix(target) not in LABEL_MAP_SUFFIXES:
                target = target.with_name(target.name + label_suffix)
            items = [replace(items[0], output=target)]
        out += [replace(i, request=request, origin=origin) for i in items]
    if not out:
        raise InputError(f"manifest {path}: no cases (only a header, blank or # lines)")
    return out


# ------------------------------------------------------------------------------ discovery
def discover_cases(
    inputs: Sequence[str | os.PathLike[str]],
    output: Path,
    *,
    label_suffix: str = ".nii.gz",
    series_uid: str | None = None,
    exclude: Sequence[Path] = (),
) -> Discovery:
    """The cases of a run, each with its output path and cost.

    Args:
        inputs: files, folders, globs and manifests, as given on the command line.
        output: ``-o``: a label map file (exactly one case) or a folder.
        label_suffix: the label-map format of derived names (``--format``).
        series_uid: ``--series-uid``: the series to read from folder inputs.
        exclude: folders never searched (the output folder, the report folder).

    Raises:
        InputError: a glob matching nothing, a bad manifest, several cases for one output file,
            two cases writing the same file.
    """
    output = Path(output).expanduser()
    exclude = [Path(e).expanduser().resolve() for e in exclude]
    notes: list[str] = []
    items: list[_Item] = []
    several = len(inputs) > 1
    for arg in inputs:
        text = os.fspath(arg)
        if is_manifest(text):
            items += _manifest_items(Path(text).expanduser(), output, label_suffix, exclude, notes)
        elif is_pattern(text):
            items += _glob_items(text, exclude, notes)
        else:
            path = Path(text).expanduser()
            base = (path.parent if several else path) if path.is_dir() else None
            items += _path_items(path, base, series_uid, exclude, notes)
    file_output = full_suffix(output) in LABEL_MAP_SUFFIXES
    if file_output and len(items) > 1:
        raise InputError(
            f"{len(items)} cases ({', '.join(str(i.source) for i in items[:3])}"
            f"{', …' if len(items) > 3 else ''}) but -o {output} is a single file: give a folder instead")
    if not file_output and output.exists() and not output.is_dir():
        raise InputError(f"-o {output}: exists and is not a folder; give a folder or a label map file "
                         f"({', '.join(LABEL_MAP_SUFFIXES)})")
    cases: list[Case] = []
    seen: dict[str, _Item] = {}
    for item in items:
        if file_output:
            target = output
        elif item.output is not None:
            target = item.output
        else:
            target = output.joinpath(*item.parts[:-1], item.parts[-1] + label_suffix)
        key = os.path.normcase(os.path.abspath(target))
        if key in seen:
            raise InputError(f"inputs {seen[key].source} and {item.source} would both write {target}; "
                             "rename one, or give the outputs in a manifest")
        seen[key] = item
        cases.append(Case(item.source, target, item.series_uid, item.request, item.origin,
                          cost=item.cost if item.cost is not None else 0.0,
                          input_bytes=item.input_bytes if item.input_bytes is not None else 0))
    return Discovery(cases, notes)


# ------------------------------------------------------------------------------ costs
def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _grid_voxels(size_xyz: Sequence[float], spacing_xyz: Sequence[float]) -> float:
    extent = [max(float(n), 1.0) * max(float(s), 1e-3) / _GRID_MM for n, s in zip(size_xyz, spacing_xyz, strict=False)]
    return max(math.prod(extent), _MIN_COST)


def _series_cost(first_file: Path, slices: int) -> float | None:
    """Grid voxels of a DICOM series from one header (rows, columns, spacing, slice count)."""
    import pydicom

    try:
        ds = pydicom.dcmread(first_file, stop_before_pixels=True,
                             specific_tags=["PixelSpacing", "SliceThickness", "Rows", "Columns"])
        dy, dx = (float(v) for v in ds.get("PixelSpacing", [1.0, 1.0]))
        dz = float(ds.get("SliceThickness", 0) or 0) or 1.0
        return _grid_voxels((int(ds.Columns), int(ds.Rows), slices), (dx, dy, dz))
    except (OSError, AttributeError, TypeError, ValueError, pydicom.errors.InvalidDicomError):
        return None


def estimate_cost(case: Case) -> Case:
    """The case with ``cost`` and ``input_bytes`` filled in (when not known from the scan).

    Cost is the voxel count of the 1.5 mm model grid the scan becomes (extent in mm / 1.5 per
    axis, from the header; at least one 96³ window). The sliding window's work grows with that
    grid, not with the file size (compression varies ten-fold between scans) nor with the source
    voxel count (a 0.6 mm and a 5 mm scan of the same body give the same grid). An unreadable
    header falls back to the file size (such a case fails quickly anyway).
    """
    if case.cost > 0:
        return case
    nbytes = case.input_bytes or (_size(case.source) if case.source.is_file() else 0)
    cost = None
    if case.source.is_file() and full_suffix(case.source) in _CT_SUFFIXES:
        try:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(case.source))
            reader.ReadImageInformation()
            cost = _grid_voxels(reader.GetSize()[:3], reader.GetSpacing()[:3])
        except (RuntimeError, ValueError):
            cost = None
    elif case.source.is_dir():
        from napari_cdpdnet.io.dicom_scan import list_dicom_series

        try:
            series = [s for s in list_dicom_series(case.source) if case.series_uid in (None, s.uid)]
        except InputError:
            series = []
        if series:
            best = max(series, key=lambda s: s.num_slices)
            nbytes = nbytes or sum(_size(f) for f in best.files)
            cost = _series_cost(best.files[0], best.num_slices)
    return replace(case, cost=cost if cost is not None else max(float(nbytes) / 2, 1.0),
                   input_bytes=nbytes)
