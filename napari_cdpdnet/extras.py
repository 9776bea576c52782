"""Optional extras: packages only some features need, and the one error naming what to install.

The plain install (``pip install napari-cdpdnet``) segments, reviews and exports. Two features
need more, declared as extras in ``pyproject.toml`` (``[all]`` includes both):

* ``[train]``: ``cdpdnet train`` (MONAI, PyYAML for YAML configs) and ``cdpdnet evaluate
  --plot`` (matplotlib);
* ``[clip]``: free-text matching with CLIP ViT-B/32 (open_clip_torch), e.g. ``cdpdnet
  structures --clip`` and ``cdpdnet train-roi-prompts --clip-weights``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from napari_cdpdnet.errors import InputError

__all__ = ["import_extra"]


def import_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module`` of the optional ``extra``, or say how to install it.

    Args:
        module: the import name (``"monai"``, ``"open_clip"``).
        extra: the pyproject extra that brings it (``"train"``, ``"clip"``).
        needed_for: what the user asked for, as the error's subject (``"cdpdnet train"``).

    Raises:
        InputError: the module (or one it needs) is not installed; the message names the
            ``pip install 'napari-cdpdnet[extra]'`` line.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(
            f"{needed_for} needs {module}, which cannot be imported ({exc}); install it with: "
            f"pip install 'napari-cdpdnet[{extra}]'"
        ) from exc
