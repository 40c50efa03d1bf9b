"""Pruner evaluation: rank agreement and kept-set overlap against saliency, with baselines."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.bench.quality import evaluate, spearman, topk_overlap
from sdtp_core.train.data import Example


def test_spearman_and_overlap_hand_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert topk_overlap(a, torch.tensor([4.0, 3.0, 2.0, 1.0]), 2) == 0.0
    assert topk_overlap(a, torch.tensor([0.0, 5.0, 1.0, 9.0]), 2) == 0.5


@pytest.mark.parametrize("query", [False, True])
def test_evaluate_reports_every_stage_and_baseline(query):
    model = tiny_model("qwen2")
    pruner = tiny_pruner(model, keep_first=1, query=query, input_norm="rms" if query else "none")
    gen = torch.Generator().manual_seed(0)
    examples = [Example(i, torch.randint(3, 90, (40,), generator=gen).tolist(), 30) for i in range(2)]
    result = evaluate(model, pruner, examples)
    for name in ("pruner", "random", "attention"):
        assert len(result[name]["spearman"]) == 3 and len(result[name]["overlap"]) == 3
        assert all(-1.0 <= v <= 1.0 for v in result[name]["spearman"])
        assert all(0.0 <= v <= 1.0 for v in result[name]["overlap"])


def test_report_table_and_plot(tmp_path):
    from sdtp_core.bench.quality import format_table, plot

    result = {"num_samples": 2, "layers": [1, 3], "keep_ratios": [0.9, 0.81]}
    for i, name in enumerate(("pruner", "random", "attention")):
        result[name] = {
            "spearman": [0.5 - i / 10, 0.25],
            "overlap": [0.75, 0.5 + i / 10],
            "mean_spearman": 0.375 - i / 20,
            "mean_overlap": 0.625 + i / 20,
        }
    table = format_table(result)
    assert "| 1 | 1 | 0.900 | 0.500 | 0.750 | 0.400 | 0.750 | 0.300 | 0.750 |" in table
    assert "| mean | | | **0.375** | **0.625** |" in table
    plot(result, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000
