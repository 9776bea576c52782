"""Segment by example: find the structure a click, box or scribble points at, and segment it.

* :mod:`~napari_cdpdnet.example.attributes` — attribute cards and instance attributes in patient space;
* :mod:`~napari_cdpdnet.example.ranking` — marks (the ``ROI`` of a click, box or scribble), and the
  structure whose probability dominates inside one (works from the official checkpoint alone);
* :mod:`~napari_cdpdnet.example.mapper` — a small learned mapper from ROI features to the CLIP text
  space of the checkpoint's organ embeddings;
* :mod:`~napari_cdpdnet.example.run` — the whole run: rank, then segment the winner.

Headless: no napari or Qt import anywhere in this package.
"""
