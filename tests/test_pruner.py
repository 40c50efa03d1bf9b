"""Pruner configuration, default schedule, save/load, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_pruner

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
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(PrunerConfigError, match=message):
        PrunerConfig(hidden_size=64, num_hidden_layers=6, **kwargs)


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
