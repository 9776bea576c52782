"""DICOM folders: find the files, group them into series, pick the one to read, say what is there.

Headers only (pydicom, ``stop_before_pixels``): nothing here decodes pixels. Split from
:mod:`napari_cdpdnet.io.dicom_series`, which turns the chosen series into a volume.

Grouping does not trust UIDs alone, because de-identification tools blank them and some exports
reuse one SeriesInstanceUID for several series:

* files with a SeriesInstanceUID are grouped by it; when one UID holds several image stacks that
  could each be a volume (different frame of reference, orientation, size, pixel spacing, series
  number or description), each stack becomes its own series and a note says so. Single images of
  another geometry (localizers) stay with their series and are left out when it is read.
* files without one are grouped by what makes a volume: study, frame of reference, orientation,
  rows/columns, pixel spacing, series number, description and time, slice thickness, kernel,
  image type, SOP class and modality; a note says the grouping was inferred.
* a group whose slices share positions is split by AcquisitionNumber when that separates them;
  otherwise reading it is refused with a message that says why (never a silent merge).

When nothing forms a CT volume, :meth:`FolderScan.no_volume_message` says how many DICOM files
were found, what they are (SOP class and modality) and why none is a CT volume: one wording for
the CLI, the napari reader and the dock. Folders are walked with symbolic links followed once
each, so a folder that links to itself ends. pydicom is imported when used.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.io.dicom_grouping import (
    CT_MODALITIES,
    DicomSeriesInfo,
    frame_count,
    group_series,
    is_image_header,
    tag_int,
    tag_str,
)
from napari_cdpdnet.io.dicom_kinds import (
    DERIVED_MODALITIES,
    PROJECTION_MODALITIES,
    not_a_volume_reason,
    object_kind,
    sniff_file_kind,
)

__all__ = [
    "DicomSeriesInfo",
    "FolderScan",
    "list_dicom_series",
    "list_volume_series",
    "scan_folder",
    "scan_files",
    "select_series",
    "select_series_of_file",
    "series_of_file",
    "is_dicom_file",
    "folder_has_dicom",
    "dicomdir_files",
    "CT_MODALITIES",
    "DAMAGED_NOTE",
]

logger = logging.getLogger(__name__)

#: Header elements read while scanning (pixel data is never read here).
_SCAN_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "SeriesDescription", "SeriesNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "NumberOfFrames", "PatientID", "GantryDetectorTilt", "StudyDescription", "StudyDate",
    "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel", "SliceThickness",
    "BodyPartExamined", "ContrastBolusAgent", "ImageType", "AcquisitionNumber", "SeriesTime",
    "RescaleSlope", "RescaleIntercept", "SamplesPerPixel", "SpecificCharacterSet",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
]

#: Kept for callers of the old name: objects that may carry frames but are never a volume.
_DERIVED_MODALITIES = DERIVED_MODALITIES

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Words of the warning about unreadable DICOM files (a refusal repeats that warning).
DAMAGED_NOTE = "could not be read and were skipped"


# ---------------------------------------------------------------------------------- detection
def _raw_dicom_start(head: bytes) -> bool:
    """A DICOM stream without the 128-byte preamble (older exports): a group 0002/0008 element."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00") or head[3] != 0:
        return False
    vr = head[4:6]
    return vr.isalpha() and vr.isupper() or int.from_bytes(head[4:8], "little") < 1024


def is_dicom_file(path: str | Path) -> bool:
    """True if ``path`` is a DICOM file: ``DICM`` at byte 128, or a preamble-less DICOM stream."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return (len(head) == 132 and head[128:132] == b"DICM") or _raw_dicom_start(head)


@dataclass
class _Walk:
    """Files under a folder, each once; symbolic links are followed but no folder twice."""

    files: list[Path] = field(default_factory=list)
    loops: int = 0


def _walk(folder: Path, recursive: bool) -> _Walk:
    out = _Walk()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            out.loops += 1
            logger.info("%s: leads back to a folder already searched (a link loop); not searched again", d)
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            logger.info("%s: cannot list (%s)", d, exc)
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subdirs.append(Path(e.path))
                elif e.is_file():
                    fst = os.stat(e.path)
                    if (fst.st_dev, fst.st_ino) not in seen_files:
                        seen_files.add((fst.st_dev, fst.st_ino))
                        out.files.append(Path(e.path))
            except OSError:
                continue
        if recursive:
            stack.extend(reversed(subdirs))
    return out


def folder_has_dicom(folder: str | Path, *, max_files: int = 64, max_folders: int = 256) -> bool:
    """Cheap check: is one of the first ``max_files`` files under ``folder`` DICOM?

    Walks lazily (top folder first, no sorting, links followed once) and gives up after
    ``max_files`` files or ``max_folders`` folders, so dropping a huge folder on napari does not
    stall it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files_seen = 0
    seen: set[tuple[int, int]] = set()
    for n_dirs, (root, dirs, files) in enumerate(os.walk(folder, followlinks=True)):
        if n_dirs >= max_folders:
            return False
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if is_dicom_file(os.path.join(root, name)):
                return True
            files_seen += 1
            if files_seen >= max_files:
                return False
    return False


# ---------------------------------------------------------------------------------- headers
def _read_header(path: Path) -> Any | None:
    """The DICOM header of ``path`` (no pixels), or None if it is not a readable DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS,
                             force=not _has_preamble(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            IndexError, OverflowError, NotImplementedError):
        return None
    if not (_is_directory_record(ds) or "SOPClassUID" in ds or "Modality" in ds or "Rows" in ds):
        return None  # forced read of something that is not DICOM
    return ds


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _is_directory_record(ds: Any) -> bool:
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    return meta_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


__all__ += ["tag_str", "tag_int", "frame_count", "is_image_header"]


# ---------------------------------------------------------------------------------- scanning
@dataclass
class FolderScan:
    """What a folder (or a list of files) holds: DICOM series and everything else."""

    where: Path
    n_files: int
    series: list[DicomSeriesInfo]
    notes: list[str]
    other_files: Counter = field(default_factory=Counter)
    damaged: list[Path] = field(default_factory=list)
    directories: int = 0
    loops: int = 0

    @property
    def n_dicom(self) -> int:
        return sum(len(s.files) for s in self.series)

    def contents(self) -> str:
        """``"3 DICOM files (2 × CT Image (CT), 1 × Segmentation (SEG)) and 1 other file (a text file)"``."""
        kinds: Counter = Counter()
        for s in self.series:
            for ds in s._headers:
                kinds[object_kind(tag_str(ds, "Modality"), tag_str(ds, "SOPClassUID"))] += 1
        n = self.n_dicom
        text = f"{n} DICOM file{'s' if n != 1 else ''}"
        if kinds:
            text += " (" + ", ".join(f"{c} × {k}" for k, c in kinds.most_common()) + ")"
        others = sum(self.other_files.values()) + self.directories
        if others:
            what = [f"{c} × {k}" for k, c in self.other_files.most_common()]
            if self.directories:
                what.append(f"{self.directories} × DICOMDIR index")
            text += f" and {others} other file{'s' if others != 1 else ''} ({', '.join(what)})"
        if self.damaged:
            text += (f"; {len(self.damaged)} file{'s' if len(self.damaged) != 1 else ''} marked as "
                     f"DICOM could not be read (damaged or truncated: {self.damaged[0].name}"
                     f"{', ...' if len(self.damaged) > 1 else ''})")
        if self.loops:
            text += f"; {self.loops} folder link{'s' if self.loops != 1 else ''} leading back into the folder were not followed again"
        return text

    def no_volume_message(self, allow_non_ct: bool) -> str:
        """Why nothing here can be read as a CT volume (the one wording every face shows)."""
        where = self.where
        if not self.series and self.damaged:
            n = len(self.damaged)
            return (
                f"{where}: found {n} file{'s' if n != 1 else ''} marked as DICOM, but none could be "
                f"read: the headers are damaged or truncated ({', '.join(p.name for p in self.damaged[:3])}"
                f"{', ...' if n > 3 else ''}). Copy or export the series again."
            )
        if not self.series:
            return (
                f"{where}: no DICOM files found in this folder: {self.contents()}. For NIfTI, NRRD or "
                "MHA give the file itself; for DICOM give the folder holding the series' files."
            )
        reasons = [(s, s.problem(allow_non_ct)) for s in self.series]
        images = [s for s, _ in reasons if not_a_volume_reason(s.modality, s.num_slices > 0) is None]
        head = f"{where}: found {self.contents()}, but none forms a CT volume"
        if not images:
            listing = "; ".join(f"{s.describe()}: {why}" for s, why in reasons)
            return (f"{head}: the DICOM files hold no image series, only derived objects or 2-D "
                    f"images (found: {listing}). Give the folder of the CT series itself.")
        if all(why and "not CT" in why for s, why in reasons if s in images):
            listing = "; ".join(s.describe() for s in images)
            return (f"{head}: no CT series here (found: {listing}). CDPDNet segments CT only; to read "
                    "this anyway pass allow_non_ct=True.")
        shown = [f"{s.describe()}: {why}" for s, why in reasons[:4]]
        more = f"; and {len(reasons) - 4} more series" if len(reasons) > 4 else ""
        return f"{head}: {'; '.join(shown)}{more}."


def _classify(paths: Iterable[Path]) -> tuple[list[tuple[Path, Any]], Counter, list[Path], int, int]:
    items: list[tuple[Path, Any]] = []
    others: Counter = Counter()
    damaged: list[Path] = []
    directories = 0
    n = 0
    for p in paths:
        n += 1
        ds = _read_header(p) if is_dicom_file(p) else None
        if ds is None:
            if _has_preamble(p):
                damaged.append(p)
                logger.warning("%s: has the DICOM marker but its header cannot be read; skipped", p)
            else:
                others[sniff_file_kind(p) or "unknown file"] += 1
            continue
        if _is_directory_record(ds):
            directories += 1
            continue
        if not is_image_header(ds) and _is_image_class(ds):
            # an image whose header stops before Rows/Columns: pydicom reads a cut header up to
            # where it ends without complaint; without this it would drop out of its series silently
            damaged.append(p)
            logger.warning("%s: an image whose header ends early (truncated?); skipped", p)
            continue
        items.append((p, ds))
    return items, others, damaged, directories, n


def _is_image_class(ds: Any) -> bool:
    """Is this an image object (CT, MR, radiograph ... "Image Storage"), which must have pixels?"""
    from pydicom.uid import UID

    sop = tag_str(ds, "SOPClassUID")
    if sop:
        return "Image Storage" in UID(sop).name
    return tag_str(ds, "Modality").upper() in ("CT", "MR", "PT", "NM")


def scan_files(paths: Sequence[Path], where: Path) -> FolderScan:
    """Group the DICOM files among ``paths`` into series (``where`` names them in messages)."""
    items, others, damaged, directories, n = _classify(paths)
    series, notes = group_series(items)
    for note in notes:
        logger.info("%s: %s", where, note)
    return FolderScan(where, n, series, notes, others, damaged, directories)


def scan_folder(folder: str | Path, *, recursive: bool = True) -> FolderScan:
    """Everything under ``folder``: its DICOM series and what else is there.

    Raises:
        InputError: ``folder`` does not exist, is not a folder, or is empty.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give the folder that holds the DICOM series)")
    walk = _walk(folder, recursive)
    scan = scan_files(walk.files, folder)
    scan.loops = walk.loops
    if scan.n_files == 0:
        loops = " (only links leading back into it)" if walk.loops else ""
        raise InputError(f"{folder}: the folder is empty{loops}; give the folder that holds the DICOM files")
    return scan


def list_dicom_series(folder: str | Path, *, recursive: bool = True) -> list[DicomSeriesInfo]:
    """Every DICOM series under ``folder`` (sub-folders included unless ``recursive=False``).

    Non-DICOM files are skipped. Non-image series (structured reports, segmentations without
    frames, …) are listed with ``num_slices == 0``; ``series.problem()`` says why a series cannot
    be read as a CT volume (None for those that can be tried). Files without a
    SeriesInstanceUID, and UIDs shared by several image stacks, are grouped as the module
    docstring describes.

    Raises:
        InputError: ``folder`` does not exist, is not a folder, or is empty.
    """
    return scan_folder(folder, recursive=recursive).series


def list_volume_series(folder: str | Path, *, recursive: bool = True, allow_non_ct: bool = False
                       ) -> list[DicomSeriesInfo]:
    """The series under ``folder`` that can be tried as (CT, unless ``allow_non_ct``) volumes:
    :func:`list_dicom_series` without derived objects, 2-D images and single slices."""
    return [s for s in list_dicom_series(folder, recursive=recursive) if s.problem(allow_non_ct) is None]


def dicomdir_files(path: Path) -> list[Path]:
    """The files a DICOMDIR lists (pydicom's File-set reader).

    Raises:
        InputError: the DICOMDIR cannot be read, lists nothing, or its files are missing.
    """
    import re
    import warnings

    from pydicom.fileset import FileSet

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fs = FileSet(path)
        listed = [Path(inst.path) for inst in fs]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged DICOMDIRs
        raise InputError(f"{path}: a DICOMDIR that cannot be read ({exc}); give its folder instead") from exc
    # pydicom leaves out (with a warning) the records whose files are missing
    missing = [Path(m.group(1).strip()) for w in caught
               if (m := re.search(r"does not exist: (.+)$", str(w.message)))]
    missing += [p for p in listed if not p.is_file()]
    if not listed and not missing:
        raise InputError(f"{path}: the DICOMDIR lists no files")
    present = [p for p in listed if p.is_file()]
    if not present:
        raise InputError(
            f"{path}: the DICOMDIR lists {len(missing)} files but none of them is there (first: "
            f"{missing[0]}); copy the whole folder it came with"
        )
    if missing:
        logger.warning("%s: %d of the %d files it lists are missing (first: %s)", path, len(missing),
                       len(missing) + len(present), missing[0])
    return present


# ---------------------------------------------------------------------------------- selection
def _choose(scan: FolderScan, series_uid: str | None, allow_non_ct: bool) -> tuple[DicomSeriesInfo, list[str]]:
    folder = scan.where
    series = scan.series
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            chosen = [s for s in series if s.series_instance_uid == series_uid]
        if not chosen:
            listing = "; ".join(s.describe() for s in series) or "none"
            raise InputError(f"{folder}: no series with UID {series_uid}. Series found: {listing}")
        if len(chosen) > 1:
            chosen = [s for s in chosen if s.problem(True) is None] or chosen
        if len(chosen) > 1:
            raise InputError(
                f"{folder}: UID {series_uid} names {len(chosen)} series here; choose one of: "
                + "; ".join(s.describe() for s in chosen)
            )
        pick = chosen[0]
        problem = pick.problem(allow_non_ct)
        if problem and "not CT" in problem:
            raise InputError(
                f"{folder}: {pick.describe()} is {pick.modality or 'of unknown modality'}, not CT. "
                "CDPDNet segments CT only; pass allow_non_ct=True to read it anyway."
            )
        if problem:
            raise InputError(f"{folder}: {pick.kind} {pick.describe()} cannot be read as a volume: {problem}")
        return pick, list(scan.notes)
    usable = [s for s in series if s.problem(allow_non_ct) is None]
    if not usable:
        raise InputError(scan.no_volume_message(allow_non_ct))
    ct = [s for s in usable if s.modality in CT_MODALITIES]
    pool = ct or usable
    chosen_one = max(pool, key=lambda s: s.num_slices)
    warnings = list(scan.notes)
    images = [s for s in series if s.num_slices > 0 and s.modality not in DERIVED_MODALITIES
              and s.modality not in PROJECTION_MODALITIES]
    others = [s for s in images if s is not chosen_one]
    if others:
        warnings.append(
            f"{folder} holds {len(images)} image series; read {chosen_one.describe()}, the "
            f"{'CT ' if ct else ''}series with the most slices. Others: "
            + "; ".join(s.describe() for s in others)
            + ". Pass series_uid=... (--series-uid) to read another."
        )
    if scan.damaged:
        warnings.append(
            f"{folder}: {len(scan.damaged)} file(s) marked as DICOM {DAMAGED_NOTE} (damaged or "
            f"truncated): {', '.join(p.name for p in scan.damaged[:5])}"
        )
    return chosen_one, warnings


def select_series(
    folder: Path,
    *,
    series_uid: str | None,
    allow_non_ct: bool,
    recursive: bool = True,
) -> tuple[DicomSeriesInfo, list[str]]:
    """The series to read from ``folder`` and the warnings about the choice and the grouping.

    Without ``series_uid``: the CT series with the most slices (other image series only with
    ``allow_non_ct``); when there was a choice, a warning names the one taken and the others.
    ``series_uid`` may be a key of :class:`DicomSeriesInfo` (``uid``) or a SeriesInstanceUID.

    Raises:
        InputError: nothing here forms a CT volume (the message says what was found and why).
    """
    return _choose(scan_folder(folder, recursive=recursive), series_uid, allow_non_ct)


def select_series_of_file(
    path: Path, *, series_uid: str | None, allow_non_ct: bool
) -> tuple[DicomSeriesInfo, list[str]]:
    """The series one DICOM file belongs to (read with its neighbours in the same folder).

    A DICOMDIR is read as the file set it lists. A file that is not a CT image (a SEG, SR, RT
    object, radiograph, slide ...) is refused naming what it is.
    """
    ds = _read_header(path)
    if ds is None:
        raise InputError(f"{path}: not a DICOM file, or its header is damaged")
    if _is_directory_record(ds):
        return _choose(scan_files(dicomdir_files(path), path), series_uid, allow_non_ct)
    kind = object_kind(tag_str(ds, "Modality"), tag_str(ds, "SOPClassUID"))
    reason = not_a_volume_reason(tag_str(ds, "Modality"), is_image_header(ds))
    if reason:
        raise InputError(f"{path}: this file is {kind}, not a CT image: {reason}")
    scan = scan_files([p for p in _walk(path.parent, False).files], path.parent)
    if series_uid is None:
        own = next((s for s in scan.series if any(os.path.samefile(f, path) for f in s.files)), None)
        if own is None:  # pragma: no cover - the file was read above
            raise InputError(f"{path}: not a DICOM file, or its header is damaged")
        series_uid = own.uid
    return _choose(scan, series_uid, allow_non_ct)


def series_of_file(path: Path) -> str:
    """The series key (:attr:`DicomSeriesInfo.uid`) of the series one DICOM file belongs to."""
    series, _ = select_series_of_file(path, series_uid=None, allow_non_ct=True)
    return series.uid


def iter_image_headers(series: DicomSeriesInfo) -> Iterator[tuple[Path, Any]]:
    """The (file, header) pairs of a series that carry pixels."""
    for p, ds in zip(series.files, series._headers, strict=True):
        if is_image_header(ds):
            yield p, ds
