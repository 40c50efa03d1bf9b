"""Pruner configuration, default schedule, save/load, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, tiny_model, tiny_pruner

from sdtp_core.config import PrunerConfig, PrunerConfigError, default_layers, geometric_keep_ratios
from sdtp_core.engine import SDTPEngine
from sdtp_core.pruner import TokenPruner


def test_default_schedule_matches_the_paper():
    assert default_layers(24) == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert default_layers(28) == [4, 6, 9, 11, 14, 16, 18, 21, 23, 26]
    ratios = geometric_keep_ratios(10, 0.9)
    assert ratios[0] == pytest.approx(0.9) and ratios[-1] == pytest.approx(0.9**10)
    cfg = PrunerConfig.default(896, 24)
    assert cfg.num_stages == 10 and cfg.keep_first == 4 and cfg.keep_recent == 0.1
    # the fraction of tokens each layer processes: 4 dense layers, then two layers per stage
    per_layer = cfg.layer_keep_ratio()
    assert per_layer[:4] == [1.0] * 4 and per_layer[4] == pytest.approx(0.9) and per_layer[23] == pytest.approx(0.9**10)


def test_scorer_cost_is_well_under_one_percent_of_the_model():
    cfg = PrunerConfig.default(896, 24)
    pruner = TokenPruner(cfg)
    per_token_pruner = 2 * sum(p.numel() for p in pruner.parameters())
    # Qwen2.5-0.5B: per layer q,k,v,o + MLP weights; 24 layers (embedding lookups cost nothing)
    h, i, kv = 896, 4864, 128
    per_layer = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i)
    assert per_token_pruner / (24 * per_layer) < 0.005


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[2, 1], keep_ratios=[0.9, 0.8]), "strictly increasing"),
        (dict(layers=[0], keep_ratios=[0.9]), "out of range"),
        (dict(layers=[6], keep_ratios=[0.9]), "out of range"),
        (dict(layers=[1], keep_ratios=[0.0]), "outside \\(0, 1\\]"),
        (dict(layers=[1], keep_ratios=[1.2]), "outside \\(0, 1\\]"),
        (dict(layers=[1, 2], keep_ratios=[0.5, 0.8]), "must not increase"),
        (dict(layers=[1, 2], keep_ratios=[0.5]), "one ratio per stage"),
        (dict(layers=[1], keep_ratios=[0.9], input_norm="layer"), "input_norm 'layer' is not one of none, rms"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(PrunerConfigError, match=message):
        PrunerConfig(hidden_size=64, num_hidden_layers=6, **kwargs)


def test_rms_input_norm_makes_scores_independent_of_the_hidden_state_scale():
    cfg = PrunerConfig(hidden_size=64, num_hidden_layers=6, layers=[2], keep_ratios=[0.8], input_norm="rms")
    torch.manual_seed(0)
    pruner = TokenPruner(cfg)
    h = torch.randn(1, 7, 64)
    plain = pruner.stages[0].fc2(pruner.stages[0].act(pruner.stages[0].fc1(h / h.pow(2).mean(-1, keepdim=True).sqrt())))
    assert torch.allclose(pruner.score(0, h), plain.squeeze(-1), atol=1e-5)
    assert torch.allclose(pruner.score(0, 50 * h), pruner.score(0, h), atol=1e-5)
    raw = TokenPruner(PrunerConfig(hidden_size=64, num_hidden_layers=6, layers=[2], keep_ratios=[0.8]))
    assert not torch.allclose(raw.score(0, 50 * h), raw.score(0, h), atol=1e-3)  # the paper's raw input


def test_configs_written_before_input_norm_load_as_the_raw_input(tmp_path):
    cfg = PrunerConfig(hidden_size=64, num_hidden_layers=6, layers=[2], keep_ratios=[0.8], input_norm="rms")
    cfg.save(tmp_path)
    assert PrunerConfig.load(tmp_path).input_norm == "rms"
    data = json.loads((tmp_path / "config.json").read_text())
    del data["input_norm"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert PrunerConfig.load(tmp_path).input_norm == "none"


def test_query_scorer_reads_the_mean_of_the_prompts_protected_recent_tokens():
    cfg = PrunerConfig(64, 6, [2], [0.8], keep_recent=0.2, input_norm="rms", query=True)
    torch.manual_seed(0)
    pruner = TokenPruner(cfg)
    assert pruner.stages[0].fc1.in_features == 128 and cfg.scorer_input == 128
    # Two rows, right-aligned: row 0 has 10 live slots (prompt of 12, two dropped), row 1 has 7 (prompt of 7).
    h = torch.randn(2, 10, 64)
    valid = torch.tensor([[True] * 10, [False] * 3 + [True] * 7])
    positions = torch.tensor([[0, 1, 2, 4, 5, 7, 8, 9, 10, 11], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]])
    lengths = torch.tensor([12, 7])
    scores = pruner.score(0, h, positions=positions, lengths=lengths, valid=valid)
    stage = pruner.stages[0]
    for b, recent in enumerate([[7, 8, 9], [8, 9]]):  # ceil(0.2 * 12) = 3: positions 9-11; ceil(0.2 * 7) = 2: 5-6
        x = h[b] / h[b].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        q = x[recent].mean(0)
        expected = stage.fc2(stage.act(stage.fc1(torch.cat([x, x * q], -1)))).squeeze(-1)
        live = valid[b]
        torch.testing.assert_close(scores[b][live], expected[live], rtol=1e-5, atol=1e-5)
    # The question changes every score; a token-only scorer ignores it.
    changed = h.clone()
    changed[:, -2:] = torch.randn(2, 2, 64)
    again = pruner.score(0, changed, positions=positions, lengths=lengths, valid=valid)
    assert not torch.allclose(again[:, :-3], scores[:, :-3], atol=1e-4)
    with pytest.raises(ValueError, match="needs \\['positions', 'lengths', 'valid'\\]"):
        pruner.score(0, h)
    with pytest.raises(PrunerConfigError, match="set input_norm to 'rms'"):
        PrunerConfig(64, 6, [2], [0.8], query=True)


def test_configs_written_before_query_load_as_token_only(tmp_path):
    PrunerConfig(64, 6, [2], [0.8], input_norm="rms", query=True).save(tmp_path)
    assert PrunerConfig.load(tmp_path).query is True
    data = json.loads((tmp_path / "config.json").read_text())
    del data["query"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert PrunerConfig.load(tmp_path).query is False


def test_too_many_default_stages_for_a_small_model():
    with pytest.raises(PrunerConfigError, match="cannot place 10 pruning stages"):
        default_layers(6)


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model()
    pruner = tiny_pruner(model)
    pruner.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = TokenPruner.from_pretrained(tmp_path)
    assert loaded.config == pruner.config
    for a, b in zip(pruner.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_pruner_for_another_model_shape_is_rejected(tmp_path):
    model = tiny_model()
    other = PrunerConfig(hidden_size=32, num_hidden_layers=6, layers=[1], keep_ratios=[0.5])
    with pytest.raises(PrunerConfigError, match="hidden_size=32"):
        SDTPEngine(model, TokenPruner(other))
    deeper = PrunerConfig(hidden_size=64, num_hidden_layers=12, layers=[1], keep_ratios=[0.5])
    with pytest.raises(PrunerConfigError, match="12 layers"):
        SDTPEngine(model, TokenPruner(deeper))


def test_missing_and_corrupt_files_name_the_problem(tmp_path):
    with pytest.raises(PrunerConfigError, match="does not exist"):
        TokenPruner.from_pretrained(tmp_path / "nope")
    with pytest.raises(PrunerConfigError, match="config.json not found"):
        TokenPruner.from_pretrained(tmp_path)
    tiny_pruner(tiny_model()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PrunerConfigError, match="corrupt"):
        TokenPruner.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(PrunerConfigError, match="model.safetensors not found"):
        TokenPruner.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PrunerConfigError, match="not valid JSON"):
        TokenPruner.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(PrunerConfigError, match="not an sdtp pruner config"):
        TokenPruner.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    model = tiny_model()
    tiny_pruner(model).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layers"], cfg["keep_ratios"] = [1, 2], [0.9, 0.8]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrunerConfigError, match="does not match"):
        TokenPruner.from_pretrained(tmp_path)


def test_fingerprint_recognises_the_same_weights_up_to_quantization_noise_only():
    from sdtp_core import fingerprint

    model = tiny_model(seed=0)
    reference = fingerprint.fingerprint(model)
    noisy = tiny_model(seed=0)
    with torch.no_grad():  # ~10% relative noise, more than Q4_K_M quantization adds
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    assert fingerprint.matches(model, reference) and fingerprint.matches(noisy, reference)
    assert not fingerprint.matches(tiny_model(seed=1), reference)  # same shape, other weights
    assert not fingerprint.matches(tiny_model("llama", seed=0), reference)  # other architecture


def test_shipped_pruner_follows_the_model_identity(tmp_path, monkeypatch, caplog):
    from sdtp_core import fingerprint, loading

    model = tiny_model(seed=0)
    shipped = tmp_path / "tiny-shipped"
    tiny_pruner(model).save_pretrained(shipped)
    fingerprint.save(model, shipped)
    monkeypatch.setattr(loading, "SHIPPED_PRUNERS_DIR", tmp_path)
    layers = [1, 3, 4]  # the tiny pruner's stages
    assert loading.shipped_pruner_dir(model) == shipped
    assert loading.load_pruner("shipped", model, layers).source == str(shipped)
    other = tiny_model(seed=1)
    assert loading.shipped_pruner_dir(other) is None
    assert loading.load_pruner("shipped", other, layers).source == str(shipped)  # explicit: loaded, with a warning
    assert "trained on another model" in caplog.text
    assert loading.load_pruner("random", other, layers).source == "random" and "UNTRAINED" in caplog.text


def test_spread_is_the_attention_scorer_spread_63_back_15_ahead_at_the_earlier_layers():
    """``spread`` (the default before ``line``) = ``attention:64:63:15`` at the paper's layers each one earlier;
    ``layers`` still overrides them, and a union of training-free scorers naming it takes its schedule."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sdtp_core.config import default_layers, earlier_layers
    from sdtp_core.loading import load_pruner

    assert default_layers(24) == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert earlier_layers(24) == [3, 5, 7, 9, 11, 13, 15, 17, 19, 21]  # the embedded model's 24 layers
    assert earlier_layers(28) == [layer - 1 for layer in default_layers(28)]
    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "num_hidden_layers": 16})).eval()
    default = load_pruner("spread", model)
    by_hand = [3, 4, 5, 7, 8, 9, 10, 11, 13, 14]  # 4 + round(1.2 i) for i < 10, each minus one
    assert default.source == "spread" and default.config.layers == earlier_layers(16) == by_hand
    assert (default.window, default.before, default.after) == (64, 63, 15)
    named = load_pruner("attention:64:63:15", model)  # the same scorer by its spec: the paper's layers
    assert named.config.layers == default_layers(16) and named.config.keep_ratios == default.config.keep_ratios
    assert load_pruner("spread", model, layers=[2, 5]).config.layers == [2, 5]
    union = load_pruner("spread+attention", model)
    assert [p.config.layers for p in union.parts] == [earlier_layers(16)] * 2


def test_norm_scorer_keeps_the_largest_hidden_states():
    from sdtp_core.scorers import NormScorer

    hidden = torch.zeros(1, 5, 4)
    for i, norm in enumerate([1.0, 5.0, 2.0, 0.5, 3.0]):
        hidden[0, i, i % 4] = -norm if i % 2 else norm  # the sign must not matter
    scores = NormScorer(None).score(0, hidden)
    assert scores[0].argsort(descending=True).tolist() == [1, 4, 2, 0, 3]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_attention_scorer_equals_the_layers_own_attention_weights(arch):
    """Against transformers' eager attention of the same layer: the attention the last `window` queries
    pay to each key, averaged over heads and queries; in a padded row, padding neither gives nor gets any."""
    from sdtp_core.scorers import AttentionScorer

    model = tiny_model(arch, attn="eager")
    layer = model.model.layers[2]
    torch.manual_seed(0)
    n, window = 12, 4
    hidden = torch.randn(1, n, 64)
    positions = torch.arange(n).unsqueeze(0)
    rope = model.model.rotary_emb(hidden, positions)
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        _, weights = layer.self_attn(layer.input_layernorm(hidden), rope, attention_mask=causal)
        expected = weights[0, :, -window:].mean(0).mean(0)
        got = AttentionScorer(None, window=window).score(
            2, hidden, layer=layer, position_embeddings=rope, valid=torch.ones(1, n, dtype=torch.bool)
        )
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    # the same row right-aligned behind 3 padding slots scores the same, padding scores 0
    padded = torch.cat([torch.randn(1, 3, 64), hidden], dim=1)
    pad_rope = tuple(torch.cat([t[:, :3], t], dim=1) for t in rope)
    valid = torch.tensor([[False] * 3 + [True] * n])
    with torch.no_grad():
        got_padded = AttentionScorer(None, window=window).score(
            2, padded, layer=layer, position_embeddings=pad_rope, valid=valid
        )
    torch.testing.assert_close(got_padded[0, 3:], expected, rtol=1e-5, atol=1e-6)
    assert got_padded[0, :3].abs().max() == 0


@pytest.mark.parametrize("before,after", [(2, 2), (3, 1), (0, 4)])
def test_pooled_attention_scorer_takes_the_neighbourhood_maximum_and_ignores_padding(before, after):
    """attention:W:B:A equals the unpooled scores max-pooled by hand over B slots before and A after; padding
    gets 0 and lends nothing."""
    from sdtp_core.scorers import AttentionScorer

    model = tiny_model(attn="eager")
    layer = model.model.layers[2]
    torch.manual_seed(1)
    pad, n, window = 3, 15, 4
    hidden = torch.randn(1, pad + n, 64)
    rope = model.model.rotary_emb(hidden, torch.arange(pad + n).unsqueeze(0))
    valid = torch.tensor([[False] * pad + [True] * n])
    kwargs = dict(layer=layer, position_embeddings=rope, valid=valid)
    with torch.no_grad():
        plain = AttentionScorer(None, window=window).score(2, hidden, **kwargs)[0]
        pooled = AttentionScorer(None, window=window, before=before, after=after).score(2, hidden, **kwargs)[0]
    live = plain[pad:]
    expected = torch.stack([live[max(0, i - before) : i + after + 1].max() for i in range(n)])
    torch.testing.assert_close(pooled[pad:], expected)
    assert pooled[:pad].abs().max() == 0
    assert bool((pooled[pad:] >= live).all()) and not torch.equal(pooled[pad:], live)


def test_pooling_keeps_the_span_around_the_attended_token_whole():
    """A hand-made case: one token gets all the attention; with pool 5 its 2 neighbours on each side share its
    score, so a stage keeping 5 of 20 candidates keeps exactly that span (unpooled, only the token is sure)."""
    from sdtp_core.selection import select
    from sdtp_core.spans import span_max

    scores = torch.full((1, 20), 0.01)
    scores[0, 9] = 1.0
    scores[0, ::3] += 0.001  # scattered noise that must not beat the span
    valid = torch.ones(1, 20, dtype=torch.bool)
    pooled = span_max(scores, valid, 2, 2)  # attention:W:5
    slots, _ = select(pooled, valid, torch.zeros_like(valid), torch.tensor([5]))
    assert slots[0].tolist() == [7, 8, 9, 10, 11]
    slots, _ = select(scores, valid, torch.zeros_like(valid), torch.tensor([5]))
    assert 9 in slots[0].tolist() and slots[0].tolist() != [7, 8, 9, 10, 11]


def test_spread_keeps_what_follows_the_attended_token():
    """A hand-made key/value case: the queries attend to a key (slots 4-5); the value is slots 6-9. A centred
    pool of 5 keeps slots 2-7 and cuts the value; a span of 4 before and 0 after keeps the key and all the value."""
    from sdtp_core.selection import select
    from sdtp_core.spans import span_max

    scores = torch.full((1, 20), 0.01)
    scores[0, 4:6] = 1.0
    scores[0, ::3] += 0.001
    valid = torch.ones(1, 20, dtype=torch.bool)
    keep = torch.tensor([6])
    centred, _ = select(span_max(scores, valid, 2, 2), valid, torch.zeros_like(valid), keep)
    assert centred[0].tolist() == [2, 3, 4, 5, 6, 7]
    spread, _ = select(span_max(scores, valid, 4, 0), valid, torch.zeros_like(valid), keep)
    assert spread[0].tolist() == [4, 5, 6, 7, 8, 9]


def test_protected_tokens_lend_their_score_to_no_neighbour():
    """attention:W:B:A with ``protected`` slots (kept by every stage anyway): their scores are left out of the
    span, so what the sink and the recent tail receive lifts no neighbour. By hand from the plain scores."""
    from sdtp_core.scorers import AttentionScorer

    model = tiny_model(attn="eager")
    layer = model.model.layers[2]
    torch.manual_seed(2)
    n, before, after = 16, 4, 1
    hidden = torch.randn(1, n, 64)
    rope = model.model.rotary_emb(hidden, torch.arange(n).unsqueeze(0))
    valid = torch.ones(1, n, dtype=torch.bool)
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[0, :2] = protected[0, -3:] = True
    kwargs = dict(layer=layer, position_embeddings=rope, valid=valid)
    spread = AttentionScorer(None, window=4, before=before, after=after)
    with torch.no_grad():
        plain = AttentionScorer(None, window=4).score(2, hidden, **kwargs)[0]
        got = spread.score(2, hidden, protected=protected, **kwargs)[0]
        unprotected = spread.score(2, hidden, **kwargs)[0]
    masked = plain.masked_fill(protected[0], 0.0)
    expected = torch.stack([masked[max(0, i - before) : i + after + 1].max() for i in range(n)])
    torch.testing.assert_close(got, expected)
    everything = torch.stack([plain[max(0, i - before) : i + after + 1].max() for i in range(n)])
    torch.testing.assert_close(unprotected, everything)  # without the mask: every slot lends, as before
    assert not torch.equal(got, unprotected)  # this case tells the two apart


def record_context(scorer, *names: str) -> list[tuple[torch.Tensor, ...]]:
    """Wrap ``scorer.score`` so each call appends copies of the named context tensors to the returned list."""
    seen = []
    score = scorer.score

    def recording(stage, hidden, **context):
        seen.append(tuple(context[name].clone() for name in names))
        return score(stage, hidden, **context)

    scorer.score = recording
    return seen


def test_the_engine_tells_the_scorer_which_slots_are_protected():
    """Every stage's ``protected`` is the protected mask of the input, gathered to the surviving slots."""
    from sdtp_core.loading import load_pruner
    from sdtp_core.selection import protected_mask

    model = tiny_model()
    scorer = load_pruner("attention:8:6:2", model, layers=[1, 3, 4], keep_ratio=0.7)
    seen = record_context(scorer, "protected", "positions", "valid")
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    SDTPEngine(model, scorer).prefill(ids)
    assert len(seen) == 3
    expected = protected_mask(torch.ones(1, 40), scorer.config.keep_first, scorer.config.keep_recent)[0]
    for protected, positions, valid in seen:
        live = positions[valid]
        assert protected[valid].tolist() == expected[live].tolist()
    assert seen[0][0][0].sum().item() == 4 + 4  # the first 4 and the last 10% (4 of 40)


@pytest.mark.parametrize("kind", ["attention", "attention:32", "attention:8:31", "attention:8:9:2", "norm", "random"])
def test_training_free_scorers_run_at_the_same_schedule(kind):
    from sdtp_core.loading import load_pruner

    model = tiny_model()
    scorer = load_pruner(kind, model, layers=[1, 3, 4], keep_ratio=0.7)
    reference = load_pruner("random", model, layers=[1, 3, 4], keep_ratio=0.7)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    out = SDTPEngine(model, scorer).prefill(ids)
    assert out.kept_counts.tolist() == SDTPEngine(model, reference).prefill(ids).kept_counts.tolist()
    assert scorer.source == kind


def test_attention_window_is_chosen_by_name_and_bad_names_fail():
    from sdtp_core.loading import load_pruner

    model = tiny_model()
    assert load_pruner("attention", model, layers=[1, 3]).window == 8
    assert load_pruner("attention:64", model, layers=[1, 3]).window == 64
    scorer = load_pruner("attention:64:31", model, layers=[1, 3])
    assert (scorer.window, scorer.before, scorer.after) == (64, 15, 15)
    scorer = load_pruner("attention:64:63:15", model, layers=[1, 3])
    assert (scorer.window, scorer.before, scorer.after) == (64, 63, 15)
    for bad in (
        "attention:0",
        "attention:x",
        "norm:3",
        "attention:8:4",
        "attention:8:0",
        "attention:8:3:1:1",
        "attention:8:-1:2",
    ):
        with pytest.raises(ValueError, match="window|unknown training-free"):
            load_pruner(bad, model, layers=[1, 3])


def test_rank_fractions_rank_live_slots_only():
    from sdtp_core.scorers import rank_fractions

    scores = torch.tensor([[9.0, 0.3, 0.1, 0.2], [5.0, 1.0, 3.0, 2.0]])
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    got = rank_fractions(scores, valid)
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 2 / 3, 1 / 3]]))
    # a single live slot, and NaN scores, do not divide by zero or poison the row
    one = rank_fractions(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[False, True]]))
    assert one.tolist() == [[0.0, 0.0]]


def test_union_keeps_what_either_scorer_ranks_high():
    """A hand-made case: scorer A favours token 2, scorer B token 7; keeping 2 of 10, each alone keeps only its
    own favourite and its runner-up, the union keeps both favourites."""
    from torch import nn

    from sdtp_core.scorers import RankUnion
    from sdtp_core.selection import select

    class Fixed(nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = torch.tensor([values])

        def score(self, stage, hidden_states, **context):
            return self.values

    a = Fixed([0.1, 0.2, 9.0, 0.3, 0.0, 0.0, 0.5, 0.4, 0.0, 0.0])
    b = Fixed([0.0, 0.0, 0.2, 0.0, 0.0, 0.3, 0.0, 7.0, 0.1, 0.0])
    valid = torch.ones(1, 10, dtype=torch.bool)
    none = torch.zeros_like(valid)
    keep = torch.tensor([2])
    assert select(a.score(0, None), valid, none, keep)[0][0].tolist() == [2, 6]
    assert select(b.score(0, None), valid, none, keep)[0][0].tolist() == [5, 7]
    union = RankUnion([a, b], config=None)
    assert select(union.score(0, None, valid=valid), valid, none, keep)[0][0].tolist() == [2, 7]


def test_union_is_loaded_by_name_at_one_schedule_and_bad_unions_fail(tmp_path):
    from sdtp_core.loading import load_pruner
    from sdtp_core.scorers import AttentionScorer, NormScorer, RankUnion

    model = tiny_model()
    union = load_pruner("attention+norm", model, layers=[1, 3, 4], keep_ratio=0.7)
    assert isinstance(union, RankUnion) and union.source == "attention+norm"
    assert [type(p) for p in union.parts] == [AttentionScorer, NormScorer]
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = load_pruner("random", model, layers=[1, 3, 4], keep_ratio=0.7)
    out = SDTPEngine(model, union).prefill(ids)
    assert out.kept_counts.tolist() == SDTPEngine(model, reference).prefill(ids).kept_counts.tolist()
    # a trained pruner fixes the layers of the training-free scorers beside it
    trained = tmp_path / "trained"
    tiny_pruner(model).save_pretrained(trained)
    mixed = load_pruner(f"norm+{trained}", model)
    schedule = ([1, 3, 4], [0.7, 0.5, 0.4])
    assert all((p.config.layers, p.config.keep_ratios) == schedule for p in [mixed, *mixed.parts])
    with pytest.raises(ValueError, match="different schedules"):  # random's geometric ratios are not the pruner's
        load_pruner(f"random+{trained}", model)
    for bad in ("attention+", "+norm", "attention+bogus:1"):
        with pytest.raises(ValueError, match="A\\+B|unknown training-free|bogus"):
            load_pruner(bad, model, layers=[1, 3])


def test_segment_ids_number_sentences_and_end_tokens_belong_to_their_sentence():
    """By hand: ids 7 and 9 end sentences; padding gets -1; a sentence's end token is its last member."""
    from sdtp_core.spans import segment_ids

    ends = torch.zeros(12, dtype=torch.bool)
    ends[[7, 9]] = True
    ids = torch.tensor([[0, 0, 1, 2, 7, 3, 9, 9, 4, 5], [1, 7, 2, 3, 4, 5, 9, 6, 7, 8]])
    valid = torch.tensor([[False, False] + [True] * 8, [True] * 10])
    assert segment_ids(ids, valid, ends).tolist() == [
        [-1, -1, 0, 0, 0, 1, 1, 2, 3, 3],
        [0, 0, 1, 1, 1, 1, 1, 2, 2, 3],
    ]


def test_segment_ids_join_a_unit_shorter_than_min_tokens_to_the_next():
    """By hand: lines of 2, 5, 1, 1 and 3 tokens (id 9 ends a line). With min_tokens 3 the 2-token line joins
    the 5-token one, and the two 1-token lines join the last; padding counts for nothing."""
    from sdtp_core.spans import segment_ids

    ends = torch.zeros(12, dtype=torch.bool)
    ends[9] = True
    lines = [1, 9, 2, 3, 4, 5, 9, 9, 9, 6, 7, 8]  # ends at slots 1, 6, 7, 8; the last line has no end
    ids = torch.tensor([[0, 0] + lines, [0] * 2 + lines])
    valid = torch.tensor([[False, False] + [True] * 12, [True] * 14])
    assert segment_ids(ids[:1], valid[:1], ends, 3).tolist() == [[-1, -1] + [0] * 7 + [1] * 5]
    assert segment_ids(ids[:1], valid[:1], ends, 2).tolist() == [[-1, -1] + [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]]
    # the same line lengths counted without padding: a live row whose first line is 4 tokens (0, 0, 1, 9) ends it
    assert segment_ids(ids[1:], valid[1:], ends, 3).tolist() == [[0] * 4 + [1] * 5 + [2] * 5]
    assert segment_ids(ids, valid, ends, 0).tolist() == segment_ids(ids, valid, ends, 1).tolist()
    assert segment_ids(ids, valid, ends, 0).tolist() == segment_ids(ids, valid, ends).tolist()


def test_unit_of_parses_the_unit_and_its_fewest_tokens():
    from sdtp_core.scorers import Unit, needs_tokenizer, unit_of

    assert unit_of("attention:64:95:15:l") == Unit("\n", 0)
    assert unit_of("attention:64:95:15:l16") == Unit("\n", 16) == unit_of("line16")
    assert unit_of("attention:64:31:s4") == Unit(".!?\n", 4)
    assert unit_of("line") == Unit("\n", 0)
    for spec in ("attention:64:95:15", "attention:64:95:15:x16", "attention:64:95:15:l1x", "norm", "attention:l"):
        assert unit_of(spec) is None, spec
    assert needs_tokenizer("attention:64:95:15:l16+attention")


def test_segment_span_max_matches_a_brute_force_maximum_within_each_sentence():
    """Against the definition, on random scores, sentences and spans: each live slot's highest score among the
    slots up to B before and A after it that share its sentence; padding gets 0."""
    from sdtp_core.spans import segment_span_max

    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        k = int(torch.randint(1, 30, (1,), generator=gen))
        before, after = (int(x) for x in torch.randint(0, 8, (2,), generator=gen))
        scores = torch.rand(2, k, generator=gen)
        segments = torch.randint(0, 4, (2, k), generator=gen).sort(1).values
        valid = torch.rand(2, k, generator=gen) > 0.2
        expected = torch.zeros(2, k)
        for r in range(2):
            for j in range(k):
                if valid[r, j]:
                    span = range(max(0, j - before), min(k, j + after + 1))
                    expected[r, j] = max(scores[r, i] for i in span if segments[r, i] == segments[r, j])
        torch.testing.assert_close(segment_span_max(scores, segments, valid, before, after), expected)


def test_within_sentences_an_attended_key_keeps_its_sentence_and_not_the_next():
    """A hand-made key/value case: the queries attend to a key (slots 4-5) whose sentence is slots 2-9 (value
    6-9). The plain spread of 6 before and 4 after also lifts slots 10-13 of the next sentence, and a stage keeping
    8 tokens cuts into the value's sentence tie by slot order; within sentences it keeps exactly slots 2-9."""
    from sdtp_core.selection import select
    from sdtp_core.spans import segment_span_max, span_max

    scores = torch.full((1, 20), 0.01)
    scores[0, 4:6] = 1.0
    scores[0, ::3] += 0.001
    valid = torch.ones(1, 20, dtype=torch.bool)
    segments = torch.tensor([[0, 0] + [1] * 8 + [2] * 10])
    keep, none = torch.tensor([8]), torch.zeros_like(valid)
    within, _ = select(segment_span_max(scores, segments, valid, 6, 4), valid, none, keep)
    assert within[0].tolist() == list(range(2, 10))
    plain, _ = select(span_max(scores, valid, 6, 4), valid, none, keep)
    assert plain[0].tolist() != list(range(2, 10))


@pytest.mark.parametrize("min_tokens", [0, 4])
def test_the_engine_gives_a_scorer_within_sentences_each_slots_sentence_at_every_stage(min_tokens):
    """``segments`` at each stage is the sentence numbering of the whole prompt (sentences under the scorer's
    ``min_unit_tokens`` joined to the next), gathered to the surviving slots (so pruning a sentence's end token
    does not merge it with the next); left padding gets -1."""
    from sdtp_core.loading import load_pruner
    from sdtp_core.scorers import AttentionScorer
    from sdtp_core.spans import segment_ids

    model = tiny_model()
    base = load_pruner("attention:8:6:2", model, layers=[1, 3, 4], keep_ratio=0.7)
    ends = torch.zeros(96, dtype=torch.bool)
    ends[::7] = True
    scorer = AttentionScorer(base.config, 8, 6, 2, ends=ends, min_unit_tokens=min_tokens)
    seen = record_context(scorer, "segments", "positions", "valid")
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    SDTPEngine(model, scorer).prefill(ids, attention_mask=mask)
    assert len(seen) == 3
    for row in range(2):
        real = ids[row][mask[row].bool()]
        live = torch.ones(1, len(real), dtype=torch.bool)
        whole = segment_ids(real[None], live, ends, min_tokens)[0]
        if min_tokens:  # short sentences were joined: a numbering other than the plain one
            assert whole.tolist() != segment_ids(real[None], live, ends)[0].tolist()
        for segments, positions, valid in seen:
            assert segments[row][valid[row]].tolist() == whole[positions[row][valid[row]]].tolist()
            assert bool((segments[row][~valid[row]] == -1).all())
    assert seen[-1][2][0].sum() < 40  # tokens were pruned, so the gathering was exercised
    with pytest.raises(ValueError, match="sentence"):  # called without them: a clear error
        AttentionScorer(base.config, 8, 6, 2, ends=ends).score(
            0, torch.zeros(1, 3, 64), layer=None, position_embeddings=None, valid=None
        )


def test_the_default_line_reads_line_ends_from_the_tokenizer(tiny_hf_dir):
    """The default, ``line16`` = ``attention:64:95:15:l16`` at the spread's layers: only a newline ends its unit (a
    line of fewer than 16 tokens joins the next);
    ``:s`` also ends one at ``.``, ``!``, ``?``. Ends come from the model's tokenizer (passed, or the one saved
    beside the weights); without either, a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sdtp_core.config import earlier_layers
    from sdtp_core.loading import load_pruner
    from sdtp_core.spans import sentence_ends

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ends = sentence_ends(tokenizer, 151936)
    ids = tokenizer.encode("The uuid for abc is: def.\nThe grass is green. Here!")
    assert [tokenizer.decode([i]) for i, end in zip(ids, ends[ids].tolist(), strict=True) if end] == [".\n", ".", "!"]
    assert ends.shape == (151936,) and not ends[len(tokenizer) :].any()
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    line = load_pruner(None, model, layers=[1, 3])  # the tokenizer saved beside the weights
    assert line.source == "line16" and (line.window, line.before, line.after) == (64, 95, 15)
    assert line.min_unit_tokens == 16  # the default joins a line of fewer than 16 tokens to the next
    assert [tokenizer.decode([i]) for i in ids if line.sentence_ends[i]] == [".\n"]
    deeper = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "num_hidden_layers": 16})).eval()
    assert load_pruner(None, deeper, tokenizer=tokenizer).config.layers == earlier_layers(16)
    sentence = load_pruner("attention:64:63:15:s", model, layers=[1, 3], tokenizer=tokenizer)
    assert torch.equal(sentence.sentence_ends[: len(tokenizer)], ends[: len(tokenizer)])
    assert load_pruner("attention:8:5:s", model, layers=[1, 3], tokenizer=tokenizer).before == 2
    assert load_pruner("line+attention", model, layers=[1, 3], tokenizer=tokenizer).sentence_ends is not None
    out = SDTPEngine(model, line).prefill(torch.tensor([ids * 4]))
    assert out.kept_counts[0, -1] < len(ids) * 4
    with pytest.raises(ValueError, match="tokenizer"):
        load_pruner(None, tiny_model(), layers=[1, 3])


def test_attention_scorer_within_sentences_takes_the_maximum_of_its_own_sentence_only():
    """attention:W:B:A:s on a real layer: the plain scores (protected ones zeroed), maximised by hand over the
    span's slots of the same sentence; without sentence ends the same scorer crosses sentences."""
    from sdtp_core.scorers import AttentionScorer

    model = tiny_model(attn="eager")
    layer = model.model.layers[2]
    torch.manual_seed(3)
    n, before, after = 18, 5, 2
    hidden = torch.randn(1, n, 64)
    rope = model.model.rotary_emb(hidden, torch.arange(n).unsqueeze(0))
    valid = torch.ones(1, n, dtype=torch.bool)
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[0, 0] = protected[0, -2:] = True
    segments = torch.tensor([[0] * 3 + [1] * 4 + [2] * 6 + [3] * 5])
    kwargs = dict(layer=layer, position_embeddings=rope, valid=valid, protected=protected, segments=segments)
    ends = torch.zeros(96, dtype=torch.bool)  # only marks the scorer as within sentences: segments are given
    with torch.no_grad():
        plain = AttentionScorer(None, window=4).score(2, hidden, **kwargs)[0].masked_fill(protected[0], 0.0)
        got = AttentionScorer(None, window=4, before=before, after=after, ends=ends).score(2, hidden, **kwargs)[0]
        crossing = AttentionScorer(None, window=4, before=before, after=after).score(2, hidden, **kwargs)[0]
    seg = segments[0]
    expected = torch.stack(
        [max(plain[j] for j in range(max(0, i - before), min(n, i + after + 1)) if seg[j] == seg[i]) for i in range(n)]
    )
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, crossing)  # this case tells the two apart
