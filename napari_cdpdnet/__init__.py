"""napari-cdpdnet: CT segmentation with CDPDNet in napari and on the command line.

Importing the package is cheap on purpose: no torch, napari, Qt or network access happens
here. Heavy modules are imported by the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
