"""The napari face: panels of the segmentation dock, the worker helper, layer conversions.

Only this package, and the npe2 entry modules beside it (``_reader``, ``_writer``, ``_widget``,
``_table_widget``), import napari or Qt. Widgets collect input, start workers and show results;
the work happens in :mod:`napari_cdpdnet.inference` and :mod:`napari_cdpdnet.export`.
"""
