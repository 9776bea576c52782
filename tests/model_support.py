"""Helpers for tests that need CDPDNet weights: the parity rule and tiny official-format files."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch


def synthetic_tensor(seed_key: str, shape: Iterable[int], key: str) -> torch.Tensor:
    """One tensor of the parity reference's weight rule (shared/cdpdnet/parity/README.md)."""
    shape = list(shape)
    g = torch.Generator().manual_seed(zlib.crc32(seed_key.encode()))
    r = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = r.numel() // shape[0] if shape[0] > 1 else shape[-1]
        return r / math.sqrt(fan_in)
    if key.endswith(("weight", "lambda1", "running_var")):
        return 1 + 0.1 * r
    return 0.1 * r


def synthetic_state_dict(prefix: str, keys: Iterable[tuple[str, list[int]]], integer_buffers: dict) -> dict:
    """Regenerate every floating entry from its key; integer buffers come from the model."""
    out = {}
    for key, shape in keys:
        if key in integer_buffers:
            out[key] = integer_buffers[key]
        else:
            out[key] = synthetic_tensor(prefix + key, shape, key)
    return out


def write_official_checkpoint(path: Path, cdpdnet_sd: dict, *, module_prefix: bool = True) -> Path:
    """Save a state dict the way the official training code does (DDP ``module.`` keys in ``net``)."""
    net = {("module." + k if module_prefix else k): v for k, v in cdpdnet_sd.items()}
    torch.save({"net": net, "epoch": 1}, path)
    return path


def write_tiny_weights(folder: Path, *, seed: int = 0, config=None) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny random CDPDNet as official-format files: (cdpdnet.pth, dino model.safetensors, model)."""
    from safetensors.torch import save_file

    from napari_cdpdnet.model import CDPDNetConfig, build_model, official_state_dicts

    model = build_model(config or CDPDNetConfig.tiny(), seed=seed).eval()
    cnn, dino = official_state_dicts(model)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = write_official_checkpoint(folder / "cdpdnet.pth", cnn)
    dino_path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in dino.items()}, str(dino_path))
    return ckpt, dino_path, model
