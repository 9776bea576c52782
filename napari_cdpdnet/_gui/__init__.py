"""The napari face: panels of the segmentation dock, the worker helper, layer conversions.

Only this package, and the npe2 entry modules beside it (``_reader``, ``_writer``, ``_widget``,
``_table_widget``), import napari or Qt. Widgets collect input, start workers and show results;
the work happens in :mod:`napari_cdpdnet.inference` and :mod:`napari_cdpdnet.export`.

The segmentation dock (``_widget.SegmentationWidget``) stacks ``run_panel`` (with
``request_box``), ``weights_panel``, ``pick_panel`` and ``example_panel``; they start work through
``worker.Jobs`` and notify through ``notify``; ``recovery`` autosaves edited result layers and
offers them back. ``layer_input`` reads layers into core inputs and
``layers`` writes results back (both without Qt). ``launch`` opens the viewer for
``cdpdnet view``; ``triton_guard`` keeps triton away from the OpenGL canvas.
"""
