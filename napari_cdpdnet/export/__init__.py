"""Stage 6, export: what a segmentation becomes on disk, written all or nothing.

:func:`export_segmentation` (:mod:`.segmentation`) is the one way a segmentation reaches disk,
for the CLI and the GUI alike: label map + label table, plus the optional formats of the registry
:data:`FORMATS` (:mod:`.formats`: DICOM-SEG read back and checked, STL meshes, probability
maps). The work of each format lives beside it: the label table (:mod:`.labeltable`),
measurements (:mod:`.measure`), DICOM-SEG (:mod:`.dicomseg`) and meshes (:mod:`.meshes`).
:mod:`.recovery` keeps autosaved copies of edited label maps until they are exported.
No torch, no napari.
"""

from __future__ import annotations

from napari_cdpdnet.export.dicomseg import TISSUE, dicom_seg_specs
from napari_cdpdnet.export.formats import FORMATS, ExportFormat, ExportJob, optional_formats
from napari_cdpdnet.export.segmentation import (
    describe_labels,
    export_dicom_seg,
    export_paths,
    export_segmentation,
    is_structure_value,
    label_key,
    present_values,
    with_reviewed,
)

__all__ = [
    "FORMATS",
    "ExportFormat",
    "ExportJob",
    "optional_formats",
    "export_segmentation",
    "export_paths",
    "export_dicom_seg",
    "describe_labels",
    "present_values",
    "label_key",
    "is_structure_value",
    "with_reviewed",
    "dicom_seg_specs",
    "TISSUE",
]
