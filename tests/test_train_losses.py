"""Stage 2 losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from sdtp_core.train.losses import (
    lm_loss_per_sample,
    mse_loss_per_sample,
    rank_loss_per_sample,
    sample_pairs,
    standardize,
)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_rank_loss_matches_hand_computation():
    pred = torch.tensor([[2.0, 0.5, 1.0, 9.0]])
    target = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last token is not supervised
    # pairs (0,1): sign +1, diff 1.5; (0,2): +1, diff 1.0; (1,2): -1, diff -0.5 -> margin 0.5
    expected = (_softplus(-1.5) + _softplus(-1.0) + _softplus(-0.5)) / 3
    got = rank_loss_per_sample(pred, target, mask)
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-6)


def test_rank_loss_skips_ties_and_empty_rows():
    pred = torch.tensor([[1.0, 3.0, 0.0], [1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    # row 0: (0,1) tied -> skipped; (0,2): +1, diff 1; (1,2): +1, diff 3. Row 1: all tied -> 0.
    expected = (_softplus(-1.0) + _softplus(-3.0)) / 2
    got = rank_loss_per_sample(pred, target, mask)
    assert torch.allclose(got, torch.tensor([expected, 0.0]), atol=1e-6)


def test_rank_loss_perfect_order_beats_reversed():
    target = torch.arange(50.0).unsqueeze(0)
    mask = torch.ones_like(target, dtype=torch.bool)
    good = rank_loss_per_sample(target * 10, target, mask)
    bad = rank_loss_per_sample(-target * 10, target, mask)
    assert good.item() < 1e-3 < 5 < bad.item()


def test_sampled_pairs_are_bounded_and_valid():
    gen = torch.Generator().manual_seed(0)
    i, j = sample_pairs(1000, 500, gen)
    assert i.numel() == 500 and bool((i < j).all()) and int(j.max()) < 1000
    i, j = sample_pairs(5, 500)
    assert i.numel() == 10  # all pairs when they fit
    # The sampled estimate is close to the exact mean.
    pred, target = torch.randn(1, 300), torch.randn(1, 300)
    mask = torch.ones(1, 300, dtype=torch.bool)
    exact = rank_loss_per_sample(pred, target, mask, max_pairs=10**6)
    approx = rank_loss_per_sample(pred, target, mask, max_pairs=20000, generator=gen)
    assert abs(exact.item() - approx.item()) < 0.02


def test_mse_matches_hand_computation():
    pred = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    target = torch.tensor([[10.0, 30.0, 20.0, -5.0]])
    mask = torch.tensor([[True, True, True, False]])
    # standardised (population std): pred -> [-a, 0, a], target -> [-a, a, 0] with a = sqrt(3/2)
    a = math.sqrt(1.5)
    expected = ((0.0) ** 2 + a**2 + a**2) / 3
    got = mse_loss_per_sample(pred, target, mask)
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-4)
    assert torch.allclose(standardize(pred, mask)[0, :3], torch.tensor([-a, 0.0, a]), atol=1e-4)
    # Scale invariance: scaling either side leaves the loss unchanged.
    assert torch.allclose(mse_loss_per_sample(pred * 7, target * 0.01, mask), got, atol=1e-4)


def test_lm_loss_per_sample_matches_cross_entropy():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[1, 2, -100, -100], [-100, 3, 4, 5]])
    got = lm_loss_per_sample(logits, labels)
    ref0 = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    ref1 = torch.nn.functional.cross_entropy(logits[1, 1:], labels[1, 1:])
    assert torch.allclose(got, torch.stack([ref0, ref1]), atol=1e-6)


def test_boundary_pairs_cross_the_keep_boundary_and_the_loss_matches_hand_computation():
    from sdtp_core.train.losses import boundary_pairs

    target = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    i, j = boundary_pairs(target, keep=2, max_pairs=100)  # keeps tokens 1 and 3
    assert sorted(zip(i.tolist(), j.tolist())) == [(1, 0), (1, 2), (1, 4), (3, 0), (3, 2), (3, 4)]
    i, j = boundary_pairs(target, keep=2, max_pairs=4, generator=torch.Generator().manual_seed(0))
    assert len(i) == 4 and set(i.tolist()) <= {1, 3} and set(j.tolist()) <= {0, 2, 4}
    pred = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    got = rank_loss_per_sample(pred, target[None], mask, keep=[2])
    margins = [1 - 0, 1 - 0, 1 - 2, 0 - 0, 0 - 0, 0 - 2]  # pred_i - pred_j over the six pairs above
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 6
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # no boundary inside the mask (keep everything): uniform pairs, as the paper's loss
    assert rank_loss_per_sample(pred, target[None], mask, keep=[5]).item() == pytest.approx(
        rank_loss_per_sample(pred, target[None], mask).item()
    )
