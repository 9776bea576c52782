"""The array-level segmentation engine: CT array + geometry in, one label map on the same grid out.

``segment_array`` runs the official test pipeline (SPEC §10–12) for a plan of passes (each pass =
one task prompt and the output channels it should deliver):

1. :func:`~napari_cdpdnet.inference.transforms.preprocess` — RAS, 1.5 mm, −175…250 HU → 0…1, foreground crop;
2. :func:`~napari_cdpdnet.inference.sliding_window.sliding_window` per pass — 96³ windows, Gaussian blending
   of logits, only the channels the pass needs (requested + post-processing companions);
3. sigmoid > 0.5, :func:`~napari_cdpdnet.inference.postprocess.postprocess` (official rules) and
   :func:`~napari_cdpdnet.inference.postprocess.merge_labels` (value = structure index, lesions win);
4. :func:`~napari_cdpdnet.inference.transforms.invert_labels` back onto the source grid (nearest).

The engine knows no structure names or counts: the caller hands in the post-processing roles
(:class:`~napari_cdpdnet.inference.postprocess.PostprocessRules`, which also bound the channel
numbers) and, optionally, the number of task prompts; the segmenter takes both from the vocabulary.

Presets: ``exact`` (default) is the official pipeline; ``fast`` trades exactness for CPU time with
overlap 0.25 instead of 0.5 (≈ 2× fewer windows on typical scans) and by skipping windows that
hold only air (≤ −175 HU). Both can be overridden field by field.

Memory (why a 512×512×600 CT fits in a few GB): the source array is never copied or converted
(orientation and resampling are one affine index map); model-space buffers are float32 for the
needed channels only and span only the windows that run; masks are boolean, the merged map uint8;
the inverse maps one uint8 label map (not 32 channels) back, in slabs or per axis. Optional
probabilities cost 4 bytes per source voxel per requested structure.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cdpdnet.errors import Cancelled, InputError
from napari_cdpdnet.geometry import Geometry
from napari_cdpdnet.inference.devices import resolve_device
from napari_cdpdnet.inference.memory import reuse_freed_memory
from napari_cdpdnet.inference.postprocess import (
    PostprocessRules,
    channels_needed,
    merge_labels,
    postprocess,
)
from napari_cdpdnet.inference.settings import PRESETS, SegmentationSettings
from napari_cdpdnet.inference.sliding_window import (
    EtaEstimator,
    Predictor,
    WindowPlan,
    plan_windows,
    set_predictor_compile,
    sliding_window,
)
from napari_cdpdnet.inference.transforms import (
    IndexBox,
    Preprocessed,
    box_to_preprocessed,
    invert_labels,
    invert_probabilities,
    preprocess,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

# PRESETS, SegmentationSettings and resolve_device are re-exported for callers of this module.
__all__ = [
    "PRESETS",
    "SegmentationSettings",
    "SegmentationResult",
    "ProgressEvent",
    "PreparedImage",
    "prepare_image",
    "resolve_device",
    "segment_array",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    """What a progress callback receives.

    Attributes:
        stage: ``"preprocess"``, ``"inference"``, ``"postprocess"`` or ``"invert"``.
        done, total: units finished / planned in this stage: windows over all passes during
            inference, passes during post-processing, 0/1 then 1/1 otherwise.
        elapsed_s: seconds since the stage started.
        eta_s: estimated seconds left in the stage (inference only, once a window is done).
        message: one line for a status bar.
    """

    stage: str
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    message: str


@dataclass
class SegmentationResult:
    """Output of :func:`segment_array`.

    Attributes:
        labels: uint8 ``[z, y, x]`` on ``geometry``; value = structure index (1…N), 0 background.
        geometry: the input geometry (the labels' grid).
        structures: structure index → voxel count, for requested structures that were found.
        requested: every requested structure index, found or not.
        probabilities: structure index → float32 ``[z, y, x]`` sigmoid map, when asked for.
        timings: seconds per stage (``preprocess``, ``inference``, ``postprocess``, ``invert``,
            ``total``).
        windows: windows run (all passes).
        windows_total: windows the whole image needs at the overlap used, before the ROI and
            air selection (all passes).
        device: device the model ran on.
        settings: the settings used.
    """

    labels: np.ndarray
    geometry: Geometry
    structures: dict[int, int]
    requested: tuple[int, ...]
    probabilities: dict[int, np.ndarray] | None
    timings: dict[str, float]
    windows: int
    windows_total: int
    device: str
    settings: SegmentationSettings


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """The CPU stage of :func:`segment_array` done ahead of time: preprocessing and window plan.

    Plain numpy and dataclasses, so it pickles: a ``torch.utils.data.DataLoader`` worker makes the
    next case's while the device runs the current one (``cdpdnet segment`` on a cohort), and
    :func:`segment_array` takes it as ``prepared=``.

    Attributes:
        pre: the CT in the model's space.
        plan: the windows to run.
        box: the ROI in model space, or None.
        seconds: time the preparation took.
        windowing: ``(overlap, skip_air, box)`` it was made for (checked against the settings).
    """

    pre: Preprocessed
    plan: WindowPlan
    box: IndexBox | None
    seconds: float
    windowing: tuple[float, bool, Any]

    def check(self, geometry: Geometry, settings: SegmentationSettings) -> None:
        """Refuse to run it with a grid or window settings it was not made for."""
        if not self.pre.source.same_grid(geometry):
            raise InputError("the prepared image was made for another grid than this CT's")
        if self.windowing != _windowing(settings):
            raise InputError(
                f"the prepared image was made for overlap/skip-air/box {self.windowing}, not "
                f"{_windowing(settings)}: prepare it again with these settings")


def _windowing(settings: SegmentationSettings) -> tuple[float, bool, Any]:
    return (settings.effective_overlap, settings.effective_skip_air, settings.box)


def prepare_image(
    array: np.ndarray, geometry: Geometry, settings: SegmentationSettings | None = None
) -> PreparedImage:
    """Preprocess a CT and plan its windows: the CPU-only part of :func:`segment_array`."""
    settings = settings or SegmentationSettings()
    t0 = time.perf_counter()
    pre = preprocess(array, geometry)
    box = box_to_preprocessed(settings.box, pre) if settings.box is not None else None
    plan = plan_windows(pre.shape, overlap=settings.effective_overlap, box=box,
                        image=pre.image, skip_air=settings.effective_skip_air)
    return PreparedImage(pre, plan, box, time.perf_counter() - t0, _windowing(settings))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's CPU thread count for the block and restore it afterwards."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_passes(
    passes: Sequence[tuple[int, Sequence[int]]], num_structures: int, num_tasks: int | None
) -> list[tuple[int, list[int]]]:
    """Validate ``(task_id, channels)`` passes; return them with structure indices (1…N).

    Task ids are checked here only when the number of task prompts is known (else the predictor
    checks them on the first window).
    """
    out: list[tuple[int, list[int]]] = []
    seen: set[int] = set()
    for item in passes:
        try:
            task, channels = item
            task = int(task)
            chans = sorted({int(c) for c in channels})
        except (TypeError, ValueError) as exc:
            raise InputError(f"pass {item!r}: expected (task_id, [channels])") from exc
        if num_tasks is not None and not 0 <= task < num_tasks:
            raise InputError(f"pass {item!r}: task id {task} is outside 0…{num_tasks - 1}")
        if not chans:
            raise InputError(f"pass {item!r}: no channels requested")
        bad = [c for c in chans if not 0 <= c < num_structures]
        if bad:
            raise InputError(f"pass {item!r}: channels {bad} are outside 0…{num_structures - 1}")
        twice = seen.intersection(chans)
        if twice:
            raise InputError(f"channels {sorted(twice)} are requested by more than one pass")
        seen.update(chans)
        out.append((task, [c + 1 for c in chans]))
    if not out:
        raise InputError("nothing to segment: no passes given")
    return out


def segment_array(
    array: np.ndarray,
    geometry: Geometry,
    passes: Sequence[tuple[int, Sequence[int]]],
    predictor: Predictor,
    settings: SegmentationSettings | None = None,
    *,
    rules: PostprocessRules,
    num_tasks: int | None = None,
    progress: Callable[[ProgressEvent], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    prepared: PreparedImage | None = None,
) -> SegmentationResult:
    """Segment a CT array and return one label map on its own grid.

    Args:
        array: ``[z, y, x]`` CT in HU (any integer or float type; it is not copied).
        geometry: the array's geometry.
        passes: ``[(task_id, [channel, ...]), ...]``; channel ``c`` is structure ``c + 1``. Each
            pass runs the model once over the image with that task prompt.
        predictor: ``predictor(x, task_id) -> logits`` on the resolved device (see
            :data:`~napari_cdpdnet.inference.sliding_window.Predictor`).
        settings: see :class:`SegmentationSettings` (default: exact, auto device).
        rules: the post-processing roles by structure index (the segmenter's
            :func:`~napari_cdpdnet.inference.segmenter.postprocess_rules`); channels must be
            below ``rules.num_structures``.
        num_tasks: the number of task prompts, to refuse a bad task id before any work;
            None leaves the check to the predictor (the CDPDNet model checks it).
        progress: receives :class:`ProgressEvent` s.
        should_stop: polled between stages and before every window batch.
        prepared: this array's :func:`prepare_image`, made ahead (then not recomputed).

    Raises:
        Cancelled: ``should_stop()`` returned True (nothing is returned or written).
        InputError: bad array/geometry, passes, settings, device or ROI.
    """
    settings = settings or SegmentationSettings()
    plan_passes = _check_passes(passes, rules.num_structures, num_tasks)
    device = resolve_device(settings.device)
    if getattr(predictor, "training", False):
        logger.warning("the predictor is in training mode (BatchNorm uses batch statistics): "
                       "call .eval() on the model for reproducible results")
    if not settings.is_official:
        logger.info("settings deviate from the official pipeline (preset %s, overlap %.2f, "
                    "skip_air %s, autocast %s)", settings.preset, settings.effective_overlap,
                    settings.effective_skip_air, settings.effective_autocast)
    run = _Run(progress, should_stop)
    t_all = time.perf_counter()
    with _torch_threads(settings.threads):
        run.check("before it started")
        t0 = run.emit("preprocess", 0, 1, "Resampling to 1.5 mm and windowing")
        if prepared is None:
            prepared = prepare_image(array, geometry, settings)
        else:
            prepared.check(geometry, settings)
        pre, box, plan = prepared.pre, prepared.box, prepared.plan
        run.timings["preprocess"] = prepared.seconds
        run.emit("preprocess", 1, 1, f"Model grid {pre.shape}, {plan.count} windows per pass", t0)
        run.check("after preprocessing")

        masks, probs = _run_passes(pre, plan, box, plan_passes, predictor, settings, device, rules,
                                   run)

        run.check("before mapping back")
        t3 = run.emit("invert", 0, 1, "Mapping labels back to the original grid")
        model_labels = np.zeros(pre.shape, dtype=np.uint8)
        model_labels[plan.region] = merge_labels(masks, rules)
        del masks
        labels = invert_labels(model_labels, pre)
        del model_labels
        probabilities = None
        if settings.return_probabilities:
            probabilities = {}
            for s in sorted(probs):
                full = np.zeros(pre.shape, dtype=np.float32)
                full[plan.region] = probs.pop(s)
                probabilities[s] = invert_probabilities(full, pre)
                del full
        counts = _label_counts(labels)
        run.timings["invert"] = time.perf_counter() - t3
        run.emit("invert", 1, 1, "Done", t3)
    run.timings["total"] = time.perf_counter() - t_all

    requested = tuple(sorted(s for _, structures in plan_passes for s in structures))
    found = {s: int(counts[s]) for s in requested if counts[s] > 0}
    windows = plan.count * len(plan_passes)
    logger.info("segmented %s on %s: %d windows, found %s, %.1f s", geometry.shape, device,
                windows, found, run.timings["total"])
    return SegmentationResult(
        labels=labels, geometry=geometry, structures=found, requested=requested,
        probabilities=probabilities, timings=run.timings, windows=windows,
        windows_total=plan.total * len(plan_passes), device=str(device), settings=settings)


class _Run:
    """Progress reporting, cancellation checks and stage timings of one ``segment_array`` call."""

    def __init__(self, progress: Callable[[ProgressEvent], Any] | None,
                 should_stop: Callable[[], bool] | None) -> None:
        self.progress = progress
        self.should_stop = should_stop
        self.timings: dict[str, float] = {}

    def emit(self, stage: str, done: int, total: int, message: str, since: float | None = None,
             eta: float | None = None) -> float:
        """Report progress; returns the current time (use it as ``since`` for later events)."""
        now = time.perf_counter()
        if self.progress is not None:
            elapsed = 0.0 if since is None else now - since
            self.progress(ProgressEvent(stage, done, total, elapsed, eta, message))
        return now

    def check(self, where: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"segmentation cancelled {where}")


def _run_passes(
    pre: Preprocessed, plan: WindowPlan, box: IndexBox | None, passes: list[tuple[int, list[int]]],
    predictor: Predictor, settings: SegmentationSettings, device: torch.device,
    rules: PostprocessRules, run: _Run,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Sliding window, threshold and post-processing per pass, on the windows' region.

    Returns the post-processed masks and (when asked for) the sigmoid maps of the requested
    structures. Each pass's logits are freed as soon as they are thresholded.
    """
    total = plan.count * len(passes)
    masks: dict[int, np.ndarray] = {}
    probs: dict[int, np.ndarray] = {}
    eta = EtaEstimator()
    t_start = time.perf_counter()
    run.timings["inference"] = run.timings["postprocess"] = 0.0
    set_predictor_compile(predictor, settings.compile)
    for p, (task, structures) in enumerate(passes):
        t1 = time.perf_counter()

        def on_window(done: int, _n: int, offset: int = p * plan.count, task: int = task) -> None:
            d = offset + done
            run.emit("inference", d, total, f"Window {d} of {total} (task {task})", t_start,
                     eta.eta(d, total))

        with reuse_freed_memory():
            out = sliding_window(
                pre.image, predictor, task, channels_needed(structures, rules), plan=plan,
                sw_batch_size=settings.batch_size_for(device), device=device,
                autocast=settings.effective_autocast, progress=on_window, should_stop=run.should_stop,
                order=settings.window_order)
        raw = _threshold(out.logits, out.channels, box, plan.region, probs, structures,
                         settings.return_probabilities)
        del out
        run.timings["inference"] += time.perf_counter() - t1
        run.check("before post-processing")
        t2 = run.emit("postprocess", p, len(passes), "Post-processing")
        masks.update(postprocess(raw, structures, rules))
        del raw
        run.timings["postprocess"] += time.perf_counter() - t2
        run.emit("postprocess", p + 1, len(passes), "Post-processing done", t2)
    return masks, probs


def _threshold(
    logits: torch.Tensor,
    channels: Sequence[int],
    box: tuple[slice, ...] | None,
    region: tuple[slice, ...],
    probs: dict[int, np.ndarray],
    requested: Sequence[int],
    keep_probabilities: bool,
) -> dict[int, np.ndarray]:
    """Official ``sigmoid > 0.5`` per channel (float32), restricted to the ROI; raw masks by index.

    Stores the sigmoid maps of requested structures in ``probs`` when asked to.
    """
    import torch

    inside = None
    if box is not None:
        inside = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region, strict=True))

    def restrict(a: np.ndarray) -> np.ndarray:
        if inside is None:
            return a
        out = np.zeros_like(a)
        out[inside] = a[inside]
        return out

    raw: dict[int, np.ndarray] = {}
    for i, c in enumerate(channels):
        p = torch.sigmoid(logits[i])
        raw[c + 1] = restrict((p > 0.5).numpy())
        if keep_probabilities and c + 1 in requested:
            probs[c + 1] = restrict(p.numpy())
        del p
    return raw


def _label_counts(labels: np.ndarray, chunk: int = 1 << 23) -> np.ndarray:
    """Voxels per value of a uint8 map, in chunks (``bincount`` widens its input to 8 bytes/voxel)."""
    counts = np.zeros(256, dtype=np.int64)
    flat = labels.reshape(-1)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk], minlength=256)
    return counts
