"""Segment by example (issue 8): find a structure from a marked region of interest.

* :mod:`~napari_cdpdnet.roi.attributes` — attribute cards and instance attributes in patient space;
* :mod:`~napari_cdpdnet.roi.fallback` — ROIs, and the structure whose probability dominates inside
  one (works from the official checkpoint alone);
* :mod:`~napari_cdpdnet.roi.mapper` — a small learned mapper from ROI features to the CLIP text
  space of the checkpoint's organ embeddings.

Headless: no napari or Qt import anywhere in this package.
"""
