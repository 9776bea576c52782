"""Segmentation results as napari Labels layers, without Qt: what the dock writes to the viewer.

Why a separate module: the rules that protect a user's work live here and are tested without a
window. A run always becomes a *new* layer (``labels_layer_data``); merging into an existing
layer happens only when the user asks for it, and :func:`merge_labels_into` then writes only
voxels that are background or already hold the same structure, and never a voxel the user has
edited (tracked by :class:`EditTracker` from the layer's paint events).

Point and click uses the probabilities of the last run, stored compactly (:class:`ProbabilityCache`,
one byte per voxel per structure) so that a click adds a structure without running the model;
:func:`add_picked_region` writes it, by the same rule as a merge, as one undoable edit.

What the dock reads *from* the viewer (the chosen image, boxes, marks, clicks) is converted in
:mod:`napari_cdpdnet._gui.layer_input`.

Layer metadata convention (shared with the reader and the structure table)::

    {"geometry": Geometry, "source_path": str, "image_layer": str,
     "cdpdnet": {"request": str, "structures": [key, ...], "preset": str, "run": int,
                 "edited": bool}}

napari itself is imported only inside the functions that build napari objects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, Structure

if TYPE_CHECKING:  # pragma: no cover
    from napari.layers import Labels

__all__ = [
    "LAYER_PREFIX",
    "color_dict",
    "label_colormap",
    "features_table",
    "layer_name",
    "next_run_number",
    "labels_layer_data",
    "is_cdpdnet_layer",
    "merge_labels_into",
    "record_structures",
    "EditTracker",
    "ProbabilityCache",
    "pick_component",
    "add_picked_region",
    "example_labels",
]

logger = logging.getLogger(__name__)

#: Every result layer's name starts with this, so users (and the widget) can tell them apart.
LAYER_PREFIX = "CDPDNet: "

_TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
#: Colour of a value that is not a CDPDNet structure (a user painting label 40, say).
_OTHER = (1.0, 0.0, 1.0, 1.0)


def color_dict() -> dict[int | None, tuple[float, float, float, float]]:
    """Label value -> RGBA (0..1) for all 32 structures in the vocabulary's standard colours.

    All 32 are listed, not only the requested ones, so a user who paints another structure's
    value sees that structure's colour.
    """
    out: dict[int | None, tuple[float, float, float, float]] = {None: _OTHER, 0: _TRANSPARENT}
    for s in STRUCTURES:
        r, g, b = s.color
        out[s.index] = (r / 255.0, g / 255.0, b / 255.0, 1.0)
    return out


def label_colormap() -> Any:
    """A napari ``DirectLabelColormap`` in the vocabulary colours (imports napari)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=color_dict(), background_value=0)


def features_table() -> dict[str, list[Any]]:
    """The Labels ``features`` table: one row per value (0 and the 32 structures).

    napari maps a hovered value to its row through the ``index`` column and shows the other
    columns in the status bar, so hovering a voxel names its structure.
    """
    rows: list[tuple[int, str, str, str]] = [(0, "background", "background", "")]
    rows += [(s.index, s.name, s.key, s.group) for s in STRUCTURES]
    return {
        "index": [r[0] for r in rows],
        "name": [r[1] for r in rows],
        "key": [r[2] for r in rows],
        "group": [r[3] for r in rows],
    }


def layer_name(structures: Sequence[Structure], run: int) -> str:
    """``"CDPDNet: liver, left_kidney"`` for the first run on an image, then ``... #2`` etc."""
    keys = ", ".join(s.key for s in structures)
    if len(keys) > 60:
        keys = keys[:57].rstrip(", ") + "..."
    return f"{LAYER_PREFIX}{keys}" + (f" #{run}" if run > 1 else "")


def is_cdpdnet_layer(metadata: Mapping[str, Any]) -> bool:
    """True when a layer's metadata says it was made by a CDPDNet run."""
    return isinstance(metadata.get("cdpdnet"), Mapping) and "run" in metadata["cdpdnet"]


def next_run_number(layers_metadata: Iterable[Mapping[str, Any]], image_layer: str) -> int:
    """1 + the highest run number among result layers made from ``image_layer``."""
    runs = [
        int(m["cdpdnet"]["run"])
        for m in layers_metadata
        if is_cdpdnet_layer(m) and m.get("image_layer") == image_layer
    ]
    return max(runs, default=0) + 1


def labels_layer_data(
    labels: np.ndarray,
    geometry: Geometry,
    structures: Sequence[Structure],
    *,
    image_layer: str,
    source_path: str | None,
    request: str,
    preset: str,
    run: int,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari LayerData tuple for one run's label map, on the image's geometry.

    Raises:
        InputError: the label map is not on ``geometry``'s grid.
    """
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise InputError(
            f"label map shape {labels.shape} does not match the image grid {geometry.shape}"
        )
    kwargs: dict[str, Any] = {
        "name": layer_name(structures, run),
        "metadata": {
            "geometry": geometry,
            "source_path": source_path,
            "image_layer": image_layer,
            "cdpdnet": {
                "request": request,
                "structures": [s.key for s in structures],
                "preset": preset,
                "run": run,
                "edited": False,
            },
        },
        "features": features_table(),
        "colormap": label_colormap(),
        "opacity": 0.5,
        **geometry.napari_layer_kwargs(),
    }
    return labels, kwargs, "labels"


# --------------------------------------------------------------------------- edits and merging
class EditTracker:
    """Remembers which voxels of a Labels layer the user has changed (paint, fill, polygon).

    napari reports every edit through ``layer.events.paint``; undo is not reported, so an undone
    edit stays marked, which errs on the side of leaving the user's voxels alone. An edit this
    class cannot read marks the whole layer as edited, for the same reason.
    """

    def __init__(self, layer: Labels) -> None:
        self.shape = tuple(layer.data.shape)
        self.mask: np.ndarray | None = None
        self.everything = False
        self._metadata = layer.metadata
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)

    @property
    def edited(self) -> bool:
        return self.everything or (self.mask is not None and bool(self.mask.any()))

    def _mark_all(self) -> None:
        self.everything = True
        self._flag()

    def _flag(self) -> None:
        info = self._metadata.get("cdpdnet")
        if isinstance(info, dict):
            info["edited"] = True

    def _on_data(self, event: Any = None) -> None:
        """The whole array was replaced: nothing in it is the model's any more."""
        self._mark_all()

    def _on_paint(self, event: Any) -> None:
        for atom in getattr(event, "value", None) or []:
            try:
                self.mark(atom)
            except Exception:  # noqa: BLE001 - an unknown atom must protect, not crash
                logger.debug("unreadable paint atom; marking the whole layer edited", exc_info=True)
                self._mark_all()
        self._flag()

    def mark(self, atom: Any) -> None:
        """Mark the voxels of one napari history atom (mask-based or fancy-index)."""
        if self.mask is None:
            self.mask = np.zeros(self.shape, dtype=bool)
        slice_key = getattr(atom, "slice_key", None)
        if slice_key is not None:
            mask = getattr(atom, "mask", None)
            if mask is None:
                self.mask[tuple(slice_key)] = True
            else:
                self.mask[tuple(slice_key)] |= np.asarray(mask, dtype=bool)
            return
        indices = atom[0]
        self.mask[tuple(np.asarray(i) for i in indices)] = True

    def protected(self) -> np.ndarray | bool:
        """Boolean mask (or True for all) of voxels a merge must not write."""
        if self.everything:
            return True
        return False if self.mask is None else self.mask


def merge_labels_into(
    target: np.ndarray,
    new: np.ndarray,
    *,
    protected: np.ndarray | bool = False,
) -> int:
    """Write the non-zero voxels of ``new`` into ``target`` in place; returns voxels written.

    A voxel is written only where ``target`` is background (0) or already holds the same
    structure, and where it is not ``protected`` (edited by the user). Nothing is erased: a
    merge adds structures, it never removes what is there.

    Raises:
        InputError: the two maps are not the same shape.
    """
    if target.shape != new.shape:
        raise InputError(f"cannot merge a {new.shape} label map into a {target.shape} layer")
    if protected is True:
        return 0
    writable = (new != 0) & ((target == 0) | (target == new))
    if protected is not False:
        writable &= ~np.asarray(protected, dtype=bool)
    writable &= target != new  # only count real changes
    count = int(writable.sum())
    target[writable] = new[writable]
    return count


def record_structures(metadata: dict[str, Any], keys: Iterable[str]) -> None:
    """Add structure keys to a result layer's ``cdpdnet.structures`` (once each, in order)."""
    info = metadata.setdefault("cdpdnet", {})
    if isinstance(info, dict):
        info["structures"] = list(dict.fromkeys([*info.get("structures", []), *keys]))


# --------------------------------------------------------------------------- point and click
@dataclass
class ProbabilityCache:
    """One run's per-structure probabilities, quantised to uint8 (p * 255) to keep them small.

    Attributes:
        geometry: the grid they live on (the image's).
        maps: structure index -> uint8 ``[z, y, x]``.
        layer_name: the result layer clicks add to.
    """

    geometry: Geometry
    maps: dict[int, np.ndarray]
    layer_name: str

    @classmethod
    def from_probabilities(
        cls, geometry: Geometry, probabilities: Mapping[int, np.ndarray], layer_name: str
    ) -> ProbabilityCache:
        maps = {}
        for s, p in probabilities.items():
            q = np.empty(np.shape(p), dtype=np.uint8)
            np.multiply(p, 255.0, out=q, casting="unsafe")  # p in [0, 1]; truncates
            maps[int(s)] = q
        return cls(geometry, maps, layer_name)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.maps.values())


#: 0.5 on the truncated uint8 scale: int(p * 255) >= 128 means p >= 128/255 (0.502), i.e. the
#: run's p > 0.5 up to the quantisation step.
_HALF = 128


def pick_component(cache: ProbabilityCache, zyx: Sequence[int]) -> tuple[int, np.ndarray] | None:
    """The structure most probable (> 0.5) at voxel ``zyx`` and its connected region there.

    Returns ``(structure index, boolean mask)``: the 6-connected component of ``p > 0.5``
    through the voxel, or None when no cached structure exceeds 0.5 there (or the voxel is
    outside the grid).
    """
    from skimage.segmentation import flood

    idx = tuple(int(round(float(i))) for i in zyx)
    shape = cache.geometry.shape
    if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, shape, strict=True)):
        return None
    best, best_p = None, _HALF - 1
    for s, m in cache.maps.items():
        v = int(m[idx])
        if v > best_p:
            best, best_p = s, v
    if best is None:
        return None
    inside = cache.maps[best] >= _HALF
    return best, flood(inside, idx, connectivity=1)


def add_picked_region(layer: Labels, index: int, region: np.ndarray) -> int:
    """Write a picked structure's region into a result layer; returns the voxels written.

    Like a merge, only background voxels and voxels already holding the structure are written,
    so a pick never overwrites another structure. The write is one undoable edit (like a brush
    stroke); the structure becomes the layer's selected label and joins its metadata's
    structures.
    """
    data = np.asarray(layer.data)
    coords = np.nonzero(region & ((data == 0) | (data == index)))
    if coords[0].size:
        layer.data_setitem(coords, index)
    layer.selected_label = index
    record_structures(layer.metadata, [STRUCTURES[index - 1].key])
    return int(coords[0].size)


# --------------------------------------------------------------------------- segment by example
def example_labels(mask: np.ndarray, structure: Structure) -> np.ndarray:
    """A segment-by-example mask as a label map (value = the structure's index)."""
    dtype = np.uint8 if structure.index < 256 else np.uint16
    return np.where(np.asarray(mask, dtype=bool), structure.index, 0).astype(dtype)
