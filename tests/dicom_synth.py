"""Synthetic single-frame CT DICOM series for tests (oblique, tilted, uneven, other modalities).

Each slice is written from explicit ImagePositionPatient/ImageOrientationPatient values, so a
test states the true geometry and checks that the reader recovers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    positions: Sequence[Sequence[float]],
    row_dir: Sequence[float] = (1.0, 0.0, 0.0),
    col_dir: Sequence[float] = (0.0, 1.0, 0.0),
    pixel_spacing_xy: tuple[float, float] = (0.7, 0.7),
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    description: str = "synthetic",
    series_number: int = 1,
    gantry_tilt: float | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``volume[k]`` (HU, ``[z, y, x]``) as slice files at ``positions[k]``; return the paths.

    Pixels are stored as uint16 with RescaleIntercept -1024 (as most scanners do). Files are named
    in reverse slice order so that readers cannot rely on file names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    n = volume.shape[0]
    names = names or [f"IM{n - k:04d}.dcm" for k in range(n)]
    paths = []
    for k in range(n):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        sop_class = CTImageStorage if modality == "CT" else MR_IMAGE_STORAGE
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientID = "SYNTH01"
        ds.PatientName = "Synthetic^Test"
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{pixel_spacing_xy[1]:.6f}", f"{pixel_spacing_xy[0]:.6f}"]
        ds.SliceThickness = "1.0"
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = f"{gantry_tilt:.3f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.PixelData = (volume[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        path = folder / names[k]
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def stack_positions(
    origin: Sequence[float], normal: Sequence[float], offsets_mm: Sequence[float],
    inplane_drift: Sequence[float] = (0.0, 0.0, 0.0),
) -> list[list[float]]:
    """Slice origins at ``offsets_mm`` along ``normal``; ``inplane_drift`` (mm per mm) shears them."""
    o, nrm, drift = (np.asarray(v, float) for v in (origin, normal, inplane_drift))
    return [list(o + d * nrm + d * drift) for d in offsets_mm]
