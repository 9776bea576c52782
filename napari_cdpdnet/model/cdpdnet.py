"""CDPDNet: the 3-D CNN with DINO fusion, FiLM text alignment and the TTPG task prompt.

:class:`CDPDNet` is the network of the official checkpoint (its parameter names are the official
``state_dict`` names); :class:`CDPDNetModel` combines it with the frozen
:class:`~napari_cdpdnet.model.dino.DinoSliceEncoder` and is what the rest of the package calls:
``model(x, task_id)`` with ``x`` ``[B, 1, 96, 96, 96]`` float32 in [0, 1] and ``task_id`` int64
``[B]`` returns logits ``[B, num_classes, 96, 96, 96]``.

Data flow (one 96³ patch, official configuration):

* encoder stages 0..4 (conv-IN-LReLU ×2; stage 0 uses (1,3,3) kernels, stage 1 halves only
  D1/D2); at stages 2..4 the DINO features of the last three ViT blocks go through an adaptor
  (depth-wise conv over 14 slices, conv-BN-ReLU, trilinear resize) and LWCA cross-attention, whose
  output replaces the CNN feature;
* bottleneck (stage 5), FiLM-modulated; TTPG: ``intermedia_conv`` → FiLM with the task texts →
  ``fusion_layer`` on [bottleneck, prompt] → channel ``task_id[0]`` appended to the bottleneck;
* decoder: transposed conv, concat with the FiLM-modulated skip, conv-IN-LReLU ×2; last head.

FiLM ("Alignment") flattens *all* organ (or task) text embeddings into one vector, so every
modulation is a per-channel constant ``γ·x + β`` fixed by the weights: in no-grad evaluation the
constants are computed once and cached (recomputed when any weight they depend on changes).

Evaluation uses the exact speed-ups of :mod:`napari_cdpdnet.model.speedups` (DINO slice cache,
matrix-multiply kernels, no needless copies; ``model.speedups``) and, opt-in,
``torch.compile`` (``model.set_compile(True)``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_cdpdnet.errors import InputError
from napari_cdpdnet.model.config import CDPDNetConfig
from napari_cdpdnet.model.dino import DinoSliceEncoder, SliceCache
from napari_cdpdnet.model.lwca import LWCA
from napari_cdpdnet.model.speedups import (
    Compiler,
    Speedups,
    conv_one_channel_cl,
    instance_norm_act_,
    pointwise_matmul,
    upsample_matmul,
)

__all__ = ["CDPDNet", "CDPDNetModel", "Alignment", "build_model", "PATCH_SIZE", "film"]

logger = logging.getLogger(__name__)

#: The only patch size the DINO branch and the adaptors support.
PATCH_SIZE: tuple[int, int, int] = (96, 96, 96)
#: Down-sampling (conv stride) of encoder stages 1..5; stage 1 keeps D0.
POOL_KERNELS: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
STAGE0_KERNEL = (1, 3, 3)
KERNEL = (3, 3, 3)
#: Encoder stages fused with DINO (stage d uses adaptor/LWCA d-1 and DINO feature d-2).
FUSED_STAGES = (2, 3, 4)
IN_EPS = 1e-5
LRELU_SLOPE = 1e-2


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple((k - 1) // 2 for k in kernel)


def film(
    feature: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``γ_c · feature + β_c`` with per-channel ``γ``, ``β`` of shape ``[C]`` (not ``1 + γ``).

    ``out`` (same dtype as ``feature``) receives the result, e.g. part of a concatenation buffer.
    """
    shape = (1, -1) + (1,) * (feature.ndim - 2)
    if out is None:
        out = feature * gamma.view(shape).to(feature.dtype)
    else:
        torch.mul(feature, gamma.view(shape).to(feature.dtype), out=out)
    return out.add_(beta.view(shape).to(feature.dtype))


class ConvNormAct(nn.Module):
    """Conv3d (bias) → InstanceNorm3d (affine, per-sample statistics) → LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, tuple(kernel), tuple(stride), _padding(kernel))
        self.instnorm = nn.InstanceNorm3d(cout, eps=IN_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.instnorm(self.conv(x)), LRELU_SLOPE, inplace=True)

    def forward_fast(self, x: torch.Tensor, fast_norm: bool = True) -> torch.Tensor:
        """:meth:`forward` in evaluation: the output keeps ``x``'s layout; ``fast_norm``: the norm
        and activation of :func:`instance_norm_act_` (float32 on CPU)."""
        return _norm_act(self.conv(x), self.instnorm, fast_norm)


def _norm_act(y: torch.Tensor, norm: nn.InstanceNorm3d, fast: bool) -> torch.Tensor:
    """Norm and LeakyReLU; ``fast`` uses :func:`instance_norm_act_` for float32 CPU tensors (under
    autocast or on another device the modules run as before)."""
    if not fast or y.dtype != torch.float32 or y.device.type != "cpu":
        return F.leaky_relu(norm(y), LRELU_SLOPE, inplace=True)
    return instance_norm_act_(y, norm.weight, norm.bias, norm.eps, LRELU_SLOPE)


def run_blocks(module: nn.Module, x: torch.Tensor, fast: bool, channels_last: bool) -> torch.Tensor:
    """``module(x)`` for a stack of conv blocks; ``fast``: each block's :meth:`forward_fast`;
    ``channels_last``: every block's output in NDHWC layout."""
    if not fast and not channels_last:
        return module(x)
    for blk in module.modules():
        if isinstance(blk, MultiChannelConvNormAct):
            x = blk.forward_fast(x, fast, channels_last)
        elif isinstance(blk, ConvNormAct):
            x = blk.forward_fast(x, fast)
        else:
            continue
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


class MultiChannelConvNormAct(nn.Module):
    """First conv of stage 0: one alternative convolution per accepted input channel count.

    The official model owns ``conv_1``, ``conv_2`` and ``conv_4`` and picks one by the input's
    channel count; CT always has one channel, the others only exist in the checkpoint.
    """

    def __init__(self, channel_options: Sequence[int], cout: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.channel_options = tuple(channel_options)
        for c in self.channel_options:
            self.add_module(f"conv_{c}", nn.Conv3d(c, cout, tuple(kernel), 1, _padding(kernel)))
        self.instnorm = nn.InstanceNorm3d(cout, eps=IN_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c not in self.channel_options:
            raise InputError(f"the network takes {self.channel_options} input channels, got {c}")
        conv = getattr(self, f"conv_{c}")
        return F.leaky_relu(self.instnorm(conv(x)), LRELU_SLOPE, inplace=True)

    def forward_fast(self, x: torch.Tensor, fast_norm: bool = True, channels_last: bool = False) -> torch.Tensor:
        """:meth:`forward` in evaluation; ``channels_last``: a 1-channel CPU input is convolved by
        :func:`conv_one_channel_cl` (NDHWC output)."""
        c = x.shape[1]
        if c not in self.channel_options:
            raise InputError(f"the network takes {self.channel_options} input channels, got {c}")
        conv = getattr(self, f"conv_{c}")
        if channels_last and c == 1 and x.device.type == "cpu" and all(k % 2 for k in conv.kernel_size):
            y = conv_one_channel_cl(x, conv.weight, conv.bias)
        else:
            y = conv(x)
        return _norm_act(y, self.instnorm, fast_norm)


class StackedConvLayers(nn.Module):
    """A sequence of conv blocks kept under ``blocks.N`` (the official key layout)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _stack(cin: int, cout: int, n: int, kernel: Sequence[int], first_stride: Sequence[int] = (1, 1, 1)) -> StackedConvLayers:
    return StackedConvLayers(
        [ConvNormAct(cin, cout, kernel, first_stride)] + [ConvNormAct(cout, cout, kernel) for _ in range(n - 1)]
    )


class Adaptor(nn.Module):
    """DINO feature volume → CNN channels: depth-wise slice conv, conv-BN-ReLU.

    The depth-wise conv has kernel = stride = ``kernel`` along the slice axis, so only the first
    ``(D0 // kernel) * kernel`` slices can influence the result (84 of 96).
    """

    def __init__(self, dino_dim: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.enc = nn.Sequential(
            nn.Conv3d(dino_dim, dino_dim, (kernel, 1, 1), (kernel, 1, 1), groups=dino_dim),
            nn.Conv3d(dino_dim, cout, 3, padding=1),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, feat: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Adapt ``feat`` and resize it (trilinear, align_corners=True) to the CNN ``size``."""
        out = self.enc(feat)
        return F.interpolate(out, size=tuple(size), mode="trilinear", align_corners=True)


class Alignment(nn.Module):
    """FiLM from a flattened text matrix: ``γ = gamma(vec(T))``, ``β = beta(vec(T))``."""

    def __init__(self, feature_dim: int, text_dim: int) -> None:
        super().__init__()
        self.gamma = nn.Linear(text_dim, feature_dim)
        self.beta = nn.Linear(text_dim, feature_dim)
        nn.init.xavier_uniform_(self.gamma.weight)
        nn.init.xavier_uniform_(self.beta.weight)

    def coefficients(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(γ, β)``, each ``[C]``, for a text matrix ``[N, D]`` flattened row-major."""
        vec = text.reshape(1, -1)
        return self.gamma(vec)[0], self.beta(vec)[0]

    def forward(self, feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return film(feature, *self.coefficients(text))


class CDPDNet(nn.Module):
    """The CDPDNet CNN (everything in the official checkpoint's ``net``).

    Args:
        config: widths and sizes; :meth:`CDPDNetConfig.official` reproduces the checkpoint.

    ``forward(x, dino_feats, task_id)`` takes the image ``[B, 1, 96, 96, 96]``, the three DINO
    feature volumes from :class:`DinoSliceEncoder` and the task ids; returns the logits.
    """

    def __init__(self, config: CDPDNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        t = config.num_tasks
        self.register_buffer("organ_embedding", torch.randn(config.num_organs, config.text_dim))
        self.register_buffer("task_embedding", torch.randn(t, config.text_dim))
        self.intermedia_conv = StackedConvLayers([ConvNormAct(w[5], t, KERNEL), ConvNormAct(t, t, KERNEL)])
        f = config.fusion_channels
        self.fusion_layer = StackedConvLayers(
            [ConvNormAct(w[5] + t, f, KERNEL), ConvNormAct(f, f, KERNEL), ConvNormAct(f, t, KERNEL)]
        )
        self.conv_blocks_localization = nn.ModuleList(
            nn.Sequential(_stack(2 * w[4 - u], w[4 - u], 1, KERNEL), _stack(w[4 - u], w[4 - u], 1, KERNEL))
            for u in range(5)
        )
        stage0 = StackedConvLayers(
            [
                MultiChannelConvNormAct(config.input_channel_options, w[0], STAGE0_KERNEL),
                ConvNormAct(w[0], w[0], STAGE0_KERNEL),
            ]
        )
        context: list[nn.Module] = [stage0]
        context += [_stack(w[d - 1], w[d], 2, KERNEL, POOL_KERNELS[d - 1]) for d in range(1, 5)]
        context.append(nn.Sequential(_stack(w[4], w[5], 1, KERNEL, POOL_KERNELS[4]), _stack(w[5], w[5], 1, KERNEL)))
        self.conv_blocks_context = nn.ModuleList(context)
        ups = [(w[5] + 1, w[4])] + [(w[5 - u], w[4 - u]) for u in range(1, 5)]
        self.tu = nn.ModuleList(
            nn.ConvTranspose3d(cin, cout, POOL_KERNELS[4 - u], POOL_KERNELS[4 - u], bias=False)
            for u, (cin, cout) in enumerate(ups)
        )
        self.seg_outputs = nn.ModuleList(
            nn.Conv3d(w[4 - u], config.num_classes, 1, bias=False) for u in range(5)
        )
        self._init_cnn_weights()  # official: He init before the modules below are created
        self.adaptors = nn.ModuleList(
            Adaptor(config.dino_hidden_size, w[i + 1], config.adaptor_kernel) for i in range(4)
        )
        self.crossatt = nn.ModuleList(
            LWCA(w[i + 1], config.lwca_heads, config.lwca_depth, config.lwca_window, config.lwca_mlp_ratio)
            for i in range(4)
        )
        organ_vec = config.num_organs * config.text_proj_dim
        self.deep_film_block = nn.ModuleList(Alignment(w[i], organ_vec) for i in range(5))
        self.promt_film_block = Alignment(t, t * config.text_proj_dim)
        self.text_to_vision = nn.Linear(config.text_dim, config.text_proj_dim)
        self.task_to_vision = nn.Linear(config.text_dim, config.text_proj_dim)
        self._film_cache: tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _init_cnn_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_text_embeddings(self, organ: torch.Tensor, task: torch.Tensor) -> None:
        """Replace the CLIP text-embedding buffers (e.g. with the shipped tables before training)."""
        for name, value in (("organ_embedding", organ), ("task_embedding", task)):
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"{name} must have shape {tuple(buf.shape)}, got {tuple(value.shape)}")
            with torch.no_grad():
                buf.copy_(value.to(buf.dtype))

    # -- FiLM ---------------------------------------------------------------------------------
    def _film_inputs(self) -> list[torch.Tensor]:
        tensors = [self.organ_embedding, self.task_embedding]
        for m in (self.text_to_vision, self.task_to_vision, self.promt_film_block.gamma, self.promt_film_block.beta):
            tensors += [m.weight, m.bias]
        for blk in self.deep_film_block:
            tensors += [blk.gamma.weight, blk.gamma.bias, blk.beta.weight, blk.beta.bias]
        return tensors

    def _compute_film(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(γ, β)]`` for ``deep_film_block.0..4`` then ``promt_film_block`` (official order)."""
        organ = F.relu(self.text_to_vision(self.organ_embedding))
        task = F.relu(self.task_to_vision(self.task_embedding))
        coeffs = [blk.coefficients(organ) for blk in self.deep_film_block]
        coeffs.append(self.promt_film_block.coefficients(task))
        return coeffs

    def film_coefficients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """FiLM constants; cached outside autograd and refreshed when a weight they use changes.

        With gradients enabled they are recomputed every call so training reaches the text
        projections and the FiLM linears.
        """
        if torch.is_grad_enabled():
            return self._compute_film()
        key = tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in self._film_inputs())
        if self._film_cache is None or self._film_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(
                self.organ_embedding.device.type, enabled=False
            ):
                coeffs = [(g.clone(), b.clone()) for g, b in self._compute_film()]
            self._film_cache = (key, coeffs)
            logger.debug("FiLM constants (re)computed")
        return self._film_cache[1]

    # -- forward ------------------------------------------------------------------------------
    def dino_slices_used(self, depth: int) -> int:
        """How many leading D0-slices the adaptors read (84 of 96): the rest cannot matter."""
        k = self.config.adaptor_kernel
        return (depth // k) * k

    def forward(
        self,
        x: torch.Tensor,
        dino_feats: Sequence[torch.Tensor],
        task_id: torch.Tensor,
        *,
        straightforward: bool = False,
        speedups: Speedups | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, num_classes, *x.shape[2:]]``; only ``task_id[0]`` selects the prompt.

        ``straightforward=True`` runs every module as the official code does (FiLM recomputed
        from the texts, every deep-supervision head evaluated); the result is the same.
        ``speedups`` switches the exact matrix-multiply kernels (eval only; default: none).
        """
        if straightforward:
            organ = F.relu(self.text_to_vision(self.organ_embedding))
            task = F.relu(self.task_to_vision(self.task_embedding))
            coeffs = [blk.coefficients(organ) for blk in self.deep_film_block]
            coeffs.append(self.promt_film_block.coefficients(task))
        else:
            coeffs = self.film_coefficients()
        return self.decode(x, dino_feats, task_id, coeffs, speedups, straightforward=straightforward)

    def decode(
        self,
        x: torch.Tensor,
        dino_feats: Sequence[torch.Tensor],
        task_id: torch.Tensor,
        coeffs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        speedups: Speedups | None = None,
        *,
        straightforward: bool = False,
    ) -> torch.Tensor:
        """The network given its FiLM constants (pure tensor code: what ``torch.compile`` sees)."""
        sp = speedups or _NO_SPEEDUPS
        on_cpu = x.device.type == "cpu"
        fast = sp.fast_norm and on_cpu and not straightforward and not torch.is_grad_enabled()
        cl = sp.channels_last and on_cpu and not straightforward and not torch.is_grad_enabled()

        def blocks(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return run_blocks(module, h, fast, cl)

        skips: list[torch.Tensor] = []
        for d in range(5):
            x = blocks(self.conv_blocks_context[d], x)
            if d in FUSED_STAGES:
                y = self.adaptors[d - 1](dino_feats[d - FUSED_STAGES[0]], x.shape[2:])
                x = self.crossatt[d - 1](x, y, straightforward, lean=sp.lean_lwca)
                del y
            skips.append(x)
        b = film(blocks(self.conv_blocks_context[5], x), *coeffs[4])
        prompt = film(blocks(self.intermedia_conv, b), *coeffs[5])
        dyn = blocks(self.fusion_layer, torch.cat((b, prompt), dim=1))
        task_prompt = dyn.index_select(1, task_id[:1].to(dyn.device))
        x = torch.cat((b, task_prompt), dim=1)
        del b, prompt, dyn, task_prompt
        seg = None
        for u in range(5):
            skip = skips.pop()
            if sp.matmul_upsampling:
                x = self._upsample_and_join(x, skip, u, coeffs[4 - u], cl)
            else:
                x = torch.cat((self.tu[u](x), film(skip, *coeffs[4 - u])), dim=1)
            del skip
            x = blocks(self.conv_blocks_localization[u], x)
            if straightforward or u == 4:
                head = self.seg_outputs[u]
                seg = pointwise_matmul(x, head.weight) if sp.matmul_head else head(x)
        return seg.contiguous()  # a no-op unless a channels-last head made NDHWC logits

    def _upsample_and_join(
        self, x: torch.Tensor, skip: torch.Tensor, u: int, coeffs: tuple[torch.Tensor, torch.Tensor],
        channels_last: bool = False,
    ) -> torch.Tensor:
        """``cat(tu[u](x), film(skip))`` with the upsampling as a matrix multiply written, like the
        FiLM-ed skip, straight into the concatenation buffer (bit-identical to the modules).
        ``channels_last``: the buffer is NDHWC (the skips after LWCA already are, the others are
        when :attr:`Speedups.channels_last` is on); else NCDHW, as ``torch.cat`` makes it."""
        weight = self.tu[u].weight
        cout = weight.shape[1]
        if x.dtype != skip.dtype:  # mixed precision (autocast): let torch.cat promote
            return torch.cat((upsample_matmul(x, weight), film(skip, *coeffs)), dim=1)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        buf = torch.empty((x.shape[0], cout + skip.shape[1], *skip.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=fmt)
        upsample_matmul(x, weight, out=buf)
        film(skip, *coeffs, out=buf[:, cout:])
        return buf


_NO_SPEEDUPS = Speedups.none()


class CDPDNetModel(nn.Module):
    """DINOv2 slice encoder + CDPDNet: ``model(x, task_id) -> logits``.

    Attributes:
        dino: the frozen :class:`DinoSliceEncoder` (always eval, never trained).
        net: the :class:`CDPDNet` CNN (official parameter names).
        config: the :class:`CDPDNetConfig` it was built from.
        num_classes: output channels (32). num_tasks: valid task ids are ``0..num_tasks-1``.
        patch_size: the only accepted spatial input size, ``(96, 96, 96)``.
        efficient: True (default) computes only what reaches the output: 84 of 96 DINO slices,
            three hidden states, no final LayerNorm, only the last head, cached FiLM constants,
            and eval-mode calls run under ``torch.inference_mode``. False runs every module as
            the official code does (under ``no_grad`` in eval); both give the same logits.
        autocast_dtype: None (default: float32, or the caller's ``torch.autocast`` if any) or
            ``torch.float16``/``torch.bfloat16`` to run under ``torch.autocast`` on the model's
            device (changes results slightly, outputs are still float32).
        speedups: the exact speed-ups used in efficient evaluation (:class:`Speedups`, all on;
            ``Speedups.none()`` evaluates as before them, with the same logits).
        slice_cache: the :class:`~napari_cdpdnet.model.dino.SliceCache` behind
            ``speedups.slice_cache`` (bounded: see its docstring); ``clear_caches()`` empties it.

    Choose the device with ``model.to(device)``; inputs are moved to it. In eval mode the
    output is a normal (not inference-mode) float32 tensor — unless the call itself runs under
    ``torch.inference_mode`` and ``speedups.lean_calls`` is on, then it is an inference tensor
    (no copy). In train mode gradients flow through the CNN and the text/FiLM parameters, never
    into DINO, and no speed-up is used.
    """

    def __init__(self, config: CDPDNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or CDPDNetConfig.official()
        self.dino = DinoSliceEncoder(self.config)
        self.net = CDPDNet(self.config)
        self.efficient = True
        self._autocast_dtype: torch.dtype | None = None
        self.speedups = Speedups()
        self.slice_cache = SliceCache()
        self._compiler = Compiler()
        self._checked_task: tuple[torch.Tensor, int] | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_tasks(self) -> int:
        return self.config.num_tasks

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return PATCH_SIZE

    @property
    def device(self) -> torch.device:
        return self.net.organ_embedding.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | str | None) -> None:
        if isinstance(dtype, str):
            names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
            if dtype not in names:
                raise ValueError(f"autocast dtype must be one of {sorted(names)} or None, got {dtype!r}")
            dtype = names[dtype]
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast dtype must be torch.float16, torch.bfloat16 or None, got {dtype}")
        self._autocast_dtype = dtype

    @property
    def compiled(self) -> bool:
        """True when ``torch.compile`` is switched on and has not fallen back to eager mode."""
        return self._compiler.enabled and self._compiler.failed is None

    def set_compile(self, enabled: bool = True) -> bool:
        """Run the CNN and the DINO encoder through ``torch.compile`` (inductor) in evaluation.

        Not bit-exact (float round-off, ~1e-5 on the logits) and the first window pays the
        compilation (minutes cold on a CPU; seconds with inductor's on-disk cache, kept in the
        napari-cdpdnet cache folder). Where inductor cannot work the model logs why and runs
        eagerly. Returns whether compilation is (still) on.
        """
        was = self._compiler.enabled
        self._compiler.enable(enabled)
        if enabled and not was and self._compiler.failed is None:
            reason = Compiler.unavailable_reason(self.device)
            if reason is not None:
                self._compiler.failed = reason
                logger.warning("torch.compile is not available here, running without it: %s", reason)
        return self.compiled

    def clear_caches(self) -> None:
        """Free the DINO slice cache (it is bounded anyway; this returns its memory now)."""
        self.slice_cache.clear()

    def _check_inputs(self, x: torch.Tensor, task_id: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != PATCH_SIZE:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(
                f"CDPDNet takes a [B, 1, 96, 96, 96] patch (one CT channel in [0, 1]), got {shape}; "
                "cut the volume into 96³ windows (sliding-window inference)"
            )
        if not x.is_floating_point():
            raise InputError(f"the input patch must be floating point, got {x.dtype}")
        if isinstance(task_id, int):
            task_id = torch.tensor([task_id])
        if not isinstance(task_id, torch.Tensor) or task_id.dtype.is_floating_point or task_id.numel() < 1:
            raise InputError(f"task_id must be an integer tensor [B], got {task_id!r}")
        dev = self.device
        checked = self._checked_task
        if not (self.speedups.lean_calls and checked is not None and checked[0] is task_id
                and checked[1] == task_id._version):
            first = int(task_id.reshape(-1)[0])  # on CUDA: a device synchronisation
            if not 0 <= first < self.num_tasks:
                raise InputError(f"task_id {first} is out of range: valid task ids are 0..{self.num_tasks - 1}")
            self._checked_task = (task_id, task_id._version)
        return x.to(dev, torch.float32), task_id.reshape(-1).to(dev, torch.int64)

    def _run(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        straightforward = not self.efficient
        ac = self._autocast_dtype
        # no autocast context at all when none is asked for: torch.autocast(enabled=False) would
        # switch off a caller's autocast
        ctx = torch.autocast(x.device.type, dtype=ac) if ac is not None else contextlib.nullcontext()
        with ctx:
            if straightforward:
                feats = self.dino(x, None, straightforward=True)
                logits = self.net(x, feats, task_id, straightforward=True)
            elif self.training:
                feats = self.dino(x, self.net.dino_slices_used(x.shape[2]))
                logits = self.net(x, feats, task_id)
            else:
                logits = self._evaluate(x, task_id)
        return logits.float()

    def _evaluate(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        """Efficient evaluation with the speed-ups (and compilation when switched on)."""
        sp = self.speedups
        dev = x.device
        comp = self._compiler

        def encode(images: torch.Tensor) -> list[torch.Tensor]:
            return comp.call("dino", self.dino.encode, dev, images, fused=sp.fused_dino)

        cache = self.slice_cache if sp.slice_cache else None
        feats = self.dino(x, self.net.dino_slices_used(x.shape[2]), cache=cache, encode=encode)
        coeffs = self.net.film_coefficients()
        return comp.call("cnn", self.net.decode, dev, x, feats, task_id, coeffs, sp)

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | int) -> torch.Tensor:
        """Logits ``[B, num_classes, 96, 96, 96]`` (no sigmoid); only ``task_id[0]`` is used."""
        x, task_id = self._check_inputs(x, task_id)
        if self.training:
            return self._run(x, task_id)
        if not self.efficient:
            with torch.no_grad():
                return self._run(x, task_id)
        if self.speedups.lean_calls and torch.is_inference_mode_enabled():
            return self._run(x, task_id)  # the caller works on inference tensors: no copy
        with torch.inference_mode():
            out = self._run(x, task_id)
        return out.clone()


def build_model(config: CDPDNetConfig | None = None, *, seed: int = 0) -> CDPDNetModel:
    """A randomly initialised model (for tests and training), deterministic for a given ``seed``.

    The global random state is left untouched. The text-embedding buffers are random too: set
    the CLIP tables with ``model.net.set_text_embeddings`` before training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CDPDNetModel(config)
    return model
