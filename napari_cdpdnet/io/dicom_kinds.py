"""What a file is, in words a user knows: DICOM object kinds and common non-DICOM files.

Messages about input must say what was found ("a DICOM Segmentation (SEG)", "a JPEG image"),
not only that it is not a CT volume. SOP class names come from pydicom's copy of the DICOM
standard's UID registry (imported when used); the modality words and the three families below
(derived objects, projection images, volumes) are ours, because the standard does not group
them by "can this be segmented as a volume".
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DERIVED_MODALITIES",
    "PROJECTION_MODALITIES",
    "sop_class_name",
    "modality_word",
    "object_kind",
    "not_a_volume_reason",
    "sniff_file_kind",
]

#: Objects made from images (or about them) that are never a volume to segment.
DERIVED_MODALITIES = frozenset({
    "SEG", "SR", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "RTIMAGE", "PR", "KO", "REG",
    "DOC", "FID", "PLAN", "RWV", "AU", "ECG", "HD", "RESP", "EPS", "M3D",
})

#: Modalities whose images are 2-D by nature (radiographs, photographs, slides, ultrasound).
PROJECTION_MODALITIES = frozenset({
    "DX", "CR", "MG", "XA", "RF", "IO", "PX", "RG", "DF", "DS", "SM", "US", "OP", "OPT", "XC",
    "ES", "GM", "BMD", "IVOCT", "IVUS", "OCT", "TG",
})

_MODALITY_WORDS = {
    "CT": "a CT image", "MR": "an MR image", "PT": "a PET image", "NM": "a nuclear-medicine image",
    "SEG": "a segmentation", "SR": "a structured report", "RTSTRUCT": "a radiotherapy structure set",
    "RTDOSE": "a radiotherapy dose grid", "RTPLAN": "a radiotherapy plan",
    "RTRECORD": "a radiotherapy treatment record", "RTIMAGE": "a radiotherapy portal image",
    "PR": "a presentation state", "KO": "a key-object selection", "REG": "a registration",
    "DOC": "an encapsulated document", "DX": "a digital X-ray radiograph",
    "CR": "a computed-radiography X-ray", "MG": "a mammogram", "XA": "an X-ray angiogram",
    "RF": "a fluoroscopy image", "IO": "an intra-oral X-ray", "PX": "a panoramic X-ray",
    "SM": "a slide-microscopy image", "US": "an ultrasound image", "OP": "an ophthalmic photograph",
    "XC": "a photograph", "ES": "an endoscopy image", "OT": "an image of another kind",
}


def sop_class_name(uid: str) -> str:
    """``"1.2.840.10008.5.1.4.1.1.66.4"`` → ``"Segmentation"`` (the standard's name, no "Storage")."""
    uid = (uid or "").strip()
    if not uid:
        return "unknown SOP class"
    from pydicom.uid import UID

    name = UID(uid).name
    if name == uid:
        return f"SOP class {uid}"
    return name.removesuffix(" Storage").replace(" Image Storage - ", " Image - ")


def modality_word(modality: str) -> str:
    """``"SEG"`` → ``"a segmentation"``; unknown codes are named as they are."""
    modality = (modality or "").upper()
    return _MODALITY_WORDS.get(modality, f"a {modality} object" if modality else "an object of unknown modality")


def object_kind(modality: str, sop_class_uid: str) -> str:
    """One label for counts and listings: ``"Segmentation (SEG)"``, ``"CT Image (CT)"``."""
    name = sop_class_name(sop_class_uid)
    modality = (modality or "").upper()
    return f"{name} ({modality})" if modality else name


def not_a_volume_reason(modality: str, has_pixels: bool) -> str | None:
    """Why an object of this modality is never a volume to segment, or None if it may be one."""
    modality = (modality or "").upper()
    if not has_pixels:
        return f"it is {modality_word(modality)} without image pixels, not an image to segment"
    if modality in DERIVED_MODALITIES:
        return f"it is {modality_word(modality)}, derived from images, not an image to segment"
    if modality in PROJECTION_MODALITIES:
        return f"it is {modality_word(modality)}: 2-D images, not a CT volume"
    return None


#: Leading bytes of common files people give by mistake, and what they are.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (0, b"\x00\x00\x00\x0cjP  \r\n", "a JPEG 2000 image"),
    (0, b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive (unpack it first)"),
    (0, b"\x1f\x8b", "a gzip-compressed file"),
    (0, b"NRRD", "an NRRD image"),
    (0, b"ObjectType", "a MetaImage header"),
    (344, b"n+1\x00", "a NIfTI image"),
    (344, b"ni1\x00", "a NIfTI header"),
    (0, b"RIFF", "a RIFF file (e.g. WebP image or WAV audio)"),
)


def sniff_file_kind(path: str | Path) -> str | None:
    """What the first bytes of ``path`` say it is (``"a JPEG image"``), or None if unknown."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return None
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]):
        return "a text file"
    return None
