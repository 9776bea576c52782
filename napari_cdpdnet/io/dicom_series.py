"""CT volumes from a DICOM series: order its slices, get the geometry right, decode the pixels.

Headers are inspected with pydicom (no pixel data is read); each image becomes a
:class:`~napari_cdpdnet.io.dicom_frames.Frame` (a classic single-frame file, or one frame of an
enhanced multi-frame file), whose pixels :mod:`~napari_cdpdnet.io.dicom_frames` decodes with
SimpleITK/GDCM or pydicom. The geometry is computed here from ImagePositionPatient and
ImageOrientationPatient instead of being taken from ITK's series reader, because that reader
averages uneven slice gaps and ignores gantry tilt without telling anyone. Here both are detected,
reported as warnings, and corrected by interpolation so that every voxel sits where the scanner
says it is.

Finding and grouping the files is :mod:`napari_cdpdnet.io.dicom_scan`. Only numpy is imported at
module level; pydicom, SimpleITK and scipy are imported when used.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import DicomReference, Geometry
from napari_cdpdnet.io.dicom_frames import Frame, decode_frames, frames_of
from napari_cdpdnet.io.dicom_frames import sitk_reason as _sitk_reason
from napari_cdpdnet.io.dicom_scan import (
    CT_MODALITIES,
    DicomSeriesInfo,
    folder_has_dicom,
    is_dicom_file,
    iter_image_headers,
    list_dicom_series,
    select_series,
    series_of_file,
    tag_str,
)

__all__ = [
    "DicomSeriesInfo",
    "DicomVolume",
    "list_dicom_series",
    "read_dicom_volume",
    "select_series",
    "series_of_file",
    "is_dicom_file",
    "folder_has_dicom",
    "CT_MODALITIES",
    "MIN_SPACING_MM",
    "MAX_SPACING_MM",
    "_sitk_reason",
]

logger = logging.getLogger(__name__)

#: Spacing outside this range (mm) is a broken header, not a scan.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 50.0

#: Slice positions closer than this (mm) to a uniform grid count as uniform; beyond it we resample.
_UNIFORM_ABS_TOL_MM = 0.01
_UNIFORM_REL_TOL = 0.02
#: In-plane drift between slices (in pixels) beyond which the series is treated as gantry-tilted.
_TILT_TOL_PIXELS = 0.05
#: A resampled series may not grow beyond this many slices (protects memory on absurd gaps).
_MAX_RESAMPLED_SLICES = 4096


@dataclass
class DicomVolume:
    """A decoded series: ``array`` is ``[z, y, x]`` in stored units after rescale (HU for CT)."""

    array: np.ndarray
    geometry: Geometry
    info: dict[str, Any]
    warnings: list[str]


# ---------------------------------------------------------------------------------- geometry
@dataclass
class _Slice:
    frame: Frame
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    along: float  # position along the slice normal

    @property
    def path(self) -> Path:
        return self.frame.path

    @property
    def ds(self) -> Any:
        return self.frame.ds


@dataclass
class _Plan:
    """Where each file's pixels go: slice order, the grid, and the corrections to apply."""

    slices: list[_Slice]
    row_dir: np.ndarray  # LPS direction of increasing column index (array x)
    col_dir: np.ndarray  # LPS direction of increasing row index (array y)
    normal: np.ndarray
    spacing_xy: tuple[float, float]
    rows: int
    cols: int
    inplane_shift_px: np.ndarray | None  # (n, 2) shift (dy, dx) per slice to undo gantry tilt
    out_along: np.ndarray | None  # output positions along the normal when resampling
    spacing_z: float
    warnings: list[str]
    info: dict[str, Any]


def _orientation(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    iop, path = frame.orientation, frame.label
    if iop is None:
        raise InputError(
            f"{frame.path}: no ImageOrientationPatient; without it the slice geometry is unknown "
            "(secondary captures and screenshots cannot be segmented)"
        )
    v = np.asarray(iop, float)
    r, c = v[:3], v[3:]
    if not (np.isfinite(v).all() and np.linalg.norm(r) > 0.5 and np.linalg.norm(c) > 0.5):
        raise InputError(f"{path}: ImageOrientationPatient {list(v)} is not a valid orientation")
    r = r / np.linalg.norm(r)
    c = c - r * float(r @ c)  # remove rounding errors: an exactly orthonormal frame
    c = c / np.linalg.norm(c)
    return r, c


def _check_spacing(values: Sequence[float], where: str) -> None:
    for v in values:
        if not math.isfinite(v) or v < MIN_SPACING_MM or v > MAX_SPACING_MM:
            raise InputError(
                f"{where}: implausible voxel spacing {tuple(round(float(x), 6) for x in values)} mm "
                f"(every spacing must be between {MIN_SPACING_MM} and {MAX_SPACING_MM} mm); "
                "the header is broken or this is not a CT volume"
            )


def _series_frames(series: DicomSeriesInfo) -> list[Frame]:
    """Every image frame of the series, each SOP instance (and frame) once."""
    frames: list[Frame] = []
    seen: dict[tuple[str, int | None], Path] = {}
    for p, ds in iter_image_headers(series):
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(f"{p}: colour (multi-component) pixels; a CT image is greyscale")
        for f in frames_of(p, ds):
            key = (f.sop_instance_uid, f.number)
            if f.sop_instance_uid and key in seen and seen[key] != p:
                logger.info("%s duplicates %s (same SOPInstanceUID), ignored", p, seen[key])
                continue
            seen[key] = p
            frames.append(f)
    return frames


def _plan(series: DicomSeriesInfo) -> _Plan:
    """Decide slice order, grid and corrections from the headers alone."""
    warnings: list[str] = []
    info: dict[str, Any] = {}
    frames = _series_frames(series)
    multi = [f for f in frames if f.number is not None]
    if multi and any(f.position is None for f in multi):
        raise InputError(
            f"{multi[0].path}: a multi-frame {tag_str(multi[0].ds, 'Modality') or 'DICOM'} image "
            "without per-frame positions (PlanePositionSequence); its frames cannot be placed in "
            "the patient, so it is no volume to segment"
        )
    if multi:
        info["multi_frame"] = True

    # Localizers and other orientations can share a series with the axial stack.
    def key(f: Frame) -> tuple:
        return (
            tuple(round(x, 3) for x in f.orientation or ()),
            f.rows,
            f.columns,
            tuple(round(x, 4) for x in f.pixel_spacing or ()),
        )

    groups: dict[tuple, list[Frame]] = defaultdict(list)
    for f in frames:
        groups[key(f)].append(f)
    main = max(groups.values(), key=len)
    if len(groups) > 1:
        dropped = len(frames) - len(main)
        warnings.append(
            f"series {series.uid}: {dropped} image(s) with another orientation or size (e.g. "
            f"localizers) were left out; the volume uses the {len(main)} matching slices"
        )
    first = main[0]
    if len(main) < 2:
        raise InputError(
            f"{first.path}: 2-D image: series {series.uid} has a single slice; a CT volume needs "
            "several slices"
        )
    row_dir, col_dir = _orientation(first)
    normal = np.cross(row_dir, col_dir)
    if first.pixel_spacing is None:
        raise InputError(f"{first.path}: no PixelSpacing; the pixel size is unknown")
    # PixelSpacing is (between rows, between columns) = (y, x).
    spacing_xy = (first.pixel_spacing[1], first.pixel_spacing[0])
    _check_spacing(spacing_xy, f"{first.label} (PixelSpacing)")

    slices = []
    for f in main:
        if f.position is None:
            raise InputError(f"{f.label}: no ImagePositionPatient; the slice's position is unknown")
        pos = np.asarray(f.position, float)
        if not np.isfinite(pos).all():
            raise InputError(f"{f.label}: ImagePositionPatient {list(pos)} is not a valid position")
        slices.append(_Slice(f, pos, float(pos @ normal)))
    slices.sort(key=lambda s: (s.along, s.frame.instance_number or 0))
    along = np.array([s.along for s in slices])
    gaps = np.diff(along)
    if np.any(gaps < _UNIFORM_ABS_TOL_MM):
        k = int(np.argmin(gaps))
        blank = "" if series.series_instance_uid else (
            " Its files have no SeriesInstanceUID, so nothing in the headers tells such series apart."
        )
        raise InputError(
            f"series {series.uid}: {slices[k].frame.label} and {slices[k + 1].frame.label} lie at the "
            "same slice position; the series holds several acquisitions or phases, which cannot "
            f"form one volume.{blank} Split them into separate series (or export one phase) and retry."
        )

    # Gantry tilt: slice origins drift in-plane as the table moves.
    offsets = np.array([s.position - slices[0].position for s in slices])
    inplane = offsets - np.outer(along - along[0], normal)
    shift_mm = np.stack([inplane @ col_dir, inplane @ row_dir], axis=1)  # (dy, dx) in mm
    shift_px = shift_mm / np.array([spacing_xy[1], spacing_xy[0]])
    header_tilt = _float_or_none(first.ds.get("GantryDetectorTilt"))
    if header_tilt:
        info["gantry_tilt_deg"] = header_tilt
    inplane_shift: np.ndarray | None = None
    if np.abs(shift_px).max() > _TILT_TOL_PIXELS:
        extent = float(along[-1] - along[0])
        drift = float(np.linalg.norm(shift_mm[-1]))
        angle = math.degrees(math.atan2(drift, extent))
        info["gantry_tilt_deg"] = header_tilt if header_tilt else round(angle, 3)
        info["gantry_tilt_corrected"] = True
        inplane_shift = shift_px
        warnings.append(
            f"series {series.uid}: gantry tilt of about {angle:.1f}° (GantryDetectorTilt "
            f"{header_tilt if header_tilt is not None else 'not given'}): the slices are sheared, "
            f"drifting {drift:.1f} mm in-plane over {extent:.1f} mm. Each slice was shifted in-plane "
            "by linear interpolation onto an orthogonal grid so that voxel positions are correct; "
            "voxels brought in from outside the field of view hold the lowest value."
        )
    elif header_tilt:
        logger.info(
            "series %s: GantryDetectorTilt %.2f° but slice positions follow the slice normal "
            "(the tilt is already in ImageOrientationPatient); no correction needed",
            series.uid, header_tilt,
        )

    # Uneven slice gaps.
    n = len(slices)
    mean_gap = float(along[-1] - along[0]) / (n - 1)
    deviation = np.abs(along - (along[0] + mean_gap * np.arange(n))).max()
    out_along: np.ndarray | None = None
    spacing_z = mean_gap
    if deviation > max(_UNIFORM_ABS_TOL_MM, _UNIFORM_REL_TOL * mean_gap):
        step = float(np.median(gaps))
        m = int(round((along[-1] - along[0]) / step)) + 1
        if m > _MAX_RESAMPLED_SLICES:
            raise InputError(
                f"series {series.uid}: slice gaps range from {gaps.min():.4g} to {gaps.max():.4g} "
                f"mm; a uniform grid would need {m} slices. The series is too incomplete to form "
                "one volume; check the export."
            )
        out_along = np.linspace(along[0], along[-1], m)
        spacing_z = float(out_along[1] - out_along[0])
        measured = int(np.isclose(out_along[:, None], along[None, :], atol=0.01 * spacing_z).any(1).sum())
        info["dicom_resampled"] = True
        info["acquired_slice_indices"] = [round(float((a - along[0]) / spacing_z), 4) for a in along]
        warnings.append(
            f"uneven slice spacing in series {series.uid}: the gaps between its {n} slices range "
            f"from {gaps.min():.4g} to {gaps.max():.4g} mm. The volume was resampled by linear "
            f"interpolation along the slice normal onto a uniform {spacing_z:.4g} mm grid of {m} "
            f"slices, so that voxel positions are correct; {m - measured} of them are "
            "interpolated, not measured. Check that the series is complete."
        )
    _check_spacing((*spacing_xy, spacing_z), f"series {series.uid}")
    rows, cols = first.rows, first.columns
    return _Plan(slices, row_dir, col_dir, normal, spacing_xy, rows, cols, inplane_shift,
                 out_along, spacing_z, warnings, info)


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------- pixels
def _fits_int16(a: np.ndarray) -> bool:
    if a.size == 0:
        return True
    if np.issubdtype(a.dtype, np.integer):
        return int(a.min()) >= -32768 and int(a.max()) <= 32767
    return bool(np.isfinite(a).all() and a.min() >= -32768 and a.max() <= 32767 and (a == np.round(a)).all())


def _read_pixels(plan: _Plan) -> np.ndarray:
    """Decode every slice in plan order into one ``[z, y, x]`` array (int16 when it fits)."""
    n = len(plan.slices)
    out = np.empty((n, plan.rows, plan.cols), np.int16)
    for k, (s, pixels) in enumerate(zip(plan.slices, decode_frames([s.frame for s in plan.slices]), strict=True)):
        if out.dtype == np.int16 and not _fits_int16(pixels):
            logger.info("%s: values do not fit int16; the volume is kept as float32", s.frame.label)
            out = out.astype(np.float32)
        out[k] = pixels
    return out


def _undo_tilt(volume: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """Shift every slice in-plane so that all slices share slice 0's in-plane grid."""
    from scipy import ndimage

    fill = float(volume.min())
    out = np.empty(volume.shape, np.float32)
    for k in range(volume.shape[0]):
        # Pixel (j, i) of slice k lies at shift_px[k] + (j, i) in slice-0 pixel units.
        ndimage.shift(volume[k].astype(np.float32), shift_px[k], output=out[k], order=1,
                      mode="constant", cval=fill)
    return out


def _resample_along_normal(volume: np.ndarray, along: np.ndarray, out_along: np.ndarray) -> np.ndarray:
    """Linear interpolation between the two nearest acquired slices for each output position."""
    upper = np.clip(np.searchsorted(along, out_along, side="right"), 1, len(along) - 1)
    lower = upper - 1
    w = (out_along - along[lower]) / (along[upper] - along[lower])
    w = np.clip(w, 0.0, 1.0).astype(np.float32)
    out = np.empty((len(out_along), *volume.shape[1:]), np.float32)
    for m, (lo, hi, wm) in enumerate(zip(lower, upper, w, strict=True)):
        out[m] = volume[lo] * (1.0 - wm) + volume[hi] * wm
    return out


def _to_output_dtype(volume: np.ndarray, source_int: bool) -> np.ndarray:
    """Interpolated integer data go back to int16 (rounded) so memory stays as for the source."""
    if source_int and volume.dtype != np.int16:
        rounded = np.round(volume)
        if rounded.size == 0 or (rounded.min() >= -32768 and rounded.max() <= 32767):
            return rounded.astype(np.int16)
    return volume.astype(np.float32, copy=False) if volume.dtype != np.int16 else volume


# ---------------------------------------------------------------------------------- public read
def read_dicom_volume(series: DicomSeriesInfo) -> DicomVolume:
    """Decode ``series`` into a ``[z, y, x]`` volume on a uniform orthogonal grid.

    Slices are ordered along the slice normal (array index ``k`` increases along
    ``row × column`` direction). Uneven gaps are resampled and gantry tilt is undone, each with a
    warning; the DICOM references in the geometry then list the acquired instances in normal
    order and ``info["acquired_slice_indices"]`` gives each one's (fractional) array index.
    """
    plan = _plan(series)
    volume = _read_pixels(plan)
    source_int = volume.dtype == np.int16
    if plan.inplane_shift_px is not None:
        volume = _undo_tilt(volume, plan.inplane_shift_px)
    if plan.out_along is not None:
        along = np.array([s.along for s in plan.slices])
        volume = _resample_along_normal(volume, along, plan.out_along)
    volume = _to_output_dtype(volume, source_int)

    first = plan.slices[0].ds
    direction = np.stack([plan.row_dir, plan.col_dir, plan.normal], axis=1)
    reference = DicomReference(
        study_instance_uid=tag_str(first, "StudyInstanceUID"),
        series_instance_uid=series.series_instance_uid,
        frame_of_reference_uid=tag_str(first, "FrameOfReferenceUID"),
        sop_class_uid=tag_str(first, "SOPClassUID"),
        sop_instance_uids=tuple(tag_str(s.ds, "SOPInstanceUID") for s in plan.slices),
        files=tuple(str(s.path) for s in plan.slices),
        modality=series.modality,
        series_description=series.description,
        patient_id=tag_str(first, "PatientID"),
    )
    geometry = Geometry(
        spacing=(plan.spacing_xy[0], plan.spacing_xy[1], plan.spacing_z),
        origin=tuple(plan.slices[0].position),
        direction=tuple(direction.ravel()),
        shape=volume.shape,
        dicom=reference,
    )
    syntaxes = Counter(
        str(getattr(getattr(s.ds, "file_meta", None), "TransferSyntaxUID", "")) for s in plan.slices
    )
    info = {
        "format": "DICOM",
        "modality": series.modality,
        "series_description": series.description,
        "series_instance_uid": series.series_instance_uid,
        "series_key": series.uid,
        "series_number": series.series_number,
        "study_instance_uid": reference.study_instance_uid,
        "study_description": tag_str(first, "StudyDescription"),
        "study_date": tag_str(first, "StudyDate"),
        "patient_id": reference.patient_id,
        "manufacturer": tag_str(first, "Manufacturer"),
        "manufacturer_model": tag_str(first, "ManufacturerModelName"),
        "kvp": _float_or_none(first.get("KVP")),
        "convolution_kernel": tag_str(first, "ConvolutionKernel"),
        "slice_thickness_mm": _float_or_none(first.get("SliceThickness")),
        "body_part": tag_str(first, "BodyPartExamined"),
        "contrast_agent": tag_str(first, "ContrastBolusAgent"),
        "transfer_syntax": syntaxes.most_common(1)[0][0],
        "num_files": len({s.path for s in plan.slices}),
        **({"series_grouping": series.grouping} if series.grouping else {}),
        **plan.info,
    }
    return DicomVolume(volume, geometry, info, plan.warnings)
