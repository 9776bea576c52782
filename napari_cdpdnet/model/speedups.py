"""Exact speed-ups of CDPDNet's evaluation, each behind a switch, and the opt-in ``torch.compile``.

Measured on CPU (docs/model.md, ``benchmarks/bench_model.py``): the arithmetic of a 96³ window
already runs near the CPU's float32 peak, so what is left is work done twice, a few slow kernels
and data layout. Everything here gives the same logits as the plain modules — bit for bit where
stated, else within float32 round-off (≈1e-4 on logits up to ~15, the size of the difference
between an AVX2 and an AVX-512 machine) — checked by tests/test_speedups.py on the tiny model and
by the benchmark on the full one:

* :class:`Speedups` — which exact speed-ups :class:`~napari_cdpdnet.model.cdpdnet.CDPDNetModel`
  uses (all on by default; ``Speedups.none()`` is the model as it was before them);
* the DINOv2 blocks with one fused q/k/v projection and in-place element-wise steps
  (:func:`~napari_cdpdnet.model.dino.fused_block`, bit-identical);
* LWCA with its shifts, partitions and merges as precomputed gathers (``torch.roll`` concatenated
  three copies per tensor; bit-identical);
* :func:`upsample_matmul` — a transposed convolution whose kernel equals its stride (no output
  overlap, as in every CDPDNet decoder stage) is one matrix multiply and a pixel shuffle; PyTorch's
  CPU kernel for it ran at 23–46 GFLOP/s, the matrix multiply is 2–3× faster and bit-identical;
* :func:`pointwise_matmul` — the 1×1×1 output head as a matrix multiply (2× faster, bit-identical);
* :func:`instance_norm_act_` — InstanceNorm + LeakyReLU in place with blocked statistics: PyTorch's
  ``instance_norm`` reads a 96³×32 tensor at ~1.5 GB/s (Welford, one channel per thread) and,
  on a channels-last tensor, first copies it; this is 2× faster and as accurate (float64
  accumulation of float32 partial sums; within 2e-6 of a float64 reference, PyTorch 6e-7);
* channels-last CNN (``Speedups.channels_last``): on CPU, oneDNN's 3-D convolutions run
  30–45 % faster on NDHWC tensors than on NCDHW ones (which it reorders on every call); the
  CNN keeps that layout from the first block to the output head (CPU only: not measured on GPUs);
* :class:`Compiler` — ``torch.compile`` (inductor) of the CNN and of the DINO encoder, with
  inductor's on-disk cache in the napari-cdpdnet cache folder, and a clean fall-back to eager
  mode with one clear warning where inductor cannot work (no C++ compiler, unsupported platform).
  Not bit-exact (≈1e-5 on the logits), so it is opt-in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Speedups", "upsample_matmul", "pointwise_matmul", "instance_norm_act_", "is_channels_last",
           "conv_one_channel_cl",
           "Compiler", "inductor_cache_dir", "use_inductor_cache_dir"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speedups:
    """Which exact speed-ups the efficient evaluation uses (eval mode only; training never does).

    Attributes:
        slice_cache: reuse the DINO features of slices the previous call already encoded
            (:class:`~napari_cdpdnet.model.dino.SliceCache`); pays when consecutive windows differ
            only along the slicing axis (the engine's ``window_order="slices"``).
        fused_dino: DINOv2 blocks with one q/k/v projection and in-place scaling, residuals and
            GELU (:func:`~napari_cdpdnet.model.dino.fused_block`).
        lean_lwca: LWCA's shift and window partition as one precomputed gather, its merge and
            shift back as another, residuals and masks added in place (see
            :mod:`~napari_cdpdnet.model.lwca`).
        matmul_upsampling: decoder transposed convolutions as matrix multiplies whose pixel
            shuffle writes straight into the decoder's concatenation buffer (no ``torch.cat``).
        matmul_head: the 1×1×1 output head as a matrix multiply.
        lean_calls: no copy of the logits when the caller already runs under
            ``torch.inference_mode`` (the sliding window does), and a task-id tensor is range-checked
            once, not on every window (on CUDA the check is a device synchronisation).
        fast_norm: InstanceNorm + LeakyReLU of every conv block by :func:`instance_norm_act_`
            (CPU, float32; not bit-identical: float32 round-off of the statistics).
        channels_last: the CNN in channels-last (NDHWC) layout on CPU, so oneDNN's convolutions
            need no reorders (not bit-identical: another summation order inside the convolutions).

    ``bit_exact`` lists the switches that change no bit of the logits.
    """

    slice_cache: bool = True
    fused_dino: bool = True
    lean_lwca: bool = True
    matmul_upsampling: bool = True
    matmul_head: bool = True
    lean_calls: bool = True
    fast_norm: bool = True
    channels_last: bool = True

    @classmethod
    def none(cls) -> Speedups:
        """Every speed-up off: the evaluation as it was before them (for benchmarks)."""
        return cls(**{f.name: False for f in fields(cls)})

    @classmethod
    def names(cls) -> list[str]:
        """The switch names, in order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def bit_exact(cls) -> Speedups:
        """Only the switches that leave the logits bit-identical (everything but the last two)."""
        return cls(fast_norm=False, channels_last=False)

    def only(self, name: str) -> Speedups:
        """Only ``name`` on (for measuring one speed-up alone)."""
        if name not in self.names():
            raise ValueError(f"unknown speed-up {name!r}: choose from {', '.join(self.names())}")
        return replace(Speedups.none(), **{name: True})


def upsample_matmul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``conv_transpose3d(x, weight, stride=kernel)`` without bias, as a matrix multiply.

    With stride equal to the kernel, output voxel ``(k·i + p)`` receives exactly one product
    ``Σ_c x[c, i] · W[c, o, p]``: one ``[Cout·k³, Cin] @ [Cin, D·H·W]`` product per sample, then
    a pixel shuffle. ``out`` (``[B, ≥Cout, ...]``, e.g. the first channels of the decoder's
    concatenation buffer) receives the result in place. A channels-last ``x`` is multiplied as
    ``[D·H·W, Cin] @ [Cin, Cout·k³]`` (no transposing copy) and a new ``out`` is channels-last.
    """
    b, cin, d0, d1, d2 = x.shape
    cout, k0, k1, k2 = weight.shape[1:]
    cl = is_channels_last(x)
    if out is None:
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        out = torch.empty((b, cout, d0 * k0, d1 * k1, d2 * k2), dtype=x.dtype, device=x.device,
                          memory_format=fmt)
    if cl:
        w = weight.reshape(cin, cout * k0 * k1 * k2).to(x.dtype)
        for i in range(b):
            y = torch.mm(x[i].permute(1, 2, 3, 0).reshape(-1, cin), w)
            shuffled = y.view(d0, d1, d2, cout, k0, k1, k2).permute(0, 4, 1, 5, 2, 6, 3)
            out[i, :cout].permute(1, 2, 3, 0).view(d0, k0, d1, k1, d2, k2, cout).copy_(shuffled)
    else:
        w = weight.reshape(cin, cout * k0 * k1 * k2).t()
        for i in range(b):
            y = torch.mm(w.to(x.dtype), x[i].reshape(cin, d0 * d1 * d2))
            shuffled = y.view(cout, k0, k1, k2, d0, d1, d2).permute(0, 4, 1, 5, 2, 6, 3)
            out[i, :cout].view(cout, d0, k0, d1, k1, d2, k2).copy_(shuffled)
    return out[:, :cout] if out.shape[1] != cout else out


def pointwise_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv3d(x, weight)`` for a 1×1×1 kernel without bias, as one matrix multiply per sample.

    The result is NCDHW-contiguous also for a channels-last ``x`` (read through a transposed view)."""
    b, cin = x.shape[:2]
    cout = weight.shape[0]
    w = weight.reshape(cout, cin).to(x.dtype)
    out = torch.empty((b, cout, *x.shape[2:]), dtype=x.dtype, device=x.device)
    cl = is_channels_last(x)
    for i in range(b):
        rhs = x[i].permute(1, 2, 3, 0).reshape(-1, cin).t() if cl else x[i].reshape(cin, -1)
        torch.mm(w, rhs, out=out[i].view(cout, -1))
    return out


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 5-D tensor laid out NDHWC (and not also plain-contiguous, as 1-channel ones are)."""
    return (x.dim() == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d)
            and not x.is_contiguous())


def instance_norm_act_(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, slope: float
) -> torch.Tensor:
    """``leaky_relu(instance_norm(x, weight, bias, eps), slope)`` computed in place on ``x``.

    Why not ``F.instance_norm``: on CPU it computes each channel's statistics with Welford's
    update on one thread per channel (~75 ms for a 96³×32 float32 tensor on this machine's two
    cores) and copies channels-last input to NCDHW first. Here the statistics are two passes of
    vectorised sums over short rows (one spatial row at a time) accumulated in float64 — as
    accurate as PyTorch's — and normalisation, affine and activation are three in-place passes.
    Biased variance, as ``InstanceNorm3d`` uses in evaluation without running statistics.
    """
    n, c = x.shape[:2]
    cl = is_channels_last(x)
    if not cl and not x.is_contiguous():
        x = x.contiguous()
    for i in range(n):
        xi = x[i]
        if cl:
            rows = xi.permute(1, 2, 3, 0)  # [D, H, W, C], a contiguous view
            flat = rows.reshape(-1, c)
            count = flat.shape[0]
            mean = rows.reshape(-1, rows.shape[2], c).sum(1).sum(0, dtype=torch.float64) / count
            flat.sub_(mean.to(x.dtype))
            # Σ(x-μ)² per channel: diagonals of one C×C product per depth slice (BLAS sums in
            # blocks; a single product over all rows is slower: BLAS handles K ≫ M, N poorly)
            per_slice = rows.reshape(rows.shape[0], -1, c)
            var = torch.bmm(per_slice.transpose(1, 2), per_slice).diagonal(dim1=1, dim2=2).sum(
                0, dtype=torch.float64) / count
            shape: tuple[int, ...] = (c,)
            target = flat
        else:
            chunks = xi.reshape(c, -1, xi.shape[-1])  # [C, rows, last axis]
            count = chunks.shape[1] * chunks.shape[2]
            mean = chunks.sum(2).sum(1, dtype=torch.float64) / count
            chunks.sub_(mean.to(x.dtype).view(c, 1, 1))
            var = torch.linalg.vector_norm(chunks, dim=2).square_().sum(1, dtype=torch.float64) / count
            shape = (c, 1, 1)
            target = chunks
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight.double()
        scale = scale.to(x.dtype).view(shape)
        if bias is not None:
            torch.addcmul(bias.to(x.dtype).view(shape), target, scale, out=target)
        else:
            target.mul_(scale)
    return F.leaky_relu_(x, slope)


def conv_one_channel_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3d(x, weight, bias, padding=kernel // 2)`` of a 1-channel input, NDHWC output.

    Why: PyTorch sends a 1-channel 3-D convolution to its slow reference kernel (NCDHW output,
    ~45 ms for the first 1×3×3 convolution of a 96³ window, plus ~30 ms to make it channels-last).
    With one input channel the convolution is a ``[N, k] @ [k, Cout]`` product of the ``k``
    shifted copies of the input (im2col of 9 taps: 32 MB), written straight in NDHWC order.
    """
    b, cin, d, h, w = x.shape
    cout, _, kd, kh, kw = weight.shape
    if cin != 1 or not (kd % 2 and kh % 2 and kw % 2):
        raise ValueError("conv_one_channel_cl takes one input channel and odd kernel sizes")
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kd // 2, kd // 2))
    k = kd * kh * kw
    wm = weight.reshape(cout, k).t().to(x.dtype)
    out = torch.empty((b, cout, d, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    cols = torch.empty((k, d, h, w), dtype=x.dtype, device=x.device)
    for i in range(b):
        taps = (xp[i, 0, a:a + d, p:p + h, q:q + w] for a in range(kd) for p in range(kh) for q in range(kw))
        for t, tap in enumerate(taps):
            cols[t].copy_(tap)
        target = out[i].permute(1, 2, 3, 0).view(-1, cout)
        if bias is None:
            torch.mm(cols.view(k, -1).t(), wm, out=target)
        else:
            torch.addmm(bias.to(x.dtype), cols.view(k, -1).t(), wm, out=target)
    return out


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels: ``$TORCHINDUCTOR_CACHE_DIR`` if the user set it,
    else ``<napari-cdpdnet cache>/inductor`` (so a warm start survives reboots, unlike /tmp).

    ``import torch._inductor`` itself fills ``$TORCHINDUCTOR_CACHE_DIR`` with inductor's default
    (``/tmp/torchinductor_<user>``), so a value equal to that default counts as not set."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != _inductor_default_dir():
        return env
    from napari_cdpdnet.weights.store import cache_dir

    return str(cache_dir() / "inductor")


def _inductor_default_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except Exception:  # noqa: BLE001 - another torch layout: no default to recognise
        return ""
    return os.path.abspath(default_cache_dir())


def use_inductor_cache_dir() -> str:
    """Point inductor at :func:`inductor_cache_dir` (before it compiles anything) and return it."""
    path = inductor_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


class Compiler:
    """Lazily ``torch.compile`` functions, falling back to eager mode once, with a clear warning.

    Compilation happens at the first call of each compiled function (3 minutes cold for the
    full model on 2 CPU cores, seconds once inductor's on-disk cache is warm). If inductor cannot
    work here — it needs a C++ compiler on CPU and triton on CUDA — the first failure is logged
    with its reason and every later call runs the eager function, so results never depend on it.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.failed: str | None = None
        self._compiled: dict[str, Callable[..., Any]] = {}

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        """Why inductor cannot compile for ``device`` here (None: it should work)."""
        import shutil

        try:
            import torch._inductor  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import problem means "unavailable"
            return f"torch's inductor backend cannot be imported ({exc})"
        if device.type == "cpu":
            from torch._inductor import config

            cxx = config.cpp.cxx
            names = [c for c in (cxx if isinstance(cxx, tuple) else (cxx,)) if c]
            names += [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
            if not any(shutil.which(n) for n in names if n):
                return "no C++ compiler found (inductor needs g++ or clang++ on the PATH for CPU code)"
        elif device.type == "cuda":
            try:
                import triton  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                return f"triton is not importable ({exc})"
        elif device.type != "cpu":
            return f"inductor does not support the {device.type} device"
        return None

    def enable(self, enabled: bool = True) -> None:
        """Switch compilation on or off (compiled functions are kept: switching back on is free)."""
        self.enabled = bool(enabled)

    def call(self, name: str, fn: Callable[..., Any], device: torch.device, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, compiled when enabled and possible."""
        if not self.enabled or self.failed is not None:
            return fn(*args, **kwargs)
        compiled = self._compiled.get(name)
        if compiled is None:
            reason = self.unavailable_reason(device)
            if reason is not None:
                return self._give_up(reason, fn, args, kwargs)
            use_inductor_cache_dir()
            compiled = torch.compile(fn, dynamic=None)
            self._compiled[name] = compiled
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compile errors come in many types
            self._compiled.clear()
            return self._give_up(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                 fn, args, kwargs)

    def _give_up(self, reason: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.failed = reason
        logger.warning("torch.compile is not available here, running without it: %s", reason)
        return fn(*args, **kwargs)
