"""Pruner evaluation: rank agreement and kept-set overlap against saliency, with baselines."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.pruner_eval import evaluate, spearman, topk_overlap
from sdtp_core.train_data import Example


def test_spearman_and_overlap_hand_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert topk_overlap(a, torch.tensor([4.0, 3.0, 2.0, 1.0]), 2) == 0.0
    assert topk_overlap(a, torch.tensor([0.0, 5.0, 1.0, 9.0]), 2) == 0.5


def test_evaluate_reports_every_stage_and_baseline():
    model = tiny_model("qwen2")
    pruner = tiny_pruner(model, keep_first=1)
    gen = torch.Generator().manual_seed(0)
    examples = [Example(i, torch.randint(3, 90, (40,), generator=gen).tolist(), 30) for i in range(2)]
    result = evaluate(model, pruner, examples)
    for name in ("pruner", "random", "attention"):
        assert len(result[name]["spearman"]) == 3 and len(result[name]["overlap"]) == 3
        assert all(-1.0 <= v <= 1.0 for v in result[name]["spearman"])
        assert all(0.0 <= v <= 1.0 for v in result[name]["overlap"])
