"""The structure whose probability dominates inside a mark (:mod:`.marks`).

This is the "segment by example" answer that needs nothing but the official checkpoint: run the
network for all 32 outputs with probabilities, average each structure's sigmoid map over the ROI
and rank. The chosen structure's mask is then cut down to the connected components the ROI
touches, so marking one kidney does not return both.

The mark itself, the :class:`~napari_cdpdnet.example.marks.ROI` of a click, box or scribble, is
in :mod:`napari_cdpdnet.example.marks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import Structure, structure

__all__ = [
    "Candidate",
    "Ranking",
    "FALLBACK_METHOD",
    "rank_by_probability",
    "restrict",
    "crop_around",
    "crop_geometry",
    "softmax_confidences",
]

logger = logging.getLogger(__name__)

#: How the fallback reports itself (the widget and the CLI print it).
FALLBACK_METHOD = "probability dominance (official checkpoint)"

# --------------------------------------------------------------------------- ranking
@dataclass(frozen=True)
class Candidate:
    """One ranked structure: ``score`` is the method's raw value (fallback: weighted mean
    probability inside the ROI), ``confidence`` its share in 0..1."""

    structure: Structure
    score: float
    confidence: float

    def __str__(self) -> str:
        return f"{self.structure.name} ({self.confidence:.0%})"


@dataclass(frozen=True)
class Ranking:
    """Structures ranked for one ROI, best first, and the method that ranked them."""

    candidates: tuple[Candidate, ...]
    method: str
    note: str = ""

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def top(self, n: int = 3) -> list[Candidate]:
        return list(self.candidates[:n])

    def describe(self, n: int = 3) -> str:
        """One line: method and the top ``n`` with confidences."""
        text = f"{self.method}: " + ", ".join(str(c) for c in self.top(n))
        return f"{text} — {self.note}" if self.note else text


def softmax_confidences(scores: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Softmax of ``scale × scores`` (float64, sums to 1)."""
    z = scale * np.asarray(scores, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def rank_by_probability(
    probabilities: Mapping[int, np.ndarray],
    roi: ROI,
    *,
    method: str = FALLBACK_METHOD,
) -> Ranking:
    """Rank structures by their (weighted) mean probability inside ``roi``.

    Args:
        probabilities: structure index → ``[z, y, x]`` sigmoid map, all on one grid (the
            pipeline's ``return_probabilities`` output); missing structures are not ranked.
        roi: the ROI on that grid.

    Confidence of structure s = score_s / (Σ scores + background), background being the weighted
    mean of 1 − max_s p_s: an ROI that mostly holds nothing any structure claims gives low
    confidences everywhere instead of a confident guess.

    Raises:
        InputError: no maps, maps of different shapes, or an ROI outside them.
    """
    if not probabilities:
        raise InputError("no probability maps to rank (run with return_probabilities=True)")
    shapes = {np.shape(p) for p in probabilities.values()}
    if len(shapes) != 1:
        raise InputError(f"probability maps have different shapes: {sorted(shapes)}")
    shape = shapes.pop()
    bounds, w = roi.weights(shape)
    total = float(w.sum())
    indices = sorted(probabilities)
    scores = np.empty(len(indices))
    peak = np.zeros(w.shape, dtype=np.float32)
    for i, s in enumerate(indices):
        p = np.asarray(probabilities[s][bounds], dtype=np.float32)
        scores[i] = float((p * w).sum()) / total
        np.maximum(peak, p, out=peak)
    background = float(((1.0 - peak) * w).sum()) / total
    conf = scores / max(scores.sum() + background, 1e-12)
    order = np.argsort(-scores, kind="stable")
    cands = tuple(Candidate(structure(indices[i]), float(scores[i]), float(conf[i])) for i in order)
    note = ""
    if background > 0.5:
        note = f"most of the ROI is claimed by no structure (background {background:.0%})"
    logger.info("ROI %s ranked by %s: %s", roi.describe(), method, ", ".join(map(str, cands[:3])))
    return Ranking(cands, method, note)


# --------------------------------------------------------------------------- masks
def restrict(
    mask: np.ndarray,
    roi: ROI,
    *,
    geometry: Geometry | None = None,
    nearest: bool = True,
) -> tuple[np.ndarray, bool]:
    """Only the connected components of ``mask`` that touch ``roi`` (26-connectivity).

    Returns ``(mask, touched)``. When no component touches the ROI and ``nearest`` is true, the
    component closest to the ROI centre is kept (distances in mm when ``geometry`` is given) and
    ``touched`` is False; otherwise the result is empty.
    """
    from scipy import ndimage

    mask = np.asarray(mask) != 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return mask, False
    hit = np.unique(labels[roi.mask(mask.shape)])
    hit = hit[hit > 0]
    if len(hit):
        return np.isin(labels, hit), True
    if not nearest:
        return np.zeros_like(mask), False
    idx = np.argwhere(labels > 0)
    centre = roi.centre()
    if geometry is not None:
        d = np.linalg.norm(geometry.index_to_world(idx) - geometry.index_to_world(centre), axis=1)
    else:
        d = np.linalg.norm(idx - centre, axis=1)
    keep = labels[tuple(idx[int(np.argmin(d))])]
    return labels == keep, False


def crop_around(roi: ROI, geometry: Geometry, margin_mm: float) -> tuple[slice, slice, slice]:
    """Voxel slices of the ROI's bounding box grown by ``margin_mm`` on every side, clipped."""
    bounds = roi.bounds(geometry.shape)
    spacing_zyx = np.asarray(geometry.spacing)[::-1]
    grow = np.ceil(max(margin_mm, 0.0) / spacing_zyx).astype(int)
    return tuple(  # type: ignore[return-value]
        slice(max(0, s.start - g), min(n, s.stop + g))
        for s, g, n in zip(bounds, grow, geometry.shape, strict=True)
    )


def crop_geometry(geometry: Geometry, crop: Sequence[slice]) -> Geometry:
    """Geometry of ``array[crop]``: same spacing and direction, origin at the crop's first voxel."""
    start = np.array([s.start for s in crop], float)
    shape = tuple(s.stop - s.start for s in crop)
    return Geometry(geometry.spacing, tuple(geometry.index_to_world(start)), geometry.direction, shape,
                    geometry.dicom)
