"""The segmentation dock's napari notifications, reached through this one module.

Every panel calls ``notify.show_error(...)`` (looked up when called, not imported by name), so a
test that wants to see what the user was told patches these three names here and nowhere else
(the ``notes`` fixture in ``tests/conftest.py``).
"""

from __future__ import annotations

from napari.utils.notifications import show_error, show_info, show_warning

__all__ = ["show_error", "show_info", "show_warning"]
