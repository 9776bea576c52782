"""Surface meshes (STL) of label maps, in patient coordinates, for 3-D printing and planning tools.

Vertices are written in LPS millimetres, the convention 3D Slicer assumes for STL files, so a
mesh lines up with the CT when loaded beside it.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from napari_cdpdnet.geometry import Geometry

__all__ = ["label_mesh", "write_stl"]

logger = logging.getLogger(__name__)


def label_mesh(
    labels: np.ndarray, value: int, geometry: Geometry, *, smoothing_sigma: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of ``labels == value``.

    Args:
        labels: ``[z, y, x]`` label map.
        value: the label to mesh.
        geometry: grid of ``labels``; vertices come out in LPS mm.
        smoothing_sigma: Gaussian smoothing (voxels) of the mask before meshing; 0 keeps the
            exact voxel boundary (staircase), ~1 gives a smoother surface.

    Returns:
        ``(vertices [N, 3] LPS mm, faces [M, 3] int)``; the faces' winding gives outward normals.
    """
    from scipy import ndimage
    from skimage.measure import marching_cubes

    mask = np.asarray(labels) == value
    if not mask.any():
        raise ValueError(f"label {value} is empty; there is no surface to mesh")
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    lo = np.array([zs[0], ys[0], xs[0]]) - 2
    hi = np.array([zs[-1], ys[-1], xs[-1]]) + 3
    crop = np.pad(mask, 2)[lo[0] + 2 : hi[0] + 2, lo[1] + 2 : hi[1] + 2, lo[2] + 2 : hi[2] + 2]
    field = crop.astype(np.float32)
    if smoothing_sigma > 0:
        field = ndimage.gaussian_filter(field, smoothing_sigma)
    verts, faces, _, _ = marching_cubes(field, level=0.5)
    verts_zyx = verts + lo
    world = geometry.index_to_world(verts_zyx)
    # skimage winds faces clockwise seen from outside in index space; keep the outward (CCW)
    # winding in LPS, which depends on the sign of the index -> world Jacobian.
    jacobian = (geometry.direction_matrix * np.asarray(geometry.spacing))[:, ::-1]
    if np.linalg.det(jacobian) > 0:
        faces = faces[:, ::-1]
    return world, faces.astype(np.int64)


def write_stl(path: str | Path, vertices: np.ndarray, faces: np.ndarray, *, overwrite: bool = False,
              name: str = "cdpdnet") -> Path:
    """Write a binary STL file (atomically)."""
    from napari_cdpdnet.fileutil import atomic_output

    tri = np.asarray(vertices, np.float64)[np.asarray(faces)]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    records = np.zeros(len(tri), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    records["n"] = normals
    records["v"] = tri
    header = f"{name} LPS mm napari-cdpdnet".encode("ascii", "replace")[:80].ljust(80, b" ")
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(struct.pack("<I", len(tri)))
        fh.write(records.tobytes())
    logger.info("wrote %d triangles to %s", len(tri), path)
    return Path(path)
