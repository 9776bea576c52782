"""Compute devices: the one place that turns "auto", "cpu", "cuda:N" or "mps" into a torch device.

The CLI, the GUI's device combo, the pipeline and training all ask here, so "auto" means the same
everywhere (CUDA, then MPS, then CPU) and an unusable device is refused with the same message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from napari_cdpdnet.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "torchrun_position",
    "resolve_device",
    "available_devices",
    "describe_devices",
    "cpu_has_native_bf16",
    "fast_autocast_dtype",
]


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """A torch device from ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.

    ``local_rank`` (a process's rank on its node under torchrun) makes ``"auto"`` and ``"cuda"``
    mean that rank's own GPU, ``cuda:<local_rank>``.

    Raises:
        InputError: unknown name, or a device this machine/torch build cannot use.
    """
    import torch

    text = str(name).strip().lower()
    mps_ok = _mps_available()
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        else:
            return torch.device("mps") if mps_ok else torch.device("cpu")
    if text == "cuda" and local_rank is not None:
        text = f"cuda:{int(local_rank)}"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"device {name!r}: unknown; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise InputError(f"device {name!r}: {why} (torch {torch.__version__}); use auto or cpu")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise InputError(f"device {name!r}: only {n} CUDA device(s) (cuda:0…cuda:{n - 1})")
        return device
    if device.type == "mps":
        if not mps_ok:
            raise InputError(f"device {name!r}: Apple MPS is not available here; use auto or cpu")
        return device
    raise InputError(f"device {name!r}: unsupported; use auto, cpu, cuda, cuda:N or mps")


def available_devices() -> list[str]:
    """``auto`` and ``cpu``, plus ``cuda`` / ``mps`` when this torch build can use them."""
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if _mps_available():
        out.append("mps")
    return out


def describe_devices() -> list[str]:
    """Every usable device with its name, for ``cdpdnet info`` (e.g. ``cuda:0 (NVIDIA A100)``)."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (Intel AMX or AVX-512-BF16).

    Without it, oneDNN emulates bfloat16 and autocast is slower than float32, so it is not used.
    """
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None)]
    return any(bool(c()) for c in checks if callable(c))


def fast_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision with a fast path on ``device``: float16 on CUDA, bfloat16 on CPUs
    with native bfloat16, None elsewhere (MPS, older CPUs: autocast would not pay)."""
    import torch

    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def torchrun_position(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's ``RANK``, ``LOCAL_RANK`` and
    ``WORLD_SIZE`` (a single process: ``(0, 0, 1)``); shared by cohort runs and training.

    Raises:
        InputError: the variables are not integers, or the rank lies outside the world.
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")))
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise InputError(f"bad torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE): {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"bad torchrun environment: RANK {rank} of WORLD_SIZE {world}")
    return rank, local, world
