"""The official learning-rate schedule: linear warm-up, then cosine annealing (SPEC §13).

The official ``optimizers/lr_scheduler.py`` (PyTorch Lightning Bolts' ``LinearWarmupCosineAnnealingLR``)
is stepped once per epoch *before* that epoch's training. With ``warmup_epochs=50``,
``max_epochs=1000``, ``warmup_start_lr=0``, ``eta_min=0`` and base lr 4e-4, epoch ``e`` (0-based)
therefore trains with

* ``4e-4 · (e + 1) / 49`` for ``e ≤ 48`` (the full rate is reached at ``e = 48``),
* ``4e-4 · ½ (1 + cos(π (e + 1 − 50) / 950))`` for ``e ≥ 49``, exactly 0 in the last epoch.

This class computes the closed form of that recurrence (the recursive form accumulates float
round-off and, being recursive, breaks when the optimiser's lr is changed from outside).
:func:`epoch_lr` gives the rate an epoch trains with under the official stepping.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LinearWarmupCosineAnnealingLR", "scheduled_lr", "epoch_lr"]


def scheduled_lr(
    step: int, base_lr: float, warmup_epochs: int, max_epochs: int,
    warmup_start_lr: float = 0.0, eta_min: float = 0.0,
) -> float:
    """The rate after ``step`` scheduler steps (the scheduler's ``last_epoch``)."""
    if step < warmup_epochs:
        if warmup_epochs == 1:
            return base_lr
        return warmup_start_lr + step * (base_lr - warmup_start_lr) / (warmup_epochs - 1)
    span = max_epochs - warmup_epochs
    if span <= 0:
        return base_lr
    t = min(step - warmup_epochs, span)
    return eta_min + 0.5 * (base_lr - eta_min) * (1.0 + math.cos(math.pi * t / span))


def epoch_lr(
    epoch: int, base_lr: float, warmup_epochs: int, max_epochs: int,
    warmup_start_lr: float = 0.0, eta_min: float = 0.0,
) -> float:
    """The rate epoch ``epoch`` (0-based) trains with when stepping before each epoch (official)."""
    return scheduled_lr(epoch + 1, base_lr, warmup_epochs, max_epochs, warmup_start_lr, eta_min)


class LinearWarmupCosineAnnealingLR(LRScheduler):
    """Linear warm-up from ``warmup_start_lr`` over ``warmup_epochs`` steps, then cosine to ``eta_min``.

    Args:
        optimizer: the wrapped optimiser (its ``lr`` is the peak rate).
        warmup_epochs: steps of the linear ramp (official 50).
        max_epochs: step at which the cosine reaches ``eta_min`` (official 1000).
        warmup_start_lr: rate at step 0 (official 0).
        eta_min: final rate (official 0).
    """

    def __init__(
        self, optimizer: Optimizer, warmup_epochs: int, max_epochs: int,
        warmup_start_lr: float = 0.0, eta_min: float = 0.0, last_epoch: int = -1,
    ) -> None:
        if warmup_epochs < 0 or max_epochs < 1 or warmup_epochs > max_epochs:
            raise ValueError(
                f"need 0 <= warmup_epochs <= max_epochs and max_epochs >= 1, got "
                f"warmup_epochs={warmup_epochs}, max_epochs={max_epochs}"
            )
        self.warmup_epochs = int(warmup_epochs)
        self.max_epochs = int(max_epochs)
        self.warmup_start_lr = float(warmup_start_lr)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            scheduled_lr(self.last_epoch, base, self.warmup_epochs, self.max_epochs,
                         self.warmup_start_lr, self.eta_min)
            for base in self.base_lrs
        ]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
