"""A small cohort for tests and the cohort benchmark: crops of the real example CT in a folder tree.

Every crop is at most 40 voxels (3 mm) along each axis, so on the 1.5 mm model grid it is one
96³ window: a case costs one window of the tiny model. The tree holds NIfTI, NRRD and MHA files
in sub-folders, a DICOM series written with pydicom from a crop, one damaged file, and things
that are not cases (a text file, a hidden folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from napari_cdpdnet.geometry import Geometry

#: name → (z, y, x) start of a crop of the 30×101×122 example CT, and its size.
CROPS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "a.nii.gz": ((0, 30, 40), (30, 40, 40)),
    "sub/b.nrrd": ((0, 40, 30), (30, 36, 40)),
    "sub/deeper/c.mha": ((5, 30, 60), (24, 40, 36)),
    "d.nii.gz": ((0, 50, 50), (16, 30, 30)),
    "e/e.nii.gz": ((10, 20, 70), (20, 40, 40)),
}
DICOM_CROP = ((0, 35, 45), (12, 36, 36))
BAD = "broken/scan.nii.gz"


def crop(array: np.ndarray, geometry: Geometry, start, size) -> tuple[np.ndarray, Geometry]:
    """A sub-volume and its geometry (same spacing and direction, origin moved)."""
    z, y, x = start
    dz, dy, dx = size
    part = np.ascontiguousarray(array[z:z + dz, y:y + dy, x:x + dx])
    origin = geometry.index_to_world(np.array([[z, y, x]], float))[0]
    return part, Geometry(geometry.spacing, tuple(origin), geometry.direction, part.shape)


def make_cohort(root: Path, example_ct: Path) -> dict[str, Path]:
    """Write the cohort under ``root``; returns name → path of every case (bad one included)."""
    from dicom_synth import write_series

    from napari_cdpdnet.io import write_image
    from napari_cdpdnet.io.images import read_ct

    ct = read_ct(example_ct)
    out: dict[str, Path] = {}
    for name, (start, size) in CROPS.items():
        part, geometry = crop(ct.array, ct.geometry, start, size)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, part, geometry)
        out[name] = path
    part, geometry = crop(ct.array, ct.geometry, *DICOM_CROP)
    d = np.asarray(geometry.direction).reshape(3, 3)  # columns: x, y, z axes in LPS
    origin = np.asarray(geometry.origin)
    sx, sy, sz = geometry.spacing
    series = root / "patient9" / "ct"
    write_series(series, part, positions=[list(origin + k * sz * d[:, 2]) for k in range(part.shape[0])],
                 row_dir=d[:, 0], col_dir=d[:, 1], pixel_spacing_xy=(sx, sy), description="crop")
    out["patient9/ct"] = series
    bad = root / BAD
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"\x1f\x8b not really a NIfTI file")
    out[BAD] = bad
    (root / "notes.txt").write_text("not a case")
    hidden = root / ".cache"
    hidden.mkdir()
    shutil.copy(out["a.nii.gz"], hidden / "copy.nii.gz")  # hidden: never a case
    return out


#: Label map each case becomes under the output folder (mirrored tree).
def expected_outputs(out: Path) -> dict[str, Path]:
    names = {name: out / (name.split(".")[0] + ".nii.gz") for name in CROPS}
    names["patient9/ct"] = out / "patient9" / "ct.nii.gz"
    names[BAD] = out / "broken" / "scan.nii.gz"
    return names
