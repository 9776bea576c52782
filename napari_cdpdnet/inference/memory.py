"""Keep freed memory in the process while windows run (glibc's allocator; elsewhere a no-op).

Why: a full-size 96³ window allocates and frees ~3 GB of tensors, each far above glibc's mmap
threshold (≤ 32 MB), so every window maps fresh pages and the kernel zeroes them on first touch:
~400,000 page faults and 0.7–1.8 s of system time per window on a 2-core machine, ~13 % of the
window (benchmarks/bench_model.py, docs/model.md). PyTorch has no caching allocator for CPU memory,
and transparent huge pages made it worse here (compaction: 2.4 s of system time per window).

:func:`reuse_freed_memory` therefore switches glibc's mmap use off and its heap trimming to a
high threshold for the duration of a segmentation, so freed blocks are reused by the next window,
then restores glibc's static defaults and calls ``malloc_trim(0)`` to give the free memory back
to the system. Nested and concurrent uses (cohort threads, the dock) are counted: the first
entry sets, the last exit restores. ``CDPDNET_REUSE_FREED_MEMORY=0`` switches it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator

__all__ = ["reuse_freed_memory", "available"]

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and glibc's documented defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_TRIM_THRESHOLD = 1 << 30  # freed memory below 1 GB at the heap's top stays in the process

_lock = threading.Lock()
_depth = 0
@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None (another platform or libc); looked up once: ``platform.libc_ver`` reads the
    interpreter's binary."""
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError) as exc:  # another libc build: nothing to tune
        logger.debug("glibc's mallopt is not available: %s", exc)
        return None
    return lib


def available() -> bool:
    """True where the setting has an effect (Linux with glibc) and is not switched off."""
    return os.environ.get("CDPDNET_REUSE_FREED_MEMORY", "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, large freed blocks are reused instead of being unmapped (see module)."""
    global _depth
    lib = _glibc() if available() else None
    if lib is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            lib.mallopt(_M_MMAP_MAX, 0)
            lib.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                lib.malloc_trim(0)
