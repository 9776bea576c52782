"""LinearWarmupCosineAnnealingLR at the epochs SPEC §13 documents for the official recipe."""

from __future__ import annotations

import math

import pytest
import torch

from napari_cdpdnet.training.schedule import LinearWarmupCosineAnnealingLR, epoch_lr

BASE = 4e-4


def _official() -> tuple[torch.optim.Optimizer, LinearWarmupCosineAnnealingLR]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=BASE, weight_decay=1e-5)
    return opt, LinearWarmupCosineAnnealingLR(opt, warmup_epochs=50, max_epochs=1000)


def _lrs_stepping_before_each_epoch(epochs: int) -> list[float]:
    opt, sched = _official()
    used = []
    for _ in range(epochs):
        sched.step()  # official train.py steps before training the epoch
        used.append(opt.param_groups[0]["lr"])
    return used


def test_documented_epochs() -> None:
    used = _lrs_stepping_before_each_epoch(1000)
    assert used[0] == pytest.approx(BASE / 49)
    assert used[10] == pytest.approx(BASE * 11 / 49)
    assert used[47] < BASE
    assert used[48] == pytest.approx(BASE)  # peak reached at e = 48
    assert used[49] == pytest.approx(BASE)  # cosine starts at its top
    assert used[524] == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi * 475 / 950)))
    assert used[524] == pytest.approx(BASE / 2)
    assert used[999] == pytest.approx(0.0, abs=1e-15)  # exactly 0 in the last epoch
    assert all(a >= b for a, b in zip(used[49:], used[50:], strict=False))
    assert [epoch_lr(e, BASE, 50, 1000) for e in range(1000)] == pytest.approx(used)


def test_initial_rate_is_warmup_start() -> None:
    opt, _ = _official()
    assert opt.param_groups[0]["lr"] == 0.0


def test_resume_from_state_dict_continues_the_curve() -> None:
    opt, sched = _official()
    for _ in range(120):
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = _official()
    sched2.load_state_dict(state)
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(epoch_lr(120, BASE, 50, 1000))


def test_bad_arguments() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        LinearWarmupCosineAnnealingLR(opt, warmup_epochs=20, max_epochs=10)
