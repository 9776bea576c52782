"""napari reader (npe2 contribution): CT files and DICOM folders as layers with patient geometry.

Thin adapter over :mod:`napari_cdpdnet.io.images`. ``napari_get_reader`` only makes cheap checks (suffix,
the 132-byte DICOM preamble) and never raises. The function it returns never raises either: an
input that cannot be read (a DICOM folder holding only a segmentation, a truncated file, a
volume of NaN ...) becomes one napari error notification with the core's message, the same words
``cdpdnet segment`` prints, and napari gets the "nothing to add" sentinel ``[(None,)]`` instead of
a traceback dialog. :func:`read_layers` is the raising variant for code that wants the exception;
:data:`REFUSALS` keeps the last messages for ``cdpdnet view``, which reports them on stderr.

Layer metadata convention (read by the other widgets of this plugin):
``metadata = {"geometry": Geometry, "source_path": str, "warnings": [str, ...], "info": {...}}``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from napari_cdpdnet.io.images import CTImage, is_supported_path, read_image_or_labels

__all__ = ["napari_get_reader", "read_layers", "read_layers_or_notify", "layer_data", "ABDOMEN_WINDOW",
           "REFUSALS"]

logger = logging.getLogger(__name__)

#: Soft-tissue (abdomen) window: level 40 HU, width 400 HU, as napari contrast limits.
ABDOMEN_WINDOW = (-160.0, 240.0)

LayerData = tuple[Any, dict[str, Any], str]
PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

#: The messages of the inputs :func:`read_layers_or_notify` refused, newest last.
REFUSALS: list[str] = []


def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """Return :func:`read_layers_or_notify` if every path looks readable here, else None (never raises)."""
    try:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if paths and all(is_supported_path(p) for p in paths):
            return read_layers_or_notify
    except Exception:  # noqa: BLE001 - a reader probe must never break napari's open dialog
        logger.debug("napari_get_reader(%r) declined after an error", path, exc_info=True)
    return None


def layer_data(kind: str, image: CTImage) -> LayerData:
    """One napari LayerData tuple for an image or label map read by :mod:`napari_cdpdnet.io.images`."""
    kwargs: dict[str, Any] = {
        "name": image.name,
        "metadata": {
            "geometry": image.geometry,
            "source_path": str(image.path),
            "warnings": list(image.warnings),
            "info": dict(image.info),
        },
        **image.geometry.napari_layer_kwargs(),
    }
    if kind == "image":
        modality = str(image.info.get("modality") or "CT")
        kwargs["colormap"] = "gray"
        if modality == "CT":
            kwargs["contrast_limits"] = ABDOMEN_WINDOW
    return image.array, kwargs, kind


def read_layers(path: PathOrPaths) -> list[LayerData]:
    """Read each path (file or DICOM folder) into one layer; warnings become napari notifications.

    Non-CT images are opened (for viewing) with a warning in ``metadata["warnings"]``; the
    segmentation widget decides what to do with them.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out = []
    for p in paths:
        kind, image = read_image_or_labels(p, allow_non_ct=True)
        for message in image.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        out.append(layer_data(kind, image))
    return out


def read_layers_or_notify(path: PathOrPaths) -> list[LayerData]:
    """:func:`read_layers` for napari: what cannot be read becomes a notification, never an exception.

    Each path is read on its own, so one refused input does not keep the others from opening.
    Returns the layers read, or ``[(None,)]`` (napari's "read, nothing to add") when none was.
    """
    from napari_cdpdnet.errors import CdpdnetError

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: list[LayerData] = []
    for p in paths:
        try:
            out.extend(read_layers(p))
        except CdpdnetError as exc:
            _refuse(str(exc))
        except Exception as exc:  # noqa: BLE001 - a reader must never raise into napari
            logger.error("reading %s failed", p, exc_info=exc)
            _refuse(f"{p}: could not be read ({type(exc).__name__}: {exc}); this is a bug, please report it")
    return out or [(None,)]  # type: ignore[list-item]


def _refuse(message: str) -> None:
    logger.warning("%s", message)
    REFUSALS.append(message)
    try:
        from napari_cdpdnet._gui import notify

        notify.show_error(message)
    except Exception:  # noqa: BLE001 - no napari (a script): the log line above is the report
        logger.debug("no napari notification for %r", message, exc_info=True)
