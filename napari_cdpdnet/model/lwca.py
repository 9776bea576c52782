"""LWCA: the 3-D window cross-attention that fuses DINO features into the CNN encoder.

One Swin-style "basic layer" of two blocks (the second with a cyclic shift of half a window) in
which the **queries come from the DINO features** and keys/values from the CNN features; both are
normalised by the block's first LayerNorm, the DINO features stay fixed from block to block, and
the result (after a final LayerNorm, ``norm0``) *replaces* the CNN feature. A learned relative
position bias per head is added inside each ``w×w×w`` window; in the shifted block, token pairs
that come from different regions of the un-rolled volume are masked with -100 as in Swin.

``LWCA.forward(..., lean=True)`` (the ``lean_lwca`` speed-up) computes the same values with less
data movement: the shift (three ``torch.roll`` copies per tensor) and the window partition (one
more) become one precomputed gather, the window merge and the shift back another, the DINO tokens
are laid out once per module instead of once per block, and residuals, masks and GELU are added
in place. The arithmetic is the same operations on the same values in the same order, so the
result is bit-identical (tested); on a CPU the two LWCA passes of stage 2 spent a third of their
time in ``torch.roll``'s concatenations.

Module and parameter names follow the official state dict (``transformer.layers.0.blocks.{0,1}``,
``transformer.norm0..3``); ``norm1..3`` exist only so that official checkpoints load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LWCA", "relative_position_index", "window_partition", "window_merge", "shift_mask"]

#: Added to the logits of token pairs that the shifted window must not connect (as in Swin).
MASK_VALUE = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """``[w³, w³]`` int64 index into the ``(2w-1)³``-row bias table for query/key token pairs.

    Tokens are numbered row-major over (a, b, c); pair (q, k) maps to
    ``(a_q-a_k+w-1)(2w-1)² + (b_q-b_k+w-1)(2w-1) + (c_q-c_k+w-1)``.
    """
    r = torch.arange(window)
    coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij")).flatten(1)  # [3, w³]
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [3, q, k]
    span = 2 * window - 1
    return rel[0] * span * span + rel[1] * span + rel[2]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, D0, D1, D2, C]`` → ``[B * nW, w³, C]``; windows and their tokens row-major."""
    b, d0, d1, d2, c = x.shape
    w = window
    x = x.view(b, d0 // w, w, d1 // w, w, d2 // w, w, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, w * w * w, c)


def window_merge(windows: torch.Tensor, window: int, b: int, d0: int, d1: int, d2: int) -> torch.Tensor:
    """Windows back to a ``[B, D0, D1, D2, C]`` grid, *as the official code does it*.

    The official ``window_reverse`` (basic_LWCA.py) applies the partition's permutation
    ``(0, 1, 3, 5, 2, 4, 6, 7)`` again instead of its inverse ``(0, 1, 4, 2, 5, 3, 6, 7)``, so
    the attention output is written back with its window and in-window axes shuffled (SPEC §5
    does not mention it). The checkpoint was trained with this layout and the parity reference
    only matches with it, so it is reproduced exactly; :func:`window_partition` is still the
    true partition.
    """
    w = window
    x = windows.reshape(b, d0 // w, d1 // w, d2 // w, w, w, w, -1)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d0, d1, d2, -1)


def shift_mask(
    size: tuple[int, int, int], window: int, shift: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[nW, w³, w³]`` additive mask for the cyclically shifted grid (0 or -100).

    Per axis the (rolled) grid has three regions ``[0, n-w)``, ``[n-w, n-shift)``, ``[n-shift, n)``;
    tokens of a window attend only to tokens of the same region combination.
    """
    labels = torch.zeros((1, *size, 1), device=device)
    bounds = [(slice(0, -window), slice(-window, -shift), slice(-shift, None))] * 3
    count = 0
    for s0 in bounds[0]:
        for s1 in bounds[1]:
            for s2 in bounds[2]:
                labels[:, s0, s1, s2, :] = count
                count += 1
    win = window_partition(labels, window).squeeze(-1)  # [nW, w³]
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)


class WindowCrossAttention(nn.Module):
    """Multi-head attention inside windows: queries from ``y``, keys/values from ``x``.

    One ``qkv`` projection (no bias) is shared: its first third makes the queries (applied to the
    DINO tokens), the other two thirds keys and values (applied to the CNN tokens).
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.dim, self.heads, self.window = dim, heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 3, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(
        self,
        xw: torch.Tensor,
        yw: torch.Tensor,
        mask: torch.Tensor | None,
        straightforward: bool = False,
        lean: bool = False,
    ) -> torch.Tensor:
        """``xw``, ``yw``: ``[B*nW, n, C]`` window tokens; ``mask``: ``[nW, n, n]`` or None.

        ``lean``: bias and mask added in place (same values, fewer allocations).
        """
        bw, n, c = xw.shape
        h = self.heads
        if straightforward:  # project both inputs fully, as the official code does
            q = self.qkv(yw)[..., :c]
            kv = self.qkv(xw)[..., c:]
        else:  # only the rows of the shared projection that are used
            q = F.linear(yw, self.qkv.weight[:c])
            kv = F.linear(xw, self.qkv.weight[c:])
        q = q.reshape(bw, n, h, c // h).transpose(1, 2) * self.scale
        k, v = kv.reshape(bw, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        idx = self.relative_position_index.reshape(-1)
        bias = self.relative_position_bias_table[idx].view(n, n, h).permute(2, 0, 1)
        if lean:
            attn = (q @ k.transpose(-2, -1)).add_(bias.unsqueeze(0).to(q.dtype))
            if mask is not None:
                nw = mask.shape[0]
                attn.view(bw // nw, nw, h, n, n).add_(mask[None, :, None].to(attn.dtype))
        else:
            attn = q @ k.transpose(-2, -1) + bias.unsqueeze(0).to(q.dtype)
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(bw // nw, nw, h, n, n) + mask[None, :, None].to(attn.dtype)
                attn = attn.view(bw, h, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LWCABlock(nn.Module):
    """Pre-norm window cross-attention + MLP, both residual on the CNN tokens."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowCrossAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, dim * mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        size: tuple[int, int, int],
        mask: torch.Tensor | None,
        straightforward: bool = False,
    ) -> torch.Tensor:
        """``x``, ``y``: ``[B, N, C]`` tokens of a ``size`` grid; ``mask`` for the padded grid."""
        b, _, c = x.shape
        w = self.window
        xn = self.norm1(x).reshape(b, *size, c)
        yn = self.norm1(y).reshape(b, *size, c)
        pads = [(-n) % w for n in size]
        if any(pads):
            pad = (0, 0, 0, pads[2], 0, pads[1], 0, pads[0])
            xn, yn = F.pad(xn, pad), F.pad(yn, pad)
        padded = tuple(xn.shape[1:4])
        if self.shift:
            dims = (1, 2, 3)
            xn = torch.roll(xn, shifts=(-self.shift,) * 3, dims=dims)
            yn = torch.roll(yn, shifts=(-self.shift,) * 3, dims=dims)
        out = self.attn(
            window_partition(xn, w), window_partition(yn, w), mask if self.shift else None,
            straightforward,
        )
        out = window_merge(out, w, b, *padded)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift,) * 3, dims=(1, 2, 3))
        if any(pads):
            out = out[:, : size[0], : size[1], : size[2]]
        x = x + out.reshape(b, -1, c)
        return x + self.mlp(self.norm2(x))

    def forward_lean(
        self,
        x: torch.Tensor,
        yn: torch.Tensor,
        gather: torch.Tensor,
        scatter: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`forward` for an unpadded grid, bit-identical: ``yn`` = ``norm1(y)``;
        ``gather``/``scatter`` = token indices of (roll →) partition and merge (→ roll back)."""
        b, n_tok, c = x.shape
        w3 = self.window ** 3
        xw = self.norm1(x).index_select(1, gather).view(-1, w3, c)
        yw = yn.index_select(1, gather).view(-1, w3, c)
        out = self.attn(xw, yw, mask if self.shift else None, False, lean=True)
        del xw, yw
        x = out.view(b, n_tok, c).index_select(1, scatter).add_(x)
        del out
        h = self.mlp.fc2(torch.ops.aten.gelu_(self.mlp.fc1(self.norm2(x))))
        return h.add_(x)


class _BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: int) -> None:
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList(
            LWCABlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )


class _LWCATransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_BasicLayer(dim, depth, heads, window, mlp_ratio)])
        # four output norms exist in the official model; only norm0 is used
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))


class LWCA(nn.Module):
    """Window cross-attention of CNN features ``x`` with same-shaped DINO features ``y``.

    Args:
        dim: channels of both inputs. heads: attention heads. depth: blocks (alternately
        unshifted and shifted by ``window // 2``). window: cubic window side. mlp_ratio: MLP
        expansion.

    ``forward(x, y)`` takes and returns ``[B, C, D0, D1, D2]``; the output replaces ``x``.
    """

    def __init__(
        self, dim: int, heads: int = 4, depth: int = 2, window: int = 3, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.window = window
        self.transformer = _LWCATransformer(dim, depth, heads, window, mlp_ratio)
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._index_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mask(self, size: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        w = self.window
        padded = tuple(n + (-n) % w for n in size)
        key = (padded, str(device))
        if key not in self._mask_cache:
            with torch.inference_mode(False), torch.no_grad():
                self._mask_cache[key] = shift_mask(padded, w, w // 2, device)
        return self._mask_cache[key]

    def _indices(self, size: tuple[int, int, int], shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices that do what :meth:`LWCABlock.forward` does with ``torch.roll``,
        :func:`window_partition` and :func:`window_merge`, found by applying exactly those
        functions to the token numbers (so the official merge permutation comes along)."""
        key = (size, shift, str(device))
        if key not in self._index_cache:
            w = self.window
            with torch.inference_mode(False), torch.no_grad():
                ids = torch.arange(size[0] * size[1] * size[2], device=device).view(1, *size, 1)
                if shift:
                    ids = torch.roll(ids, shifts=(-shift,) * 3, dims=(1, 2, 3))
                gather = window_partition(ids, w).reshape(-1)
                pos = torch.arange(gather.numel(), device=device).view(-1, w ** 3, 1)
                merged = window_merge(pos, w, 1, *size)
                if shift:
                    merged = torch.roll(merged, shifts=(shift,) * 3, dims=(1, 2, 3))
                self._index_cache[key] = (gather, merged.reshape(-1).contiguous())
        return self._index_cache[key]

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, straightforward: bool = False, lean: bool = False
    ) -> torch.Tensor:
        """``lean=True``: the same result with less data movement (see the module docstring);
        used for grids that need no padding (every grid of a 96³ window)."""
        if x.shape != y.shape:
            raise ValueError(f"LWCA inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        b, c, d0, d1, d2 = x.shape
        size = (d0, d1, d2)
        xt = x.flatten(2).transpose(1, 2)
        yt = y.flatten(2).transpose(1, 2)
        mask = self._mask(size, x.device) if self.window // 2 else None
        blocks = self.transformer.layers[0].blocks
        if lean and not straightforward and not any(n % self.window for n in size):
            xt = xt.contiguous()
            yt = yt.contiguous()
            for blk in blocks:
                gather, scatter = self._indices(size, blk.shift, x.device)
                xt = blk.forward_lean(xt, blk.norm1(yt), gather, scatter, mask)
        else:
            for blk in blocks:
                xt = blk(xt, yt, size, mask, straightforward)
        xt = self.transformer.norm0(xt)
        return xt.transpose(1, 2).reshape(b, c, d0, d1, d2)
