"""napari writer (npe2 contribution): save a Labels layer as NIfTI, NRRD or MHA on the CT's grid.

The geometry comes from ``metadata["geometry"]`` (set by this plugin's reader and segmentation
widget), so the file lines up exactly with the source CT. A Labels layer without it (drawn on an
image opened by another plugin) is written with the geometry its own scale/translate/rotate/affine
describe in napari world coordinates, which this plugin takes to be LPS millimetres in
``(z, y, x)`` order; a warning says so.

Overwriting: napari's save dialog already asks before replacing a file, so this writer replaces
the file it was given; the write itself is atomic (no partial file on error).

A Labels layer whose CT was read from a DICOM series can also be saved as DICOM-SEG (``.dcm``,
:func:`write_labels_dicom_seg`): values 1..32 of layers made by this plugin (``metadata["cdpdnet"]``)
carry the vocabulary's names and SNOMED codes, other values become generic ``label N`` segments;
label values listed in ``metadata["edited_labels"]`` are declared SEMIAUTOMATIC. The file is read
back and compared before it appears (:func:`napari_cdpdnet.export.export_dicom_seg`: the export
registry's DICOM-SEG writer and staging). New single-file label-map formats are added in
:data:`WRITABLE_SUFFIXES`; this writer saves exactly the file napari names (no table beside it),
the structure table's Export and the CLI write the full set through ``export_segmentation``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.io import write_label_map

__all__ = ["write_labels", "write_labels_dicom_seg", "geometry_for_layer", "WRITABLE_SUFFIXES"]

logger = logging.getLogger(__name__)

#: What the napari writer offers (declared identically in napari.yaml).
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

_ZYX_TO_XYZ = np.eye(4)[[2, 1, 0, 3]]


def _layer_affine_zyx(shape: tuple[int, ...], attributes: Mapping[str, Any]) -> np.ndarray:
    """The layer's data → world 4×4 matrix in (z, y, x) order, composed as napari does."""
    ndim = len(shape)
    scale = np.asarray(attributes.get("scale", np.ones(ndim)), float)
    translate = np.asarray(attributes.get("translate", np.zeros(ndim)), float)
    rotate = np.asarray(attributes.get("rotate", np.eye(ndim)), float)
    shear = np.asarray(attributes.get("shear", np.zeros(ndim * (ndim - 1) // 2)), float)
    affine = np.asarray(attributes.get("affine", np.eye(ndim + 1)), float)
    if shear.size and np.abs(shear - (np.eye(ndim) if shear.ndim == 2 else 0)).max() > 1e-9:
        raise InputError(
            "this Labels layer is sheared; a NIfTI/NRRD/MHA grid cannot be sheared. Reset the "
            "layer's shear or save the layer's data from a layer made by this plugin."
        )
    if rotate.shape != (ndim, ndim) or affine.shape != (ndim + 1, ndim + 1):
        raise InputError("this Labels layer's transform is not a 3-D rotation/affine")
    composite = np.eye(ndim + 1)
    composite[:ndim, :ndim] = rotate @ np.diag(scale)
    composite[:ndim, ndim] = translate
    return affine @ composite


def geometry_for_layer(shape: tuple[int, ...], attributes: Mapping[str, Any]) -> Geometry:
    """The grid to write a Labels layer on (see module docstring for the rules).

    Args:
        shape: the layer data's shape, ``(z, y, x)``.
        attributes: the layer's ``as_layer_data_tuple()`` attributes (``metadata``, ``scale``,
            ``translate``, ``rotate``, ``shear``, ``affine``).

    Raises:
        InputError: not 3-D, shape differs from the stored geometry, or a sheared transform.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise InputError(f"only 3-D label layers can be saved as CT label maps; this one is {len(shape)}-D")
    metadata = attributes.get("metadata") or {}
    stored = metadata.get("geometry")
    if isinstance(stored, Mapping):
        stored = Geometry.from_dict(dict(stored))
    if isinstance(stored, Geometry):
        if stored.shape != shape:
            raise InputError(
                f"this Labels layer has shape {shape} but its CT grid is {stored.shape}; "
                "it no longer matches the image it was made for"
            )
        return stored
    lin_zyx = _layer_affine_zyx(shape, attributes)
    lps = _ZYX_TO_XYZ @ lin_zyx @ _ZYX_TO_XYZ
    linear = lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.allclose(
        (linear / spacing).T @ (linear / spacing), np.eye(3), atol=1e-6
    ):
        raise InputError("this Labels layer's transform is not a rotation with scaling; cannot save it as a grid")
    geometry = Geometry.from_affine_lps(lps, shape)
    warnings.warn(
        "this Labels layer has no CT geometry (it was not made by napari-cdpdnet); it is saved "
        f"with its napari scale/translate/rotate as LPS mm: spacing {tuple(round(s, 4) for s in geometry.spacing)}",
        UserWarning,
        stacklevel=2,
    )
    return geometry


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels: returns the written path (napari's convention)."""
    if isinstance(data, (list, tuple)):  # multiscale: the full-resolution level
        data = data[0]
    array = np.asarray(data)
    geometry = geometry_for_layer(array.shape, attributes)
    written = write_label_map(path, array, geometry, overwrite=True)
    return [str(written)]


def write_labels_dicom_seg(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a Labels layer on a DICOM series as a verified DICOM-SEG."""
    from napari_cdpdnet.export import export_dicom_seg

    if isinstance(data, (list, tuple)):
        data = data[0]
    array = np.asarray(data)
    geometry = geometry_for_layer(array.shape, attributes)
    metadata = attributes.get("metadata") or {}
    written = export_dicom_seg(
        array,
        geometry,
        path,
        cdpdnet="cdpdnet" in metadata,
        edited=metadata.get("edited_labels") or (),
        overwrite=True,
    )
    return [str(written)]
