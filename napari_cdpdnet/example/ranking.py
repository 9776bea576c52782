"""Regions of interest, and the structure whose probability dominates inside one.

This is the "segment by example" answer that needs nothing but the official checkpoint: run the
network for all 32 outputs with probabilities, average each structure's sigmoid map over the ROI
and rank. The chosen structure's mask is then cut down to the connected components the ROI
touches, so marking one kidney does not return both.

An ROI is always stored in voxel indices ``[z, y, x]`` of the image it was drawn on; boxes and
clicks given in patient LPS millimetres are converted through the
:class:`~napari_cdpdnet.geometry.Geometry` (which handles flipped and oblique grids).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import Structure, structure

__all__ = [
    "ROI",
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

RoiKind = Literal["box", "scribble", "click"]


@dataclass(frozen=True)
class ROI:
    """A marked region: a box, a scribble (voxel list) or a click (one voxel), in ``[z, y, x]``.

    ``points`` holds the two inclusive corners (lowest, highest) for a box, every marked voxel
    for a scribble and the one voxel for a click. Use the constructors.
    """

    kind: RoiKind
    points: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        pts = np.asarray(self.points)
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
            raise InputError(f"{self.kind} ROI needs [z, y, x] voxel points, got shape {pts.shape}")
        object.__setattr__(self, "points", np.rint(pts).astype(np.int64))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def box(cls, corner: Sequence[float], opposite: Sequence[float]) -> ROI:
        """Box between two opposite ``[z, y, x]`` voxel corners (both inclusive, any order)."""
        a, b = np.rint(np.asarray(corner, float)), np.rint(np.asarray(opposite, float))
        return cls("box", np.stack([np.minimum(a, b), np.maximum(a, b)]))

    @classmethod
    def box_mm(cls, corner: Sequence[float], opposite: Sequence[float], geometry: Geometry) -> ROI:
        """Box between two opposite LPS corners (mm): the voxel box covering all 8 corners."""
        a, b = np.asarray(corner, float), np.asarray(opposite, float)
        corners = np.array([[x, y, z] for x in (a[0], b[0]) for y in (a[1], b[1]) for z in (a[2], b[2])])
        idx = geometry.world_to_index(corners)
        return cls.box(idx.min(axis=0), idx.max(axis=0))

    @classmethod
    def scribble(cls, voxels: Sequence[Sequence[float]] | np.ndarray) -> ROI:
        """A scribble: every marked ``[z, y, x]`` voxel (duplicates are dropped)."""
        pts = np.unique(np.rint(np.asarray(voxels, float)).astype(np.int64).reshape(-1, 3), axis=0)
        return cls("scribble", pts)

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> ROI:
        """A scribble from a painted mask (non-zero voxels)."""
        pts = np.argwhere(np.asarray(mask) != 0)
        if len(pts) == 0:
            raise InputError("the scribble mask is empty: paint at least one voxel")
        return cls("scribble", pts)

    @classmethod
    def click(cls, voxel: Sequence[float]) -> ROI:
        """One ``[z, y, x]`` voxel."""
        return cls("click", np.asarray(voxel, float).reshape(1, 3))

    @classmethod
    def click_mm(cls, point: Sequence[float], geometry: Geometry) -> ROI:
        """The voxel nearest to an LPS point (mm)."""
        return cls.click(geometry.world_to_index(np.asarray(point, float)))

    # ------------------------------------------------------------------ geometry
    def check(self, shape: Sequence[int]) -> ROI:
        """Raise InputError unless the ROI lies (a box: at least partly) inside ``shape``."""
        shape_a = np.asarray(shape)
        if self.kind == "box":
            lo, hi = self.points
            if np.any(hi < 0) or np.any(lo >= shape_a):
                raise InputError(f"the box {lo.tolist()}..{hi.tolist()} (z, y, x) lies outside the image {tuple(shape)}")
        else:
            bad = np.any((self.points < 0) | (self.points >= shape_a), axis=1)
            if bad.all() or (self.kind == "click" and bad.any()):
                raise InputError(f"the {self.kind} lies outside the image {tuple(shape)} (z, y, x voxels)")
        return self

    def bounds(self, shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """The ROI's voxel bounding box, clipped to ``shape``."""
        self.check(shape)
        lo = np.clip(self.points.min(axis=0), 0, np.asarray(shape) - 1)
        hi = np.clip(self.points.max(axis=0), 0, np.asarray(shape) - 1)
        return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        """Boolean ``[z, y, x]`` mask of the ROI's voxels (clipped to ``shape``)."""
        out = np.zeros(tuple(shape), dtype=bool)
        if self.kind == "box":
            out[self.bounds(shape)] = True
        else:
            self.check(shape)
            pts = self.points[np.all((self.points >= 0) & (self.points < np.asarray(shape)), axis=1)]
            out[tuple(pts.T)] = True
        return out

    def weights(self, shape: Sequence[int]) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Voxel weights for averaging inside the ROI: ``(bounds, weights over bounds)``.

        A box is weighted towards its centre (a separable tent, 1 at the centre, ¼ at the faces):
        people draw boxes around the structure they mean, so the corners mostly hold neighbours.
        Scribble and click voxels weigh 1 each.
        """
        bounds = self.bounds(shape)
        if self.kind == "box":
            profiles = []
            for s in bounds:
                n = s.stop - s.start
                t = np.abs(np.linspace(-1.0, 1.0, n)) if n > 1 else np.zeros(1)
                profiles.append(1.0 - 0.75 * t ** 2 if n > 1 else np.ones(1))
            w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
            return bounds, w.astype(np.float32)
        return bounds, self.mask(shape)[bounds].astype(np.float32)

    def shifted(self, offset: Sequence[int]) -> ROI:
        """The same ROI in a crop starting at voxel ``offset`` of the original image."""
        return ROI(self.kind, self.points - np.asarray(offset, dtype=np.int64)[None, :])

    def centre(self) -> np.ndarray:
        """Mean ``[z, y, x]`` of the ROI (box: its centre)."""
        return self.points.mean(axis=0)

    def describe(self) -> str:
        if self.kind == "box":
            lo, hi = self.points
            return f"box z {lo[0]}..{hi[0]}, y {lo[1]}..{hi[1]}, x {lo[2]}..{hi[2]} (voxels)"
        if self.kind == "click":
            return "click at [z, y, x] = " + str(self.points[0].tolist())
        return f"scribble of {len(self.points)} voxels"


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
