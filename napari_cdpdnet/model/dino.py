"""The frozen DINOv2 slice encoder of CDPDNet.

A transformers ``Dinov2Model`` is built from a ``Dinov2Config`` (never ``from_pretrained``: the
weights come from a file through :mod:`napari_cdpdnet.model.convert`). A 96³ patch is cut into
its D0-slices, every slice is resized to the next multiple of the ViT patch size *plus one patch*
(96 → 98), copied to three identical channels (no ImageNet normalisation, as in the official code)
and encoded; the patch tokens of the last three transformer blocks are returned as feature
volumes ``[B, hidden, slices, 7, 7]``.

Position embeddings are interpolated from the pre-training grid (37×37 for dinov2-base) to the
token grid (7×7) in float32 with bicubic sampling, either size-based (transformers ≥ 4.45, the
default) or with the legacy "+0.1" scale factor (transformers < 4.45); the two differ visibly in
the final logits, so the behaviour is a flag.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_cdpdnet.model.config import CDPDNetConfig

__all__ = ["DinoSliceEncoder", "interpolate_pos_embed", "slices_to_images", "dino_input_size"]

logger = logging.getLogger(__name__)

#: Number of DINO blocks (counted from the last) whose outputs feed the CNN (encoder stages 2-4).
NUM_FEATURE_LAYERS = 3


def dino_input_size(size: int, patch: int) -> int:
    """Slice side fed to the ViT: one patch more than fits (96 → 98 for patch 14), as officially."""
    return (size // patch + 1) * patch


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid_h: int, grid_w: int, *, legacy: bool = False
) -> torch.Tensor:
    """Resample ``[1, 1 + n*n, D]`` position embeddings to a ``grid_h × grid_w`` token grid.

    ``legacy=False`` samples with ``size=(grid_h, grid_w)`` (current transformers);
    ``legacy=True`` passes ``scale_factor=(grid + 0.1) / n`` as transformers < 4.45 did, which
    makes PyTorch sample with step ``n / (grid + 0.1)``. The CLS embedding is kept unchanged and
    nothing is interpolated when the grid already matches (both behaviours agree there).
    """
    num_positions = pos_embed.shape[1] - 1
    n = int(math.isqrt(num_positions))
    if n * n != num_positions:
        raise ValueError(f"position embeddings of {num_positions} patches are not a square grid")
    if num_positions == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    grid = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2).to(torch.float32)
    if legacy:
        scale = (float((grid_h + 0.1) / n), float((grid_w + 0.1) / n))
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (grid_h, grid_w):  # pragma: no cover - cannot happen for n >= 1
            raise ValueError(f"legacy interpolation gave {tuple(grid.shape[-2:])}")
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)


def slices_to_images(x: torch.Tensor, patch: int, num_slices: int | None = None) -> torch.Tensor:
    """Turn ``[B, 1, D0, D1, D2]`` into ``[B*S, 3, H, W]`` ViT images (b-major, then slice).

    Only the first ``num_slices`` D0-slices are resized (default: all). Resizing each slice with
    2-D bilinear sampling is the same computation as the official trilinear resize that keeps D0.
    """
    b, c, d0, d1, d2 = x.shape
    if c != 1:
        raise ValueError(f"the DINO branch takes one channel, got {c}")
    s = d0 if num_slices is None else num_slices
    h, w = dino_input_size(d1, patch), dino_input_size(d2, patch)
    sl = x[:, 0, :s].reshape(b * s, 1, d1, d2)
    img = F.interpolate(sl, size=(h, w), mode="bilinear", align_corners=False)
    return img.expand(-1, 3, -1, -1)


class DinoSliceEncoder(nn.Module):
    """Frozen DINOv2 applied slice by slice; returns the last three blocks' patch tokens.

    Args:
        config: the model configuration (its ``dino_*`` fields and ``legacy_pos_interp``).

    The wrapped ``transformers.Dinov2Model`` is available as :attr:`vit`; its parameters never
    require gradients and it always runs in eval mode under ``no_grad``.
    """

    def __init__(self, config: CDPDNetConfig) -> None:
        super().__init__()
        from transformers import Dinov2Model

        self.vit = Dinov2Model(config.dino_config())
        self.vit.requires_grad_(False)
        self.vit.eval()
        self.patch_size = config.dino_patch_size
        self.hidden_size = config.dino_hidden_size
        self.num_layers = config.dino_num_layers
        self.legacy_pos_interp = config.legacy_pos_interp

    def train(self, mode: bool = True) -> DinoSliceEncoder:
        """The encoder is frozen: it stays in eval mode whatever the parent's mode."""
        super().train(False)
        return self

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.vit.embeddings
        tokens = emb.patch_embeddings(images)
        gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        with torch.autocast(images.device.type, enabled=False):
            pos = interpolate_pos_embed(
                emb.position_embeddings, gh, gw, legacy=self.legacy_pos_interp
            )
        cls = emb.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat((cls.to(tokens.dtype), tokens), dim=1) + pos.to(tokens.dtype)

    def forward(
        self, x: torch.Tensor, num_slices: int | None = None, *, straightforward: bool = False
    ) -> list[torch.Tensor]:
        """Encode the first ``num_slices`` D0-slices of ``x`` ``[B, 1, D0, D1, D2]``.

        Returns three tensors ``[B, hidden, S, H/p, W/p]``: the outputs of blocks L-2, L-1, L
        (pre final LayerNorm, CLS token dropped). ``straightforward=True`` does what the official
        code does instead of only what reaches the output: all slices through a trilinear
        resize, every hidden state kept and the final LayerNorm applied (results identical).
        """
        b, _, d0, d1, d2 = x.shape
        with torch.no_grad():
            if straightforward:
                size = (d0, dino_input_size(d1, self.patch_size), dino_input_size(d2, self.patch_size))
                vol = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
                s = d0
                images = vol[:, 0].reshape(b * s, 1, *size[1:]).repeat(1, 3, 1, 1)
            else:
                s = d0 if num_slices is None else min(num_slices, d0)
                images = slices_to_images(x, self.patch_size, s)
            gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            hidden = self._embed(images)
            first_kept = self.num_layers - NUM_FEATURE_LAYERS
            states = [hidden]
            feats = []
            for i, layer in enumerate(self.vit.encoder.layer):
                hidden = layer(hidden)
                if straightforward:
                    states.append(hidden)
                elif i >= first_kept:
                    feats.append(hidden)
            if straightforward:
                self.vit.layernorm(hidden)  # computed (and unused) by the official model
                feats = list(states[-NUM_FEATURE_LAYERS:])
        out = []
        for f in feats:
            f = f[:, 1:].reshape(b, s, gh, gw, -1)
            out.append(f.permute(0, 4, 1, 2, 3))
        return out
