"""Architecture hyper-parameters of CDPDNet (CNN widths, text/FiLM sizes, LWCA, DINOv2 geometry).

The official network is one fixed configuration (:meth:`CDPDNetConfig.official`); the widths are
configurable so tests and experiments can build a small model quickly (:meth:`CDPDNetConfig.tiny`).
Everything that does not change the parameter shapes (kernel sizes, strides, the 96³ patch) is a
constant of the architecture and lives in :mod:`napari_cdpdnet.model.cdpdnet`.

This module imports only the standard library; transformers is imported by :meth:`dino_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Dinov2Config

__all__ = ["CDPDNetConfig", "OFFICIAL_WIDTHS", "DINO_HEAD_DIM"]

#: Feature channels of encoder stages 0..4 and of the bottleneck (stage 5) in the official model.
OFFICIAL_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 320, 320)

#: Every published DINOv2 model (small/base/large/giant) uses 64-dim attention heads; the head
#: count is not visible in a state dict, so it is derived from the hidden size with this.
DINO_HEAD_DIM = 64


@dataclass(frozen=True)
class CDPDNetConfig:
    """Shapes of a CDPDNet model; the defaults are the official model (``jwu2009/CDPDNet``).

    Attributes:
        widths: channels of encoder stages 0..4 and of the bottleneck; ``widths[5]`` must equal
            ``widths[4]`` because the same FiLM block modulates the bottleneck and skip 4.
        num_classes: output channels (independent sigmoid logits, one per structure).
        num_organs: rows of the organ text-embedding table (one CLIP prompt per structure).
        num_tasks: rows of the task text-embedding table (= TTPG prompt channels).
        text_dim: CLIP text-embedding size (512 for ViT-B/32).
        text_proj_dim: size of the text projections ``text_to_vision``/``task_to_vision``.
        input_channel_options: the alternative first convolutions of stage 0 (only 1 is usable).
        lwca_heads, lwca_depth, lwca_window, lwca_mlp_ratio: window cross-attention geometry.
        adaptor_kernel: depth-wise kernel (and stride) of the adaptors along the slice axis.
        dino_*: the DINOv2 ViT used as a frozen slice encoder (dinov2-base by default).
        legacy_pos_interp: use the transformers<4.45 "+0.1" position-embedding interpolation
            instead of the current size-based one (see :mod:`napari_cdpdnet.model.dino`).
    """

    widths: tuple[int, ...] = OFFICIAL_WIDTHS
    num_classes: int = 32
    num_organs: int = 32
    num_tasks: int = 11
    text_dim: int = 512
    text_proj_dim: int = 256
    input_channel_options: tuple[int, ...] = (1, 2, 4)
    lwca_heads: int = 4
    lwca_depth: int = 2
    lwca_window: int = 3
    lwca_mlp_ratio: int = 4
    adaptor_kernel: int = 14
    dino_hidden_size: int = 768
    dino_num_layers: int = 12
    dino_num_heads: int = 12
    dino_mlp_ratio: int = 4
    dino_image_size: int = 518
    dino_patch_size: int = 14
    dino_layer_norm_eps: float = 1e-6
    dino_use_mask_token: bool = True
    dino_qkv_bias: bool = True
    legacy_pos_interp: bool = False

    def __post_init__(self) -> None:
        w = tuple(int(v) for v in self.widths)
        object.__setattr__(self, "widths", w)
        object.__setattr__(
            self, "input_channel_options", tuple(int(v) for v in self.input_channel_options)
        )
        problems = []
        if len(w) != 6 or min(w) < 1:
            problems.append(f"widths must be 6 positive channel counts, got {w}")
        elif w[5] != w[4]:
            problems.append(f"widths[5] (bottleneck) must equal widths[4], got {w}")
        elif any(c % self.lwca_heads for c in w[1:5]):
            problems.append(f"widths[1:5] {w[1:5]} must be divisible by lwca_heads={self.lwca_heads}")
        if 1 not in self.input_channel_options:
            problems.append("input_channel_options must contain 1 (CT has one channel)")
        if self.dino_num_layers < 3:
            problems.append(
                f"dino_num_layers must be >= 3 (the last three blocks feed the CNN), got {self.dino_num_layers}"
            )
        if self.dino_hidden_size % self.dino_num_heads:
            problems.append(
                f"dino_hidden_size={self.dino_hidden_size} is not divisible by dino_num_heads={self.dino_num_heads}"
            )
        if self.lwca_window < 1 or self.adaptor_kernel < 1:
            problems.append("lwca_window and adaptor_kernel must be >= 1")
        if problems:
            raise ValueError("invalid CDPDNetConfig: " + "; ".join(problems))

    @classmethod
    def official(cls) -> CDPDNetConfig:
        """The published model: CDPDNet widths 32..320 with a 12-layer DINOv2-base."""
        return cls()

    @classmethod
    def tiny(cls) -> CDPDNetConfig:
        """A very small model with the official topology, for fast tests (still 96³ patches).

        The DINO branch keeps 64-dim heads so that :func:`build_from_official` infers the same
        head count from a tiny state dict, and a 16×16 position grid so that the position
        embeddings are really interpolated (to 7×7) as in the official model.
        """
        return cls(
            widths=(4, 8, 12, 16, 20, 20),
            text_dim=32,
            text_proj_dim=8,
            dino_hidden_size=64,
            dino_num_layers=3,
            dino_num_heads=1,
            dino_mlp_ratio=2,
            dino_image_size=224,
        )

    @property
    def fusion_channels(self) -> int:
        """Hidden channels of the TTPG fusion convs: ``(bottleneck + tasks) // 4`` (331//4 = 82)."""
        return (self.widths[5] + self.num_tasks) // 4

    def replace(self, **changes: Any) -> CDPDNetConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (tuples become lists)."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["input_channel_options"] = list(self.input_channel_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CDPDNetConfig:
        """Inverse of :meth:`to_dict`; unknown fields are an error (a typo must not pass)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CDPDNetConfig fields: {unknown}")
        return cls(**d)

    def dino_config(self, attn_implementation: str = "eager") -> Dinov2Config:
        """The transformers ``Dinov2Config`` of the slice encoder (no download, no file access).

        Eager attention by default: the official reference was computed with it and the port
        then matches bit for bit; SDPA differs by float round-off (~1e-4 in the logits).
        """
        from transformers import Dinov2Config

        return Dinov2Config(
            hidden_size=self.dino_hidden_size,
            num_hidden_layers=self.dino_num_layers,
            num_attention_heads=self.dino_num_heads,
            mlp_ratio=self.dino_mlp_ratio,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=self.dino_layer_norm_eps,
            image_size=self.dino_image_size,
            patch_size=self.dino_patch_size,
            num_channels=3,
            qkv_bias=self.dino_qkv_bias,
            layerscale_value=1.0,
            drop_path_rate=0.0,
            use_swiglu_ffn=False,
            use_mask_token=self.dino_use_mask_token,
            attn_implementation=attn_implementation,
        )
