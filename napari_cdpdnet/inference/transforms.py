"""The official CDPDNet preprocessing (SPEC §10) and its inverse, without MONAI's memory cost.

The official test pipeline (MONAI 0.9) turns a CT into the model's space with
``Orientation("RAS") → Spacing(1.5 mm, bilinear, border) → ScaleIntensityRange(−175…250 HU → 0…1,
clip) → CropForeground(image > 0)`` and maps predictions back with ``Invertd`` (nearest). This module
reproduces that chain exactly (``tests/test_transforms.py`` compares it with MONAI) but

* composes orientation and resampling into **one** affine index map, so no flipped/permuted or
  float64 copy of the (possibly 512×512×600) source is ever made;
* inverts a single merged ``uint8`` label map (nearest interpolation picks the same source voxel for
  every channel, so merge-then-invert equals invert-then-merge) in slabs, with a separable fast path
  for the usual axis-aligned scans.

Grids and conventions
    Source arrays are ``[z, y, x]`` with a :class:`~napari_cdpdnet.geometry.Geometry`. Preprocessed
    arrays are ``[X, Y, Z]`` = ``[D0, D1, D2]`` in RAS order (index grows towards the patient's Right,
    Anterior, Superior), 1.5 mm, as the model sees them. ``Preprocessed.affine`` maps ``(X, Y, Z)``
    indices of the cropped array to RAS millimetres (MONAI's convention).

What we checked against MONAI (SPEC §17)
    ``compute_shape_offset`` (output shape ``round(extent / 1.5 + 1)``, half-to-even) is the same in
    MONAI 0.9.0 and 1.6.1; the offset rule differs only when no input corner maps to the output
    minimum, which cannot happen here because ``Spacing(diagonal=False)`` keeps the oriented direction
    matrix, so the resampling is a per-axis zoom anchored at oriented voxel 0. The Gaussian blending
    map *did* change (MONAI 1.1); see :mod:`napari_cdpdnet.inference.sliding_window`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import LPS_TO_RAS, Geometry

__all__ = [
    "Preprocessed",
    "IndexBox",
    "TARGET_SPACING",
    "HU_WINDOW",
    "preprocess",
    "preprocess_labels",
    "invert_labels",
    "invert_probabilities",
    "box_to_preprocessed",
]

logger = logging.getLogger(__name__)

#: Isotropic voxel size (mm) of the model's grid (SPEC §10 step 3).
TARGET_SPACING = 1.5
#: HU window mapped linearly onto 0…1 and clipped (SPEC §10 step 4).
HU_WINDOW = (-175.0, 250.0)

#: ``(slice_X, slice_Y, slice_Z)`` into a preprocessed array.
IndexBox = tuple[slice, slice, slice]

# Source voxels mapped per slab when inverting (bounds the size of temporary index arrays).
_SLAB_VOXELS = 1 << 22
_ORTHO_TOL = 1e-4


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """A CT in the model's space plus everything needed to map results back.

    Attributes:
        image: float32 ``[X, Y, Z]`` (RAS, 1.5 mm), windowed to 0…1, cropped to the foreground.
        affine: 4×4 map from ``(X, Y, Z)`` indices of ``image`` to RAS mm.
        resampled_shape: shape of the 1.5 mm grid before the foreground crop.
        resampled_affine: 4×4 map from indices of that uncropped grid to RAS mm.
        crop_start: first voxel of the crop in the uncropped grid (``crop_start + image.shape``
            is the end).
        source: geometry of the original ``[z, y, x]`` array.
    """

    image: np.ndarray
    affine: np.ndarray
    resampled_shape: tuple[int, int, int]
    resampled_affine: np.ndarray
    crop_start: tuple[int, int, int]
    source: Geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(X, Y, Z)`` of the cropped model-space array."""
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def source_to_resampled(self) -> np.ndarray:
        """4×4 map from source ``[z, y, x]`` indices to (uncropped) model-grid ``(X, Y, Z)`` indices."""
        return np.linalg.solve(self.resampled_affine, self.source.affine_ras()) @ _ZYX_TO_XYZ


# Homogeneous permutation between [z, y, x] and (x, y, z) index order (its own inverse).
_ZYX_TO_XYZ = np.eye(4)[[2, 1, 0, 3]]


# --------------------------------------------------------------------------- grid computation
def _check_geometry(array: np.ndarray, geometry: Geometry, name: str = "array") -> None:
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3-D [z, y, x] volume, got {array.ndim}-D {array.shape}")
    if tuple(array.shape) != geometry.shape:
        raise InputError(
            f"{name}: shape {tuple(array.shape)} does not match its geometry {geometry.shape}; "
            "pass the geometry read with this array"
        )
    if min(array.shape) < 1:
        raise InputError(f"{name}: empty volume {array.shape}")
    spacing = np.asarray(geometry.spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{name}: spacing {geometry.spacing} mm must be positive and finite")
    d = geometry.direction_matrix
    if not np.allclose(d.T @ d, np.eye(3), atol=_ORTHO_TOL):
        raise InputError(
            f"{name}: direction matrix {geometry.direction} is not orthonormal (sheared grid); "
            "resample the image to an orthogonal grid first"
        )


def _model_grid(geometry: Geometry) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """The official 1.5 mm RAS grid of a source geometry.

    Returns ``(grid_to_source, shape, affine)``: the 4×4 map from grid ``(X, Y, Z)`` indices to
    source ``[z, y, x]`` indices, and the shape and RAS affine of the grid that MONAI's
    ``Orientation("RAS")`` followed by ``Spacing(pixdim=1.5, diagonal=False)`` produces.
    """
    from nibabel import orientations as nio

    src_affine = geometry.affine_ras()
    size_xyz = np.asarray(geometry.size_xyz)
    ornt = nio.ornt_transform(nio.io_orientation(src_affine), nio.axcodes2ornt("RAS"))
    oriented_to_source = nio.inv_ornt_aff(ornt, size_xyz)
    oriented_affine = src_affine @ oriented_to_source
    oriented_size = size_xyz[np.argsort(ornt[:, 0])]
    oriented_spacing = np.linalg.norm(oriented_affine[:3, :3], axis=0)
    # Spacing(diagonal=False): same direction columns, new zoom, output anchored at oriented voxel 0
    # (the input corner that maps to the output minimum, see compute_shape_offset).
    affine = oriented_affine.copy()
    affine[:3, :3] = oriented_affine[:3, :3] / oriented_spacing * TARGET_SPACING
    extent = (oriented_size - 1.0) * oriented_spacing / TARGET_SPACING
    shape = tuple(int(v) for v in np.round(extent + 1.0))
    zoom = np.diag(np.append(TARGET_SPACING / oriented_spacing, 1.0))
    grid_to_source = _ZYX_TO_XYZ @ oriented_to_source @ zoom
    return grid_to_source, shape, affine  # type: ignore[return-value]


def _window(image: np.ndarray) -> None:
    """``ScaleIntensityRange(a_min=−175, a_max=250, b_min=0, b_max=1, clip=True)`` in place (float32)."""
    a_min, a_max = HU_WINDOW
    image -= np.float32(a_min)
    image /= np.float32(a_max - a_min)
    np.clip(image, 0.0, 1.0, out=image)


def _foreground_box(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``CropForeground(select_fn=x > 0, margin=0)``: start and end of the voxels above zero."""
    start, end = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(image > 0, axis=others))
        if hit.size == 0:
            return (0, 0, 0), (0, 0, 0)
        start.append(int(hit[0]))
        end.append(int(hit[-1]) + 1)
    return tuple(start), tuple(end)


# --------------------------------------------------------------------------- resampling kernels
def _linear(volume: np.ndarray, matrix: np.ndarray, offset: np.ndarray,
            out_shape: Sequence[int]) -> np.ndarray:
    """Trilinear sampling ``out[o] = volume(matrix @ o + offset)``, edge values beyond the border.

    Matches ``grid_sample(bilinear, padding_mode="border", align_corners=False)`` on voxel-centre
    coordinates, which is what MONAI's ``Spacing``/``Invertd`` do. Computed in float64, stored float32.
    """
    from scipy import ndimage

    out = np.empty(tuple(out_shape), dtype=np.float32)
    ndimage.affine_transform(volume, matrix, offset, output_shape=tuple(out_shape), output=out,
                             order=1, mode="nearest", prefilter=False)
    return out


def _axis_permutation(matrix: np.ndarray) -> np.ndarray | None:
    """For a matrix with one non-zero per row and column: the output axis driving each input axis."""
    nz = np.abs(matrix) > 1e-9 * np.abs(matrix).max()
    if np.all(nz.sum(axis=0) == 1) and np.all(nz.sum(axis=1) == 1):
        return np.argmax(nz, axis=1)
    return None


def _nearest(volume: np.ndarray, matrix: np.ndarray, offset: np.ndarray,
             out_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour sampling with the border rule: ``out[o] = volume[clip(rint(M o + t))]``.

    Rounds half to even like ``grid_sample(mode="nearest")``. Axis-aligned maps are done per axis
    (three 1-D index vectors, one gather); oblique ones in slabs of output voxels.
    """
    out_shape = tuple(int(s) for s in out_shape)
    limits = np.asarray(volume.shape) - 1
    perm = _axis_permutation(matrix)
    if perm is not None:
        # input axis k is driven by output axis perm[k] alone
        index = []
        for k in range(3):
            o = np.arange(out_shape[perm[k]], dtype=np.float64)
            c = np.rint(matrix[k, perm[k]] * o + offset[k])
            index.append(np.clip(c, 0, limits[k]).astype(np.intp))
        gathered = volume[np.ix_(*index)]  # axes ordered like the input
        return np.ascontiguousarray(gathered.transpose(np.argsort(perm)))
    out = np.empty(out_shape, dtype=volume.dtype)
    flat = out.reshape(-1)
    plane = out_shape[1] * out_shape[2]
    step = max(1, _SLAB_VOXELS // plane)
    grid_yz = np.indices(out_shape[1:], dtype=np.float64).reshape(2, -1)
    for start in range(0, out_shape[0], step):
        n = min(step, out_shape[0] - start)
        o0 = np.repeat(np.arange(start, start + n, dtype=np.float64), plane)
        o12 = np.tile(grid_yz, n)
        idx = []
        for k in range(3):
            c = matrix[k, 0] * o0 + matrix[k, 1] * o12[0] + matrix[k, 2] * o12[1] + offset[k]
            idx.append(np.clip(np.rint(c), 0, limits[k]).astype(np.intp))
        flat[start * plane:(start + n) * plane] = volume[tuple(idx)]
    return out


# --------------------------------------------------------------------------- forward chain
def preprocess(array: np.ndarray, geometry: Geometry) -> Preprocessed:
    """Map a ``[z, y, x]`` HU volume into the model's space exactly as the official test pipeline.

    Orientation to RAS, 1.5 mm trilinear resampling (edge values beyond the border), window
    −175…250 HU → 0…1 with clipping, crop to the voxels above 0 (i.e. above −175 HU).

    Raises:
        InputError: not a 3-D volume matching ``geometry``, non-finite values, a sheared grid, or
            nothing above −175 HU (no body to segment).
    """
    array = np.asarray(array)
    _check_geometry(array, geometry, "CT")
    if array.dtype.kind not in "iuf":
        raise InputError(f"CT: voxel type {array.dtype} is not numeric HU")
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError("CT: the volume contains NaN or infinite values; fix or mask them first")
    if lo > -500.0:
        logger.warning(
            "CT values range %.0f…%.0f: no air below −500 HU; is this a CT in Hounsfield units "
            "(not rescaled/normalised)?", lo, hi)

    # grid (X, Y, Z) index -> oriented index (per-axis zoom) -> source (x, y, z) -> source [z, y, x]
    to_source, shape, affine = _model_grid(geometry)
    resampled = _linear(array, to_source[:3, :3], to_source[:3, 3], shape)
    _window(resampled)
    start, end = _foreground_box(resampled)
    if end == (0, 0, 0):
        raise InputError(
            f"CT: no voxel above {HU_WINDOW[0]:.0f} HU (the official foreground threshold); "
            "is this a CT in Hounsfield units?"
        )
    image = np.ascontiguousarray(resampled[start[0]:end[0], start[1]:end[1], start[2]:end[2]])
    del resampled
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=float) + affine[:3, 3]
    logger.debug("preprocess: %s %s mm -> resampled %s -> cropped %s at %s", geometry.shape,
                 geometry.spacing, shape, image.shape, start)
    return Preprocessed(image=image, affine=crop_affine, resampled_shape=shape,
                        resampled_affine=affine, crop_start=start, source=geometry)


def preprocess_labels(labels: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """A label map on the source grid, taken into ``pre``'s model space as the official label chain.

    The official training/evaluation pipeline resamples labels with nearest interpolation and applies
    the image's foreground crop (SPEC §10). Returns ``[X, Y, Z]`` with ``labels``' dtype.
    """
    labels = np.asarray(labels)
    _check_geometry(labels, pre.source, "label map")
    to_source = np.linalg.inv(pre.source_to_resampled())
    start = np.asarray(pre.crop_start, dtype=float)
    offset = to_source[:3, :3] @ start + to_source[:3, 3]
    return _nearest(labels, to_source[:3, :3], offset, pre.shape)


# --------------------------------------------------------------------------- inverse chain
def _padded_crop(values: np.ndarray, pre: Preprocessed) -> tuple[np.ndarray, np.ndarray]:
    """``values`` with one voxel of zeros on every side where the crop is inside the 1.5 mm grid.

    The official inverse zero-pads the crop back to the full 1.5 mm grid and then samples it with
    the border rule. Sampling this padded crop with the border rule gives the same values: beyond a
    padded side everything is zero anyway, and unpadded sides are the grid's own border. Returns the
    padded array and the index shift (full grid index − padded index).
    """
    if tuple(values.shape) != pre.shape:
        raise InputError(f"model-space array has shape {values.shape}, expected {pre.shape}")
    before = [1 if s > 0 else 0 for s in pre.crop_start]
    after = [1 if s + n < full else 0
             for s, n, full in zip(pre.crop_start, pre.shape, pre.resampled_shape, strict=True)]
    padded = np.pad(values, list(zip(before, after, strict=True)))
    shift = np.asarray(pre.crop_start) - np.asarray(before)
    return padded, shift


def _source_to_padded(pre: Preprocessed, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = pre.source_to_resampled()
    return m[:3, :3], m[:3, 3] - shift


def invert_labels(labels: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """Map a model-space label map back onto the source ``[z, y, x]`` grid (nearest, as ``Invertd``).

    Undo the crop (zeros outside), resample from the 1.5 mm grid to the source grid with nearest
    interpolation and the border rule, undo the orientation. The dtype is kept (use uint8).
    """
    padded, shift = _padded_crop(np.asarray(labels), pre)
    matrix, offset = _source_to_padded(pre, shift)
    return _nearest(padded, matrix, offset, pre.source.shape)


def invert_probabilities(probabilities: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """Map a model-space probability map back onto the source grid with trilinear interpolation.

    Not part of the official pipeline (which never inverts soft outputs); same chain as
    :func:`invert_labels` with linear interpolation. Returns float32 ``[z, y, x]``.
    """
    padded, shift = _padded_crop(np.asarray(probabilities, dtype=np.float32), pre)
    matrix, offset = _source_to_padded(pre, shift)
    return _linear(padded, matrix, offset, pre.source.shape)


# --------------------------------------------------------------------------- regions of interest
def box_to_preprocessed(box_lps_mm: Sequence[Sequence[float]], pre: Preprocessed) -> IndexBox:
    """The index box of ``pre.image`` covering a box given by two opposite LPS corners (mm).

    The box's 8 corners are mapped into the model grid; the result holds every voxel whose centre
    lies within their bounding box, clipped to the image.

    Raises:
        InputError: malformed corners, or a box that misses the image's foreground crop.
    """
    try:
        corners = np.asarray(box_lps_mm, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"ROI {box_lps_mm!r}: expected two (x, y, z) LPS corners in mm") from exc
    if corners.shape != (2, 3) or not np.all(np.isfinite(corners)):
        raise InputError(f"ROI {box_lps_mm!r}: expected two finite (x, y, z) LPS corners in mm")
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    pts = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                    for z in (lo[2], hi[2])]).T
    idx = np.linalg.solve(pre.affine, LPS_TO_RAS @ pts)[:3]
    eps = 1e-6
    start = np.maximum(np.ceil(idx.min(axis=1) - eps), 0).astype(int)
    stop = np.minimum(np.floor(idx.max(axis=1) + eps) + 1, pre.shape).astype(int)
    if np.any(stop <= start):
        raise InputError(
            f"ROI {lo.tolist()}…{hi.tolist()} mm (LPS) does not overlap the scanned body "
            "(the part of the image above −175 HU); check the corners' coordinates and sign "
            "convention (LPS: x to the patient's left, y posterior, z superior)"
        )
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    return box  # type: ignore[return-value]
