"""Stage 1, input/output: CT volumes and label maps in and out with their patient geometry.

Owns reading (NIfTI, NRRD, MHA/MHD, DICOM series: :mod:`.images`, :mod:`.dicom_series`) and
writing label maps and images on a scan's own grid. No torch, no napari; imports only the base
floor (:mod:`napari_cdpdnet.errors`, :mod:`~napari_cdpdnet.geometry`,
:mod:`~napari_cdpdnet.fileutil`). The names below are the public API.
"""

from __future__ import annotations

from napari_cdpdnet.io.images import *  # noqa: F403 - the package's public API
from napari_cdpdnet.io.images import __all__  # noqa: F401
