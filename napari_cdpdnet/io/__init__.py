"""Stage 1, input/output: CT volumes and label maps in and out with their patient geometry.

Owns reading (NIfTI, NRRD, MHA/MHD: :mod:`.images`; DICOM series: :mod:`.dicom_scan` finds and
groups the files, :mod:`.dicom_series` builds the volume) and writing label maps and images on a
scan's own grid (:mod:`.writing`). No torch, no napari; imports only the base floor
(:mod:`napari_cdpdnet.errors`, :mod:`~napari_cdpdnet.geometry`, :mod:`~napari_cdpdnet.fileutil`).
The names below are the public API.
"""

from __future__ import annotations

from napari_cdpdnet.io import images as _images
from napari_cdpdnet.io import writing as _writing
from napari_cdpdnet.io.images import *  # noqa: F403 - the package's public API
from napari_cdpdnet.io.writing import *  # noqa: F403

__all__ = [*_images.__all__, *_writing.__all__]
