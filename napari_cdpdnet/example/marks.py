"""Marks a user makes to point at a structure: a click, a box or a scribble (segment by example).

A mark is always stored in voxel indices ``[z, y, x]`` of the image it was drawn on; boxes and
clicks given in patient LPS millimetres are converted through the
:class:`~napari_cdpdnet.geometry.Geometry` (which handles flipped and oblique grids). Not to be
confused with ``SegmentationSettings.box``, the LPS box that only restricts where a named
segmentation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry

__all__ = ["ROI", "RoiKind"]

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
