"""The label table: what each value of a label map means, and how big and dense it is.

Written beside every exported label map as ``<name>.csv`` (``liver.nii.gz`` → ``liver.csv``), so
the map stays interpretable without this software: value, structure key and display name,
colour, SNOMED-CT codes, voxel count, volume in mL, HU mean/SD, and whether a person reviewed
the structure (``reviewed``: fine-tuning treats reviewed structures as labelled, the others as
unknown, not as background).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from napari_cdpdnet.export.measure import LabelStats, label_statistics
from napari_cdpdnet.geometry import Geometry

__all__ = [
    "LabelRow",
    "COLUMNS",
    "build_label_table",
    "write_label_table",
    "label_table_path",
    "structure_row",
    "plain_label_row",
]


@dataclass(frozen=True)
class LabelRow:
    """One row of the label table. ``value`` is the structure index (1..32) for CDPDNet labels."""

    value: int
    key: str
    name: str
    color: str
    group: str
    laterality: str
    snomed_category: str
    snomed_type: str
    snomed_modifier: str
    voxel_count: int
    volume_ml: float
    hu_mean: float
    hu_sd: float
    reviewed: bool
    source: str


#: CSV columns, in order.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LabelRow))


def _code_text(code) -> str:
    """``value^scheme^meaning`` (the HL7 component style), empty when absent."""
    return "" if code is None else f"{code[0]}^{code[1]}^{code[2]}"


def build_label_table(
    labels: np.ndarray,
    geometry: Geometry,
    image: np.ndarray | None = None,
    *,
    values: Iterable[int] | None = None,
    reviewed: Iterable[int] = (),
    source: str = "CDPDNet",
) -> list[LabelRow]:
    """Describe and measure the CDPDNet structures of ``labels`` (values = structure indices).

    Args:
        labels: ``[z, y, x]`` label map on ``geometry``.
        geometry: its grid (gives voxel volume).
        image: the CT in HU on the same grid, for density columns (NaN without it).
        values: structure indices to list (default: every non-zero value present). Requested
            but absent structures appear with zero volume, which is itself information.
        reviewed: structure indices a person has checked.
        source: who made the labels (``CDPDNet``, ``CDPDNet+edited``, ...).
    """
    stats = label_statistics(labels, geometry, image, values=values)
    reviewed = {int(v) for v in reviewed}
    return [structure_row(st, reviewed=st.value in reviewed, source=source) for st in stats]


def structure_row(st: LabelStats, *, reviewed: bool = False, source: str = "CDPDNet") -> LabelRow:
    """The row of a CDPDNet structure (``st.value`` = structure index 1..32) from its measurements.

    Raises:
        VocabularyError: ``st.value`` is not a structure index.
    """
    from napari_cdpdnet.vocabulary.catalog import structure

    s = structure(st.value)
    return LabelRow(
        value=st.value,
        key=s.key,
        name=s.name,
        color=s.color_hex,
        group=s.group,
        laterality=s.laterality or "",
        snomed_category=_code_text(s.snomed.category),
        snomed_type=_code_text(s.snomed.type),
        snomed_modifier=_code_text(s.snomed.type_modifier),
        voxel_count=st.voxel_count,
        volume_ml=round(st.volume_ml, 3),
        hu_mean=st.hu_mean,
        hu_sd=st.hu_sd,
        reviewed=bool(reviewed),
        source=source,
    )


def plain_label_row(
    st: LabelStats, *, name: str | None = None, color: str = "", reviewed: bool = False, source: str = ""
) -> LabelRow:
    """The row of a label that is not a CDPDNet structure (drawn by hand, or from another tool):
    named ``label N`` unless a name is given, no codes."""
    return LabelRow(
        value=st.value,
        key=f"label_{st.value}",
        name=name or f"label {st.value}",
        color=color,
        group="",
        laterality="",
        snomed_category="",
        snomed_type="",
        snomed_modifier="",
        voxel_count=st.voxel_count,
        volume_ml=round(st.volume_ml, 3),
        hu_mean=st.hu_mean,
        hu_sd=st.hu_sd,
        reviewed=bool(reviewed),
        source=source,
    )


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_label_table(path: str | Path, rows: Sequence[LabelRow], *, overwrite: bool = False) -> Path:
    """Write the table as UTF-8 CSV (atomically; an existing file only with ``overwrite``)."""
    from napari_cdpdnet.fileutil import atomic_output

    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(_cell(v) for v in asdict(row).values())
    return Path(path)


def label_table_path(label_map_path: str | Path) -> Path:
    """``<folder>/<name>.csv`` beside ``<folder>/<name>.nii.gz`` (or .nrrd, .seg.nrrd, .mha, ...)."""
    from napari_cdpdnet.fileutil import full_suffix

    p = Path(label_map_path)
    suffix = full_suffix(p)
    stem = p.name[: -len(suffix)] if suffix and p.name.lower().endswith(suffix) else p.stem
    return p.with_name(stem + ".csv")
