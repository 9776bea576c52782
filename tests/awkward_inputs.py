"""Awkward inputs made from the real CT series in ../shared: what PACS exports, anonymisers and
careless copies produce, one function each, with parameters so that the held-out corpus
(``scripts/dicom_corpus.py``) can make different variants than the tests.

Everything is written with pydicom (headers rewritten, tags dropped, frames merged by highdicom's
legacy converter, pixel data compressed by pydicom's encoders or Pillow's JPEG 2000 encoder) or
SimpleITK; nothing here reads the files back.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
JPEG_XL = "1.2.840.10008.1.2.4.110"


# --------------------------------------------------------------------------- loading / writing
def load_series(folder: Path) -> list[Dataset]:
    """Every DICOM file of a folder (searched recursively), sorted along the slice normal."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "LICENSE"]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def write(datasets: Sequence[Dataset], folder: Path, *, names: Sequence[str] | Callable[[int], str] | None = None,
          nested: bool = False) -> list[Path]:
    """Write each dataset; ``names`` per file (default ``IM<k>.dcm``), ``nested`` one folder each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        name = names(k) if callable(names) else (names[k] if names else f"IM{k + 1:04d}.dcm")
        path = folder / (f"d{k:02d}/sub" if nested else "") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def as_new_series(datasets: Sequence[Dataset], *, series_uid: str | None = None, study_uid: str | None = None,
                  frame_uid: str | None = None, series_number: int | None = None, description: str | None = None,
                  shift_mm: Sequence[float] = (0.0, 0.0, 0.0), hu_offset: int = 0) -> list[Dataset]:
    """Copies with fresh SOP UIDs (and the given series identity), shifted in space or in value."""
    series_uid = series_uid if series_uid is not None else generate_uid()
    out = []
    for ds in datasets:
        d = copy.deepcopy(ds)
        d.SOPInstanceUID = generate_uid()
        d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        d.SeriesInstanceUID = series_uid
        if study_uid is not None:
            d.StudyInstanceUID = study_uid
        if frame_uid is not None:
            d.FrameOfReferenceUID = frame_uid
        if series_number is not None:
            d.SeriesNumber = series_number
        if description is not None:
            d.SeriesDescription = description
        d.ImagePositionPatient = [f"{float(v) + s:.6f}" for v, s in zip(d.ImagePositionPatient, shift_mm, strict=True)]
        if hu_offset:
            d.PixelData = (d.pixel_array.astype(np.int32) + hu_offset).astype(d.pixel_array.dtype).tobytes()
        out.append(d)
    return out


def restack(datasets: Sequence[Dataset], offsets_mm: Sequence[float], *, drift_mm_per_mm: Sequence[float] = (0, 0, 0),
            gantry_tilt: float | None = None) -> list[Dataset]:
    """A series with one slice per offset along the normal (pixels cycled from ``datasets``),
    its origins sheared in-plane by ``drift_mm_per_mm`` (gantry tilt) when given."""
    base = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    series_uid = generate_uid()
    out = []
    for k, off in enumerate(offsets_mm):
        d = copy.deepcopy(datasets[k % len(datasets)])
        d.SOPInstanceUID = generate_uid()
        d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        d.SeriesInstanceUID = series_uid
        d.InstanceNumber = k + 1
        pos = base + off * normal + off * np.asarray(drift_mm_per_mm, float)
        d.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        d.SliceLocation = f"{off:.6f}"
        if gantry_tilt is not None:
            d.GantryDetectorTilt = f"{gantry_tilt:.3f}"
        out.append(d)
    return out


# --------------------------------------------------------------------------- de-identification
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def blank_uids(datasets: Sequence[Dataset], *, tags: Sequence[str] = UID_TAGS[:3], delete: bool = False) -> list[Dataset]:
    """What some de-identification tools leave: the UIDs blank (or removed), media UID too."""
    out = []
    for ds in datasets:
        d = copy.deepcopy(ds)
        for tag in tags:
            if delete:
                if tag in d:
                    delattr(d, tag)
            else:
                setattr(d, tag, "")
        if "SOPInstanceUID" in tags:
            d.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"  # some tools write a placeholder
        out.append(d)
    return out


# --------------------------------------------------------------------------- encodings
def compressed(datasets: Sequence[Dataset], syntax: str) -> list[Dataset]:
    """Copies in another transfer syntax: pydicom's encoders (RLE, JPEG-LS with pyjpegls,
    deflate), Pillow's JPEG 2000 encoder for J2K, and a JPEG 2000 payload under the JPEG XL
    syntax for a syntax that no installed decoder reads."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless

    out = []
    for ds in datasets:
        d = copy.deepcopy(ds)
        if syntax == DeflatedExplicitVRLittleEndian:
            d.file_meta.TransferSyntaxUID = syntax
        elif syntax in (JPEG2000Lossless, JPEG_XL):
            stored = d.pixel_array.astype(np.int32)
            shift = -int(stored.min()) if stored.min() < 0 else 0
            unsigned = np.ascontiguousarray((stored + shift).astype("<u2"))
            d.PixelRepresentation = 0
            d.RescaleIntercept = f"{float(d.RescaleIntercept) - shift:g}"
            d.PixelData = encapsulate([_j2k(unsigned)])
            d["PixelData"].VR = "OB"
            d["PixelData"].is_undefined_length = True
            d.file_meta.TransferSyntaxUID = syntax
        else:
            d.compress(syntax)
        out.append(d)
    return out


def _j2k(pixels: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.frombytes("I;16", (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    buf = io.BytesIO()
    image.save(buf, format="JPEG2000", no_jp2=True, irreversible=False)
    return buf.getvalue()


def write_any_syntax(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` even under a transfer syntax this pydicom does not know (e.g. JPEG XL)."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        raw.write(b"\x00" * 128 + b"DICM")
        fp = DicomFileLike(raw)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        body = Dataset({tag: elem for tag, elem in ds.items() if tag.group != 2})
        write_dataset(fp, body)
    return path


def enhanced(datasets: Sequence[Dataset], *, sop_class: str = ENHANCED_CT) -> Dataset:
    """One multi-frame CT from a classic series (highdicom's legacy converter), labelled as
    Enhanced CT by default (its functional groups are the same)."""
    import warnings

    import highdicom as hd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=list(datasets), series_instance_uid=hd.UID(), series_number=99,
            sop_instance_uid=hd.UID(), instance_number=1,
        )
    if sop_class != mf.SOPClassUID:
        mf.SOPClassUID = sop_class
        mf.file_meta.MediaStorageSOPClassUID = sop_class
    return mf


def with_dicomdir(datasets: Sequence[Dataset], folder: Path) -> Path:
    """A DICOMDIR-rooted folder as media exports make it (pydicom's File-set writer: nested,
    extension-less file names); returns the DICOMDIR's path."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for ds in datasets:
        fs.add(copy.deepcopy(ds))
    folder.mkdir(parents=True, exist_ok=True)
    fs.write(folder)
    return folder / "DICOMDIR"


# --------------------------------------------------------------------------- other objects
def _object(template: Dataset, sop_class: str, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    d = Dataset()
    d.file_meta = meta
    d.SOPClassUID, d.SOPInstanceUID, d.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    for tag in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate"):
        if tag in template:
            setattr(d, tag, template.data_element(tag).value)
    d.SeriesInstanceUID = generate_uid()
    d.SeriesNumber = 900
    return d


def structured_report(template: Dataset) -> Dataset:
    d = _object(template, COMPREHENSIVE_SR, "SR")
    d.ValueType, d.ContinuityOfContent, d.CompletionFlag, d.VerificationFlag = "CONTAINER", "SEPARATE", "COMPLETE", "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    d.ConceptNameCodeSequence = [concept]
    d.ContentSequence = []
    return d


def rt_structure_set(template: Dataset) -> Dataset:
    d = _object(template, RT_STRUCT, "RTSTRUCT")
    d.StructureSetLabel = "LIVER"
    d.StructureSetROISequence = []
    return d


def rt_dose(template: Dataset, frames: int = 3) -> Dataset:
    """A dose grid: pixels, positions and frames like a volume, yet not an image to segment."""
    d = _object(template, RT_DOSE, "RTDOSE")
    d.FrameOfReferenceUID = template.FrameOfReferenceUID
    d.ImagePositionPatient = list(template.ImagePositionPatient)
    d.ImageOrientationPatient = list(template.ImageOrientationPatient)
    d.PixelSpacing = ["2.5", "2.5"]
    d.GridFrameOffsetVector = [f"{2.5 * k:g}" for k in range(frames)]
    d.NumberOfFrames = frames
    d.Rows = d.Columns = 16
    d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
    d.BitsAllocated = d.BitsStored = 16
    d.HighBit, d.PixelRepresentation = 15, 0
    d.DoseUnits, d.DoseType, d.DoseSummationType, d.DoseGridScaling = "GY", "PHYSICAL", "PLAN", "0.001"
    d.PixelData = np.arange(frames * 256, dtype="<u2").tobytes()
    return d


def projection(template: Dataset, modality: str = "DX", sop_class: str = DX_PRESENTATION, frames: int = 1) -> Dataset:
    """A radiograph (DX) or slide (SM) made from a CT slice's pixels: 2-D by nature."""
    d = copy.deepcopy(template)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "GantryDetectorTilt"):
        if tag in d:
            delattr(d, tag)
    d.SOPClassUID = d.file_meta.MediaStorageSOPClassUID = sop_class
    d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    d.SeriesInstanceUID = generate_uid()
    d.Modality = modality
    if frames > 1:
        d.NumberOfFrames = frames
        d.PixelData = d.PixelData * frames
    return d


def secondary_capture(template: Dataset) -> Dataset:
    """A screenshot of a slice stored as DICOM: pixels, no patient geometry."""
    d = projection(template, "OT", SECONDARY_CAPTURE)
    return d


def encapsulated_pdf(template: Dataset) -> Dataset:
    d = _object(template, ENCAPSULATED_PDF, "DOC")
    d.MIMETypeOfEncapsulatedDocument = "application/pdf"
    d.EncapsulatedDocument = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    return d


def jpeg_of(ds: Dataset, path: Path, *, level: float = 40, width: float = 400) -> Path:
    """The slice as an 8-bit JPEG, as a screenshot or a PACS "export as image" makes it."""
    from PIL import Image

    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey = np.clip((hu - (level - width / 2)) / width * 255, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey).save(path, format="JPEG")
    return path


# --------------------------------------------------------------------------- files that lie
def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def implicit_no_preamble(ds: Dataset, path: Path) -> Path:
    """An old-style file: implicit VR, no preamble and no file meta (some PACS still export it)."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    body = Dataset({tag: elem for tag, elem in copy.deepcopy(ds).items() if tag.group != 2})
    with open(path, "wb") as raw:
        fp = DicomFileLike(raw)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, body)
    return path


def non_finite_volume(path: Path, value: float | Sequence[float], shape: tuple[int, int, int] = (4, 8, 8)) -> Path:
    """A float volume whose voxels are all ``value`` (NaN, +inf, -inf, or a cycle of them)."""
    import SimpleITK as sitk

    values = np.resize(np.asarray(value, np.float32), int(np.prod(shape))).reshape(shape)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(image, str(path), True)
    return path


def detached_header(folder: Path, kind: str, data_name: str = "missing.raw") -> Path:
    """A ``.nhdr`` or ``.mhd`` header whose data file is not there."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "nhdr":
        path = folder / "ct.nhdr"
        path.write_text(
            "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 4\n"
            "space directions: (0.8,0,0) (0,0.8,0) (0,0,2)\nencoding: raw\nendian: little\n"
            f"space origin: (0,0,0)\ndata file: {data_name}\n"
        )
    else:
        path = folder / "ct.mhd"
        path.write_text(
            "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 0.8 0.8 2\n"
            f"DimSize = 8 8 4\nElementType = MET_SHORT\nElementDataFile = {data_name}\n"
        )
    return path


def self_link(folder: Path, name: str = "loop") -> Path:
    """A link inside ``folder`` pointing at ``folder`` itself."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / name
    os.symlink(folder, link, target_is_directory=True)
    return link
