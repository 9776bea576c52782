"""Freed memory is reused during a segmentation and given back afterwards (glibc only)."""

from __future__ import annotations

import os
import resource
import threading

import pytest
import torch

from napari_cdpdnet.inference import memory

pytestmark = pytest.mark.skipif(not memory.available(), reason="needs Linux with glibc (mallopt)")


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_windows_of_the_full_model_reuse_memory_and_give_it_back() -> None:
    """Full-size model, two windows with glibc's default and two inside the block (~30 s): the
    second window inside faults in almost no pages, and the memory is given back after."""
    from napari_cdpdnet.model import CDPDNetConfig, build_model
    from napari_cdpdnet.model.speedups import Speedups

    model = build_model(CDPDNetConfig.official(), seed=0).eval()
    model.speedups = Speedups(slice_cache=False)
    x = torch.rand(1, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0))
    task = torch.tensor([0])

    def second_window_faults() -> int:
        with torch.inference_mode():
            model(x, task)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x, task)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = second_window_faults()
    resident = _resident_mb()
    with memory.reuse_freed_memory():
        reused = second_window_faults()
    assert memory._depth == 0
    assert default > 100_000  # ~3 GB of fresh pages per window (measured ~400,000 faults)
    assert reused < default / 10
    assert _resident_mb() <= resident + 300  # malloc_trim gave the memory back


def test_nested_and_concurrent_uses_restore_once(monkeypatch) -> None:
    calls: list[tuple] = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(memory, "_glibc", lambda: FakeLibc())
    entered = threading.Barrier(2)

    def worker():
        with memory.reuse_freed_memory():
            entered.wait()
            entered.wait()

    t = threading.Thread(target=worker)
    t.start()
    with memory.reuse_freed_memory():
        entered.wait()
        with memory.reuse_freed_memory():
            pass
        entered.wait()
        t.join()
    assert [c[0] for c in calls] == ["mallopt", "mallopt", "mallopt", "mallopt", "trim"]
    assert calls[0][1:] == (memory._M_MMAP_MAX, 0) and calls[2][1:] == (memory._M_MMAP_MAX, 65536)
    assert memory._depth == 0


def test_switched_off_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("CDPDNET_REUSE_FREED_MEMORY", "0")
    assert not memory.available()
    with memory.reuse_freed_memory():
        assert memory._depth == 0
