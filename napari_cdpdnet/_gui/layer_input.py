"""napari layers in, core inputs out: the chosen CT, "Limit to box", example marks, clicks.

Everything the dock reads *from* the viewer is converted here, without Qt, so each rule is
written once:

* the chosen image, checked (patient geometry, CT, shape) and snapshotted for a job;
* which layer a mark comes from: the **active layer first**, then the others from the top of
  the layer list down (:func:`by_precedence`), and of a Shapes layer its **last** rectangle or
  path;
* clicks on the canvas (:class:`ClickTool`), and world → voxel conversion of clicks and of
  shape vertices (a 2-D Shapes layer lacks the leading axes: they span the image for a box
  that limits a run, and take the displayed slice for a mark);
* voxel points → the LPS-mm box of ``SegmentationSettings.box`` ("Limit to box"), and → the
  segment-by-example :class:`~napari_cdpdnet.example.marks.ROI` (click, rectangle, scribble).

What the dock writes *to* the viewer (result layers, merges, picks) is in
:mod:`napari_cdpdnet._gui.layers`. napari itself is imported only inside the functions that
need its layer classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_cdpdnet._gui.layers import is_cdpdnet_layer
from napari_cdpdnet.errors import InputError
from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Layer

__all__ = [
    "ImageSnapshot",
    "layer_named",
    "chosen_image",
    "by_precedence",
    "ClickTool",
    "world_to_index",
    "vertices_to_index",
    "limit_box",
    "roi_from_index_points",
    "click_roi",
    "example_roi",
    "example_box_roi",
    "example_scribble_roi",
]

Box = tuple[tuple[float, float, float], tuple[float, float, float]]


# --------------------------------------------------------------------------- the image
def layer_named(viewer: napari.Viewer, name: str | None) -> Layer | None:
    """The layer called ``name``, or None (it may have been renamed or removed meanwhile)."""
    return viewer.layers[name] if name and name in viewer.layers else None


def chosen_image(viewer: napari.Viewer, name: str) -> Image:
    """The image layer called ``name``, checked to be a CT with patient geometry.

    Raises:
        InputError: no such layer, or it carries no patient geometry, is not CT, or its data
            does not match its geometry.
    """
    layer = layer_named(viewer, name)
    if layer is None:
        raise InputError("no image layer: open a CT first (File > Open, napari-cdpdnet reader)")
    geometry = layer.metadata.get("geometry")
    if not isinstance(geometry, Geometry):
        raise InputError(
            f"layer {name!r} has no patient geometry: open the CT with the napari-cdpdnet "
            "reader so that results can be placed and measured in millimetres"
        )
    modality = str((layer.metadata.get("info") or {}).get("modality") or "CT")
    if modality != "CT":
        raise InputError(f"layer {name!r} is {modality}, not CT: CDPDNet segments CT only")
    if tuple(np.shape(layer.data)) != geometry.shape:
        raise InputError(f"layer {name!r}: data shape does not match its geometry")
    return layer


@dataclass(frozen=True)
class ImageSnapshot:
    """What a job takes from the chosen image, read on the GUI thread when it starts: the layer
    may be renamed, edited or removed while the job runs."""

    name: str
    geometry: Geometry
    source_path: str | None
    array: np.ndarray

    @classmethod
    def of(cls, layer: Image) -> ImageSnapshot:
        return cls(
            name=layer.name,
            geometry=layer.metadata["geometry"],
            source_path=layer.metadata.get("source_path"),
            array=np.asarray(layer.data),
        )


# --------------------------------------------------------------------------- which layer
def by_precedence(viewer: napari.Viewer) -> list[Layer]:
    """The layers in the order a mark is looked for: the active one, then top to bottom."""
    active = viewer.layers.selection.active
    others = [lyr for lyr in list(viewer.layers)[::-1] if lyr is not active]
    return ([active] if active is not None else []) + others


def _last_shape(layer: Any, types: Sequence[str]) -> np.ndarray | None:
    """The data vertices of a Shapes layer's last shape of one of ``types``, or None."""
    found = [i for i, t in enumerate(layer.shape_type) if t in types]
    return np.asarray(layer.data[found[-1]], dtype=float) if found else None


def _last_rectangle(viewer: napari.Viewer) -> tuple[Any, np.ndarray] | None:
    """``(Shapes layer, vertices)`` of the last rectangle, the active layer first; or None."""
    from napari.layers import Shapes

    for layer in by_precedence(viewer):
        if isinstance(layer, Shapes):
            vertices = _last_shape(layer, ("rectangle",))
            if vertices is not None:
                return layer, vertices
    return None


# --------------------------------------------------------------------------- clicks
class ClickTool:
    """A click tool on the canvas: while on, a left press calls ``on_click(world_position)``.

    It is a viewer mouse callback (it sits in ``viewer.mouse_drag_callbacks`` while on). Turning
    it on puts an active Labels layer in pan/zoom mode, so the click does not also paint. Drags
    and other buttons are ignored, and so is every click once ``alive()`` is False (the dock was
    closed).
    """

    def __init__(
        self, viewer: napari.Viewer, on_click: Callable[[Sequence[float]], Any], alive: Callable[[], bool]
    ) -> None:
        self._viewer = viewer
        self._on_click = on_click
        self._alive = alive

    def set_on(self, on: bool) -> None:
        from napari.layers import Labels

        callbacks = self._viewer.mouse_drag_callbacks
        if not on:
            if self in callbacks:
                callbacks.remove(self)
            return
        active = self._viewer.layers.selection.active
        if isinstance(active, Labels) and active.mode != "pan_zoom":
            active.mode = "pan_zoom"
        if self not in callbacks:
            callbacks.append(self)

    def __call__(self, viewer: napari.Viewer, event: Any) -> None:
        if (self._alive() and getattr(event, "type", "mouse_press") == "mouse_press"
                and getattr(event, "button", 1) in (1, None)):
            self._on_click(event.position)


# --------------------------------------------------------------------------- world -> voxels
def world_to_index(image: Image, world: Sequence[float]) -> np.ndarray:
    """The ``[z, y, x]`` voxel coordinates (float) on ``image`` of a world position."""
    return np.asarray(image.world_to_data(np.asarray(world, dtype=float)), dtype=float)[-3:]


def vertices_to_index(
    image: Image, layer: Any, vertices: np.ndarray, leading: Sequence[float] | None = None
) -> np.ndarray:
    """``[z, y, x]`` voxel coordinates on ``image`` of a layer's data vertices.

    A 2-D layer lacks the image's leading world axes: they take ``leading`` (the slice the
    viewer shows) or, when None, NaN (unknown: a run limited by the box spans the image there).
    """
    world = np.array([layer.data_to_world(v) for v in np.asarray(vertices, float)], dtype=float)
    missing = image.ndim - world.shape[1]
    if missing > 0:
        pad = (
            np.full((len(world), missing), np.nan)
            if leading is None
            else np.tile(np.asarray(leading, dtype=float)[:missing], (len(world), 1))
        )
        world = np.hstack([pad, world])
    idx = []
    for w in world:
        known = np.isfinite(w)
        d = np.asarray(image.world_to_data(np.where(known, w, 0.0)), dtype=float)
        d[~known] = np.nan
        idx.append(d[-3:])
    return np.array(idx)


# --------------------------------------------------------------------------- "Limit to box"
def limit_box(viewer: napari.Viewer, image: Image) -> Box:
    """The LPS-mm box (``SegmentationSettings.box``) of the last rectangle on a Shapes layer.

    Raises:
        InputError: no Shapes layer holds a rectangle, or it misses the image.
    """
    found = _last_rectangle(viewer)
    if found is None:
        raise InputError(
            "'Limit to box' is on but no Shapes layer holds a rectangle: draw one with the "
            "rectangle tool of a Shapes layer, or untick 'Limit to box'"
        )
    layer, vertices = found
    return roi_from_index_points(vertices_to_index(image, layer, vertices), image.metadata["geometry"])


def roi_from_index_points(points: np.ndarray, geometry: Geometry) -> Box:
    """The LPS-mm ROI box (``SegmentationSettings.box``) of a box drawn in voxel coordinates.

    ``points`` are ``[z, y, x]`` voxel coordinates of the drawn shape's vertices (NaN for an axis
    the shape does not have). A rectangle drawn on one slice is flat along one axis; that axis,
    and any NaN axis, spans the whole image, so a box drawn on an axial slice limits the run in
    x and y only. The box covers whole voxels (half a voxel beyond the vertex centres).

    Raises:
        InputError: no finite vertex, or a box that misses the image.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 3)
    shape = np.asarray(geometry.shape, dtype=float)
    if pts.size == 0 or not np.isfinite(pts).any():
        raise InputError("the box has no usable corners")
    lo = np.empty(3)
    hi = np.empty(3)
    for axis in range(3):
        col = pts[:, axis][np.isfinite(pts[:, axis])]
        if col.size == 0 or col.max() - col.min() < 0.5:
            lo[axis], hi[axis] = 0.0, shape[axis] - 1
        else:
            lo[axis], hi[axis] = col.min(), col.max()
    if np.any(hi < 0) or np.any(lo > shape - 1):
        raise InputError("the box lies outside the image: draw it over the CT")
    lo = np.clip(lo, 0, shape - 1) - 0.5
    hi = np.clip(hi, 0, shape - 1) + 0.5
    corners = np.array([[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for x in (lo[2], hi[2])])
    lps = geometry.index_to_world(corners)
    a, b = lps.min(axis=0), lps.max(axis=0)
    return (float(a[0]), float(a[1]), float(a[2])), (float(b[0]), float(b[1]), float(b[2]))


# --------------------------------------------------------------------------- segment by example
def click_roi(image: Image, world_position: Sequence[float]) -> ROI:
    """The example mark of a click at a world position.

    Raises:
        InputError: the click lies outside the image.
    """
    return ROI.click(world_to_index(image, world_position)).check(image.metadata["geometry"].shape)


def example_roi(viewer: napari.Viewer, image: Image, kind: Literal["box", "scribble"]) -> ROI:
    """The example mark of the last rectangle (``"box"``) or scribble, the active layer first.

    A scribble is the painted voxels of a Labels layer on the image's grid that is not a CDPDNet
    result, or the last path or line on a Shapes layer.

    Raises:
        InputError: nothing of that kind is drawn, or it misses the image.
    """
    from napari.layers import Labels, Shapes

    shape = image.metadata["geometry"].shape
    here = np.asarray(viewer.dims.point, dtype=float)[-image.ndim:]
    if kind == "box":
        found = _last_rectangle(viewer)
        if found is None:
            raise InputError(
                "no rectangle: draw one around the structure with the rectangle tool of a Shapes layer"
            )
        layer, vertices = found
        return example_box_roi(vertices_to_index(image, layer, vertices, leading=here), shape)
    for layer in by_precedence(viewer):
        if (isinstance(layer, Labels) and not is_cdpdnet_layer(layer.metadata)
                and tuple(layer.data.shape) == tuple(shape) and np.any(layer.data)):
            return ROI.from_mask(np.asarray(layer.data)).check(shape)
        if isinstance(layer, Shapes):
            vertices = _last_shape(layer, ("path", "line"))
            if vertices is not None:
                return example_scribble_roi([vertices_to_index(image, layer, vertices, leading=here)], shape)
    raise InputError(
        "no scribble: paint the structure on a Labels layer of the image's size (not a "
        "CDPDNet result), or draw a path or line on a Shapes layer"
    )


def example_box_roi(points: np.ndarray, shape: Sequence[int]) -> ROI:
    """The segment-by-example box of a rectangle drawn with ``[z, y, x]`` voxel vertices.

    Unlike :func:`roi_from_index_points` (which limits a run, so a flat axis spans the image),
    an example box marks one structure: a rectangle drawn on one slice stays on that slice.

    Raises:
        InputError: no finite vertex (or a missing axis), or a box outside the image.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, 3)
    if pts.size == 0 or not np.isfinite(pts).all():
        raise InputError("the rectangle has no usable corners: draw it over the CT")
    return ROI.box(pts.min(axis=0), pts.max(axis=0)).check(shape)


def example_scribble_roi(polylines: Sequence[np.ndarray], shape: Sequence[int]) -> ROI:
    """A scribble ROI from Shapes paths/lines (``[z, y, x]`` voxel vertices), densified so
    every voxel the stroke crosses counts, not only its vertices.

    Raises:
        InputError: no usable vertex, or the stroke lies entirely outside the image.
    """
    voxels: list[np.ndarray] = []
    for line in polylines:
        pts = np.asarray(line, dtype=float).reshape(-1, 3)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) == 0:
            continue
        voxels.append(pts[:1])
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            n = max(1, int(np.ceil(np.abs(b - a).max() * 2)))  # half-voxel steps
            t = np.linspace(0.0, 1.0, n + 1)[1:, None]
            voxels.append(a + t * (b - a))
    if not voxels:
        raise InputError("the scribble has no usable points: draw a path or line over the CT")
    pts = np.rint(np.concatenate(voxels))
    inside = np.all((pts >= 0) & (pts < np.asarray(shape)), axis=1)
    if not inside.any():
        raise InputError(f"the scribble lies outside the image {tuple(shape)} (z, y, x voxels)")
    return ROI.scribble(pts[inside]).check(shape)
