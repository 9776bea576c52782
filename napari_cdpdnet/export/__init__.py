"""Stage 6, export: what a segmentation becomes on disk, written all or nothing.

Owns :func:`export_segmentation` (label map + label table, DICOM-SEG read back and checked, STL
meshes) used by the CLI and the GUI alike, measurements (:mod:`.measure`), the label table
(:mod:`.labeltable`), DICOM-SEG (:mod:`.dicomseg`) and meshes (:mod:`.meshes`). No torch, no
napari.
"""

from __future__ import annotations

from napari_cdpdnet.export.segmentation import *  # noqa: F403 - the package's public API
from napari_cdpdnet.export.segmentation import __all__  # noqa: F401
