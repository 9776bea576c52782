"""Stage 5, inference: a CT array and a request in, a label map on the CT's grid out.

Owns the settings and presets every face offers (:mod:`.settings`), compute devices
(:mod:`.devices`), the official pre-processing and its inverse (:mod:`.transforms`), the sliding
window (:mod:`.sliding_window`), post-processing (:mod:`.postprocess`), the allocator setting
while windows run (:mod:`.memory`), the array-level engine
(:mod:`.pipeline`) and :class:`~napari_cdpdnet.inference.segmenter.Segmenter`, the one object the
CLI and the GUI share. Submodules import torch when they run; importing this package does not.
"""
