"""How a segmentation runs: the presets every face offers, and the settings of one run.

:data:`PRESETS` is the one list of presets: ``cdpdnet segment --preset``, ``segment-by-example``,
``train-roi-prompts`` and the GUI's combo all read their choices from it. No torch at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from napari_cdpdnet.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Preset",
    "PRESETS",
    "DEFAULT_PRESET",
    "WINDOW_ORDERS",
    "LpsBox",
    "SegmentationSettings",
    "preset_help",
]

#: Sliding-window orders (see :mod:`napari_cdpdnet.inference.sliding_window`): column by column
#: along the DINO slicing axis (lets the model reuse slice features; the default), or MONAI's.
WINDOW_ORDERS = ("slices", "monai")


@dataclass(frozen=True)
class Preset:
    """A named set of defaults for :class:`SegmentationSettings` (each can be overridden).

    Attributes:
        name: what the CLI's ``--preset`` and the GUI's combo show.
        overlap: sliding-window overlap (official 0.5).
        skip_air: skip windows that hold only air (≤ −175 HU).
        summary: one line for ``--help`` and the GUI's tooltip.
        autocast: reduced precision where the device has a fast path (float16 on CUDA, bfloat16
            on CPUs with AMX / AVX-512-BF16, nothing elsewhere); not exact.
    """

    name: str
    overlap: float
    skip_air: bool
    summary: str
    autocast: bool = False


#: Every preset, in the order the faces list them; the first is the default. The CLI's
#: ``--preset`` choices and the GUI's combo are read from here: a preset added here appears in
#: both, and nowhere else needs to change.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("exact", 0.5, False, "the official pipeline (overlap 0.5), the default"),
        Preset(
            "fast", 0.25, True,
            "overlap 0.25, air-only windows skipped and reduced precision where the hardware "
            "has a fast path (bfloat16 on CPUs with AMX/AVX-512-BF16, float16 on CUDA): "
            "about 4x faster than exact on such CPUs; labels differ slightly from exact",
            autocast=True,
        ),
    )
}
DEFAULT_PRESET = next(iter(PRESETS))


def preset_help() -> str:
    """One line per preset, for ``--help`` texts and tooltips."""
    return "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())

#: ``(corner, opposite corner)``, LPS millimetres.
LpsBox = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class SegmentationSettings:
    """How to run a segmentation (what to segment comes separately, as passes).

    Attributes:
        preset: a name in :data:`PRESETS` (``"exact"``: the official pipeline).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        threads: CPU threads for torch during the run (None: leave torch's setting).
        autocast: reduced precision where the device has a fast path: float16 on CUDA, bfloat16
            on CPUs with AMX / AVX-512-BF16 (faster, not bit-exact; ignored elsewhere). None:
            the preset's (``fast`` uses it, ``exact`` does not).
        sw_batch_size: windows per model call (None: 1 on CPU so Cancel acts within one window,
            2 on GPUs as the official code; results do not depend on it).
        overlap: window overlap (None: preset; official 0.5).
        skip_air: skip windows holding only air (None: preset).
        box: ``((x0, y0, z0), (x1, y1, z1))`` in patient LPS mm (``--box``, "Limit to box"); only windows covering it run and
            labels outside it are background.
        return_probabilities: also return per-structure sigmoid maps on the source grid (before
            post-processing; float32, 4 bytes per voxel per structure).
        compile: run the model through ``torch.compile`` (inductor): 1.14-1.19x per window on a
            quiet CPU, not shown under load (docs/model.md), within ~1e-4 of the uncompiled logits, but the first run compiles for minutes
            (seconds once inductor's cache in the napari-cdpdnet cache folder is warm). Where it
            cannot work, the run goes on without it and says why.
        window_order: ``"slices"`` (default) runs windows column by column along the model's
            slicing axis so the model reuses slice features (exact up to float32 rounding of the
            blend); ``"monai"`` runs them in MONAI's order (for comparisons).
    """

    preset: str = DEFAULT_PRESET
    device: str = "auto"
    threads: int | None = None
    autocast: bool | None = None
    sw_batch_size: int | None = None
    overlap: float | None = None
    skip_air: bool | None = None
    box: LpsBox | None = None
    return_probabilities: bool = False
    compile: bool = False
    window_order: str = "slices"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise InputError(f"preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.threads is not None and int(self.threads) < 1:
            raise InputError(f"threads {self.threads!r}: must be at least 1")
        if self.sw_batch_size is not None and int(self.sw_batch_size) < 1:
            raise InputError(f"sw_batch_size {self.sw_batch_size!r}: must be at least 1")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise InputError(f"overlap {self.overlap!r}: must be at least 0 and below 1 (official 0.5)")
        if self.window_order not in WINDOW_ORDERS:
            raise InputError(f"window_order {self.window_order!r}: choose one of {', '.join(WINDOW_ORDERS)}")

    @property
    def effective_overlap(self) -> float:
        """The overlap that will be used."""
        return float(PRESETS[self.preset].overlap if self.overlap is None else self.overlap)

    @property
    def effective_skip_air(self) -> bool:
        """Whether air-only windows will be skipped."""
        return bool(PRESETS[self.preset].skip_air if self.skip_air is None else self.skip_air)

    @property
    def effective_autocast(self) -> bool:
        """Whether reduced precision is asked for (used only where the device has a fast path)."""
        return bool(PRESETS[self.preset].autocast if self.autocast is None else self.autocast)

    def batch_size_for(self, device: torch.device) -> int:
        """Windows per model call on ``device``."""
        if self.sw_batch_size is not None:
            return int(self.sw_batch_size)
        return 1 if device.type == "cpu" else 2

    @property
    def is_official(self) -> bool:
        """True when nothing deviates from the official pipeline (the box aside, which only restricts)."""
        return self.effective_overlap == 0.5 and not self.effective_skip_air and not self.effective_autocast
