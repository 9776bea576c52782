"""Sliding-window inference with the official (MONAI 0.9) semantics, made usable on a CPU.

SPEC §11: 96³ windows, overlap 0.5 (scan interval 48, last start clamped to ``size − 96``),
symmetric zero padding of axes shorter than 96, Gaussian importance map, blending of **logits**
(Σ w·logits / Σ w). On top of that, and without changing any blended value:

* only the requested output channels are accumulated (blending is per channel, so this is exact)
  — the buffers hold ``len(channels)`` channels instead of 32;
* ``progress(done, total)`` after every window batch, and ``should_stop()`` before each batch
  (raises :class:`~napari_cdpdnet.errors.Cancelled`, so cancelling takes effect within one batch;
  use ``sw_batch_size=1`` for "within one window");
* a region of interest runs only the windows that intersect it, and the buffers cover only those
  windows;
* optionally, windows that hold only air (every voxel ≤ −175 HU, i.e. 0 after windowing) are
  skipped (``fast`` preset; *not* exact: voxels seen only by skipped windows become background,
  others are blended from fewer windows);
* ``order="slices"`` runs the windows column by column: windows that differ only along axis 0
  (the axis CDPDNet's DINO branch slices) follow each other, so the model's slice cache can
  reuse the slices they share (37–46 % of all slice encodings on abdominal scans). Blending is
  a float32 sum, so another order rounds differently in the last bit: the blended logits move
  by a few units in the last place (≤ 1e-6 relative), never more (``tests/test_sliding_window.py``).

**MONAI version finding.** MONAI 0.9 (the official environment) built the importance map by
Gaussian-filtering a delta at index 48 with the erf-discretised kernel (σ = 0.125·96 = 12),
normalised to max 1, then clamped below at ``max(min non-zero, 1e-3)`` = 1e-3. MONAI ≥ 1.1 (PR #5302)
uses a sampled ``exp(−x²/2σ²)`` centred at 47.5 instead. :func:`importance_map` reproduces the 0.9
map; MONAI 1.x's ``sliding_window_inference`` gives the official result only when that map is
passed as ``roi_weight_map`` (``tests/test_sliding_window.py`` proves equality that way).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_cdpdnet.errors import Cancelled, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "WINDOW_ORDERS",
    "ROI_SIZE",
    "SIGMA_SCALE",
    "AIR_LEVEL",
    "WindowPlan",
    "WindowOutput",
    "EtaEstimator",
    "Predictor",
    "importance_map",
    "window_starts",
    "plan_windows",
    "sliding_window",
    "ordered_by_columns",
    "set_predictor_compile",
]

logger = logging.getLogger(__name__)

#: The model's window (SPEC §11).
ROI_SIZE: tuple[int, int, int] = (96, 96, 96)
#: Gaussian σ as a fraction of the window size.
SIGMA_SCALE = 0.125
#: Windowed intensity at or below which a voxel counts as air (−175 HU maps to 0).
AIR_LEVEL = 0.0

#: ``predictor(x, task_id) -> logits``: x float32 ``[B, 1, 96, 96, 96]`` on the chosen device,
#: task_id int64 ``[B]``, logits ``[B, 32, 96, 96, 96]``.
Predictor = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]

Box = tuple[slice, slice, slice]

#: Window orders: MONAI's (axis 0 slowest) and column by column (axis 0 fastest).
WINDOW_ORDERS = ("monai", "slices")


def _gaussian_1d(sigma: float) -> torch.Tensor:
    """MONAI's erf-discretised Gaussian kernel (``gaussian_1d(approx="erf")``, truncated at 4σ)."""
    import torch

    s = torch.as_tensor(sigma, dtype=torch.float)
    tail = int(max(float(s) * 4.0, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float)
    t = 0.70710678 / torch.abs(s)
    return (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)  # not normalised


@lru_cache(maxsize=4)
def _importance_map_cached(roi_size: tuple[int, int, int], sigma_scale: float) -> torch.Tensor:
    import torch

    # MONAI 0.9 compute_importance_map(mode="gaussian"): GaussianFilter applied to a delta at
    # size // 2, i.e. separable convolutions along axes 0, 1, 2 -- the product of the three
    # kernels taken in that order -- then divided by its maximum; then the clamp that
    # sliding_window_inference applies.
    axes = []
    for n in roi_size:
        k = _gaussian_1d(n * sigma_scale)
        tail = (k.numel() - 1) // 2
        # cross-correlation of a delta at n // 2: voxel i reads kernel tap n // 2 + tail - i
        tap = n // 2 + tail - torch.arange(n)
        valid = (tap >= 0) & (tap < k.numel())
        axes.append(torch.where(valid, k[tap.clamp(0, k.numel() - 1)], 0.0))
    a, b, c = axes
    w = (a[:, None] * b[None, :])[:, :, None] * c[None, None, :]
    w = (w / torch.max(w)).float()
    floor = max(w[w != 0].min().item(), 1e-3)
    return torch.clamp(w, min=floor).contiguous()


def importance_map(roi_size: Sequence[int] = ROI_SIZE, sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """The official Gaussian blending weights (float32 CPU tensor of shape ``roi_size``; read-only)."""
    return _importance_map_cached(tuple(int(s) for s in roi_size), float(sigma_scale))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one (padded) axis, exactly as MONAI's ``dense_patch_slices``."""
    if size <= roi:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    starts = []
    for i in range(int(math.ceil(size / interval))):
        start = i * interval
        starts.append(min(start, size - roi))
        if start + roi >= size:
            break
    return starts


@dataclass(frozen=True)
class WindowPlan:
    """Which windows to run over an image, in MONAI's order.

    Attributes:
        image_shape: shape of the (unpadded) model-space image.
        pad_before: zeros added before each axis (axes shorter than the window are padded
            symmetrically, ⌊diff/2⌋ before).
        padded_shape: shape after padding.
        starts: the windows to run, as start indices in padded coordinates.
        total: number of windows of the full grid (before region / air selection).
        roi_size: window size.
    """

    image_shape: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    starts: tuple[tuple[int, int, int], ...]
    total: int
    roi_size: tuple[int, int, int] = ROI_SIZE

    @property
    def count(self) -> int:
        """Number of windows that will run."""
        return len(self.starts)

    @property
    def padded_region(self) -> Box:
        """Bounding box (padded coordinates) of the windows that run."""
        if not self.starts:
            return (slice(0, 0),) * 3  # type: ignore[return-value]
        s = np.asarray(self.starts)
        return tuple(slice(int(lo), int(hi) + r)  # type: ignore[return-value]
                     for lo, hi, r in zip(s.min(axis=0), s.max(axis=0), self.roi_size, strict=True))

    @property
    def region(self) -> Box:
        """The part of the unpadded image covered by the windows that run."""
        return tuple(  # type: ignore[return-value]
            slice(max(r.start - p, 0), min(r.stop - p, n))
            for r, p, n in zip(self.padded_region, self.pad_before, self.image_shape, strict=True))


def plan_windows(
    image_shape: Sequence[int],
    *,
    overlap: float = 0.5,
    roi_size: Sequence[int] = ROI_SIZE,
    box: Box | None = None,
    image: np.ndarray | None = None,
    skip_air: bool = False,
    air_level: float = AIR_LEVEL,
) -> WindowPlan:
    """Plan the windows for an image of ``image_shape`` (``[X, Y, Z]``, model space).

    Args:
        overlap: fraction of overlap between neighbouring windows, 0 ≤ overlap < 1 (official 0.5).
        box: only windows intersecting this index box of the unpadded image are kept.
        image: the image itself; needed only for ``skip_air``.
        skip_air: drop windows whose every voxel is ≤ ``air_level``.

    Raises:
        InputError: bad overlap, or ``skip_air`` without the image.
    """
    shape = tuple(int(s) for s in image_shape)
    roi = tuple(int(r) for r in roi_size)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"sliding window: expected a non-empty 3-D image shape, got {shape}")
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"overlap {overlap!r}: must be at least 0 and below 1 (official 0.5)")
    pad_before = tuple(max(r - n, 0) // 2 for n, r in zip(shape, roi, strict=True))
    padded = tuple(max(n, r) for n, r in zip(shape, roi, strict=True))
    axes = [window_starts(n, r, overlap) for n, r in zip(padded, roi, strict=True)]
    starts = [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
    total = len(starts)
    if box is not None:
        lo = [b.start + p for b, p in zip(box, pad_before, strict=True)]
        hi = [b.stop + p for b, p in zip(box, pad_before, strict=True)]
        starts = [s for s in starts
                  if all(s[k] < hi[k] and s[k] + roi[k] > lo[k] for k in range(3))]
    if skip_air:
        if image is None:
            raise InputError("sliding window: skip_air needs the image")
        starts = [s for s in starts if _window_max(image, s, pad_before, roi) > air_level]
    return WindowPlan(shape, pad_before, padded, tuple(starts), total, roi)  # type: ignore[arg-type]


def ordered_by_columns(starts: Sequence[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """``starts`` sorted column by column: by (axis 1, axis 2), then axis 0 (stable)."""
    return tuple(sorted(starts, key=lambda s: (s[1], s[2], s[0])))


def _window_max(image: np.ndarray, start: Sequence[int], pad_before: Sequence[int],
                roi: Sequence[int]) -> float:
    """Largest value inside a window (padding is 0, which never exceeds the air level)."""
    sl = tuple(slice(max(s - p, 0), max(s - p + r, 0))
               for s, p, r in zip(start, pad_before, roi, strict=True))
    part = image[sl]
    return float(part.max()) if part.size else 0.0


@dataclass
class WindowOutput:
    """Blended logits of the requested channels over the region the windows covered.

    Attributes:
        logits: float32 CPU tensor ``[len(channels), *region shape]``; voxels no window covered
            (possible with ``skip_air``) hold ``fill``.
        region: index box of the unpadded image that ``logits`` covers.
        channels: the output channels, in the order of ``logits``.
        windows: number of windows run.
    """

    logits: torch.Tensor
    region: Box
    channels: tuple[int, ...]
    windows: int


class EtaEstimator:
    """Remaining time from the average time per finished window (None until one is done)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()

    def restart(self) -> None:
        """Start timing from now (e.g. after loading the model)."""
        self._start = self._clock()

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self._start

    def eta(self, done: int, total: int) -> float | None:
        """Seconds left, assuming the remaining windows take as long as the finished ones."""
        if done <= 0:
            return None
        return self.elapsed / done * max(total - done, 0)


def sliding_window(
    image: np.ndarray | torch.Tensor,
    predictor: Predictor,
    task_id: int,
    channels: Sequence[int],
    *,
    plan: WindowPlan | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device: str | torch.device = "cpu",
    autocast: bool = False,
    sigma_scale: float = SIGMA_SCALE,
    fill: float = float("-inf"),
    progress: Callable[[int, int], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    order: str = "monai",
) -> WindowOutput:
    """Blend the predictor's logits over ``image`` (float32 ``[X, Y, Z]``, model space).

    Equal to MONAI 0.9's ``sliding_window_inference(image[None, None], (96,)*3, sw_batch_size,
    predictor, overlap, mode="gaussian")[0, channels]`` when ``plan`` holds every window.
    Stitching happens on the CPU in float32 whatever the device; only the selected channels leave
    the device.

    Args:
        predictor: ``predictor(x, task_id) -> logits`` (see :data:`Predictor`).
        task_id: official task prompt id (0…10), passed for every window.
        channels: output channels (0…31) to blend.
        plan: from :func:`plan_windows`; default: every window at ``overlap``.
        sw_batch_size: windows per predictor call.
        device: where windows are sent (the predictor's device).
        autocast: run the predictor under reduced-precision autocast where the device has a fast
            path: float16 on CUDA, bfloat16 on CPUs with AMX or AVX-512-BF16 (not exact);
            ignored with a warning elsewhere.
        progress: called as ``progress(done, total)`` in windows, first with ``done=0``.
        should_stop: polled before every batch; returning True raises ``Cancelled``.
        order: ``"monai"`` (the plan's order) or ``"slices"`` (column by column along axis 0,
            see the module docstring). The predictor's ``clear_caches()``, if it has one, is
            called when the loop ends.

    Raises:
        Cancelled: ``should_stop()`` returned True.
        InputError: bad image, channels or batch size.
        RuntimeError: the predictor returned something that is not ``[B, C, 96, 96, 96]``.
    """
    import torch

    img = torch.as_tensor(image)
    if img.ndim != 3:
        raise InputError(f"sliding window: expected a 3-D [X, Y, Z] image, got shape {tuple(img.shape)}")
    img = img.to(torch.float32)
    chans = tuple(int(c) for c in channels)
    if not chans or len(set(chans)) != len(chans) or min(chans) < 0:
        raise InputError(f"sliding window: channels {list(channels)} must be distinct and ≥ 0")
    if int(sw_batch_size) < 1:
        raise InputError(f"sw_batch_size {sw_batch_size!r}: must be at least 1")
    if order not in WINDOW_ORDERS:
        raise InputError(f"window order {order!r}: choose one of {', '.join(WINDOW_ORDERS)}")
    if plan is None:
        plan = plan_windows(tuple(img.shape), overlap=overlap)
    elif plan.image_shape != tuple(img.shape):
        raise InputError(f"sliding window: plan is for {plan.image_shape}, image is {tuple(img.shape)}")
    device = torch.device(device)
    roi = plan.roi_size

    if plan.padded_shape != plan.image_shape:
        pads: list[int] = []
        for n, r, b in reversed(list(zip(plan.image_shape, roi, plan.pad_before, strict=True))):
            diff = max(r - n, 0)
            pads += [b, diff - b]
        img = torch.nn.functional.pad(img[None, None], pads, mode="constant", value=0.0)[0, 0]

    region = plan.padded_region
    region_shape = tuple(r.stop - r.start for r in region)
    out = torch.zeros((len(chans), *region_shape), dtype=torch.float32)
    count = torch.zeros(region_shape, dtype=torch.float32)
    weight = importance_map(roi, sigma_scale)
    amp = None
    if autocast:
        from napari_cdpdnet.inference.devices import fast_autocast_dtype

        amp = fast_autocast_dtype(device)
        if amp is None:
            logger.warning("autocast requested on %s: ignored (no fast reduced-precision path there)", device)

    starts = plan.starts if order == "monai" else ordered_by_columns(plan.starts)
    total = plan.count
    tasks: dict[int, torch.Tensor] = {}  # one task tensor per batch size, made once
    if progress is not None:
        progress(0, total)
    try:
        for first in range(0, total, int(sw_batch_size)):
            if should_stop is not None and should_stop():
                raise Cancelled(f"segmentation cancelled after {first} of {total} windows")
            batch = starts[first:first + int(sw_batch_size)]
            x = torch.stack([img[s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]]
                             for s in batch])[:, None].to(device)
            if len(batch) not in tasks:
                tasks[len(batch)] = torch.full((len(batch),), int(task_id), dtype=torch.int64, device=device)
            ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                y = predictor(x, tasks[len(batch)])
            _check_logits(y, len(batch), roi, chans)
            # stacking channel views copies only what is needed, whatever the output's strides
            y = torch.stack([y[:, c] for c in chans], 1).to(device="cpu", dtype=torch.float32)
            for i, s in enumerate(batch):
                sl = tuple(slice(s[k] - region[k].start, s[k] - region[k].start + roi[k]) for k in range(3))
                out[(slice(None), *sl)] += weight * y[i]
                count[sl] += weight
            del x, y
            if progress is not None:
                progress(min(first + int(sw_batch_size), total), total)
    finally:
        clear = getattr(predictor, "clear_caches", None)
        if callable(clear):
            clear()

    covered = count > 0
    out /= torch.where(covered, count, torch.ones_like(count))
    if not bool(covered.all()):
        out[:, ~covered] = fill
    del count, covered
    crop = tuple(slice(r.start - (rp.start - p), r.stop - (rp.start - p))
                 for r, rp, p in zip(plan.region, region, plan.pad_before, strict=True))
    logits = out[(slice(None), *crop)]
    if logits.shape != out.shape:
        logits = logits.contiguous()
    return WindowOutput(logits=logits, region=plan.region, channels=chans, windows=total)


def set_predictor_compile(predictor: Predictor, enabled: bool) -> None:
    """Switch ``torch.compile`` of the predictor on or off, if it offers ``set_compile(bool)``
    (CDPDNet does; the engine never compiles a foreign callable behind its back)."""
    setter = getattr(predictor, "set_compile", None)
    if callable(setter):
        setter(bool(enabled))
    elif enabled:
        logger.warning("compile requested, but the predictor has no set_compile(): running it as is")


def _check_logits(y: Any, batch: int, roi: Sequence[int], channels: Sequence[int]) -> None:
    import torch

    if not isinstance(y, torch.Tensor):
        raise RuntimeError(f"predictor returned {type(y).__name__}, expected a logits tensor")
    expected = (batch, max(channels) + 1, *roi)
    if y.ndim != 5 or y.shape[0] != batch or tuple(y.shape[2:]) != tuple(roi) or y.shape[1] <= max(channels):
        raise RuntimeError(
            f"predictor returned logits of shape {tuple(y.shape)}, expected [B={batch}, C≥{expected[1]}, "
            f"{', '.join(map(str, roi))}]"
        )
