"""The official masked BCE + Dice and the naive loss, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from napari_cdpdnet.training.loss import naive_loss, partial_label_loss

LN3 = math.log(3.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    # [B=2, C=2, 2 voxels]; sample 0: ch0 logits 0 (p=.5), target [1, 0]; ch1 logits ln3 (p=.75)
    logits = torch.tensor([[[0.0, 0.0], [LN3, LN3]], [[0.0, 0.0], [LN3, LN3]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]]])
    return logits, target


def test_single_pair_by_hand() -> None:
    logits, target = _batch()
    labelled = torch.tensor([[True, False], [False, False]])
    out = partial_label_loss(logits, target, labelled)
    # BCE = ln 2 on both voxels; Dice = 1 - 2*0.5 / (1 + 1 + 1) = 2/3
    assert out.pairs == 1
    assert out.bce == pytest.approx(math.log(2.0))
    assert out.dice == pytest.approx(2.0 / 3.0)
    assert float(out.total) == pytest.approx(math.log(2.0) + 2.0 / 3.0)


def test_mean_over_pairs_of_different_samples() -> None:
    logits, target = _batch()
    labelled = torch.tensor([[True, False], [False, True]])
    out = partial_label_loss(logits, target, labelled)
    # pair (1, ch1): p = .75 on targets 1 -> BCE ln(4/3); Dice 1 - 2*1.5/(1.5 + 2 + 1) = 1/3
    assert out.pairs == 2
    assert out.bce == pytest.approx((math.log(2.0) + math.log(4.0 / 3.0)) / 2)
    assert out.dice == pytest.approx((2.0 / 3.0 + 1.0 / 3.0) / 2)


def test_unlabelled_channel_gets_no_gradient_but_naive_pushes_it_down() -> None:
    logits, target = _batch()
    logits = logits.clone().requires_grad_(True)
    labelled = torch.tensor([[True, False], [True, False]])
    partial_label_loss(logits, target, labelled).total.backward()
    assert torch.all(logits.grad[:, 1] == 0)
    assert torch.all(logits.grad[:, 0] != 0)

    logits.grad = None
    out = naive_loss(logits, target)
    out.total.backward()
    assert out.pairs == 4
    # sample 0 ch1 (unannotated, p=.75): treated as background -> positive gradient (push down)
    assert torch.all(logits.grad[0, 1] > 0)


def test_naive_by_hand() -> None:
    logits, target = _batch()
    out = naive_loss(logits[:1], target[:1])
    # ch0: ln2, 2/3; ch1 with targets 0 and p=.75: BCE ln4, Dice 1 - 0/(1.5 + 0 + 1) = 1
    assert out.bce == pytest.approx((math.log(2.0) + math.log(4.0)) / 2)
    assert out.dice == pytest.approx((2.0 / 3.0 + 1.0) / 2)
    only0 = naive_loss(logits[:1], target[:1], channels=torch.tensor([True, False]))
    assert only0.pairs == 1 and only0.dice == pytest.approx(2.0 / 3.0)


def test_no_labelled_pair_is_a_zero_with_a_graph() -> None:
    logits, target = _batch()
    logits.requires_grad_(True)
    out = partial_label_loss(logits, target, torch.zeros(2, 2, dtype=torch.bool))
    assert out.pairs == 0 and out.total.item() == 0.0
    out.total.backward()
    assert torch.all(logits.grad == 0)


def test_perfect_prediction_dice_is_not_exactly_zero() -> None:
    # the +1 in the denominator: a perfect large mask has Dice loss 1 - 2n/(2n + 1)
    n = 50
    logits = torch.full((1, 1, n), 30.0)
    target = torch.ones(1, 1, n)
    out = partial_label_loss(logits, target, torch.ones(1, 1, dtype=torch.bool))
    assert out.dice == pytest.approx(1 - 2 * n / (2 * n + 1), rel=1e-5)


def test_shape_errors_are_specific() -> None:
    logits, target = _batch()
    with pytest.raises(ValueError, match="target shape"):
        partial_label_loss(logits, target[:, :1], torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labelled mask must be \[B, C\]"):
        partial_label_loss(logits, target, torch.ones(2, 3, dtype=torch.bool))
