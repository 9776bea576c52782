"""Segment by example: find the structure a click, box or scribble points at, and segment it.

* :mod:`~napari_cdpdnet.example.attributes` — attribute cards and instance attributes in patient space;
* :mod:`~napari_cdpdnet.example.marks` — the mark a user makes (the ``ROI`` of a click, box or
  scribble), in voxel indices of the image;
* :mod:`~napari_cdpdnet.example.ranking` — the structure whose probability dominates inside a mark
  (works from the official checkpoint alone);
* :mod:`~napari_cdpdnet.example.mapper` — a small learned mapper from ROI features to the CLIP text
  space of the checkpoint's organ embeddings;
* :mod:`~napari_cdpdnet.example.run` — the whole run: rank, then segment the winner.

Headless: no napari or Qt import anywhere in this package.
"""
