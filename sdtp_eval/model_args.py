"""The ``sdtp`` model's own model_args (besides HFLM's): their parsing, and the generation strategies they choose.

``press``/``press_ratio`` and ``compress``/``compress_rate``/``compress_model`` choose, once at construction,
the :mod:`sdtp_eval.generation` strategies the model holds; the peer ones live in :mod:`sdtp_eval.peers` and are
imported only when named (their libraries are the optional ``peers`` extra).
"""

from __future__ import annotations

import torch

from .generation import GenerationStrategy, PromptTransform, SDTPGeneration


def as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def as_layers(value) -> list[int] | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    try:
        return [int(x) for x in str(value).replace(";", ":").split(":") if x.strip()]
    except ValueError as e:
        raise ValueError(f"layers must be integers separated by ':' (e.g. 4:8:12), got {value!r}") from e


def generation_for(press, press_ratio) -> GenerationStrategy:
    """``press=NAME`` (with ``press_ratio``): generation through that kvpress press; none: plain SDTP."""
    if press in (None, "", "none", "None"):
        float(press_ratio)  # a malformed press_ratio is an error even without a press
        return SDTPGeneration()
    from .peers.press_generation import PressGeneration

    return PressGeneration(press, press_ratio)


def prompts_for(compress, rate: float, model: str | None, dtype: torch.dtype) -> PromptTransform:
    """``compress=llmlingua``: LLMLingua v1 (its small LM ``model``, default the embedded model, in ``dtype``)
    compresses generation prompts; none: they stay as they are."""
    if compress in (None, "", "none", "None"):
        return PromptTransform()
    if str(compress).lower() != "llmlingua":
        raise ValueError(f"compress must be 'llmlingua' (LLMLingua v1), got {compress!r}")
    from .peers.llmlingua_prompts import LLMLinguaPrompts

    return LLMLinguaPrompts.load(rate, model, dtype)
