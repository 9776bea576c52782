"""Grouping DICOM files into series without trusting UIDs alone (headers only, no pixels).

Split from :mod:`napari_cdpdnet.io.dicom_scan` (walking folders, reading headers, choosing a
series, messages): this module holds :class:`DicomSeriesInfo` and the rules of
:func:`group_series`, which the scan module's docstring states. Tag helpers read pydicom datasets
without importing pydicom.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from napari_cdpdnet.io.dicom_kinds import not_a_volume_reason, object_kind

__all__ = ["DicomSeriesInfo", "group_series", "tag_str", "tag_int", "is_image_header", "frame_count",
           "CT_MODALITIES"]

#: Modalities that are CT (CT proper; "CT" is also used by most PET/CT and SPECT/CT CT parts).
CT_MODALITIES = frozenset({"CT"})


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series found in a folder (what a user needs to choose it).

    ``uid`` identifies the series among those found: its SeriesInstanceUID when that names
    exactly one image stack, else a key made here (``<UID>#2`` for the second stack sharing a
    UID, ``noUID-<hash>`` for files without one); ``series_instance_uid`` is what the headers say
    (empty when blank). ``num_slices`` counts images (frames for multi-frame files); ``files``
    are in the order they were found, not slice order. ``grouping`` says how the files were
    grouped when it was not by a unique UID.
    """

    uid: str
    modality: str
    num_slices: int
    description: str
    files: tuple[Path, ...]
    study_uid: str = ""
    series_number: int | None = None
    _headers: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    grouping: str = ""

    @property
    def kind(self) -> str:
        """``"CT Image (CT)"``, ``"Segmentation (SEG)"``: the SOP class and modality."""
        return object_kind(self.modality, self.sop_class_uid)

    def describe(self) -> str:
        """One line for messages: ``CT series 3 "Abdomen 1.0" (512 slices, UID 1.2.3)``."""
        number = f" {self.series_number}" if self.series_number is not None else ""
        desc = f' "{self.description}"' if self.description else ""
        unit = "slice" if self.num_slices == 1 else "slices"
        if self.series_instance_uid and self.uid == self.series_instance_uid:
            ident = f"UID {self.uid}"
        elif self.series_instance_uid:
            ident = f"{self.uid}: one of the stacks sharing UID {self.series_instance_uid}"
        else:
            ident = f"no SeriesInstanceUID, grouped as {self.uid}"
        return f"{self.modality or '?'} series{number}{desc} ({self.num_slices} {unit}, {ident})"

    def problem(self, allow_non_ct: bool = False) -> str | None:
        """Why this series cannot be read as a CT volume (None: it can be tried)."""
        has_pixels = any(is_image_header(ds) for ds in self._headers) if self._headers else self.num_slices > 0
        reason = not_a_volume_reason(self.modality, has_pixels)
        if reason:
            return reason
        if self.num_slices < 2:
            return f"2-D image: series {self.uid} has a single slice; a CT volume needs several slices"
        if self.modality not in CT_MODALITIES and not allow_non_ct:
            return f"it is {self.modality or 'of unknown modality'}, not CT"
        return None


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


def _rounded(ds: Any, keyword: str, digits: int) -> tuple[float, ...]:
    try:
        return tuple(round(float(v), digits) for v in (ds.get(keyword) or ()))
    except (TypeError, ValueError):
        return ()


def _shared(ds: Any, sequence: str, keyword: str, digits: int) -> tuple[float, ...]:
    """A geometry value of a multi-frame file (shared functional group), else the top level."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        item = shared[0].get(sequence)
        if item:
            return _rounded(item[0], keyword, digits)
    return _rounded(ds, keyword, digits)


def _geometry_key(ds: Any) -> tuple:
    """What a volume's slices share: frame of reference, orientation, size, pixel spacing."""
    return (
        tag_str(ds, "FrameOfReferenceUID"),
        _shared(ds, "PlaneOrientationSequence", "ImageOrientationPatient", 3),
        tag_int(ds, "Rows"),
        tag_int(ds, "Columns"),
        _shared(ds, "PixelMeasuresSequence", "PixelSpacing", 4),
    )


def _uid_key(path: Path, ds: Any) -> tuple:
    """Within one SeriesInstanceUID: a different image stack if any of these differ."""
    own = str(path) if frame_count(ds) > 1 else ""  # each multi-frame file is a volume of its own
    return (tag_str(ds, "Modality").upper(), *_geometry_key(ds), tag_int(ds, "SeriesNumber"),
            tag_str(ds, "SeriesDescription"), own)


def _inferred_key(path: Path, ds: Any) -> tuple:
    """Without a SeriesInstanceUID: everything that stays the same across one series' slices."""
    image_type = tag_str(ds, "ImageType").upper().split("\\")[:3]
    return (*_uid_key(path, ds), tag_str(ds, "StudyInstanceUID"), tag_str(ds, "SeriesTime"),
            tag_str(ds, "SliceThickness"), tag_str(ds, "ConvolutionKernel"), tuple(image_type),
            tag_str(ds, "SOPClassUID"), tag_str(ds, "PatientID"))


def _positions(members: Sequence[tuple[Path, Any]]) -> list[tuple[float, ...]]:
    return [p for _, ds in members if (p := _rounded(ds, "ImagePositionPatient", 2))]


def _can_form_volume(members: Sequence[tuple[Path, Any]]) -> bool:
    """At least two images at different positions (or one multi-frame image)."""
    images = [(p, ds) for p, ds in members if is_image_header(ds)]
    if any(frame_count(ds) > 1 for _, ds in images):
        return True
    return len(set(_positions(images))) >= 2


def _short_hash(key: tuple) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:8]


def _most_common(members: Sequence[tuple[Path, Any]], keyword: str) -> str:
    values = Counter(tag_str(ds, keyword) for _, ds in members)
    return values.most_common(1)[0][0] if values else ""


def _info(key: str, uid: str, members: Sequence[tuple[Path, Any]], grouping: str = "") -> DicomSeriesInfo:
    images = [ds for _, ds in members if is_image_header(ds)]
    first = (images or [members[0][1]])[0]
    return DicomSeriesInfo(
        uid=key,
        modality=_most_common(members, "Modality").upper(),
        num_slices=sum(frame_count(ds) for ds in images),
        description=tag_str(first, "SeriesDescription"),
        files=tuple(p for p, _ in members),
        study_uid=tag_str(first, "StudyInstanceUID"),
        series_number=tag_int(first, "SeriesNumber"),
        _headers=tuple(ds for _, ds in members),
        series_instance_uid=uid,
        sop_class_uid=_most_common(members, "SOPClassUID"),
        grouping=grouping,
    )


def _split_acquisitions(info: DicomSeriesInfo) -> tuple[list[DicomSeriesInfo], str | None]:
    """Slices at the same positions in several acquisitions: one series per AcquisitionNumber,
    when that leaves no two slices at one position."""
    members = list(zip(info.files, info._headers, strict=True))
    images = [(p, ds) for p, ds in members if is_image_header(ds) and frame_count(ds) == 1]
    positions = _positions(images)
    if len(positions) == len(set(positions)):
        return [info], None
    by_acq: dict[int | None, list[tuple[Path, Any]]] = defaultdict(list)
    for p, ds in members:
        by_acq[tag_int(ds, "AcquisitionNumber")].append((p, ds))
    parts = list(by_acq.items())
    if len(parts) < 2 or not all(
        _can_form_volume(m) and len(_positions(m)) == len(set(_positions(m))) for _, m in parts
    ):
        return [info], None
    out = [
        replace(_info(f"{info.uid}:acq{acq}", info.series_instance_uid, m, info.grouping),
                grouping=(info.grouping + "; " if info.grouping else "") + f"AcquisitionNumber {acq}")
        for acq, m in sorted(parts, key=lambda kv: (kv[0] is None, kv[0] or 0))
    ]
    note = (
        f"{info.describe()} holds {len(out)} acquisitions at the same slice positions "
        f"(AcquisitionNumber {', '.join(str(a) for a, _ in parts)}); each is read as its own "
        f"series: {', '.join(s.uid for s in out)}"
    )
    return out, note


def group_series(items: Sequence[tuple[Path, Any]]) -> tuple[list[DicomSeriesInfo], list[str]]:
    """Series from (path, header) pairs, and notes on every grouping that was inferred."""
    by_uid: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    blank: list[tuple[Path, Any]] = []
    for p, ds in items:
        uid = tag_str(ds, "SeriesInstanceUID")
        (by_uid[uid] if uid else blank).append((p, ds))
    series: list[DicomSeriesInfo] = []
    notes: list[str] = []
    for uid, members in by_uid.items():
        parts: dict[tuple, list[tuple[Path, Any]]] = defaultdict(list)
        for p, ds in members:
            parts[_uid_key(p, ds)].append((p, ds))
        stacks = [m for m in parts.values() if _can_form_volume(m)]
        if len(stacks) <= 1:
            series.append(_info(uid, uid, members))
            continue
        stacks.sort(key=lambda m: (tag_int(m[0][1], "SeriesNumber") or 0, -len(m)))
        fragments = [pair for m in parts.values() if not _can_form_volume(m) for pair in m]
        biggest = max(range(len(stacks)), key=lambda k: len(stacks[k]))
        split = []
        for k, m in enumerate(stacks, start=1):
            extra = fragments if k - 1 == biggest else []
            split.append(_info(f"{uid}#{k}", uid, m + extra,
                               f"stack {k} of {len(stacks)} sharing SeriesInstanceUID {uid}"))
        series.extend(split)
        notes.append(
            f"SeriesInstanceUID {uid} is shared by {len(stacks)} different image stacks (they differ "
            "in frame of reference, orientation, image size, pixel spacing, series number or "
            "description); each is read as its own series: " + "; ".join(s.describe() for s in split)
        )
    if blank:
        parts = defaultdict(list)
        for p, ds in blank:
            parts[_inferred_key(p, ds)].append((p, ds))
        inferred = [_info(f"noUID-{_short_hash(key)}", "", m, "inferred without SeriesInstanceUID")
                    for key, m in parts.items()]
        series.extend(inferred)
        notes.append(
            f"{len(blank)} DICOM file{'s' if len(blank) != 1 else ''} have no SeriesInstanceUID "
            "(de-identified?); they were grouped into "
            f"{len(inferred)} series by study, frame of reference, orientation, image size, pixel "
            "spacing, series number, description and time, slice thickness, kernel, image type, "
            "SOP class and modality"
        )
    final: list[DicomSeriesInfo] = []
    for info in series:
        split, note = _split_acquisitions(info)
        final.extend(split)
        if note:
            notes.append(note)
    final.sort(key=lambda s: (s.study_uid, s.series_number if s.series_number is not None else 1 << 30,
                              s.description, s.uid))
    return final, notes
