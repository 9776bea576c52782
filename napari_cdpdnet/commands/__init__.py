"""Subcommands of the ``cdpdnet`` CLI, one module each (see :mod:`napari_cdpdnet.cli`)."""
