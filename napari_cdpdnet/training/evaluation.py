"""Dice and HD95 in millimetres per structure, between a prediction and a reference label map.

Computed on the source grid (the reference's geometry, which the prediction must share), with
the voxel spacing, for any label numbering through pairs ``pred value -> [ref values]``
(:func:`parse_pred_ref`; several reference values may form one structure, e.g. the lung lobes of
TotalSegmentator). Neither map is translated, unlike a label-value mapping
(:mod:`napari_cdpdnet.vocabulary.labelmaps`), which renumbers a reference onto the structures.

* Dice = 2|P∩G| / (|P| + |G|) — no smoothing term. The official ``test.py`` adds 1 to the
  denominator, which lowers small structures' scores (a perfect 10-voxel mask scores 0.952).
* HD95 follows medpy's ``hd95`` (what the official code calls): surface voxels are the mask minus
  its erosion (6-connectivity), distances are Euclidean in mm from each surface to the other,
  and HD95 is the 95th percentile of both directions pooled. The official evaluation runs it
  with spacing (1, 1, 1) on the 1.5 mm grid, on logits > 0.5 without post-processing, so its
  numbers are in 1.5 mm voxels of another mask than the one reported; ours are in mm on the
  final label map.
* Both masks empty: Dice and HD95 are undefined (NaN, note "absent in both"). One empty: Dice
  0 and HD95 undefined (the official code writes 999 then).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.extras import import_extra
from napari_cdpdnet.geometry import Geometry

__all__ = [
    "StructureScore",
    "SCORE_COLUMNS",
    "dice",
    "hd95_mm",
    "evaluate_labels",
    "evaluate_files",
    "parse_pred_ref",
    "write_scores_csv",
    "plot_scores",
]

logger = logging.getLogger(__name__)

_GEOMETRY_TOL = 1e-3  # mm / direction cosines


@dataclass(frozen=True)
class StructureScore:
    """One structure's scores. Volumes in mL; NaN where undefined (see ``note``)."""

    name: str
    pred_values: str
    ref_values: str
    dice: float
    hd95_mm: float
    pred_voxels: int
    ref_voxels: int
    pred_ml: float
    ref_ml: float
    note: str


#: CSV columns, in order.
SCORE_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(StructureScore))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|); NaN when both are empty."""
    p, g = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if p + g == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(pred & ref)) / (p + g)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    footprint = ndimage.generate_binary_structure(3, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th percentile of the pooled symmetric surface distances in mm (medpy ``hd95``).

    NaN when either mask is empty. Only the bounding box of both masks (plus one voxel) is
    processed, so big volumes with small structures stay cheap.
    """
    from scipy import ndimage

    if not pred.any() or not ref.any():
        return math.nan
    both = pred | ref
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(both.any(axis=others))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    # pad by one voxel so that masks touching the array border keep their border surface
    p = np.pad(pred[tuple(box)], 1)
    r = np.pad(ref[tuple(box)], 1)
    sp, sr = _surface(p), _surface(r)
    sampling = [float(s) for s in spacing_zyx]
    d_pr = ndimage.distance_transform_edt(~sr, sampling=sampling)[sp]
    d_rp = ndimage.distance_transform_edt(~sp, sampling=sampling)[sr]
    return float(np.percentile(np.hstack((d_pr, d_rp)), 95))


def _same_grid(a: Geometry, b: Geometry) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.spacing, b.spacing, atol=_GEOMETRY_TOL)
        and np.allclose(a.origin, b.origin, atol=_GEOMETRY_TOL)
        and np.allclose(a.direction, b.direction, atol=_GEOMETRY_TOL)
    )


def _name(pred_value: int, numbering: str) -> str:
    if numbering == "cdpdnet":
        from napari_cdpdnet.vocabulary.catalog import STRUCTURES

        if 1 <= pred_value <= len(STRUCTURES):
            return STRUCTURES[pred_value - 1].name
    return f"label {pred_value}"


def evaluate_labels(
    pred: np.ndarray, pred_geometry: Geometry, ref: np.ndarray, ref_geometry: Geometry,
    mapping: Mapping[int, Sequence[int]] | None = None, *, numbering: str = "cdpdnet",
) -> list[StructureScore]:
    """Scores per mapped structure.

    Args:
        pred, ref: ``[z, y, x]`` label maps on the same grid.
        pred_geometry, ref_geometry: their grids; they must agree (shape, spacing, origin,
            direction within 1e-3), because scores are computed on the source grid.
        mapping: pred value -> reference values forming the same structure. Default: every
            non-zero value present in either map, compared with itself.
        numbering: ``"cdpdnet"`` names pred values that are structure indices by structure;
            anything else gives ``label N``.

    Raises:
        InputError: different grids, or a mapping value that is not a positive integer.
    """
    if not _same_grid(pred_geometry, ref_geometry):
        raise InputError(
            "prediction and reference are on different grids "
            f"(shape {pred_geometry.shape} vs {ref_geometry.shape}, spacing {pred_geometry.spacing} "
            f"vs {ref_geometry.spacing}, origin {pred_geometry.origin} vs {ref_geometry.origin}); "
            "evaluate on the source grid: resample the prediction to the reference first"
        )
    if mapping is None:
        present = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
        mapping = {int(v): [int(v)] for v in present if v != 0}
    spacing_zyx = tuple(reversed(ref_geometry.spacing))
    voxel_ml = float(np.prod(ref_geometry.spacing)) / 1000.0
    rows = []
    for pv, rvs in mapping.items():
        if int(pv) <= 0 or any(int(r) <= 0 for r in rvs) or not rvs:
            raise InputError(f"mapping {pv}:{list(rvs)}: label values must be positive integers")
        p = pred == int(pv)
        g = np.isin(ref, [int(r) for r in rvs])
        np_, ng = int(p.sum()), int(g.sum())
        d = dice(p, g)
        h = hd95_mm(p, g, spacing_zyx)
        note = ""
        if np_ == 0 and ng == 0:
            note = "absent in both"
        elif np_ == 0:
            note = "prediction empty"
        elif ng == 0:
            note = "reference empty"
        rows.append(StructureScore(
            name=_name(int(pv), numbering), pred_values=str(int(pv)),
            ref_values="+".join(str(int(r)) for r in rvs), dice=d, hd95_mm=h,
            pred_voxels=np_, ref_voxels=ng, pred_ml=round(np_ * voxel_ml, 3),
            ref_ml=round(ng * voxel_ml, 3), note=note,
        ))
    return rows


def parse_pred_ref(items: Sequence[str]) -> dict[int, list[int]]:
    """``evaluate --map PRED:REF`` pairs: ``["6:5", "16:12,13,14", "liver:5"]`` →
    ``{6: [5], 16: [12, 13, 14]}`` (prediction value -> the reference values it is compared with).

    The prediction side may be a CDPDNet structure key or name instead of its index
    (:func:`~napari_cdpdnet.vocabulary.labelmaps.label_value`); the reference side is numbers.
    """
    from napari_cdpdnet.errors import VocabularyError
    from napari_cdpdnet.vocabulary.labelmaps import label_value

    out: dict[int, list[int]] = {}
    for item in items:
        left, sep, right = str(item).partition(":")
        if not sep or not left.strip() or not right.strip():
            raise InputError(f"--map {item!r}: expected PRED:REF, e.g. 6:5 or 16:12,13,14 or liver:5")
        try:
            pv = label_value(left)
        except (InputError, VocabularyError) as exc:
            raise InputError(f"--map {item!r}: {exc}") from None
        try:
            refs = [int(v) for v in right.split(",")]
        except ValueError:
            raise InputError(f"--map {item!r}: reference values must be whole numbers") from None
        if any(r <= 0 for r in refs):
            raise InputError(f"--map {item!r}: label values must be > 0 (0 is background)")
        if pv in out:
            raise InputError(f"--map {item!r}: prediction value {pv} is mapped twice")
        out[pv] = refs
    return out


def evaluate_files(
    pred: str | os.PathLike[str], ref: str | os.PathLike[str],
    mapping: Mapping[int, Sequence[int]] | None = None, *, numbering: str = "cdpdnet",
) -> list[StructureScore]:
    """Read two label map files (io.read_label_map) and score them."""
    from napari_cdpdnet.io.images import read_label_map

    p, pg = read_label_map(pred)
    r, rg = read_label_map(ref)
    return evaluate_labels(p, pg, r, rg, mapping, numbering=numbering)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_scores_csv(path: str | os.PathLike[str], rows: Sequence[StructureScore], *,
                     overwrite: bool = False) -> Path:
    """UTF-8 CSV with :data:`SCORE_COLUMNS`; undefined scores are empty cells. Atomic."""
    from napari_cdpdnet.fileutil import atomic_output

    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(SCORE_COLUMNS)
        for row in rows:
            w.writerow(_cell(v) for v in asdict(row).values())
    return Path(path)


def plot_scores(path: str | os.PathLike[str], rows: Sequence[StructureScore], *,
                title: str = "", overwrite: bool = False) -> Path:
    """Bar plot (PNG) of Dice and HD95 per structure; undefined values are left out."""
    matplotlib = import_extra("matplotlib", "train", "plotting scores (cdpdnet evaluate --plot)")
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from napari_cdpdnet.fileutil import atomic_output, full_suffix

    if full_suffix(Path(path)) not in (".png",):
        raise InputError(f"--plot {path}: the plot is written as PNG; use a .png name")
    names = [r.name for r in rows]
    y = np.arange(len(rows))
    fig = Figure(figsize=(10, max(2.5, 0.35 * len(rows) + 1.2)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    ax1.barh(y, [0 if math.isnan(r.dice) else r.dice for r in rows], color="#4c72b0")
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("Dice")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax2.barh(y, [0 if math.isnan(r.hd95_mm) else r.hd95_mm for r in rows], color="#dd8452")
    ax2.set_xlabel("HD95 (mm)")
    for i, r in enumerate(rows):
        if r.note:
            ax2.text(0, i, f" {r.note}", va="center", fontsize=8, color="0.3")
    if title:
        fig.suptitle(title)
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
