"""Training losses for partially labelled data (SPEC §13) and the naive baseline.

CDPDNet learns from datasets that each label only some of the 32 structures. The official loss
(``utils/loss.py``) therefore scores, for every sample, only the channels its dataset labels:

* BCE: binary cross-entropy with logits, averaged over the voxels of one channel, then averaged
  over all labelled (sample, structure) pairs of the batch;
* Dice: ``1 − 2Σpt / (Σp + Σt + 1)`` with ``p = sigmoid(logit)`` per labelled pair (no squares,
  smoothing 1 only in the denominator), averaged over the same pairs;
* total = BCE + Dice.

An unlabelled structure is *unknown*, not background: its channel contributes nothing. The naive
loss (:func:`naive_loss`) does what a plain multi-label trainer would do with merged partial label
maps: every channel is scored and unlabelled structures are taken as background, which teaches the
network to suppress structures that a dataset did not annotate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossTerms", "partial_label_loss", "naive_loss", "DICE_SMOOTH"]

#: Added to the Dice denominator only, as the official ``DiceLoss`` does.
DICE_SMOOTH = 1.0


@dataclass(frozen=True)
class LossTerms:
    """The loss to back-propagate and its parts (``bce``/``dice`` detached, for logging).

    ``pairs`` is how many (sample, structure) pairs were scored; with zero pairs the loss is a
    zero that still carries a graph, so every rank of a distributed run can call backward.
    """

    total: torch.Tensor
    bce: float
    dice: float
    pairs: int


def _check(logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> None:
    if logits.ndim < 3:
        raise ValueError(f"logits must be [B, C, ...spatial], got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    if tuple(labelled.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labelled mask must be [B, C] = {tuple(logits.shape[:2])}, got {tuple(labelled.shape)}"
        )


def partial_label_loss(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
) -> LossTerms:
    """Official masked BCE + Dice over the labelled (sample, structure) pairs only.

    Args:
        logits: ``[B, C, ...]`` raw network outputs.
        target: ``[B, C, ...]`` binary masks (0/1, any dtype); values of unlabelled channels are
            ignored.
        labelled: ``[B, C]`` bool, True where sample ``b`` has ground truth for channel ``c``.
    """
    _check(logits, target, labelled)
    b, c = logits.shape[:2]
    logits = logits.float().reshape(b, c, -1)
    target = target.to(logits.dtype).reshape(b, c, -1)
    mask = labelled.to(device=logits.device, dtype=torch.bool)
    pairs = int(mask.sum())
    if pairs == 0:
        zero = logits.sum() * 0.0
        return LossTerms(zero, 0.0, 0.0, 0)
    lg = logits[mask]  # [pairs, N]
    tg = target[mask]
    bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none").mean(dim=1)
    p = torch.sigmoid(lg)
    dice = 1.0 - 2.0 * (p * tg).sum(dim=1) / (p.sum(dim=1) + tg.sum(dim=1) + DICE_SMOOTH)
    bce_m, dice_m = bce.mean(), dice.mean()
    return LossTerms(bce_m + dice_m, float(bce_m.detach()), float(dice_m.detach()), pairs)


def naive_loss(
    logits: torch.Tensor, target: torch.Tensor, channels: torch.Tensor | None = None
) -> LossTerms:
    """The same BCE + Dice, but every channel of every sample counts: unlabelled = background.

    Args:
        logits, target: as :func:`partial_label_loss`; ``target`` must be 0 where a structure was
            not annotated (that is what "background" means here).
        channels: optional ``[C]`` bool selecting the channels trained at all (e.g. the union of
            all datasets' structures); default all.
    """
    b, c = logits.shape[:2]
    if channels is None:
        channels = torch.ones(c, dtype=torch.bool)
    channels = channels.to(dtype=torch.bool).reshape(1, c).expand(b, c)
    return partial_label_loss(logits, target, channels)
