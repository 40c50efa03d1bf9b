"""The per-layer RULER probe scores every layer at that layer's input and ranks the gold value by its worst token."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_eval.retention.needle_survival import needle_positions, percentile
from sdtp_eval.retention.ruler_layers import ValueInProtectedTail, layer_ranks


def test_the_worst_value_token_rank_is_the_lowest_percentile():
    scores = torch.tensor([9.0, 1.0, 5.0, 3.0, 7.0, 0.0])
    candidates = torch.tensor([False, True, True, True, True, True])  # slot 0 is protected
    # among the 5 candidates: slot 2 (5.0) has 3 below (1, 3, 0), slot 3 (3.0) has 2 below; of 4 others
    assert min(percentile(scores, candidates, p) for p in [2, 3]) == pytest.approx(2 / 4)
    assert percentile(scores, candidates, 4) == pytest.approx(1.0)
    assert percentile(scores, candidates, 5) == pytest.approx(0.0)


class LayerOneLikesLate(torch.nn.Module):
    """Scores slots by position at the model's layer 1 and by minus position elsewhere; records its inputs."""

    def __init__(self, config, model):
        super().__init__()
        self.config = config
        self.layer_one = model.model.layers[1]
        self.seen: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def score(self, stage, hidden_states, *, layer, **context):
        self.seen.append((layer, hidden_states.clone()))
        position = torch.arange(hidden_states.shape[1], dtype=torch.float32).expand(hidden_states.shape[:2])
        return position if layer is self.layer_one else -position


def test_layer_ranks_scores_every_layer_at_its_own_input():
    model = tiny_model()
    config = tiny_pruner(model).config  # first 4 and last 10% protected
    scorer = LayerOneLikesLate(config, model)
    ids = list(range(3, 63))  # 60 tokens: candidates are slots 4..53
    ranks = layer_ranks(model, {"probe": scorer}, ids, [50, 51], config)["probe"]
    assert len(ranks) == model.config.num_hidden_layers
    # layer 1: 50 has 46 of 49 other candidates below it (51 has 47): the worst is 46/49; elsewhere, reversed
    assert ranks[1] == pytest.approx(46 / 49)
    assert all(r == pytest.approx(2 / 49) for i, r in enumerate(ranks) if i != 1)
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert [layer for layer, _ in scorer.seen] == list(model.model.layers)
    for i, (_, h) in enumerate(scorer.seen):
        torch.testing.assert_close(h, hidden[i])


def test_a_value_in_the_protected_tail_is_refused():
    model = tiny_model()
    config = tiny_pruner(model).config
    with pytest.raises(ValueInProtectedTail, match="protected"):
        layer_ranks(model, {"p": LayerOneLikesLate(config, model)}, list(range(3, 63)), [58], config)


def test_value_positions_cover_the_first_occurrence(embedded_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    text = "noise 1234567 more. One of the numbers for key is: 7654321. Again: 7654321"
    ids, positions = needle_positions(tokenizer, text, "7654321")
    assert tokenizer.decode([ids[p] for p in positions]).strip() == "7654321"
    assert tokenizer.decode(ids[: positions[0]]).rstrip().endswith("is:")
    with pytest.raises(ValueError, match="does not occur"):
        needle_positions(tokenizer, text, "999")


def test_only_the_droppable_tokens_of_a_value_are_ranked():
    model = tiny_model()
    config = tiny_pruner(model).config
    scorer = LayerOneLikesLate(config, model)
    # 53 is the last candidate (all 49 others below it at layer 1, none elsewhere); 58 is protected, not ranked
    ranks = layer_ranks(model, {"p": scorer}, list(range(3, 63)), [53, 58], config)["p"]
    assert ranks[1] == pytest.approx(1.0) and ranks[0] == pytest.approx(0.0)
