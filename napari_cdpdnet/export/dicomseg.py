"""DICOM-SEG export and import (highdicom), so results go back to PACS next to the source series.

The segmentation is written as a BINARY DICOM Segmentation that references the source CT series
(study, series, frame of reference and every SOP instance), with one segment per label value and
the SNOMED-CT codes of the structure. Frames are positioned from the label map's own geometry
(a highdicom ``Volume``), so a label map on a resampled grid is still placed correctly.

Exports write through :func:`write_verified_dicom_seg`, which reads the file back and compares it
voxel by voxel before it may appear. Label-table rows become segment descriptions with
:func:`dicom_seg_specs`: CDPDNet structures carry the vocabulary's SNOMED-CT codes; plain labels
(from another tool, or drawn by hand) are coded as the generic SNOMED "Tissue" with algorithm type
MANUAL, because nothing more is known about them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_cdpdnet import __version__
from napari_cdpdnet.errors import CdpdnetError, InputError
from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet.export.labeltable import LabelRow

__all__ = [
    "dicom_seg_problem",
    "TISSUE",
    "SegmentSpec",
    "ReadSegment",
    "segment_specs",
    "dicom_seg_specs",
    "write_dicom_seg",
    "write_verified_dicom_seg",
    "read_dicom_seg",
    "Code3",
]

logger = logging.getLogger(__name__)

#: (code value, coding scheme designator, code meaning), e.g. ("10200004", "SCT", "Liver").
Code3 = tuple[str, str, str]

_ANATOMICAL_STRUCTURE: Code3 = ("123037004", "SCT", "Anatomical Structure")

#: SNOMED-CT "Tissue", the generic category/type for labels that are not CDPDNet structures.
TISSUE: Code3 = ("85756007", "SCT", "Tissue")


@dataclass(frozen=True)
class SegmentSpec:
    """How one label value of the map is described in the DICOM-SEG."""

    value: int
    label: str
    type_code: Code3
    category_code: Code3 = _ANATOMICAL_STRUCTURE
    modifier_code: Code3 | None = None
    color: tuple[int, int, int] | None = None
    algorithm_type: str = "AUTOMATIC"  # SEMIAUTOMATIC once a user edited the mask


def segment_specs(indices: Iterable[int], *, edited: Iterable[int] = ()) -> list[SegmentSpec]:
    """Segment descriptions of CDPDNet structures (by index 1..32) from the vocabulary's codes.

    Structures a user edited are declared SEMIAUTOMATIC, the others AUTOMATIC.
    """
    from napari_cdpdnet.vocabulary.catalog import structure

    edited = {int(i) for i in edited}
    out = []
    for i in indices:
        s = structure(int(i))
        out.append(
            SegmentSpec(
                value=s.index,
                label=s.name,
                type_code=tuple(s.snomed.type),
                category_code=tuple(s.snomed.category),
                modifier_code=None if s.snomed.type_modifier is None else tuple(s.snomed.type_modifier),
                color=tuple(s.color),
                algorithm_type="SEMIAUTOMATIC" if s.index in edited else "AUTOMATIC",
            )
        )
    return out


def _hex_rgb(color: str) -> tuple[int, int, int] | None:
    text = color.lstrip("#")
    if len(text) < 6:
        return None
    try:
        return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return None


def dicom_seg_specs(rows: Sequence[LabelRow], *, edited: Iterable[int] = ()) -> list[SegmentSpec]:
    """Segment descriptions for label-table rows: vocabulary codes for structures, the generic
    ``Tissue`` code (algorithm type MANUAL) for plain labels."""
    edited = {int(v) for v in edited}
    specs = []
    for row in rows:
        if row.snomed_type:  # a vocabulary structure
            specs.extend(segment_specs([row.value], edited=edited))
        else:
            specs.append(
                SegmentSpec(
                    value=row.value, label=row.name, type_code=TISSUE, category_code=TISSUE,
                    color=_hex_rgb(row.color), algorithm_type="MANUAL",
                )
            )
    return specs


def _code(c: Code3):
    from pydicom.sr.coding import Code

    return Code(value=c[0], scheme_designator=c[1], meaning=c[2])


def dicom_seg_problem(geometry: Geometry) -> str | None:
    """Why no valid DICOM-SEG can be made for labels on ``geometry`` (None: it can).

    A DICOM-SEG references its source by UIDs: the study, the series, the frame of reference
    and every source image (SOP Instance UID). De-identification tools that blank them leave
    nothing to reference; a SEG written anyway would be invalid and could never be matched to
    its CT in a PACS or viewer, so the export is refused and NIfTI/NRRD are offered instead.
    """
    ref = geometry.dicom
    if ref is None:
        return "the image was not read from a DICOM series"
    blank = [name for name, value in (("StudyInstanceUID", ref.study_instance_uid),
                                      ("SeriesInstanceUID", ref.series_instance_uid),
                                      ("FrameOfReferenceUID", ref.frame_of_reference_uid)) if not value]
    n_blank = sum(1 for uid in ref.sop_instance_uids if not uid)
    if n_blank:
        blank.append(f"SOPInstanceUID of {n_blank} of its {len(ref.sop_instance_uids)} images")
    if blank:
        return (
            f"the source series has blank {', '.join(blank)} (de-identified without new UIDs), and a "
            "DICOM-SEG must reference its study, series, frame of reference and every source image "
            "by these UIDs; one written without them would be invalid and could not be matched to "
            "the CT in a PACS or viewer"
        )
    owners: dict[str, str] = {}
    for uid, f in zip(ref.sop_instance_uids, ref.files, strict=False):
        if owners.setdefault(uid, f) != f:
            return (
                f"two source files carry the same SOPInstanceUID {uid} ({Path(owners[uid]).name}, "
                f"{Path(f).name}), so a DICOM-SEG could not say which image each frame belongs to"
            )
    return None


def require_dicom_seg_source(geometry: Geometry) -> None:
    """Raise :class:`InputError` saying why no DICOM-SEG can be written, and what to export instead."""
    problem = dicom_seg_problem(geometry)
    if problem is None:
        return
    if geometry.dicom is None:
        raise InputError(
            "DICOM-SEG needs the source DICOM series, and these labels belong to an image that was "
            "not read from DICOM. Export NIfTI/NRRD instead, or open the DICOM series and draw or "
            "segment on that."
        )
    raise InputError(
        f"DICOM-SEG cannot be written: {problem}. Export the label map as NIfTI or NRRD (with its "
        "table) instead: it holds the same result on the CT's grid."
    )


def _source_datasets(geometry: Geometry) -> list:
    import pydicom

    ref = geometry.dicom
    require_dicom_seg_source(geometry)
    if ref is None:
        raise InputError(
            "DICOM-SEG needs the source DICOM series: this label map's image was not read from "
            "DICOM. Export NIfTI/NRRD instead, or open the DICOM series and segment that."
        )
    missing = [f for f in ref.files if not Path(f).is_file()]
    if missing:
        raise InputError(
            f"DICOM-SEG needs the source series files, but {len(missing)} of {len(ref.files)} are "
            f"gone (first: {missing[0]}). Keep the DICOM folder where it was read from."
        )
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in dict.fromkeys(ref.files)]


def write_dicom_seg(
    path: str | Path,
    labels: np.ndarray,
    geometry: Geometry,
    segments: Sequence[SegmentSpec],
    *,
    overwrite: bool = False,
    series_description: str = "CDPDNet segmentation",
    series_number: int = 300,
    content_creator: str | None = None,
) -> Path:
    """Write a BINARY DICOM-SEG of ``labels`` (on ``geometry``) referencing the source series.

    Args:
        path: output ``.dcm`` file.
        labels: ``[z, y, x]`` integer label map on ``geometry``.
        geometry: must carry ``dicom`` references (the image was read from a DICOM series).
        segments: one spec per label value to export; values absent from the map are skipped
            with a log message (DICOM-SEG cannot hold empty segments).
        overwrite: replace an existing file.

    Returns:
        The written path.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from napari_cdpdnet.fileutil import atomic_output

    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise InputError(f"label map shape {labels.shape} differs from its geometry {geometry.shape}")
    sources = _source_datasets(geometry)
    present = set(np.unique(labels).tolist()) - {0}
    kept = [s for s in segments if s.value in present]
    for s in segments:
        if s.value not in present:
            logger.info("segment %r (value %d) is empty and is left out of the DICOM-SEG", s.label, s.value)
    if not kept:
        raise InputError("nothing to export: the label map holds none of the requested structures")

    # Segment numbers must run 1..K; map label values onto them in the given order.
    lut = np.zeros(int(labels.max()) + 1, np.uint8)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="CDPDNet (napari-cdpdnet)",
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
    )
    for number, spec in enumerate(kept, start=1):
        lut[spec.value] = number
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label[:64],
            segmented_property_category=_code(spec.category_code),
            segmented_property_type=_code(spec.type_code),
            algorithm_type=spec.algorithm_type,
            algorithm_identification=algorithm if spec.algorithm_type != "MANUAL" else None,
            tracking_uid=hd.UID(),
            tracking_id=f"{spec.label} ({spec.value})",
            display_color=None if spec.color is None else hd.color.CIELabColor.from_rgb(*spec.color),
        )
        if spec.modifier_code is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(*spec.modifier_code)
            ]
        descriptions.append(desc)
    seg_map = lut[labels]

    # highdicom's Volume wants array axes (z, y, x) mapped to LPS (x, y, z).
    affine = geometry.affine_lps()[:, [2, 1, 0, 3]]
    volume = hd.Volume(
        seg_map,
        affine=affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=geometry.dicom.frame_of_reference_uid,
    )
    with warnings.catch_warnings():
        # The patient name is copied from the source series as it is; not ours to "fix".
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _build_segmentation(hd, sources, volume, descriptions, series_number, series_description,
                                  content_creator)
    with atomic_output(path, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
    logger.info("wrote DICOM-SEG with %d segments to %s", len(kept), path)
    return Path(path)


def write_verified_dicom_seg(path: str | Path, labels: np.ndarray, geometry: Geometry,
                             specs: Sequence[SegmentSpec]) -> Path:
    """Write the DICOM-SEG and read it back: each segment must hold exactly its label's voxels.

    Meant for a staged path (see :func:`napari_cdpdnet.export.export_segmentation`): on a
    mismatch the file is left where it is and :class:`CdpdnetError` says nothing was exported.
    """
    labels = np.asarray(labels)
    path = write_dicom_seg(path, labels, geometry, specs)
    back, segments = read_dicom_seg(path, geometry)
    kept = [s for s in specs if (labels == s.value).any()]
    if len(segments) != len(kept):
        raise CdpdnetError(
            f"DICOM-SEG check failed: {len(segments)} segments read back, {len(kept)} written; "
            "nothing was exported (please report this)"
        )
    expected = np.zeros(labels.shape, np.uint8)
    for number, spec in enumerate(kept, start=1):
        expected[labels == spec.value] = number
    if not np.array_equal(back, expected):
        wrong = int(np.count_nonzero(back != expected))
        raise CdpdnetError(
            f"DICOM-SEG check failed: {wrong} voxels differ after reading it back; nothing was "
            "exported (please report this)"
        )
    logger.info("DICOM-SEG %s read back identical (%d segments)", path.name, len(kept))
    return path


def _build_segmentation(hd, sources, volume, descriptions, series_number, series_description,
                        content_creator):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-cdpdnet",
        manufacturer_model_name="CDPDNet",
        software_versions=__version__,
        device_serial_number="none",
        series_description=series_description,
        content_creator_name=content_creator,
        content_label="CDPDNET",
        content_description="CDPDNet segmentation"[:64],
        **_charset_kwargs(sources[0]),
    )


def _charset_kwargs(source) -> dict:
    """Some scanners write an empty SpecificCharacterSet (= default repertoire), which highdicom
    rejects when it copies it; the default repertoire is a subset of ISO_IR 100, so use that."""
    value = source.get("SpecificCharacterSet")
    return {} if value else {"specific_character_set": "ISO_IR 100"}


@dataclass(frozen=True)
class ReadSegment:
    """A segment as found in a DICOM-SEG file."""

    number: int
    label: str
    type_code: Code3
    category_code: Code3
    modifier_code: Code3 | None


def read_dicom_seg(path: str | Path, geometry: Geometry) -> tuple[np.ndarray, list[ReadSegment]]:
    """Read a DICOM-SEG onto ``geometry``'s grid (the source series' grid).

    Returns a ``[z, y, x]`` uint8 map whose values are the segment numbers, and the segments.
    Frames are placed by their plane positions, so the map matches the source slices whatever
    the frame order in the file.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types
        raise InputError(f"{path}: not a readable DICOM Segmentation ({exc})") from exc
    out = np.zeros(geometry.shape, np.uint8)
    inv = np.linalg.inv(geometry.affine_lps())
    segments: list[ReadSegment] = []
    for desc in seg.SegmentSequence:
        number = int(desc.SegmentNumber)
        t = desc.SegmentedPropertyTypeCodeSequence[0]
        c = desc.SegmentedPropertyCategoryCodeSequence[0]
        mod = getattr(t, "SegmentedPropertyTypeModifierCodeSequence", None)
        segments.append(
            ReadSegment(
                number,
                str(desc.SegmentLabel),
                (t.CodeValue, t.CodingSchemeDesignator, t.CodeMeaning),
                (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning),
                None if not mod else (mod[0].CodeValue, mod[0].CodingSchemeDesignator, mod[0].CodeMeaning),
            )
        )
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    # A functional group missing from a frame's item is in the shared one (highdicom puts the
    # segment number there when the SEG has a single segment).
    shared = seg.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None

    def group(fg, keyword: str):
        item = fg.get(keyword) or (shared.get(keyword) if shared is not None else None)
        if not item:
            raise InputError(f"{path}: frames carry no {keyword}; cannot place them")
        return item[0]

    for frame_index, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group(fg, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        pos = np.array(group(fg, "PlanePositionSequence").ImagePositionPatient, float)
        zyx = (inv @ np.append(pos, 1.0))[:3][::-1]
        k = int(round(zyx[0]))
        if abs(zyx[0] - k) > 0.05 or not 0 <= k < geometry.shape[0] or np.abs(zyx[1:]).max() > 0.05:
            raise InputError(f"{path}: frame {frame_index + 1} does not lie on a slice of the source grid")
        frame = pixels[frame_index] > 0
        if frame.shape != geometry.shape[1:]:
            raise InputError(f"{path}: frame size {frame.shape} differs from the source {geometry.shape[1:]}")
        out[k][frame] = number
    return out, segments
