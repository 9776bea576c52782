"""The one reader of CDPDNet checkpoint files.

Every ``.pth`` the package reads goes through :func:`read_torch_file`: on the CPU, with
``weights_only=True`` (no code from the file runs), and with one clear
:class:`~napari_cdpdnet.errors.WeightsError` for a missing, empty, truncated or foreign file.

A CDPDNet checkpoint is the official training file ``cdpdnet.pth`` (``{"net": state_dict, ...}``
saved from DistributedDataParallel, so its keys usually start with ``module.``), a checkpoint
written by ``cdpdnet train`` (the same format, plus optimiser and scheduler state), or a bare
state dict. :func:`read_checkpoint` (:func:`unwrap_checkpoint` once loaded) unwraps all three into the state dict under official key
names and the file's other entries; :func:`load_official_checkpoint` keeps only the state dict.
Reading the text embeddings out of a checkpoint is :mod:`napari_cdpdnet.model.text`'s job,
building a model from the state dict :mod:`napari_cdpdnet.model.convert`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from napari_cdpdnet.errors import WeightsError

__all__ = [
    "StateDict",
    "read_torch_file",
    "check_file",
    "as_state_dict",
    "strip_module_prefix",
    "unwrap_checkpoint",
    "read_checkpoint",
    "load_official_checkpoint",
    "short_list",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_LIST_LIMIT = 12


def short_list(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    """``a, b, c ... and 9 more``: key lists in error messages stay readable."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def check_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, refused when it does not exist or is an empty file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"the {what} {p} does not exist; check the path or download the weights")
    if p.is_file() and p.stat().st_size == 0:
        raise WeightsError(f"the {what} {p} is empty (0 bytes); download it again")
    return p


def read_torch_file(path: Path, what: str, *, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; any failure is one WeightsError.

    ``mmap`` maps the file instead of reading it (a few buffers of a large checkpoint cost only
    their own size); legacy non-zip files cannot be mapped and are read whole.
    """
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear WeightsError
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            hint = (
                "it holds Python objects other than tensors, which are not loaded for safety; "
                "use the original file or re-save only its tensors"
            )
        else:
            hint = "the file is corrupt, truncated or not a PyTorch file; download it again"
        raise WeightsError(f"cannot read the {what} {path}: {hint} ({type(exc).__name__}: {text})") from exc


def as_state_dict(obj: Any, path: Path, what: str) -> StateDict:
    """``obj`` when it is a non-empty mapping of names to tensors, else a WeightsError."""
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"the {what} {path} does not hold a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"the {what} {path} is not a state dict: entries {short_list(map(str, bad))} are not named tensors"
        )
    return dict(obj)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove the ``module.`` prefix (DistributedDataParallel) from the keys that have it."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def unwrap_checkpoint(obj: Any, path: Path, what: str) -> tuple[StateDict, dict[str, Any]]:
    """``(state dict, other entries)`` of a loaded CDPDNet checkpoint (see :func:`read_checkpoint`)."""
    rest: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "net" in obj:
        rest = {k: v for k, v in obj.items() if k != "net"}
        obj = obj["net"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        rest = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"the {what} {path} has no 'net' entry (top-level keys: {short_list(map(str, obj))}); "
            "expected the official training checkpoint cdpdnet.pth from jwu2009/CDPDNet"
        )
    return strip_module_prefix(as_state_dict(obj, path, what)), rest


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, Any]]:
    """``(state dict, other entries)`` of a CDPDNet checkpoint file.

    The state dict is ``checkpoint["net"]`` (official and ``cdpdnet train`` files), else
    ``checkpoint["state_dict"]``, else the file itself when it is a bare state dict, with
    ``module.`` stripped from the keys that start with it. The other entries are the rest of the
    top level (``epoch``, ``optimizer``, ``scheduler``, ...), empty for a bare state dict.

    Raises:
        WeightsError: a missing, corrupt, truncated or foreign file. Whether the tensors fit the
            model is checked by :func:`~napari_cdpdnet.model.convert.build_from_official`.
    """
    what = "CDPDNet checkpoint"
    p = check_file(path, what)
    if p.is_dir():
        raise WeightsError(f"the {what} {p} is a folder; pass the cdpdnet.pth file inside it")
    sd, rest = unwrap_checkpoint(read_torch_file(p, what), p, what)
    logger.info("read %d tensors from %s", len(sd), p)
    return sd, rest


def load_official_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """Read the official ``cdpdnet.pth`` and return the CDPDNet state dict (official key names).

    The file is loaded with ``weights_only=True`` on the CPU. The state dict is taken from
    ``checkpoint["net"]`` (a bare state dict is accepted too) and ``module.`` is stripped from the
    keys that start with it. Raises :class:`WeightsError` for a missing, corrupt, truncated or
    foreign file; whether the tensors fit the model is checked by :func:`build_from_official`.
    """
    return read_checkpoint(path)[0]
