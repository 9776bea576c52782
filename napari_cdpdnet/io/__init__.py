"""Stage 1, input/output: CT volumes and label maps in and out with their patient geometry.

Owns reading (NIfTI, NRRD, MHA/MHD: :mod:`.images`, with :mod:`.volume_checks`; DICOM series:
:mod:`.dicom_scan` finds the files and chooses a series, :mod:`.dicom_grouping` groups them,
:mod:`.dicom_kinds` names what they are, :mod:`.dicom_frames` decodes frames, :mod:`.dicom_series`
builds the volume; docs/dicom.md) and writing label maps and images on a scan's own grid
(:mod:`.writing`). No torch, no napari; imports only the base floor
(:mod:`napari_cdpdnet.errors`, :mod:`~napari_cdpdnet.geometry`, :mod:`~napari_cdpdnet.fileutil`).
The names below are the public API.
"""

from __future__ import annotations

from napari_cdpdnet.io import images as _images
from napari_cdpdnet.io import writing as _writing
from napari_cdpdnet.io.images import *  # noqa: F403 - the package's public API
from napari_cdpdnet.io.writing import *  # noqa: F403

__all__ = [*_images.__all__, *_writing.__all__]
