"""Recognise a model by what it is: its architecture plus a cheap, fixed sample of its weights.

A shipped pruner records the fingerprint of the model it was trained on. A model matches when its
architecture fields are equal and every weight sample has a cosine similarity of at least
``MIN_COSINE`` with the recorded one. That accepts the same weights from any directory, and the
same checkpoint in another precision or quantization (the embedded model is a Q4_K_M GGUF of the Hub
checkpoint: cosine ≈ 0.99), but not another model of the same shape (cosine ≈ 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FINGERPRINT_NAME = "model_fingerprint.json"
CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
MIN_COSINE = 0.95
_ROWS, _COLS = 64, 32


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """A fixed grid of ``_ROWS`` x ``_COLS`` entries spread over a 2-D weight, as float32."""
    rows = torch.linspace(0, weight.shape[0] - 1, _ROWS).round().long()
    cols = torch.linspace(0, weight.shape[1] - 1, _COLS).round().long()
    return weight.detach()[rows][:, cols].float().cpu().flatten()


def _weights(model) -> dict[str, torch.Tensor]:
    inner = model.model
    return {
        "embed_tokens": _sample(inner.embed_tokens.weight),
        "layers.0.mlp.down_proj": _sample(inner.layers[0].mlp.down_proj.weight),
        "layers.-1.mlp.up_proj": _sample(inner.layers[-1].mlp.up_proj.weight),
    }


def fingerprint(model) -> dict:
    """The architecture fields and weight samples of ``model`` (JSON-serialisable)."""
    config = {key: getattr(model.config, key, None) for key in CONFIG_KEYS}
    return {"config": config, "weights": {k: [round(float(x), 6) for x in v] for k, v in _weights(model).items()}}


def same_architecture(model, reference: dict) -> bool:
    return all(getattr(model.config, key, None) == value for key, value in reference["config"].items())


def weight_similarity(model, reference: dict) -> float:
    """The smallest cosine similarity between ``model``'s weight samples and the recorded ones."""
    mine = _weights(model)
    sims = [
        torch.nn.functional.cosine_similarity(mine[name], torch.tensor(values), dim=0).item()
        for name, values in reference["weights"].items()
    ]
    return min(sims)


def matches(model, reference: dict) -> bool:
    """Whether ``model`` is the model ``reference`` was taken from (same architecture, same weights up to
    precision/quantization)."""
    return same_architecture(model, reference) and weight_similarity(model, reference) >= MIN_COSINE


def save(model, directory: str | Path) -> None:
    (Path(directory) / FINGERPRINT_NAME).write_text(json.dumps(fingerprint(model)))


def load(directory: str | Path) -> dict | None:
    path = Path(directory) / FINGERPRINT_NAME
    return json.loads(path.read_text()) if path.is_file() else None
