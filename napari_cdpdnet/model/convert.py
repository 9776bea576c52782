"""From official weights to a model: DINOv2 key names, the architecture, the strict load.

* The CDPDNet checkpoint ``cdpdnet.pth`` is read by
  :func:`~napari_cdpdnet.model.checkpoint.load_official_checkpoint` (the 324-entry state dict
  with official key names).
* DINOv2 weights are separate (``facebook/dinov2-base``). :func:`load_dino_state_dict` reads a
  ``.safetensors`` or PyTorch file (or a Hugging Face snapshot folder) in Hugging Face hub names
  (``attention.attention.query``), transformers-5 names (``attention.q_proj``) or Meta's original
  names (``blocks.N.attn.qkv``), and returns hub names.
* :func:`build_from_official` infers the architecture from the tensors' shapes (so tiny models in
  the official format work too), checks both state dicts strictly and returns an eval-mode
  :class:`~napari_cdpdnet.model.cdpdnet.CDPDNetModel`. A file that does not fit raises
  :class:`~napari_cdpdnet.errors.WeightsError` listing missing and unexpected keys and naming every
  shape mismatch.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from napari_cdpdnet.errors import WeightsError
from napari_cdpdnet.model.cdpdnet import CDPDNetModel
from napari_cdpdnet.model.checkpoint import (
    StateDict,
    as_state_dict,
    check_file,
    read_torch_file,
    short_list,
    strip_module_prefix,
)
from napari_cdpdnet.model.config import DINO_HEAD_DIM, CDPDNetConfig

__all__ = [
    "load_dino_state_dict",
    "build_from_official",
    "official_state_dicts",
    "infer_config",
    "normalise_dino_keys",
    "dino_hub_to_transformers",
    "dino_transformers_to_hub",
]

logger = logging.getLogger(__name__)

#: hub (transformers 4.x) name fragment ↔ transformers-5 fragment, for DINOv2 attention.
_HUB_TO_TF5 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


# ---------------------------------------------------------------------------------- file reading
def load_dino_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read DINOv2 weights (``.safetensors``, ``.bin``/``.pth`` or a snapshot folder) in hub names.

    Hugging Face hub names, transformers-5 names and Meta's original names are all accepted and
    returned in hub names (``encoder.layer.N.attention.attention.query.weight``, ...).
    """
    what = "DINOv2 weights file"
    p = check_file(path, what)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise WeightsError(
                f"the folder {p} has neither model.safetensors nor pytorch_model.bin; "
                "pass the DINOv2 (facebook/dinov2-base) weights file"
            )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(
                f"cannot read the {what} {p}: the file is corrupt, truncated or not safetensors; "
                f"download it again ({type(exc).__name__}: {exc})"
            ) from exc
    else:
        obj = read_torch_file(p, what)
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
    sd = normalise_dino_keys(as_state_dict(obj, p, what))
    logger.info("read %d DINOv2 tensors from %s", len(sd), p)
    return sd


# ------------------------------------------------------------------------------ DINO key names
def dino_hub_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Hub / transformers-4 DINOv2 names → the names of transformers-5 ``Dinov2Model``."""
    out = {}
    for k, v in state_dict.items():
        for hub, tf5 in _HUB_TO_TF5:
            k = k.replace(hub, tf5)
        out[k] = v
    return out


def dino_transformers_to_hub(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers-5 DINOv2 names → hub names (inverse of :func:`dino_hub_to_transformers`)."""
    out = {}
    for k, v in state_dict.items():
        for hub, tf5 in _HUB_TO_TF5:
            k = k.replace(tf5, hub)
        out[k] = v
    return out


def _meta_to_hub(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Meta's original DINOv2 checkpoint names (``blocks.N.attn.qkv``) → hub names."""
    simple = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = {
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    out: StateDict = {}
    for k, v in state_dict.items():
        if k in simple:
            out[simple[k]] = v
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if not m:
            out[k] = v  # left for the strict check to report
            continue
        n, rest = m.groups()
        prefix = f"encoder.layer.{n}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
            continue
        for meta, hub in block.items():
            if rest.startswith(meta + ".") or rest == meta:
                rest = hub + rest[len(meta):]
                break
        out[prefix + rest] = v
    return out


def normalise_dino_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any supported DINOv2 naming (hub, transformers-5, Meta; ``dinov2.``/``module.`` prefixes
    stripped) → hub names."""
    sd: StateDict = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "dinov2."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    if "pos_embed" in sd or any(k.startswith("blocks.") for k in sd):
        sd = _meta_to_hub(sd)
    return dino_transformers_to_hub(sd)


# ---------------------------------------------------------------------------- config inference
def _shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...] | None:
    t = sd.get(key)
    if isinstance(t, torch.Tensor) and t.ndim == ndim:
        return tuple(t.shape)
    return None


def _infer_dino(dino_sd: Mapping[str, torch.Tensor], base: CDPDNetConfig, num_heads: int | None) -> dict[str, Any]:
    f: dict[str, Any] = {}
    cls = _shape(dino_sd, "embeddings.cls_token", 3)
    if cls is None:
        return f
    hidden = cls[-1]
    f["dino_hidden_size"] = hidden
    layers = {int(m.group(1)) for k in dino_sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if layers:
        f["dino_num_layers"] = max(layers) + 1
    if any(".mlp.weights_in." in k or ".mlp.w12." in k or ".mlp.gate_proj." in k for k in dino_sd):
        raise WeightsError("DINOv2 weights with a SwiGLU MLP (dinov2-giant) are not supported; use dinov2-base")
    if num_heads is not None:
        f["dino_num_heads"] = int(num_heads)
    elif hidden % DINO_HEAD_DIM == 0:
        f["dino_num_heads"] = hidden // DINO_HEAD_DIM
    else:
        raise WeightsError(
            f"cannot tell the attention-head count of a DINOv2 with hidden size {hidden} "
            f"(not a multiple of {DINO_HEAD_DIM}); pass dino_num_heads"
        )
    fc1 = _shape(dino_sd, "encoder.layer.0.mlp.fc1.weight", 2)
    if fc1 and fc1[0] % hidden == 0:
        f["dino_mlp_ratio"] = fc1[0] // hidden
    proj = _shape(dino_sd, "embeddings.patch_embeddings.projection.weight", 4)
    if proj:
        f["dino_patch_size"] = proj[-1]
    pos = _shape(dino_sd, "embeddings.position_embeddings", 3)
    if pos:
        n = math.isqrt(pos[1] - 1)
        f["dino_image_size"] = n * f.get("dino_patch_size", base.dino_patch_size)
    f["dino_use_mask_token"] = "embeddings.mask_token" in dino_sd
    f["dino_qkv_bias"] = "encoder.layer.0.attention.attention.query.bias" in dino_sd
    return f


def _infer_cnn(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    f: dict[str, Any] = {}
    ctx = "conv_blocks_context"
    keys = [f"{ctx}.0.blocks.0.conv_1.weight"] + [f"{ctx}.{d}.blocks.0.conv.weight" for d in range(1, 5)]
    keys.append(f"{ctx}.5.0.blocks.0.conv.weight")
    widths = [_shape(sd, k, 5) for k in keys]
    if all(widths):
        f["widths"] = tuple(s[0] for s in widths)  # type: ignore[index]
    options = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(rf"{ctx}\.0\.blocks\.0\.conv_(\d+)\.weight", k)))
    if options:
        f["input_channel_options"] = tuple(options)
    if s := _shape(sd, "seg_outputs.4.weight", 5):
        f["num_classes"] = s[0]
    if s := _shape(sd, "organ_embedding", 2):
        f["num_organs"], f["text_dim"] = s
    if s := _shape(sd, "task_embedding", 2):
        f["num_tasks"] = s[0]
    if s := _shape(sd, "text_to_vision.weight", 2):
        f["text_proj_dim"] = s[0]
    blk = "crossatt.1.transformer.layers.0.blocks"
    if s := _shape(sd, f"{blk}.0.attn.relative_position_bias_table", 2):
        span = round(s[0] ** (1 / 3))
        if span**3 == s[0] and span % 2 == 1:
            f["lwca_window"] = (span + 1) // 2
        f["lwca_heads"] = s[1]
    depth = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(blk)}\.(\d+)\.", k))}
    if depth:
        f["lwca_depth"] = max(depth) + 1
    fc1, dim = _shape(sd, f"{blk}.0.mlp.fc1.weight", 2), _shape(sd, f"{blk}.0.norm1.weight", 1)
    if fc1 and dim and fc1[0] % dim[0] == 0:
        f["lwca_mlp_ratio"] = fc1[0] // dim[0]
    if s := _shape(sd, "adaptors.1.enc.0.weight", 5):
        f["adaptor_kernel"] = s[2]
    return f


def infer_config(
    cdpdnet_state_dict: Mapping[str, torch.Tensor],
    dino_state_dict: Mapping[str, torch.Tensor],
    *,
    legacy_pos_interp: bool = False,
    dino_num_heads: int | None = None,
) -> CDPDNetConfig:
    """The :class:`CDPDNetConfig` whose parameter shapes match the given state dicts.

    ``dino_state_dict`` must use hub names (see :func:`normalise_dino_keys`). Fields that cannot
    be read from the tensors keep their official values, so a wrong file still produces a config
    and the strict check can then report precisely what does not fit.
    """
    base = CDPDNetConfig.official()
    fields = _infer_cnn(cdpdnet_state_dict)
    fields.update(_infer_dino(dino_state_dict, base, dino_num_heads))
    fields["legacy_pos_interp"] = bool(legacy_pos_interp)
    try:
        return base.replace(**fields)
    except ValueError as exc:
        raise WeightsError(f"the weights describe an unsupported architecture: {exc}") from exc


# -------------------------------------------------------------------------------- strict check
def _check_keys(
    expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], what: str, hint: str
) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} (file {list(given[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {short_list(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {short_list(mismatched)}")
    raise WeightsError(f"the {what} does not fit the model: " + "; ".join(parts) + f". {hint}")


def _looks_like_dino(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.", "blocks.")) or k == "pos_embed" for k in sd)


def build_from_official(
    cdpdnet_state_dict: Mapping[str, torch.Tensor],
    dino_state_dict: Mapping[str, torch.Tensor],
    *,
    legacy_pos_interp: bool = False,
    dino_num_heads: int | None = None,
) -> CDPDNetModel:
    """Build the model for official-format weights and load them strictly; returns it in eval mode.

    Args:
        cdpdnet_state_dict: the CDPDNet ``net`` state dict (official names; ``module.`` is
            stripped where present), e.g. from :func:`load_official_checkpoint`. All 324 official
            entries are required, including the parameters the forward never uses, and the
            text-embedding buffers are taken from it.
        dino_state_dict: DINOv2 weights in any naming :func:`normalise_dino_keys` accepts; its
            depth (number of blocks) and width set the encoder's.
        legacy_pos_interp: use the transformers<4.45 "+0.1" position interpolation.
        dino_num_heads: DINOv2 attention heads, only needed when the hidden size is not a
            multiple of 64 (all published DINOv2 models use 64-dim heads).

    Raises:
        WeightsError: a state dict lists missing/unexpected keys or shape mismatches.
    """
    cnn_sd = strip_module_prefix(cdpdnet_state_dict)
    dino_sd = normalise_dino_keys(dino_state_dict)
    config = infer_config(cnn_sd, dino_sd, legacy_pos_interp=legacy_pos_interp, dino_num_heads=dino_num_heads)
    with torch.device("meta"):
        model = CDPDNetModel(config)
    cnn_hint = "Expected the CDPDNet checkpoint cdpdnet.pth (jwu2009/CDPDNet)"
    if _looks_like_dino(cnn_sd):
        cnn_hint += "; these look like DINOv2 weights: were the two files swapped?"
    _check_keys({k: v.shape for k, v in model.net.state_dict().items()}, cnn_sd, "CDPDNet state dict", cnn_hint)
    expected_dino = dino_transformers_to_hub({k: v for k, v in model.dino.vit.state_dict().items()})
    dino_hint = "Expected DINOv2 weights such as facebook/dinov2-base (model.safetensors)"
    if any(k.startswith(("conv_blocks_context.", "crossatt.")) for k in dino_sd):
        dino_hint += "; these look like CDPDNet weights: were the two files swapped?"
    _check_keys({k: v.shape for k, v in expected_dino.items()}, dino_sd, "DINOv2 state dict", dino_hint)
    model.to_empty(device="cpu")
    model.net.load_state_dict(cnn_sd, strict=True)
    model.dino.vit.load_state_dict(dino_hub_to_transformers(dino_sd), strict=True)
    model.dino.vit.requires_grad_(False)
    logger.info(
        "built CDPDNet (widths %s, %d DINO layers, %s position interpolation)",
        config.widths, config.dino_num_layers, "legacy" if legacy_pos_interp else "size-based",
    )
    return model.eval()


def official_state_dicts(model: CDPDNetModel) -> tuple[StateDict, StateDict]:
    """``(cdpdnet_sd, dino_sd)`` in official names (CDPDNet ``net`` keys, DINOv2 hub keys).

    A tiny official-format checkpoint for tests elsewhere:
    ``torch.save({"net": {"module." + k: v for k, v in cdpdnet_sd.items()}}, path)``.
    """
    cnn = dict(model.net.state_dict())
    dino = dino_transformers_to_hub(model.dino.vit.state_dict())
    return cnn, dino
