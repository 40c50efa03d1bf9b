"""``diagnose needle`` follows tokens through the stages (a hand-made scorer as the oracle); the command line."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.engine import SDTPEngine
from sdtp_eval.retention.diagnose import build_parser
from sdtp_eval.retention.diagnose.needle import follow, needle_positions, occurrences, percentile


class LaterIsBetter(torch.nn.Module):
    """Scores the live slots 0, 1, 2, ...: kept tokens stay in order, so later original positions win."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def score(self, stage, hidden_states, **context):
        return torch.arange(hidden_states.shape[1], dtype=torch.float32).expand(hidden_states.shape[:2])


def stages_for(needle: list[int]) -> list[dict]:
    model = tiny_model()
    engine = SDTPEngine(model, LaterIsBetter(tiny_pruner(model).config))  # stages keep 0.7, 0.5, 0.4 of 60
    return follow(engine, list(range(3, 63)), needle)


def test_a_late_needle_survives_every_stage_with_its_rank():
    # 60 tokens: first 4 and last 6 protected, candidates 4..53. Position 50 has 46 candidates below it
    # (of 49 others), 51 has 47: mean percentile 46.5 / 49 at the first stage.
    stages = stages_for([50, 51])
    assert [s["kept"] for s in stages] == [1.0, 1.0, 1.0]
    assert stages[0]["percentile"] == pytest.approx(46.5 / 49)
    # stage 2 candidates: the 32 kept of 4..53, i.e. 22..53; 50 and 51 have 28 and 29 below (of 31)
    assert stages[1]["percentile"] == pytest.approx(28.5 / 31)


def test_an_early_needle_goes_at_the_first_stage_and_has_no_rank_after():
    stages = stages_for([5, 6])
    assert stages[0]["kept"] == 0.0 and stages[0]["percentile"] == pytest.approx(1.5 / 49)
    assert stages[1]["kept"] == 0.0 and stages[1]["percentile"] is None


def test_protected_needle_tokens_are_kept_and_not_ranked():
    stages = stages_for([57, 58])
    assert [s["kept"] for s in stages] == [1.0, 1.0, 1.0]
    assert all(s["percentile"] is None for s in stages)


def oracle_stages(monkeypatch, needle: list[int]) -> tuple[list[dict], dict]:
    """``saliency_stages`` with a hand-made saliency: -position at every layer (its magnitude grows with
    the position, so |saliency| ranks like ``LaterIsBetter``); records what the loss was asked to score."""
    import sdtp_core.train.saliency as saliency_module
    from sdtp_eval.retention.diagnose.needle import saliency_stages

    seen = {}

    def fake(model, input_ids, labels, layers):
        seen.update(input_ids=input_ids, labels=labels, layers=layers)
        n = input_ids.shape[1]
        return -torch.arange(n, dtype=torch.float32).expand(1, len(layers), n).clone()

    monkeypatch.setattr(saliency_module, "compute_saliency", fake)
    model = tiny_model()
    config = tiny_pruner(model).config  # stages keep 0.7, 0.5, 0.4 of the prompt
    return saliency_stages(model, list(range(3, 63)), [7, 8, 9], needle, config), seen


def test_saliency_oracle_ranks_and_keeps_by_magnitude(monkeypatch):
    stages, seen = oracle_stages(monkeypatch, [50, 51])
    # 60 prompt tokens, first 4 and last 6 protected: 50 and 51 have 46 and 47 of 49 other candidates below
    assert [s["percentile"] for s in stages] == [pytest.approx(46.5 / 49)] * 3
    # keep 0.4 -> 24 tokens: the 10 protected, then the 14 largest |saliency|, positions 40..53
    assert [s["kept"] for s in stages] == [1.0, 1.0, 1.0]
    # the answer follows the prompt and is the only target, each token predicted by the one before it
    assert seen["input_ids"][0].tolist() == list(range(3, 63)) + [7, 8, 9]
    assert (seen["labels"][0, 59:62] == torch.tensor([7, 8, 9])).all() and (seen["labels"] != -100).sum() == 3


def test_saliency_oracle_drops_a_low_saliency_needle_at_the_first_stage(monkeypatch):
    # keep 0.7 -> 42 tokens: 10 protected + the top 32 candidates (22..53): 20 is out, 30 is in;
    # keep 0.5 -> 30 tokens: 10 protected + 34..53: both out. Percentiles: 16 and 26 of 49 below.
    stages, _ = oracle_stages(monkeypatch, [20, 30])
    assert [s["kept"] for s in stages] == [0.5, 0.0, 0.0]
    assert stages[0]["percentile"] == pytest.approx(21 / 49)


def test_the_worst_value_token_rank_is_the_lowest_percentile():
    scores = torch.tensor([9.0, 1.0, 5.0, 3.0, 7.0, 0.0])
    candidates = torch.tensor([False, True, True, True, True, True])  # slot 0 is protected
    # among the 5 candidates: slot 2 (5.0) has 3 below (1, 3, 0), slot 3 (3.0) has 2 below; of 4 others
    assert min(percentile(scores, candidates, p) for p in [2, 3]) == pytest.approx(2 / 4)
    assert percentile(scores, candidates, 4) == pytest.approx(1.0)
    assert percentile(scores, candidates, 5) == pytest.approx(0.0)


def test_value_positions_cover_the_first_occurrence(embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    text = "noise 1234567 more. One of the numbers for key is: 7654321. Again: 7654321"
    ids, positions = needle_positions(tokenizer, text, "7654321")
    assert tokenizer.decode([ids[p] for p in positions]).strip() == "7654321"
    assert tokenizer.decode(ids[: positions[0]]).rstrip().endswith("is:")
    with pytest.raises(ValueError, match="does not occur"):
        needle_positions(tokenizer, text, "999")


def test_occurrences_finds_every_occurrence_by_token_offsets(tiny_hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    text = "VAR QPRSX = 79253. Then VAR ABC = VAR QPRSX. The end."
    ids, spans = occurrences(tokenizer, text, "QPRSX")
    assert len(spans) == 2 and spans[0][-1] < spans[1][0]
    for span in spans:
        assert tokenizer.decode([ids[p] for p in span]).strip() == "QPRSX"
    assert occurrences(tokenizer, text, "absent")[1] == []


def test_subcommands_share_the_common_options_with_their_own_defaults():
    parser = build_parser()
    needle = parser.parse_args(["needle", "--out", "o"])
    assert (needle.length, needle.limit, needle.dtype, needle.model) == (2048, 33, "bfloat16", None)
    assert needle.pruners == ["shipped", "attention", "norm", "random"]
    start = parser.parse_args(["start", "--out", "o", "--length", "2048"])
    assert (start.length, start.limit, start.tasks, start.pruner, start.protect) == (
        2048,
        20,
        ["ruler_cwe"],
        "line",
        64,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["needle", "--out", "o", "--tasks", "ruler_cwe"])  # --tasks is start's
