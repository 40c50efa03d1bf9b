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


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The converted embedded model (converts once, ~1 min, on a fresh machine)."""
    from sdtp_core.embedded import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, embedded_dir) -> Path:
    """A tiny random Qwen2 saved as a Hugging Face directory with the real Qwen2.5 tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    config = Qwen2Config(**{**TINY, "vocab_size": len(tokenizer)}, attn_implementation="sdpa")
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = Qwen2ForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_datasets_cache(tmp_path_factory) -> Path:
    """The real COPA/PIQA/WinoGrande (etc.) installed offline into a temporary datasets cache."""
    import subprocess
    import sys

    path = shared_data_dir()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must set SDTP_DATA_DIR to the shared evaluation data (../shared/data)")
        pytest.skip("real evaluation data not found: set SDTP_DATA_DIR to a copy of the original releases")
    cache = tmp_path_factory.mktemp("hf_datasets")
    data_home = tmp_path_factory.mktemp("sdtp_data")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtp_eval.data",
            "install",
            "--from",
            str(path),
            "--cache-dir",
            str(cache),
            "--data-home",
            str(data_home),
        ],
        check=True,
        capture_output=True,
    )
    os.environ["SDTP_TEST_DATA_HOME"] = str(data_home)
    return cache


def offline_env(cache: Path) -> dict:
    """Environment for an lm_eval subprocess that reads the installed data offline."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache))
    if os.environ.get("SDTP_TEST_DATA_HOME"):
        env["SDTP_DATA_HOME"] = os.environ["SDTP_TEST_DATA_HOME"]
    return env
