"""The question-aware scorer inputs (sdtp_core/question_features.py): by hand, against transformers' own
attention weights, through the pruner, and trained end to end by the fit stage."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.config import PrunerConfigError
from sdtp_core.engine import SDTPEngine
from sdtp_core.pruner import TokenPruner
from sdtp_core.question_features import parse_feature, question_features, tail_attention


def test_features_by_hand():
    """attn, span and line features of a hand-made attention row: log1p(n * x), spans over slots, lines cut
    spans, protected slots lend nothing."""
    a = torch.tensor([[0.30, 0.01, 0.02, 0.20, 0.03, 0.04, 0.05, 0.10, 0.15, 0.10]])
    valid = torch.ones(1, 10, dtype=torch.bool)
    protected = torch.tensor([[True, False, False, False, False, False, False, False, False, True]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    got = question_features(["attn", "span:2:1", "line:2:1"], a, valid, protected, segments)[0]
    # protected slots (0 and 9) lend 0 to spans; a span is the max over slots [j-2, j+1]
    span = [0.01, 0.02, 0.20, 0.20, 0.20, 0.20, 0.10, 0.15, 0.15, 0.15]
    line = [0.01, 0.02, 0.02, 0.20, 0.20, 0.20, 0.05, 0.15, 0.15, 0.15]  # ... within each line
    for column, values in enumerate([a[0].tolist(), span, line]):
        expected = torch.tensor([math.log1p(10 * v) for v in values])
        torch.testing.assert_close(got[:, column], expected, msg=f"column {column}")


def test_padding_gets_nothing_and_lends_nothing():
    a = torch.tensor([[0.9, 0.9, 0.1, 0.2, 0.3, 0.4]])
    valid = torch.tensor([[False, False, True, True, True, True]])
    got = question_features(["attn", "span:3:0"], a, valid)[0]
    assert got[:2].abs().max() == 0
    expected = torch.tensor([math.log1p(4 * v) for v in (0.1, 0.2, 0.3, 0.4)])  # n = 4 live slots
    torch.testing.assert_close(got[2:, 0], expected)
    torch.testing.assert_close(got[2:, 1], expected)  # each slot's own value is the max of its live window


def test_line_features_need_lines_and_specs_are_checked():
    a, valid = torch.rand(1, 5), torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="segments"):
        question_features(["line:3:1"], a, valid)
    for bad in ("spread", "span:3", "line:-1:2", "attn:4"):
        with pytest.raises(ValueError, match="unknown scorer feature"):
            parse_feature(bad)
    model = tiny_model()
    with pytest.raises(PrunerConfigError, match="unknown scorer feature"):
        tiny_pruner(model, features=["span:x:1"])


def test_tail_attention_equals_transformers_eager_weights():
    """The features' attention is the stage layer's own: transformers' eager attention of the last `window`
    queries, averaged over heads and queries."""
    model = tiny_model(attn="eager")
    layer = model.model.layers[3]
    torch.manual_seed(3)
    n, window = 16, 5
    hidden = torch.randn(1, n, 64)
    rope = model.model.rotary_emb(hidden, torch.arange(n)[None])
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        _, weights = layer.self_attn(layer.input_layernorm(hidden), rope, attention_mask=causal)
        got = tail_attention(layer, hidden, rope, torch.ones(1, n, dtype=torch.bool), window)
    torch.testing.assert_close(got[0], weights[0, :, -window:].mean((0, 1)), rtol=1e-5, atol=1e-6)


def test_pruner_score_is_the_hidden_mlp_plus_the_feature_mlp():
    model = tiny_model(attn="eager")
    specs = ["attn", "span:3:1", "line:4:2"]
    pruner = tiny_pruner(model, features=specs, feature_window=3)
    layer, n = model.model.layers[1], 20
    torch.manual_seed(4)
    hidden = torch.randn(1, n, 64)
    rope = model.model.rotary_emb(hidden, torch.arange(n)[None])
    valid = torch.ones(1, n, dtype=torch.bool)
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[0, :2] = protected[0, -2:] = True
    segments = torch.tensor([[0] * 7 + [1] * 6 + [2] * 7])
    context = dict(layer=layer, position_embeddings=rope, valid=valid, protected=protected, segments=segments)
    with torch.no_grad():
        got = pruner.score(0, hidden, **context)
        stage = pruner.stages[0]
        feats = question_features(specs, tail_attention(layer, hidden, rope, valid, 3), valid, protected, segments)
        expected = stage.fc2(stage.act(stage.fc1(hidden))).squeeze(-1) + stage.feature_mlp(feats).squeeze(-1)
        precomputed = pruner.score(0, hidden, features=feats)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(precomputed, expected)
    with pytest.raises(ValueError, match="layer"):
        pruner.score(0, hidden)


def test_a_pruner_with_line_features_saves_loads_and_prunes_by_line(tmp_path):
    """Saved and loaded, the pruner keeps its features; the engine gives it each slot's line (it scores
    differently when the line ends change) and keeps the scheduled counts."""
    model = tiny_model()
    pruner = tiny_pruner(model, features=["attn", "line:8:2"], feature_window=4)
    pruner.save_pretrained(tmp_path / "p")
    loaded = TokenPruner.from_pretrained(tmp_path / "p")
    assert loaded.config.features == ["attn", "line:8:2"] and loaded.needs_lines
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(0))
    ends = torch.zeros(96, dtype=torch.bool)
    ends[ids[0, 9]] = True  # the token at slot 9 ends a line
    loaded.set_line_ends(ends)
    seen, original = [], loaded.score

    def wrapped(stage, hidden, **kw):
        seen.append(kw.get("segments"))
        return original(stage, hidden, **kw)

    loaded.score = wrapped
    out = SDTPEngine(model, loaded).prefill(ids, use_cache=False)
    first_stage = seen[0][0]  # the engine numbered the lines: slot 9 closes the first one
    assert first_stage[9] == first_stage[0] and first_stage[10] > first_stage[9]
    assert out.kept_counts[0].tolist() == [60, 42, 42, 30, 24, 24]  # ceil(0.7 * 60), 0.5 and 0.4 of 60
    with torch.no_grad():
        first = SDTPEngine(model, loaded).prefill(ids, use_cache=False).positions
        loaded.set_line_ends(torch.ones(96, dtype=torch.bool))  # every token ends a line: spans shrink to 1
        other = SDTPEngine(model, loaded).prefill(ids, use_cache=False).positions
    assert not torch.equal(first, other)


def test_load_pruner_reads_line_ends_from_the_tokenizer(tiny_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdtp_core.loading import load_pruner

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    tiny_pruner(model, features=["line:8:2"]).save_pretrained(tmp_path / "p")
    pruner = load_pruner(str(tmp_path / "p"), model)  # no tokenizer given: the one saved beside the model
    newline = tok("a\nb", add_special_tokens=False)["input_ids"]
    assert any(bool(pruner.sentence_ends[i]) for i in newline)
    assert not bool(pruner.sentence_ends[tok(" the", add_special_tokens=False)["input_ids"][0]])
