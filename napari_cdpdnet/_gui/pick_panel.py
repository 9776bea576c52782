""""Pick structure by click": add the structure under a click from the last run's probabilities.

No model runs: a run keeps its probabilities (compactly, :class:`~napari_cdpdnet._gui.layers.
ProbabilityCache`), and a click adds the most probable structure there (p > 0.5, its connected
region) to that run's result layer. Which voxels may be written is a layer rule
(:func:`~napari_cdpdnet._gui.layers.add_picked_region`); this panel finds the voxel and reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QPushButton, QVBoxLayout, QWidget

from napari_cdpdnet._gui import layers as _layers
from napari_cdpdnet._gui import notify
from napari_cdpdnet._gui.layer_input import ClickTool, layer_named, world_to_index
from napari_cdpdnet.errors import CdpdnetError
from napari_cdpdnet.vocabulary.catalog import STRUCTURES

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet._widget import SegmentationWidget

__all__ = ["PickPanel"]


class PickPanel(QWidget):
    """A toggle: while on, a left click on the canvas picks the structure there."""

    def __init__(self, dock: SegmentationWidget) -> None:
        super().__init__()
        self._dock = dock
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.pick_button = QPushButton("Pick structure by click")
        self.pick_button.setCheckable(True)
        self.pick_button.setToolTip(
            "After a run: click the image to add the most probable structure there (p > 0.5, "
            "its connected region) from the cached probabilities, without rerunning."
        )
        layout.addWidget(self.pick_button)
        #: The viewer mouse callback while picking is on.
        self.tool = ClickTool(dock.viewer, self.pick_at, alive=lambda: dock.jobs.alive)
        self.pick_button.toggled.connect(self.tool.set_on)

    def pick_at(self, world_position: Sequence[float]) -> int | None:
        """Add (or select) the structure under a world position from the cached probabilities.

        Returns the structure index added or selected, or None (with a message) when there is
        nothing to pick there.
        """
        dock = self._dock
        try:
            image = dock.image_layer()
        except CdpdnetError as exc:
            notify.show_info(str(exc))
            return None
        cache = dock.probability_cache.get(image.name)
        if cache is None:
            notify.show_info("Run a segmentation on this image first: clicks use its probabilities")
            return None
        target = layer_named(dock.viewer, cache.layer_name)
        if target is None:
            notify.show_info(f"The result layer {cache.layer_name!r} is gone; run again to pick")
            return None
        zyx = tuple(int(round(i)) for i in world_to_index(image, world_position))
        picked = _layers.pick_component(cache, zyx)
        if picked is None:
            dock.status_label.setText("Pick: no requested structure above 0.5 probability there.")
            return None
        index, region = picked
        name = STRUCTURES[index - 1].name
        if int(target.data[zyx]) == index:
            target.selected_label = index
            dock.status_label.setText(f"Pick: selected {name} (already in {target.name!r}).")
            return index
        written = _layers.add_picked_region(target, index, region)
        dock.status_label.setText(f"Pick: added {name} ({written:,} voxels) to {target.name!r}.")
        return index
