"""Keep triton out of GUI processes on machines without CUDA.

Importing triton (torch pulls it in lazily through ``torch._dynamo``, e.g. when torchvision or
open_clip are imported) *after* napari has created an OpenGL canvas crashes the process with a
segmentation fault when OpenGL is Mesa's llvmpipe (VMs, remote desktops, Xvfb): triton's
bundled LLVM clashes with the LLVM Mesa has loaded. Triton only generates GPU kernels, so on a
machine without CUDA nothing is lost by making ``import triton`` fail cleanly instead; torch then
reports that triton is unavailable and carries on.

Set ``CDPDNET_ALLOW_TRITON=1`` to opt out.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["block_triton_without_cuda"]

logger = logging.getLogger(__name__)


def block_triton_without_cuda() -> bool:
    """Make ``import triton`` raise ImportError when CUDA is absent; returns True if blocked."""
    if "triton" in sys.modules or os.environ.get("CDPDNET_ALLOW_TRITON") == "1":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # import machinery: "not importable"
    logger.debug("triton blocked: no CUDA, and its LLVM can crash next to Mesa's OpenGL")
    return True
