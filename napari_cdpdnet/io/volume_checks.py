"""Checks of what a volume file really holds, where the readers would not say (no napari, no Qt).

Split from :mod:`napari_cdpdnet.io.images`. ITK's NIfTI reader fills a truncated file's missing
voxels with zeros and reads NaN and ±inf voxels as 0 (water); a detached header (``.nhdr``,
``.mhd``) whose data file is missing fails with a generic read error. These checks find such
files and say what is wrong; :func:`finite_only` then refuses a volume without a single finite
voxel and sets the others' non-finite voxels to the lowest finite value, with a warning.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.fileutil import full_suffix

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

__all__ = ["nifti_scan", "nifti_float_voxels", "detached_data_problem", "finite_only"]

logger = logging.getLogger(__name__)


_NIFTI_FLOATS = {"16": "<f4", "64": "<f8"}


def nifti_scan(path: Path, reader: sitk.ImageFileReader) -> tuple[bool, int]:
    """One streaming pass over a NIfTI file's voxel bytes: (all there?, non-finite floats seen).

    ITK's NIfTI reader fills missing data with zeros instead of failing, so a truncated download
    would otherwise load as a scan with an empty lower part; and it silently reads NaN and ±inf
    voxels as 0 (water), so a volume without one finite voxel would load as a flat image. For
    ``.nii.gz`` this decompresses the stream once more (without keeping it) and stops as soon as
    enough bytes have come out.
    """
    import zlib

    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]
        offset = int(float(reader.GetMetaData("vox_offset")))
        expected = offset + math.prod(dims) * int(reader.GetMetaData("bitpix")) // 8
        float_type = _NIFTI_FLOATS.get(reader.GetMetaData("datatype").strip())
    except (RuntimeError, ValueError):
        logger.debug("%s: NIfTI header fields missing; completeness not checked", path)
        return True, 0
    counter = _NonFiniteCounter(offset, float_type)
    if full_suffix(path) != ".nii.gz":
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                counter.feed(chunk)
        return path.stat().st_size >= expected, counter.count
    total = 0
    decomp = zlib.decompressobj(wbits=31)
    with open(path, "rb") as fh:
        pending = b""
        while total < expected:
            if not pending:
                pending = fh.read(1 << 20)
                if not pending:
                    return False, counter.count  # the file ends before the data does
            try:
                out = decomp.decompress(pending, 1 << 24)
            except zlib.error:
                return False, counter.count
            total += len(out)
            counter.feed(out)
            pending = decomp.unconsumed_tail
            if decomp.eof:
                if total >= expected:
                    break
                rest = decomp.unused_data  # another gzip member may follow
                decomp = zlib.decompressobj(wbits=31)
                pending = rest + pending
                if not pending and not (pending := fh.read(1 << 20)):
                    return False, counter.count
    return True, counter.count


class _NonFiniteCounter:
    """Counts NaN/inf among float voxels fed as a byte stream that starts at the file's start."""

    def __init__(self, offset: int, dtype: str | None) -> None:
        self.skip, self.dtype, self.count = offset, dtype, 0
        self.size = np.dtype(dtype).itemsize if dtype else 0
        self.carry = b""

    def feed(self, data: bytes) -> None:
        if not self.dtype:
            return
        if self.skip:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
        data = self.carry + data
        usable = len(data) - len(data) % self.size
        self.carry = data[usable:]
        if usable:
            values = np.frombuffer(data[:usable], self.dtype)
            self.count += int(values.size - np.count_nonzero(np.isfinite(values)))


def nifti_float_voxels(path: Path) -> np.ndarray:
    """A NIfTI file's voxels ``[z, y, x]`` with NaN/inf kept (nibabel; ITK turns them into 0)."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.ascontiguousarray(data.reshape(data.shape[:3]).transpose(2, 1, 0))


def detached_data_problem(path: Path) -> str | None:
    """For a header whose voxels live in another file (``.nhdr``, ``.mhd``, or an ``.nrrd``/
    ``.mha`` that points elsewhere): why that data file cannot be read, or None.

    ITK reports a missing data file as a generic read error; the user needs to hear that the
    header was found and which file it names is missing.
    """
    import re

    try:
        with open(path, "rb") as fh:
            head = fh.read(16384)
    except OSError:
        return None
    text = head.split(b"\n\n", 1)[0].decode("latin-1", "replace")
    names: list[str] = []
    nrrd = re.findall(r"^data ?file:\s*(.+?)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    meta = re.findall(r"^ElementDataFile\s*=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    if nrrd:
        value = nrrd[0]
        if value.upper().startswith("LIST"):
            names = [ln.strip() for ln in text.split(nrrd[0], 1)[1].splitlines() if ln.strip()]
        elif "%" not in value:
            names = [value]
    elif meta:
        value = meta[0]
        if value.upper() not in ("LOCAL", "LIST") and "%" not in value:
            names = [value]
    for name in names:
        data = (path.parent / name) if not Path(name).is_absolute() else Path(name)
        if not data.is_file():
            return (
                f"{path}: the header names its voxel data file {name!r}, which is missing ({data} "
                "does not exist); copy the data file next to the header, or give a single-file "
                "image (.nii.gz, .nrrd, .mha)"
            )
        if data.stat().st_size == 0:
            return f"{path}: its voxel data file {data} is empty (0 bytes)"
    return None


def finite_only(array: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """Refuse a volume without a single finite voxel; set the non-finite voxels of others to the
    lowest finite value (air, outside the field of view), with a warning that counts them."""
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return array, []
    finite = np.isfinite(array)
    n_bad = int(array.size - np.count_nonzero(finite))
    if n_bad == 0:
        return array, []
    if n_bad == array.size:
        kinds = sorted({"NaN" if np.isnan(v) else ("+inf" if v > 0 else "-inf")
                        for v in np.unique(array[:: max(1, array.size // 4096)].ravel()[:64])})
        raise InputError(
            f"{path}: no finite voxel: all {array.size} voxels are NaN or infinite "
            f"({', '.join(kinds) or 'NaN/inf'}); the file holds no image (a failed conversion or "
            "an empty result). Export the CT again"
        )
    low = float(array[finite].min())
    array = np.where(finite, array, np.float32(low)).astype(array.dtype, copy=False)
    return array, [
        f"{path}: {n_bad} of {array.size} voxels are NaN or infinite (e.g. padding outside the "
        f"field of view); they were set to the lowest finite value, {low:g}"
    ]
