"""DICOM images as frames: one per classic single-frame file, one per frame of an enhanced file,
and their pixels decoded by whichever installed decoder can.

Classic CT series store one slice per file, with its geometry at the top level of the header.
Enhanced (and legacy-converted enhanced) CT stores a whole series in one multi-frame file, with
each frame's position, and often its rescale, in functional-group sequences. :func:`frames_of`
turns both into :class:`Frame` records, so slice ordering, gantry-tilt and spacing checks in
:mod:`napari_cdpdnet.io.dicom_series` see one kind of thing.

Pixels: single-frame files are decoded by SimpleITK's GDCM, which reads the most transfer
syntaxes (every JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE, deflate) and applies rescale
slope/intercept. Where GDCM fails on a compressed syntax, pydicom's decoders are tried (its
plugins: Pillow, pyjpegls, pylibjpeg, python-gdcm). Multi-frame files are decoded by pydicom,
because GDCM applies one rescale to all frames while enhanced objects may give each frame its
own. When no installed decoder reads a syntax, the error names the syntax and the packages that
would (pydicom's own list of plugin dependencies), instead of calling the file damaged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_cdpdnet.errors import InputError

__all__ = ["Frame", "frames_of", "decode_frames", "sitk_reason", "NATIVE_SYNTAXES"]

logger = logging.getLogger(__name__)

#: Uncompressed transfer syntaxes: a decoding failure there means a damaged or truncated file.
NATIVE_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
})

#: pydicom names plugin requirements by import name; pip knows some of them by another name.
_PIP_NAMES = {"gdcm": "python-gdcm"}


@dataclass(frozen=True, eq=False)
class Frame:
    """One 2-D image of a series: a single-frame file, or frame ``number`` of a multi-frame file.

    ``position`` is ImagePositionPatient (LPS mm), ``orientation`` ImageOrientationPatient and
    ``pixel_spacing`` PixelSpacing (between rows, between columns), each None when the header
    lacks it. ``rescale`` is (slope, intercept) for frames of multi-frame files (single frames
    are rescaled by the decoder).
    """

    path: Path
    ds: Any
    number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    sop_instance_uid: str
    instance_number: int | None
    rescale: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        """The file name, with the frame number for multi-frame files (for messages)."""
        return self.path.name if self.number is None else f"{self.path.name} frame {self.number + 1}"


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _group_item(frame_item: Any, shared: Any, sequence: str) -> Any | None:
    """The first item of a functional-group ``sequence``: the frame's own, else the shared one."""
    for source in (frame_item, shared):
        if source is None:
            continue
        seq = source.get(sequence)
        if seq:
            return seq[0]
    return None


def frames_of(path: Path, ds: Any) -> list[Frame]:
    """The frames of one image file (one for a classic file; NumberOfFrames for enhanced ones)."""
    rows, cols = _int(ds.get("Rows")) or 0, _int(ds.get("Columns")) or 0
    sop = str(ds.get("SOPInstanceUID", "") or "").strip()
    n = max(1, _int(ds.get("NumberOfFrames")) or 1)
    if n == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        ps = _floats(ds.get("PixelSpacing") or (), 2)
        return [Frame(
            path, ds, None, _floats(ds.get("ImagePositionPatient") or (), 3),  # type: ignore[arg-type]
            _floats(ds.get("ImageOrientationPatient") or (), 6), ps, rows, cols, sop,  # type: ignore[arg-type]
            _int(ds.get("InstanceNumber")),
        )]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared_seq = ds.get("SharedFunctionalGroupsSequence") or []
    shared = shared_seq[0] if shared_seq else None
    top_rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    frames = []
    for k in range(n):
        item = per_frame[k] if k < len(per_frame) else None
        pos = _group_item(item, shared, "PlanePositionSequence")
        ori = _group_item(item, shared, "PlaneOrientationSequence")
        meas = _group_item(item, shared, "PixelMeasuresSequence")
        trans = _group_item(item, shared, "PixelValueTransformationSequence")
        rescale = top_rescale
        if trans is not None and "RescaleSlope" in trans:
            rescale = (float(trans.RescaleSlope), float(trans.get("RescaleIntercept", 0) or 0))
        frames.append(Frame(
            path, ds, k,
            None if pos is None else _floats(pos.get("ImagePositionPatient") or (), 3),  # type: ignore[arg-type]
            None if ori is None else _floats(ori.get("ImageOrientationPatient") or (), 6),
            None if meas is None else _floats(meas.get("PixelSpacing") or (), 2),  # type: ignore[arg-type]
            rows, cols, sop, k + 1, rescale,
        ))
    return frames


# ---------------------------------------------------------------------------------- decoding
def sitk_reason(exc: BaseException) -> str:
    """The informative part of a SimpleITK exception (no C++ source location, no pointers).

    ``"...cxx:410:\\nitk::ERROR: NrrdImageIO(0x55d3): Error reading c.nrrd:\\n[nrrd] ...: hit end
    of header"`` becomes ``"Error reading c.nrrd: hit end of header"``.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    main = next((ln for ln in lines if "ERROR:" in ln), lines[-1])
    main = main.split("ERROR:", 1)[-1].strip()
    main = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", main)
    library_detail = [ln for ln in lines if ln.startswith("[")]  # teem/nrrd's innermost cause
    if library_detail:
        main = f"{main.rstrip(':')}: {library_detail[-1].split('] ', 1)[-1].split(': ', 1)[-1]}"
    return main


def _syntax(ds: Any) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    return f"{UID(uid).name} ({uid})" if uid and UID(uid).name != uid else (uid or "unknown transfer syntax")


def _pip_hint(requirement: str) -> str:
    """``"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"`` → the pip line."""
    wanted = requirement.split("requires", 1)[-1]
    names = [re.split(r"[<>=!~ ]", part.strip(), maxsplit=1)[0] for part in wanted.split(" and ")]
    return "pip install " + " ".join(_PIP_NAMES.get(n, n) for n in names if n)


def decoder_problem(syntax: str) -> str | None:
    """Why pydicom cannot decode ``syntax`` here (naming the packages that would), or None."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        return (
            f"no installed decoder reads {_syntax_name(syntax)}: SimpleITK's GDCM does not, and "
            "pydicom has no decoder for it. Ask for the series uncompressed or in a common "
            "compression (JPEG lossless, JPEG-LS, JPEG 2000, RLE)"
        )
    if decoder.is_available:
        return None
    hints = "; or ".join(_pip_hint(r) for r in decoder.missing_dependencies)
    return (
        f"no installed decoder reads {_syntax_name(syntax)}: SimpleITK's GDCM failed on it and "
        f"pydicom needs a plugin package for it: {hints}"
    )


def _pydicom_pixels(path: Path) -> tuple[Any, np.ndarray]:
    import pydicom

    ds = pydicom.dcmread(path)
    return ds, np.asarray(ds.pixel_array)


def _decode_single(frame: Frame) -> np.ndarray:
    """A classic slice after rescale: GDCM first, pydicom where GDCM cannot."""
    import SimpleITK as sitk

    path = frame.path
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        return _decode_single_fallback(frame, sitk_reason(exc))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: colour (multi-component) pixels; a CT slice is greyscale")
    array = sitk.GetArrayViewFromImage(image)
    return _checked_shape(np.array(array), frame)


def _decode_single_fallback(frame: Frame, gdcm_reason: str) -> np.ndarray:
    syntax = _syntax(frame.ds)
    if syntax in NATIVE_SYNTAXES or not syntax:
        raise InputError(
            f"{frame.path}: the pixel data cannot be decoded: the file is truncated or damaged "
            f"({gdcm_reason}). Copy or export it again, or remove it from the folder"
        )
    problem = decoder_problem(syntax)
    if problem:
        raise InputError(f"{frame.path}: the pixel data cannot be decoded: {problem}")
    try:
        ds, raw = _pydicom_pixels(frame.path)
    except Exception as exc:  # noqa: BLE001 - pydicom's plugins raise many types
        raise InputError(
            f"{frame.path}: the pixel data cannot be decoded: the {_syntax_name(syntax)} data is "
            f"damaged or truncated (GDCM: {gdcm_reason}; pydicom: {exc})"
        ) from exc
    from pydicom.pixels import apply_rescale

    logger.info("%s: decoded by pydicom (GDCM: %s)", frame.path, gdcm_reason)
    return _checked_shape(np.asarray(apply_rescale(raw, ds)), frame)


def _checked_shape(array: np.ndarray, frame: Frame) -> np.ndarray:
    if array.size == frame.rows * frame.columns:
        array = array.reshape(frame.rows, frame.columns)
    if array.shape != (frame.rows, frame.columns):
        raise InputError(
            f"{frame.path}: pixel data of shape {array.shape}, header says {frame.rows}×{frame.columns}"
        )
    return array


def _decode_multi(path: Path, ds: Any) -> np.ndarray:
    """Every frame of a multi-frame file as stored values ``[frame, y, x]`` (pydicom)."""
    syntax = _syntax(ds)
    if syntax and syntax not in NATIVE_SYNTAXES:
        problem = decoder_problem(syntax)
        if problem:
            raise InputError(f"{path}: the pixel data cannot be decoded: {problem}")
    try:
        full, raw = _pydicom_pixels(path)
    except Exception as exc:  # noqa: BLE001 - pydicom's plugins raise many types
        raise InputError(
            f"{path}: the pixel data cannot be decoded: the file is truncated or damaged ({exc})"
        ) from exc
    if int(full.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{path}: colour (multi-component) pixels; a CT image is greyscale")
    return raw.reshape(-1, *raw.shape[-2:])


def decode_frames(frames: list[Frame]) -> list[np.ndarray]:
    """Each frame's pixels after rescale, in the order given (a multi-frame file is decoded once)."""
    out: list[np.ndarray] = []
    decoded: dict[Path, np.ndarray] = {}
    for frame in frames:
        if frame.number is None:
            out.append(_decode_single(frame))
            continue
        if frame.path not in decoded:
            decoded = {frame.path: _decode_multi(frame.path, frame.ds)}  # keep one file in memory
        stack = decoded[frame.path]
        if frame.number >= stack.shape[0]:
            raise InputError(
                f"{frame.path}: the header lists more frames than the pixel data holds; the file "
                "is truncated"
            )
        pixels = stack[frame.number]
        slope, intercept = frame.rescale or (1.0, 0.0)
        if slope != 1.0 or intercept != 0.0:
            values = pixels.astype(np.float64) * slope + intercept
            pixels = values.astype(np.int32) if np.array_equal(values, np.round(values)) else values.astype(np.float32)
        out.append(pixels)
    return out
