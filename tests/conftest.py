"""Shared fixtures: tiny randomly initialised decoder models (instant, run everywhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sdtp_core.config import PrunerConfig
from sdtp_core.pruner import TokenPruner

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_model(arch: str = "qwen2", attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, attn_implementation=attn))
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=attn))
    return model.eval()


def tiny_pruner(model, layers=(1, 3, 4), ratios=(0.7, 0.5, 0.4), seed: int = 1, **kw) -> TokenPruner:
    cfg = PrunerConfig(model.config.hidden_size, model.config.num_hidden_layers, list(layers), list(ratios), **kw)
    torch.manual_seed(seed)
    return TokenPruner(cfg).eval()


@pytest.fixture(params=["qwen2", "llama"])
def arch(request) -> str:
    return request.param


def shared_data_dir() -> Path | None:
    """The real evaluation data: ``$SDTP_DATA_DIR`` (CI sets it to ../shared/data)."""
    value = os.environ.get("SDTP_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must set SDTP_DATA_DIR to the shared evaluation data (../shared/data)")
        pytest.skip("real evaluation data not found: set SDTP_DATA_DIR to a copy of the original releases")
    return path
