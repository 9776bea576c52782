"""DICOM folders: find the files, group them into series, pick the one to read.

Headers only (pydicom, ``stop_before_pixels``): nothing here decodes pixels. Split from
:mod:`napari_cdpdnet.io.dicom_series`, which turns the chosen series into a volume. pydicom is
imported when used.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_cdpdnet.errors import InputError

__all__ = [
    "DicomSeriesInfo",
    "list_dicom_series",
    "select_series",
    "series_of_file",
    "is_dicom_file",
    "folder_has_dicom",
    "CT_MODALITIES",
]

logger = logging.getLogger(__name__)

#: Header elements read while scanning (pixel data is never read here).
_SCAN_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "SeriesDescription", "SeriesNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "NumberOfFrames", "PatientID", "GantryDetectorTilt", "StudyDescription", "StudyDate",
    "Manufacturer", "ManufacturerModelName", "KVP", "ConvolutionKernel", "SliceThickness",
    "BodyPartExamined", "ContrastBolusAgent", "ImageType", "AcquisitionNumber",
]

#: Modalities that are CT (CT proper; "CT" is also used by most PET/CT and SPECT/CT CT parts).
CT_MODALITIES = frozenset({"CT"})

#: Derived objects that may carry frames but are never a volume to segment.
_DERIVED_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO", "REG"})

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series found in a folder (what a user needs to choose it).

    ``num_slices`` counts image files (frames for multi-frame files); ``files`` are in the order
    they were found, not slice order.
    """

    uid: str
    modality: str
    num_slices: int
    description: str
    files: tuple[Path, ...]
    study_uid: str = ""
    series_number: int | None = None
    _headers: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def describe(self) -> str:
        """One line for messages: ``CT series 3 "Abdomen 1.0" (512 slices, UID 1.2.3)``."""
        number = f" {self.series_number}" if self.series_number is not None else ""
        desc = f' "{self.description}"' if self.description else ""
        unit = "slice" if self.num_slices == 1 else "slices"
        return f"{self.modality or '?'} series{number}{desc} ({self.num_slices} {unit}, UID {self.uid})"


# ---------------------------------------------------------------------------------- detection
def is_dicom_file(path: str | Path) -> bool:
    """True if ``path`` is a file starting with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _candidate_files(folder: Path, recursive: bool) -> Iterable[Path]:
    walker = folder.rglob("*") if recursive else folder.iterdir()
    for p in sorted(walker):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.is_file() and p.name.upper() != "DICOMDIR":
            yield p


def folder_has_dicom(folder: str | Path, *, max_files: int = 64, max_folders: int = 256) -> bool:
    """Cheap check: is one of the first ``max_files`` files under ``folder`` DICOM?

    Walks lazily (top folder first, no sorting) and gives up after ``max_files`` files or
    ``max_folders`` folders, so dropping a huge folder on napari does not stall it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files_seen = 0
    for n_dirs, (root, dirs, files) in enumerate(os.walk(folder)):
        if n_dirs >= max_folders:
            return False
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            if is_dicom_file(os.path.join(root, name)):
                return True
            files_seen += 1
            if files_seen >= max_files:
                return False
    return False


# ---------------------------------------------------------------------------------- scanning
def _read_header(path: Path) -> Any | None:
    """The DICOM header of ``path`` (no pixels), or None if it is not a DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
        return None
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if meta_class == _MEDIA_STORAGE_DIRECTORY:
        return None
    return ds


def tag_str(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def tag_int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def is_image_header(ds: Any) -> bool:
    return "Rows" in ds and "Columns" in ds


def frame_count(ds: Any) -> int:
    return max(1, tag_int(ds, "NumberOfFrames") or 1)


def _scan(folder: Path, recursive: bool) -> tuple[list[DicomSeriesInfo], int]:
    """All series under ``folder`` (with their headers) and the number of files looked at."""
    by_series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    n_files = 0
    for p in _candidate_files(folder, recursive):
        n_files += 1
        ds = _read_header(p)
        if ds is None:
            continue
        uid = tag_str(ds, "SeriesInstanceUID")
        if not uid:
            logger.info("%s: DICOM file without SeriesInstanceUID, ignored", p)
            continue
        by_series[uid].append((p, ds))
    series = []
    for uid, items in by_series.items():
        first = items[0][1]
        series.append(
            DicomSeriesInfo(
                uid=uid,
                modality=tag_str(first, "Modality").upper(),
                num_slices=sum(frame_count(ds) for _, ds in items if is_image_header(ds)),
                description=tag_str(first, "SeriesDescription"),
                files=tuple(p for p, _ in items),
                study_uid=tag_str(first, "StudyInstanceUID"),
                series_number=tag_int(first, "SeriesNumber"),
                _headers=tuple(ds for _, ds in items),
            )
        )
    series.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else 1 << 30, s.uid))
    return series, n_files


def list_dicom_series(folder: str | Path, *, recursive: bool = True) -> list[DicomSeriesInfo]:
    """Every DICOM series under ``folder`` (sub-folders included unless ``recursive=False``).

    Non-DICOM files are skipped. Non-image series (structured reports, segmentations without
    frames, …) are listed with ``num_slices == 0``.

    Raises:
        InputError: ``folder`` does not exist, is not a folder, or is empty.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give the folder that holds the DICOM series)")
    series, n_files = _scan(folder, recursive)
    if n_files == 0:
        raise InputError(f"{folder}: the folder is empty; give the folder that holds the DICOM files")
    return series


# ---------------------------------------------------------------------------------- selection
def select_series(
    folder: Path,
    *,
    series_uid: str | None,
    allow_non_ct: bool,
    recursive: bool = True,
) -> tuple[DicomSeriesInfo, list[str]]:
    """The series to read from ``folder`` and any warning about the choice.

    Without ``series_uid``: the CT series with the most slices (other image series only with
    ``allow_non_ct``); when there was a choice, a warning names the one taken and the others.
    """
    series = list_dicom_series(folder, recursive=recursive)
    images = [s for s in series if s.num_slices > 0 and s.modality not in _DERIVED_MODALITIES]
    if not series:
        raise InputError(
            f"{folder}: no DICOM files found in this folder. For NIfTI, NRRD or MHA give the file "
            "itself; for DICOM give the folder holding the series' .dcm files."
        )
    if series_uid is not None:
        chosen = next((s for s in series if s.uid == series_uid), None)
        if chosen is None:
            listing = "; ".join(s.describe() for s in series)
            raise InputError(f"{folder}: no series with UID {series_uid}. Series found: {listing}")
        if chosen.num_slices == 0 or chosen.modality in _DERIVED_MODALITIES:
            raise InputError(f"{folder}: {chosen.describe()} holds no images to read as a volume")
        _check_modality(chosen, allow_non_ct, folder)
        return chosen, []
    if not images:
        listing = "; ".join(s.describe() for s in series)
        raise InputError(
            f"{folder}: the DICOM files hold no image series, only derived objects (found: "
            f"{listing}); give the folder of the CT series itself"
        )
    ct = [s for s in images if s.modality in CT_MODALITIES]
    pool = ct if ct else images
    if not ct and not allow_non_ct:
        listing = "; ".join(s.describe() for s in images)
        raise InputError(
            f"{folder}: no CT series here (found: {listing}). CDPDNet segments CT; to read "
            "this anyway pass allow_non_ct=True."
        )
    chosen = max(pool, key=lambda s: s.num_slices)
    warnings: list[str] = []
    others = [s for s in images if s is not chosen]
    if others:
        warnings.append(
            f"{folder} holds {len(images)} image series; read {chosen.describe()}, the "
            f"{'CT ' if ct else ''}series with the most slices. Others: "
            + "; ".join(s.describe() for s in others)
            + ". Pass series_uid=... to read another."
        )
    return chosen, warnings


def _check_modality(series: DicomSeriesInfo, allow_non_ct: bool, folder: Path) -> None:
    if series.modality in CT_MODALITIES or allow_non_ct:
        return
    raise InputError(
        f"{folder}: {series.describe()} is {series.modality or 'of unknown modality'}, not CT. "
        "CDPDNet segments CT only; pass allow_non_ct=True to read it anyway."
    )


def series_of_file(path: Path) -> str:
    """The SeriesInstanceUID of one DICOM file (to read the series it belongs to)."""
    ds = _read_header(path)
    if ds is None:
        raise InputError(f"{path}: not a DICOM file, or its header is damaged")
    uid = tag_str(ds, "SeriesInstanceUID")
    if not uid:
        raise InputError(f"{path}: DICOM file without a SeriesInstanceUID; cannot find its series")
    if not is_image_header(ds):
        raise InputError(
            f"{path}: a DICOM {tag_str(ds, 'Modality') or 'object'} without image pixels "
            "(e.g. a report or a segmentation), not a CT slice"
        )
    return uid
