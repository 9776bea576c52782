"""Helpers for the ROI tests: the real TotalSegmentator example, re-gridded without moving the patient."""

from __future__ import annotations

import numpy as np

from napari_cdpdnet.geometry import Geometry


def flipped(array: np.ndarray, geometry: Geometry, axes: tuple[int, ...] = (0, 1, 2)) -> tuple[np.ndarray, Geometry]:
    """The same patient stored with the array axes ``axes`` (0 = z, 1 = y, 2 = x) reversed.

    The direction columns of those axes are negated and the origin moves to the voxel that is now
    first, so every voxel keeps its LPS position.
    """
    index = [slice(None)] * 3
    corner = np.zeros(3)
    direction = geometry.direction_matrix.copy()
    for a in axes:
        index[a] = slice(None, None, -1)
        corner[a] = geometry.shape[a] - 1
        direction[:, 2 - a] *= -1  # direction columns are in (x, y, z) order
    origin = geometry.index_to_world(corner)
    return np.ascontiguousarray(array[tuple(index)]), Geometry(
        geometry.spacing, tuple(origin), tuple(direction.ravel()), geometry.shape)


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=float)
    k /= np.linalg.norm(k)
    t = np.deg2rad(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def oblique(arrays: list[tuple[np.ndarray, float, bool]], geometry: Geometry, rot: np.ndarray) -> tuple[list[np.ndarray], Geometry]:
    """The same patient resampled onto a grid whose axes are rotated by ``rot`` (same spacing).

    ``arrays`` are ``(array, outside value, is_label)``: labels use nearest neighbour, images
    linear interpolation. The new grid covers the whole old image.
    """
    import SimpleITK as sitk

    direction = rot @ geometry.direction_matrix
    spacing = np.asarray(geometry.spacing)
    nz, ny, nx = geometry.shape
    corners = np.array([[z, y, x] for z in (0, nz - 1) for y in (0, ny - 1) for x in (0, nx - 1)], float)
    world = geometry.index_to_world(corners)
    local = world @ direction  # coordinates along the new axes (columns of direction)
    lo, hi = local.min(axis=0), local.max(axis=0)
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    origin = direction @ lo
    new = Geometry(tuple(spacing), tuple(origin), tuple(direction.ravel()), tuple(int(v) for v in size[::-1]))
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    new.apply_to(ref)
    out = []
    for array, outside, is_label in arrays:
        image = geometry.to_sitk(array)
        res = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
                            float(outside), image.GetPixelID())
        out.append(sitk.GetArrayFromImage(res))
    return out, new
