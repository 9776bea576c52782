"""Segment by example: ROI in, ranked structures and the chosen structure's mask out.

Shared by ``cdpdnet segment-by-example`` and the napari widget (which imports this, never the
other way round). Two stages keep the cost down on large scans:

1. **rank** — the network runs for all 32 outputs, with probabilities, on a crop around the ROI
   (``context_mm`` on every side); the ranking comes from the learned mapper when one is given,
   else from the fallback (:func:`~napari_cdpdnet.example.ranking.rank_by_probability`).
2. **segment** — the chosen structure is segmented on the whole scan (one task pass, no
   probabilities, only that structure requested) and restricted to the
   connected components the ROI touches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from napari_cdpdnet.example.marks import ROI
from napari_cdpdnet.example.ranking import (
    Ranking,
    crop_around,
    crop_geometry,
    rank_by_probability,
    restrict,
)
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.vocabulary.catalog import STRUCTURES, Structure

if TYPE_CHECKING:  # pragma: no cover
    from napari_cdpdnet.example.mapper import RoiMapper
    from napari_cdpdnet.inference.pipeline import ProgressEvent, SegmentationResult
    from napari_cdpdnet.inference.segmenter import Segmenter
    from napari_cdpdnet.inference.settings import SegmentationSettings

__all__ = ["ExampleResult", "run_all_structures", "rank_roi", "segment_by_example", "describe_roi", "DEFAULT_CONTEXT_MM"]

logger = logging.getLogger(__name__)

#: Context around the ROI for the ranking run: one 96³ model window at 1.5 mm is 144 mm wide.
DEFAULT_CONTEXT_MM = 72.0


@dataclass
class ExampleResult:
    """What one segment-by-example run produced.

    Attributes:
        ranking: ranked structures and the method that answered.
        structure: the structure segmented (the ranking's best unless one was forced).
        mask: boolean ``[z, y, x]`` on the input grid: the components the ROI touches.
        touched: False when no component touched the ROI and the nearest one was kept instead.
        notes: lines for the user.
        seconds: wall time.
        prompt: the attribute sentence of the marked region (the coarse "real-text prompt"),
            e.g. "A computerized tomography of a small rounded soft-tissue density structure on
            the patient's left at the upper body level, 12 mL, mean 35 HU, in one piece."
    """

    ranking: Ranking
    structure: Structure
    mask: np.ndarray
    touched: bool
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    prompt: str = ""


def run_all_structures(
    segmenter: Segmenter,
    array: np.ndarray,
    geometry: Geometry,
    settings: SegmentationSettings | None = None,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """All 32 structures with probabilities, each from a task pass trained on it (7 passes).

    Calls the pipeline directly rather than ``Segmenter.segment``, which would warn about every
    structure absent from a small crop.
    """
    from napari_cdpdnet.inference.devices import resolve_device
    from napari_cdpdnet.inference.pipeline import segment_array
    from napari_cdpdnet.inference.segmenter import postprocess_rules
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.vocabulary.catalog import TASKS, plan_passes

    settings = replace(settings or SegmentationSettings(), return_probabilities=True)
    plan = plan_passes(STRUCTURES)
    passes = [(q.task.id, sorted(s.channel for s in q.structures)) for q in plan.passes]
    model = segmenter.model(resolve_device(settings.device))
    return segment_array(array, geometry, passes, model, settings, rules=postprocess_rules(),
                         num_tasks=len(TASKS), progress=progress, should_stop=should_stop)


def rank_roi(
    segmenter: Segmenter,
    array: np.ndarray,
    geometry: Geometry,
    roi: ROI,
    settings: SegmentationSettings | None = None,
    *,
    context_mm: float = DEFAULT_CONTEXT_MM,
    mapper: RoiMapper | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Ranking, np.ndarray | None, tuple[slice, ...]]:
    """Stage 1: rank the 32 structures for ``roi``.

    Returns the ranking, the crop's label map (all 32 structures, post-processed; None when only
    the mapper ran without a model) and the crop slices.
    """
    from napari_cdpdnet.inference.settings import SegmentationSettings

    settings = settings or SegmentationSettings()
    roi.check(array.shape)
    crop = crop_around(roi, geometry, context_mm)
    sub = array[crop]
    sub_geom = crop_geometry(geometry, crop)
    sub_roi = roi.shifted([s.start for s in crop])
    if mapper is not None and not mapper.uses_model_features:
        return mapper.rank(roi, array, geometry), None, crop
    result = run_all_structures(segmenter, sub, sub_geom, settings, progress=progress, should_stop=should_stop)
    probs = result.probabilities or {}
    if mapper is not None:
        ranking = mapper.rank(roi, array, geometry, probabilities=probs, probability_roi=sub_roi)
    else:
        ranking = rank_by_probability(probs, sub_roi)
    return ranking, result.labels, crop


def segment_by_example(
    segmenter: Segmenter,
    array: np.ndarray,
    geometry: Geometry,
    roi: ROI,
    settings: SegmentationSettings | None = None,
    *,
    context_mm: float = DEFAULT_CONTEXT_MM,
    mapper: RoiMapper | None = None,
    choose: Structure | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ExampleResult:
    """Rank structures for ``roi`` and segment the best one (or ``choose``), restricted to the
    components the ROI touches. Nothing is written here.

    Raises:
        InputError: ROI outside the image; WeightsError: weights missing; Cancelled.
    """
    from napari_cdpdnet.inference.settings import SegmentationSettings

    t0 = time.perf_counter()
    settings = settings or SegmentationSettings()
    ranking, _crop_labels, _crop = rank_roi(
        segmenter, array, geometry, roi, settings, context_mm=context_mm, mapper=mapper,
        progress=progress, should_stop=should_stop)
    chosen = choose or ranking.best.structure
    notes = [ranking.note] if ranking.note else []
    # Always a pass of its own, even when the crop was the whole scan: in the all-structures
    # label map other structures (tumours, neighbours whose sigmoid also passed 0.5) paint over
    # parts of the chosen one, and post-processing depends on what was requested.
    out = segmenter.segment(array, geometry, [chosen], replace(settings, return_probabilities=False),
                            progress=progress, should_stop=should_stop)
    full = out.labels == chosen.index
    mask, touched = restrict(full, roi, geometry=geometry)
    if not mask.any():
        notes.append(f"{chosen.name}: not found in this scan")
    elif not touched:
        notes.append(f"no {chosen.name} component touches the ROI; the nearest one was kept")
    for n in notes:
        logger.warning(n)
    return ExampleResult(ranking, chosen, mask, touched, notes, time.perf_counter() - t0,
                         describe_roi(roi, array, geometry))


def describe_roi(roi: ROI, array: np.ndarray, geometry: Geometry) -> str:
    """The attribute sentence of the region an ROI stands for (patient-space words)."""
    from napari_cdpdnet.example.attributes import (
        attribute_sentence,
        body_frame,
        instance_attributes,
    )
    from napari_cdpdnet.example.mapper import roi_region

    crop, region = roi_region(roi, geometry)
    attrs = instance_attributes(region, array[crop], crop_geometry(geometry, crop),
                                body=body_frame(array, geometry))
    return attribute_sentence(instance=attrs)
