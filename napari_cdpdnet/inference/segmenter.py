"""One object the CLI and the napari widget share: names in, label map and label table out.

:class:`Segmenter` turns what a user typed into structures (resolver), the structures into a plan
of task-prompt passes (vocabulary), finds and loads the weights once (weights, model), and runs
the array-level engine (pipeline). It holds the loaded model between runs, so a second request in
the viewer costs only the inference.

CDPDNet's text conditioning is fixed: every run computes the same 32 outputs whatever is typed;
the request only selects which outputs are kept and which of the 11 task prompts runs. Typed
text the lexicon does not cover is matched by CLIP (``clip``: a mode of
:mod:`~napari_cdpdnet.inference.clip_choice` or a scorer), which only chooses among those 32.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cdpdnet.errors import InputError, WeightsError
from napari_cdpdnet.geometry import Geometry

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_cdpdnet.export.labeltable import LabelRow
    from napari_cdpdnet.inference.clip_choice import ClipChoice
    from napari_cdpdnet.inference.pipeline import PreparedImage, ProgressEvent, SegmentationResult
    from napari_cdpdnet.inference.postprocess import PostprocessRules
    from napari_cdpdnet.inference.settings import SegmentationSettings
    from napari_cdpdnet.vocabulary.catalog import SegmentationPlan, Structure
    from napari_cdpdnet.vocabulary.clip_stage import ClipThresholds, TextScorer
    from napari_cdpdnet.vocabulary.resolver import Resolution
    from napari_cdpdnet.weights import WeightFiles

__all__ = ["Segmenter", "SegmentationOutput", "PreparedCase", "parse_request", "postprocess_rules"]

logger = logging.getLogger(__name__)


@dataclass
class SegmentationOutput:
    """Everything one run produced: the label map (in ``result``), how the request was read,
    the plan that ran and the label table."""

    result: SegmentationResult
    resolutions: list[Resolution]
    plan: SegmentationPlan
    table: list[LabelRow]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return self.result.labels

    @property
    def geometry(self) -> Geometry:
        return self.result.geometry


@dataclass
class PreparedCase:
    """A CT after the CPU stage (:meth:`Segmenter.prepare`), ready for the device stage
    (:meth:`Segmenter.segment_prepared`). Picklable, so DataLoader workers can make it.

    Attributes:
        array: the CT in HU ``[z, y, x]`` (kept for the label table's HU columns).
        geometry: its grid.
        image: preprocessed image and window plan.
        settings: the settings it was prepared with (the device stage uses them by default).
    """

    array: np.ndarray
    geometry: Geometry
    image: PreparedImage
    settings: SegmentationSettings


@cache
def postprocess_rules() -> PostprocessRules:
    """The vocabulary's post-processing roles (``resources/postprocess.json``) in the form the
    engine takes: here, because the engine never imports the vocabulary."""
    from napari_cdpdnet.inference.postprocess import PostprocessRules
    from napari_cdpdnet.vocabulary.catalog import POSTPROCESS_ROLES

    return PostprocessRules(**POSTPROCESS_ROLES)


def parse_request(
    request: str | Sequence[str | int] | Iterable[Structure],
    *,
    clip_scorer: ClipChoice | Callable[[], TextScorer | None] = None,
    clip_thresholds: ClipThresholds | None = None,
) -> tuple[list[Structure], list[Resolution]]:
    """Structures for a request given as text ("liver, left kidney"), names, keys or indices.

    Args:
        clip_scorer: the CLIP stage for text the lexicon does not cover: a scorer, a mode
            ("auto", "on", "off"), or a function returning one (called only when there is text);
            None: the lexicon only.
        clip_thresholds: when CLIP's answer is trusted (default: the resolver's).

    Raises:
        VocabularyError: naming every phrase that is not one of the 32 structures, with
            suggestions, before any computation.
        WeightsError: ``clip_scorer="on"`` and CLIP's weights cannot be had.
    """
    from napari_cdpdnet.vocabulary.catalog import Structure, structure
    from napari_cdpdnet.vocabulary.resolver import resolve_many

    items = [request] if isinstance(request, str) else list(request)
    direct = [i for i in items if isinstance(i, (int, Structure))]
    texts = [str(i) for i in items if not isinstance(i, (int, Structure))]
    structures: list[Structure] = [i if isinstance(i, Structure) else structure(i) for i in direct]
    resolutions: list[Resolution] = []
    if texts:
        scorer = clip_scorer() if callable(clip_scorer) and not hasattr(clip_scorer, "similarities") else clip_scorer
        if isinstance(scorer, str):
            from napari_cdpdnet.inference.clip_choice import clip_scorer_for

            scorer = clip_scorer_for(scorer)
        resolutions = resolve_many(texts, clip_scorer=scorer, clip_thresholds=clip_thresholds)
    for r in resolutions:
        if r.structure not in structures:
            structures.append(r.structure)
    if not structures:
        raise InputError("no structures requested: name at least one, e.g. 'liver'")
    return structures, resolutions


class Segmenter:
    """Loads CDPDNet once and segments CT arrays on request.

    Args:
        checkpoint: official ``cdpdnet.pth`` (or a folder holding it); default: found by
            :func:`napari_cdpdnet.weights.resolve_weights` (weights folder, cache, download).
        dino: DINOv2-base weights file or folder; same default.
        allow_download: False never touches the network (air-gapped sites, tests).
        download_progress: ``progress(done_bytes, total_bytes, filename)`` while downloading.
        legacy_pos_interp: the pre-4.45 transformers DINOv2 position interpolation (SPEC §3).
        module: an already built model (``module(x, task_id) -> logits``); skips weights.
        clip: matching typed text the lexicon does not cover: "auto" (CLIP when it can be had),
            "on" (CLIP must work), "off", or a scorer (see :mod:`.clip_choice`).
        clip_weights: open_clip ViT-B/32 weights file (default: the weights registry).
        clip_thresholds: when CLIP's answer is trusted (default: the resolver's).
    """

    def __init__(
        self,
        *,
        checkpoint: str | Path | None = None,
        dino: str | Path | None = None,
        allow_download: bool = True,
        download_progress: Callable[[int, int | None, str], None] | None = None,
        legacy_pos_interp: bool = False,
        module: torch.nn.Module | None = None,
        clip: ClipChoice = "auto",
        clip_weights: str | Path | None = None,
        clip_thresholds: ClipThresholds | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.dino = dino
        self.allow_download = allow_download
        self.download_progress = download_progress
        self.legacy_pos_interp = legacy_pos_interp
        self._module = module
        self._device_modules: dict[str, Any] = {}
        self._weights: WeightFiles | None = None
        self._lock = threading.Lock()
        self.clip = clip
        self.clip_weights = clip_weights
        self.clip_thresholds = clip_thresholds
        self._text_scorer: TextScorer | None = None
        self._text_scorer_made = False

    # ------------------------------------------------------------------ text matching
    def text_scorer(self) -> TextScorer | None:
        """The CLIP stage for typed text (made once; loads nothing until text needs it).

        Raises:
            WeightsError, InputError: ``clip="on"`` and CLIP cannot be had.
        """
        if not self._text_scorer_made:
            from napari_cdpdnet.inference.clip_choice import clip_scorer_for

            self._text_scorer = clip_scorer_for(
                self.clip,
                clip_weights=self.clip_weights,
                checkpoint=self.checkpoint,
                allow_download=self.allow_download,
                progress=self.download_progress,
            )
            self._text_scorer_made = True
        return self._text_scorer

    def reset_text_scorer(self) -> None:
        """Forget the text scorer (e.g. after CLIP's weights were downloaded): made anew next time."""
        self._text_scorer, self._text_scorer_made = None, False

    # ------------------------------------------------------------------ weights and model
    def weights(self) -> WeightFiles:
        """The weight files (found, downloaded if allowed, and checked) — once per Segmenter."""
        from napari_cdpdnet.weights import resolve_weights

        if self._weights is None:
            self._weights = resolve_weights(
                checkpoint=self.checkpoint,
                dino=self.dino,
                allow_download=self.allow_download,
                progress=self.download_progress,
            )
        return self._weights

    def is_loaded(self) -> bool:
        """True when a model is in memory (the next run starts inference at once)."""
        return self._module is not None

    def model(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model on ``device`` in eval mode, loading the weights on first use."""
        import torch

        device = torch.device(device)
        with self._lock:
            if self._module is None:
                self._module = self._load_official()
            key = str(device)
            if key not in self._device_modules:
                self._device_modules = {key: self._module.to(device).eval()}
            return self._device_modules[key]

    def _load_official(self) -> torch.nn.Module:
        from napari_cdpdnet.model import (
            build_from_official,
            load_dino_state_dict,
            load_official_checkpoint,
        )

        files = self.weights()
        t0 = time.perf_counter()
        sd = load_official_checkpoint(files.checkpoint)
        dino_sd = load_dino_state_dict(files.dino_weights)
        try:
            module = build_from_official(sd, dino_sd, legacy_pos_interp=self.legacy_pos_interp)
        except WeightsError:
            raise
        except (RuntimeError, ValueError, KeyError) as exc:
            raise WeightsError(
                f"the weights in {files.checkpoint} and {files.dino_weights} do not build a CDPDNet "
                f"model: {exc}"
            ) from exc
        from napari_cdpdnet.vocabulary.catalog import STRUCTURES

        outputs = getattr(module, "num_classes", len(STRUCTURES))
        if outputs != len(STRUCTURES):  # a checkpoint of another label set, or an edited vocabulary
            raise WeightsError(
                f"{files.checkpoint} predicts {outputs} structures but the vocabulary "
                f"(resources/structures.json) lists {len(STRUCTURES)}: they must match one to one"
            )
        logger.info("model loaded in %.1f s (%s)", time.perf_counter() - t0, files.sources)
        return module

    # ------------------------------------------------------------------ requests
    def plan(
        self,
        request: str | Sequence[str | int] | Iterable[Structure],
        *,
        clip_scorer: ClipChoice = None,
        force_task: int | None = None,
    ) -> tuple[list[Structure], list[Resolution], SegmentationPlan]:
        """Read a request and plan its passes, without loading the model or computing anything
        (CLIP is loaded when typed text needs it). ``clip_scorer`` overrides ``self.clip``."""
        from napari_cdpdnet.vocabulary.catalog import plan_passes

        structures, resolutions = parse_request(
            request,
            clip_scorer=clip_scorer if clip_scorer is not None else self.text_scorer,
            clip_thresholds=self.clip_thresholds,
        )
        return structures, resolutions, plan_passes(structures, force_task=force_task)

    def segment(
        self,
        array: np.ndarray,
        geometry: Geometry,
        request: str | Sequence[str | int] | Iterable[Structure],
        settings: SegmentationSettings | None = None,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        clip_scorer: ClipChoice = None,
        force_task: int | None = None,
    ) -> SegmentationOutput:
        """Segment ``request`` in a CT (``[z, y, x]`` HU on ``geometry``).

        The request is checked before weights are loaded or anything is computed. Cancelling
        (``should_stop()`` returning True) raises :class:`~napari_cdpdnet.errors.Cancelled`
        within one window; nothing is written here in any case.
        """
        return self._segment(array, geometry, None, request, settings, progress=progress,
                             should_stop=should_stop, clip_scorer=clip_scorer, force_task=force_task)

    @staticmethod
    def prepare(
        array: np.ndarray, geometry: Geometry, settings: SegmentationSettings | None = None
    ) -> PreparedCase:
        """The CPU stage of :meth:`segment` (preprocessing, window plan): no model, no weights.

        A static method, so a worker process can call it without a Segmenter (or its model).
        """
        from napari_cdpdnet.inference.pipeline import prepare_image
        from napari_cdpdnet.inference.settings import SegmentationSettings

        settings = settings or SegmentationSettings()
        return PreparedCase(array, geometry, prepare_image(array, geometry, settings), settings)

    def segment_prepared(
        self,
        prepared: PreparedCase,
        request: str | Sequence[str | int] | Iterable[Structure],
        settings: SegmentationSettings | None = None,
        *,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        clip_scorer: ClipChoice = None,
        force_task: int | None = None,
    ) -> SegmentationOutput:
        """The device stage of :meth:`segment` on a :meth:`prepare` d case: windows,
        post-processing, mapping back and the label table. Same result as :meth:`segment`.

        ``settings`` default to the prepared ones; others may change the device, threads or
        autocast, not what the preparation depends on (overlap, skip-air, box).
        """
        return self._segment(prepared.array, prepared.geometry, prepared.image, request,
                             settings or prepared.settings, progress=progress,
                             should_stop=should_stop, clip_scorer=clip_scorer, force_task=force_task)

    def _segment(
        self,
        array: np.ndarray,
        geometry: Geometry,
        prepared: PreparedImage | None,
        request: str | Sequence[str | int] | Iterable[Structure],
        settings: SegmentationSettings | None,
        *,
        progress: Callable[[ProgressEvent], None] | None,
        should_stop: Callable[[], bool] | None,
        clip_scorer: ClipChoice,
        force_task: int | None,
    ) -> SegmentationOutput:
        from napari_cdpdnet.export.labeltable import build_label_table
        from napari_cdpdnet.inference.devices import resolve_device
        from napari_cdpdnet.inference.pipeline import segment_array
        from napari_cdpdnet.inference.settings import SegmentationSettings
        from napari_cdpdnet.vocabulary.catalog import TASKS

        t0 = time.perf_counter()
        settings = settings or SegmentationSettings()
        structures, resolutions, plan = self.plan(request, clip_scorer=clip_scorer, force_task=force_task)
        device = resolve_device(settings.device)
        model = self.model(device)
        passes = [(p.task.id, sorted(s.channel for s in p.structures)) for p in plan.passes]
        result = segment_array(
            array, geometry, passes, model, settings, rules=postprocess_rules(),
            num_tasks=len(TASKS), progress=progress, should_stop=should_stop, prepared=prepared,
        )
        requested = [s.index for s in structures]
        table = build_label_table(result.labels, geometry, array, values=requested)
        notes = [
            f"{s.name}: not found in this scan (empty after post-processing)"
            for s in structures
            if result.structures.get(s.index, 0) == 0
        ]
        for n in notes:
            logger.warning(n)
        return SegmentationOutput(result, resolutions, plan, table, time.perf_counter() - t0, notes)
