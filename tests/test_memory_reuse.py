"""Freed memory is reused during a segmentation and given back afterwards (glibc only)."""

from __future__ import annotations

import resource
import threading

import pytest
import torch

from napari_cdpdnet.inference import memory

pytestmark = pytest.mark.skipif(not memory.available(), reason="needs Linux with glibc (mallopt)")


def _faults_for_big_allocations(n: int = 6, mb: int = 96) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = torch.empty(mb * 2**18)  # far above glibc's mmap threshold (numpy would ask for huge pages)
        a.fill_(1.0)  # first touch
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_big_freed_blocks_are_reused_inside_and_released_after() -> None:
    pages = 96 * 2**20 // 4096
    outside = _faults_for_big_allocations()
    assert outside >= 5 * pages  # each allocation maps and faults in fresh pages
    with memory.reuse_freed_memory():
        inside = _faults_for_big_allocations()
    assert inside <= 2 * pages  # only the first one faults; the rest reuse it
    assert memory._depth == 0
    again = _faults_for_big_allocations()  # defaults restored: unmapped again
    assert again >= 5 * pages


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
