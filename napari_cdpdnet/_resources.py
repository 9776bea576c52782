"""Access to the data files shipped inside the package (``napari_cdpdnet/resources``)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

__all__ = ["resource", "load_json"]


def resource(*parts: str) -> Traversable:
    """Return a shipped resource file; works from a wheel and from an editable checkout."""
    node = resources.files("napari_cdpdnet").joinpath("resources")
    for part in parts:
        node = node.joinpath(part)
    if not node.is_file():
        raise FileNotFoundError(
            f"napari-cdpdnet resource {'/'.join(parts)!r} is missing from the installed package; "
            "reinstall napari-cdpdnet"
        )
    return node


@cache
def load_json(*parts: str) -> Any:
    """Parse a shipped JSON resource once per process."""
    return json.loads(resource(*parts).read_text(encoding="utf-8"))
