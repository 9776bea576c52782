"""The CDPDNet model: architecture, official-weight loading, builders and the text side.

``cdpdnet`` (the network), ``lwca`` and ``dino`` (its parts), ``config`` (the architecture as
data), ``checkpoint`` (the one reader of checkpoint files), ``convert`` (official weights to a
model) and ``text`` (the fixed CLIP text embeddings and the optional CLIP scorer for free text).

Importing this package imports torch (``import napari_cdpdnet`` alone does not); transformers is
imported when a model is built, open_clip only when CLIP is loaded.

Typical use::

    from napari_cdpdnet.model import build_from_official, load_dino_state_dict, load_official_checkpoint

    model = build_from_official(load_official_checkpoint("cdpdnet.pth"),
                                load_dino_state_dict("dinov2-base/model.safetensors"))
    logits = model(patch, torch.tensor([task_id]))   # [B, 32, 96, 96, 96]
"""

from __future__ import annotations

from napari_cdpdnet.model.cdpdnet import PATCH_SIZE, CDPDNet, CDPDNetModel, build_model
from napari_cdpdnet.model.checkpoint import load_official_checkpoint
from napari_cdpdnet.model.config import CDPDNetConfig
from napari_cdpdnet.model.convert import (
    build_from_official,
    infer_config,
    load_dino_state_dict,
    normalise_dino_keys,
    official_state_dicts,
)

__all__ = [
    "PATCH_SIZE",
    "CDPDNet",
    "CDPDNetConfig",
    "CDPDNetModel",
    "build_from_official",
    "build_model",
    "infer_config",
    "load_dino_state_dict",
    "load_official_checkpoint",
    "normalise_dino_keys",
    "official_state_dicts",
]
