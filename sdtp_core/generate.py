"""Generation with a pruned prefill and decoding on the pruned per-layer KV caches.

The prompt is run once, with pruning, by :meth:`SDTPEngine.prefill`; every new token is then decoded
by :meth:`SDTPEngine.decode_step` against the pruned caches. The unpruned prompt is never re-run.
Sampling and stopping reuse transformers' logits processors and stopping criteria.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .engine import PrefillResult, SDTPEngine


@dataclass
class GenerationResult:
    """New tokens (batch, t), padded with ``pad_token_id`` after a row stopped, the prefill statistics,
    and wall-clock seconds of the prefill (to the first token's logits) and of the whole call."""

    sequences: torch.Tensor
    prefill: PrefillResult
    prefill_seconds: float
    total_seconds: float


@torch.inference_mode()
def generate(
    engine: SDTPEngine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    prune: bool = True,
    protect: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for each prompt of a batch.

    A row stops at an EOS token (kept in the output) or when its generated text contains one of
    ``stop_strings`` (needs ``tokenizer``); the batch stops when every row has stopped.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    start = time.perf_counter()
    result = engine.prefill(input_ids, attention_mask, protect=protect, prune=prune, logits_to_keep=1)
    _synchronize(result.logits.device)
    prefill_seconds = time.perf_counter() - start
    cache, logits = result.cache, result.logits[:, -1]
    batch = logits.shape[0]
    device = logits.device

    warpers = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    stop = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=device,
        dtype=torch.long,
    )

    done = torch.zeros(batch, dtype=torch.bool, device=device)
    positions = result.lengths.clone()
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        generated = torch.stack(tokens, dim=1) if tokens else torch.empty(batch, 0, dtype=torch.long, device=device)
        scores = warpers(generated, logits.float())
        if do_sample:
            next_token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_token = scores.argmax(-1)
        next_token = next_token.masked_fill(done, pad_token_id)
        tokens.append(next_token)
        done |= torch.isin(next_token, eos)
        if stop is not None:
            done |= stop(torch.stack(tokens, dim=1), scores)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = engine.decode_step(cache, next_token, positions)
        positions = positions + 1
    sequences = torch.stack(tokens, dim=1)
    _synchronize(sequences.device)
    return GenerationResult(sequences, result, prefill_seconds, time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
