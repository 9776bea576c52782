"""CT and label-map input/output with exact geometry (no napari, no Qt).

Everything a user opens goes through :func:`read_ct` (CT volumes: NIfTI, NRRD, MHA/MHD files or a
DICOM series) or :func:`read_label_map`; everything written back as a label map goes through
:func:`write_label_map`, which keeps the source geometry exactly and never replaces a file unless
asked. Arrays are ``[z, y, x]``; the geometry is a :class:`~napari_cdpdnet.geometry.Geometry`
(ITK order, LPS mm). Anything wrong with an input raises
:class:`~napari_cdpdnet.errors.InputError` naming the file and the problem.

SimpleITK and pydicom are imported inside the functions that need them, so importing this module
is cheap.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.fileutil import full_suffix
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io.dicom_kinds import sniff_file_kind
from napari_cdpdnet.io.dicom_scan import DAMAGED_NOTE, select_series_of_file
from napari_cdpdnet.io.dicom_series import (
    MAX_SPACING_MM,
    MIN_SPACING_MM,
    DicomSeriesInfo,
    _sitk_reason,
    folder_has_dicom,
    is_dicom_file,
    list_dicom_series,
    read_dicom_volume,
    select_series,
)
from napari_cdpdnet.io.volume_checks import (
    detached_data_problem,
    finite_only,
    nifti_float_voxels,
    nifti_scan,
)

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = [
    "CTImage",
    "DicomSeriesInfo",
    "SUPPORTED_IMAGE_SUFFIXES",
    "LABEL_MAP_SUFFIXES",
    "is_supported_path",
    "check_input_path",
    "list_dicom_series",
    "read_ct",
    "read_label_map",
    "read_image_or_labels",
    "looks_like_label_map",
]

logger = logging.getLogger(__name__)

#: File suffixes read through SimpleITK, with the ImageIO that reads them and a format name.
_VOLUME_FORMATS: dict[str, tuple[str, str]] = {
    ".nii.gz": ("NiftiImageIO", "NIfTI"),
    ".nii": ("NiftiImageIO", "NIfTI"),
    ".seg.nrrd": ("NrrdImageIO", "NRRD"),
    ".nrrd": ("NrrdImageIO", "NRRD"),
    ".nhdr": ("NrrdImageIO", "NRRD"),
    ".mha": ("MetaImageIO", "MetaImage"),
    ".mhd": ("MetaImageIO", "MetaImage"),
}
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

#: What :func:`read_ct` accepts as a file (a folder is read as DICOM).
SUPPORTED_IMAGE_SUFFIXES: tuple[str, ...] = tuple(_VOLUME_FORMATS) + _DICOM_SUFFIXES

#: What :func:`write_label_map` can write (the format follows the suffix).
LABEL_MAP_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd")

#: MetaImage ``Modality`` values and what they mean.
_META_MODALITIES = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}

#: Above this many distinct values an integer volume is an image, not a label map.
_MAX_LABELS = 256

#: Values below this (HU) exist in every real CT (air is about -1000 HU).
_AIR_HU = -200.0

_INT16 = np.iinfo(np.int16)


@dataclass
class CTImage:
    """A CT volume and where it sits in the patient.

    Attributes:
        array: ``[z, y, x]`` voxels in Hounsfield units; int16 when the values are whole numbers
            that fit, else float32.
        geometry: the voxel grid (``geometry.dicom`` holds the series identifiers for DICOM).
        path: the file or DICOM folder it was read from.
        warnings: human-readable notes about anything surprising in the input (also logged).
        info: what the header says: ``format``, ``modality``, ``series_description``,
            ``patient_id``, … (keys present only when known).
    """

    array: np.ndarray
    geometry: Geometry
    path: Path
    warnings: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short display name: the series description or the file name without its suffix."""
        desc = str(self.info.get("series_description") or "").strip()
        if self.info.get("format") == "DICOM":
            return desc or self.path.name
        return _strip_suffix(self.path)


# ---------------------------------------------------------------------------------- paths
def _strip_suffix(path: Path) -> str:
    suffix = full_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def is_supported_path(path: str | os.PathLike[str]) -> bool:
    """Cheap check: could :func:`read_ct` read this (by suffix, DICOM preamble, or a DICOM folder)?

    Reads at most a few file headers (132 bytes each); never raises.
    """
    try:
        p = Path(path)
        if p.is_dir():
            return folder_has_dicom(p)
        if not p.is_file():
            return False
        return full_suffix(p) in SUPPORTED_IMAGE_SUFFIXES or is_dicom_file(p)
    except (OSError, ValueError, TypeError):
        return False


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    return p


# ---------------------------------------------------------------------------------- SimpleITK files
@dataclass
class _Volume:
    array: np.ndarray
    geometry: Geometry
    info: dict[str, Any]
    warnings: list[str]


def _check_spacing(spacing: tuple[float, ...], path: Path) -> None:
    for v in spacing:
        if not math.isfinite(v) or v < MIN_SPACING_MM or v > MAX_SPACING_MM:
            raise InputError(
                f"{path}: implausible voxel spacing {tuple(round(float(x), 6) for x in spacing)} mm "
                f"(each must be between {MIN_SPACING_MM} and {MAX_SPACING_MM} mm); the header is "
                "broken or the image is not a CT volume in mm"
            )


def check_input_path(path: str | os.PathLike[str]) -> Path:
    """The cheap checks of :func:`read_ct`, without reading: exists, and a type it can read.

    Lets a command refuse a wrong input before it plans or loads anything. Folders pass (their
    DICOM content is checked when they are read).

    Raises:
        InputError: missing path, a file type that is not a CT volume, a ``.dcm`` without DICOM
            marker.
    """
    p = _existing(path)
    if p.is_dir():
        return p
    suffix = full_suffix(p)
    if suffix in _VOLUME_FORMATS or is_dicom_file(p):
        return p
    if suffix in _DICOM_SUFFIXES:
        kind = sniff_file_kind(p)
        what = f": it is {kind}, not a CT volume" if kind and kind != "a text file" else ", or the file is damaged"
        raise InputError(f"{p}: not a DICOM file (no DICM marker){what}")
    raise _unsupported(p)


def _unsupported(path: Path) -> InputError:
    suffix = full_suffix(path)
    kind = sniff_file_kind(path) if path.is_file() else None
    what = f" ({kind}, not a CT volume)" if kind and kind not in ("a text file",) else ""
    return InputError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}{what}; "
        f"supported: {', '.join(SUPPORTED_IMAGE_SUFFIXES)} or a DICOM folder"
    )


def _read_file(path: Path) -> _Volume:
    """Read a NIfTI/NRRD/MetaImage file as a 3-D volume, validating the header first."""
    import SimpleITK as sitk

    suffix = full_suffix(path)
    if suffix not in _VOLUME_FORMATS:
        raise _unsupported(path)
    io_name, fmt = _VOLUME_FORMATS[suffix]
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a {fmt} file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    detached = detached_data_problem(path)
    if detached:
        raise InputError(detached)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            f"{path}: not a readable {fmt} image: the file is damaged, truncated or of another "
            f"type ({_sitk_reason(exc)})"
        ) from exc
    size = tuple(reader.GetSize())
    dim = reader.GetDimension()
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise InputError(
            f"{path}: multi-component image ({components} values per voxel, e.g. RGB or a vector "
            "field); a CT or label map has one value per voxel"
        )
    if dim > 3 and any(s != 1 for s in size[3:]):
        extra = " × ".join(str(s) for s in size[3:])
        hint = (
            " (a Slicer segmentation with overlapping segments stores one layer per volume; "
            "export it from Slicer as a label map)"
            if suffix == ".seg.nrrd"
            else " (e.g. a time series or several phases in one file); save one volume as 3-D"
        )
        raise InputError(f"{path}: {dim}-D image with {extra} volumes{hint}")
    if dim < 3 or any(s == 1 for s in size[:3]):
        raise InputError(
            f"{path}: 2-D image (size {' × '.join(str(s) for s in size)}); a CT volume needs "
            "several slices in every direction"
        )
    _check_spacing(tuple(reader.GetSpacing())[:3], path)
    complete, non_finite = nifti_scan(path, reader) if fmt == "NIfTI" else (True, 0)
    if not complete:
        raise InputError(
            f"{path}: the file is truncated or corrupted: it holds less voxel data than its "
            f"header describes ({' × '.join(str(s) for s in size)} voxels); download or copy it again"
        )
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"{path}: the pixel data cannot be read, the file is probably truncated or corrupted "
            f"({_sitk_reason(exc)})"
        ) from exc
    if image.GetDimension() > 3:
        image = image[:, :, :, 0] if image.GetDimension() == 4 else sitk.Extract(
            image, [*size[:3]] + [0] * (dim - 3), [0] * dim
        )
    try:
        geometry = Geometry.from_sitk(image)
    except ValueError as exc:  # pragma: no cover - guarded by the checks above
        raise InputError(f"{path}: {exc}") from exc
    info: dict[str, Any] = {"format": fmt, "source_dtype": image.GetPixelIDTypeAsString()}
    keys = set(reader.GetMetaDataKeys())
    for key in ("Modality", "modality", "0008|0060"):
        if key in keys:
            raw = reader.GetMetaData(key).strip()
            modality = _META_MODALITIES.get(raw, raw.upper())
            if modality and not modality.startswith("MET_MOD"):
                info["modality"] = modality
            break
    if "descrip" in keys and reader.GetMetaData("descrip").strip():
        info["description"] = reader.GetMetaData("descrip").strip()
    array = sitk.GetArrayFromImage(image)
    if non_finite:  # ITK read them as 0; take the voxels as they are stored
        array = nifti_float_voxels(path)
    return _Volume(array, geometry, info, [])


# ---------------------------------------------------------------------------------- conversions
def _all_whole(a: np.ndarray, chunk: int = 16) -> bool:
    """True if a float array holds only finite whole numbers (checked in slabs to save memory)."""
    for k in range(0, a.shape[0], chunk):
        block = a[k : k + chunk]
        if not np.isfinite(block).all() or not np.array_equal(block, np.round(block)):
            return False
    return True


def _as_hu(a: np.ndarray) -> np.ndarray:
    """int16 when the voxels are whole numbers within int16, else float32 (never a needless copy)."""
    if a.size == 0:
        return a.astype(np.int16)
    if a.dtype == np.int16:
        return a
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    fits = lo >= _INT16.min and hi <= _INT16.max
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        return a.astype(np.int16) if fits else a.astype(np.float32)
    if fits and _all_whole(a):
        return a.astype(np.int16)
    return a.astype(np.float32, copy=False)


def _label_dtype(max_value: int) -> np.dtype:
    if max_value <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_value <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _as_labels(a: np.ndarray, where: str) -> np.ndarray:
    """Validate an integer label map and store it in the smallest fitting type (uint8/uint16/int32)."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.size == 0:
        return a.astype(np.uint8)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{where}: a label map must hold integers, not {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise InputError(f"{where}: not a label map: it contains NaN values")
        if not _all_whole(a if a.ndim == 3 else a.reshape(1, -1)):
            frac = a[a != np.round(a)].ravel()[:1]
            raise InputError(
                f"{where}: not a label map: fractional values such as {float(frac[0]):g} (a "
                "probability map or an image?); label maps hold whole numbers 0, 1, 2, …"
            )
    lo, hi = a.min(), a.max()
    if lo < 0:
        raise InputError(
            f"{where}: not a label map: negative values (minimum {lo:g}); label values are 0 "
            "(background) and positive integers. Is this a CT image?"
        )
    if hi > np.iinfo(np.int32).max:
        raise InputError(f"{where}: label values up to {hi:g} are too large (limit 2147483647)")
    return a.astype(_label_dtype(int(hi)), copy=False)


def looks_like_label_map(array: np.ndarray) -> bool:
    """Heuristic for readers: integer (or bool), non-negative, at most 256 distinct values.

    CT volumes have negative HU (air) or thousands of distinct values, so they never qualify.
    """
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return True
    if not np.issubdtype(a.dtype, np.integer) or a.size == 0:
        return False
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        return False
    if hi < _MAX_LABELS:
        return True
    if hi > 1 << 24:
        return np.unique(a).size <= _MAX_LABELS
    return int(np.count_nonzero(np.bincount(a.ravel()))) <= _MAX_LABELS


def _hu_warnings(array: np.ndarray, path: Path) -> list[str]:
    if array.size == 0:
        return []
    lo, hi = float(array.min()), float(array.max())
    if lo > _AIR_HU:
        return [
            f"{path}: values range from {lo:g} to {hi:g}, with no air (about -1000 HU) anywhere; "
            "this may not be a CT in Hounsfield units (raw stored values, a cropped or "
            "normalised image, or another modality). Segmentation expects HU."
        ]
    return []


# ---------------------------------------------------------------------------------- reading
def _read_dicom(path: Path, *, series_uid: str | None, allow_non_ct: bool) -> _Volume:
    if path.is_dir():
        series, notes = select_series(path, series_uid=series_uid, allow_non_ct=allow_non_ct)
    else:
        series, notes = select_series_of_file(path, series_uid=series_uid, allow_non_ct=allow_non_ct)
    try:
        vol = read_dicom_volume(series)
    except InputError as exc:
        # a file that could not be read may be the slice this series misses: say so with the refusal
        skipped = [n for n in notes if DAMAGED_NOTE in n]
        if skipped:
            raise InputError(f"{exc}. Note: {skipped[0]}") from exc
        raise
    return _Volume(vol.array, vol.geometry, vol.info, notes + vol.warnings)


def _as_ct_image(path: Path, vol: _Volume, allow_non_ct: bool) -> CTImage:
    """Check the modality, store HU compactly, add the HU sanity warning, log the warnings."""
    warnings = list(vol.warnings)
    modality = str(vol.info.get("modality") or "")
    if modality and modality != "CT":
        if not allow_non_ct:
            raise InputError(
                f"{path}: the header says modality {modality}, not CT; CDPDNet segments CT only. "
                "Pass allow_non_ct=True to read it anyway."
            )
        warnings.append(
            f"{path}: modality {modality}, not CT; CDPDNet was trained on CT and its masks will "
            "not be meaningful on this image"
        )
    finite, notes = finite_only(vol.array, path)
    warnings.extend(notes)
    array = _as_hu(finite)
    warnings.extend(_hu_warnings(array, path))
    for w in warnings:
        logger.warning("%s", w)
    logger.info("read %s: %s %s, spacing %s mm", path, array.shape, array.dtype, vol.geometry.spacing)
    return CTImage(array, vol.geometry, path, tuple(warnings), vol.info)


def read_ct(
    path: str | os.PathLike[str], *, series_uid: str | None = None, allow_non_ct: bool = False
) -> CTImage:
    """Read a CT volume from a NIfTI/NRRD/MHA/MHD file, a DICOM folder or one file of a series.

    Args:
        path: an image file, a folder holding a DICOM series (sub-folders are searched), or one
            DICOM file (its whole series is read from the same folder).
        series_uid: which DICOM series to read when the folder holds several; by default the CT
            series with the most slices (a warning says which was taken).
        allow_non_ct: read images whose header names another modality (MR, PT, …) instead of
            refusing them; a warning is added.

    Returns:
        The volume (int16 HU when the values fit), its geometry and what the header says.

    Raises:
        InputError: missing path, not an image, unreadable/truncated file, 2-D or 4-D or
            multi-component image, empty folder, non-CT modality, implausible spacing.

    Examples:
        >>> ct = read_ct("scan.nii.gz")  # doctest: +SKIP
        >>> ct.array.shape, ct.geometry.spacing  # doctest: +SKIP
        ((112, 101, 122), (3.0, 3.0, 3.0))
    """
    p = check_input_path(path)
    if p.is_dir() or full_suffix(p) not in _VOLUME_FORMATS:
        vol = _read_dicom(p, series_uid=series_uid, allow_non_ct=allow_non_ct)
    elif series_uid is not None:
        raise InputError(f"{p}: series_uid only applies to DICOM folders and files")
    else:
        vol = _read_file(p)
    return _as_ct_image(p, vol, allow_non_ct)


def read_label_map(path: str | os.PathLike[str]) -> tuple[np.ndarray, Geometry]:
    """Read an integer label map (NIfTI, NRRD incl. ``.seg.nrrd``, MHA/MHD) and its geometry.

    Returns:
        ``[z, y, x]`` labels as uint8 (or uint16/int32 when larger values occur) and the geometry.

    Raises:
        InputError: as :func:`read_ct` for files, plus: negative or fractional values (an image,
            not a label map), a folder or DICOM file (use ``napari_cdpdnet.export.dicomseg`` for SEG).
    """
    p = _existing(path)
    if p.is_dir():
        raise InputError(f"{p}: is a folder; a label map is one NIfTI, NRRD or MHA file")
    if full_suffix(p) in _DICOM_SUFFIXES or is_dicom_file(p):
        raise InputError(
            f"{p}: a DICOM file; DICOM-SEG label maps are read with "
            "napari_cdpdnet.export.dicomseg.read_dicom_seg onto the source series' geometry"
        )
    vol = _read_file(p)
    return _as_labels(vol.array, str(p)), vol.geometry


def read_image_or_labels(
    path: str | os.PathLike[str], *, series_uid: str | None = None, allow_non_ct: bool = True
) -> tuple[Literal["image", "labels"], CTImage]:
    """Read ``path`` and tell whether it is an image or a label map (for viewers).

    DICOM series are always images. A file whose voxels are non-negative integers with at most
    256 distinct values (see :func:`looks_like_label_map`) is a label map: its array is returned
    as uint8/uint16/int32 and no HU checks apply. Other files are read as by :func:`read_ct`.
    """
    p = _existing(path)
    if p.is_dir() or full_suffix(p) not in _VOLUME_FORMATS or series_uid is not None:
        return "image", read_ct(p, series_uid=series_uid, allow_non_ct=allow_non_ct)
    vol = _read_file(p)
    if full_suffix(p) == ".seg.nrrd" or looks_like_label_map(vol.array):
        labels = _as_labels(vol.array, str(p))
        return "labels", CTImage(labels, vol.geometry, p, tuple(vol.warnings), vol.info)
    return "image", _as_ct_image(p, vol, allow_non_ct)
