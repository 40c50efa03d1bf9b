"""Generation with a pruned prefill and decoding on the pruned per-layer KV caches.

The prompt is run once, with pruning, by :meth:`SDTPEngine.prefill`; every new token is then decoded
by :meth:`SDTPEngine.decode_step` against the pruned caches. The unpruned prompt is never re-run.
Sampling and stopping reuse transformers' logits processors and stopping criteria.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sdtp_core.cache import PrunedCache
from sdtp_core.engine import PrefillResult, SDTPEngine
from sdtp_core.timing import StageTimer, stage

#: GenerationConfig fields the pruned decoding loop honours (the rest must be unset, or it refuses).
SUPPORTED_FIELDS = {
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
}
#: Fields that do not change which tokens are generated (bookkeeping, outputs, caching).
NEUTRAL_FIELDS = {
    "bos_token_id",
    "decoder_start_token_id",
    "use_cache",
    "cache_implementation",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "transformers_version",
    "_from_model_config",
    "num_beams",  # refused below unless 1
    "num_return_sequences",  # refused below unless 1
    "max_length",  # the loop is bounded by max_new_tokens
    "remove_invalid_values",
    "renormalize_logits",
}


class UnsupportedGenerationError(ValueError):
    """A generation setting the pruned decoding loop cannot honour."""


@dataclass
class GenerationResult:
    """New tokens (batch, t), padded with ``pad_token_id`` after a row stopped, the prefill statistics,
    and wall-clock seconds of the prefill (to the first token's logits) and of the whole call."""

    sequences: torch.Tensor
    prefill: PrefillResult
    prefill_seconds: float
    total_seconds: float


def resolve_generation_config(generation_config: GenerationConfig | None = None, **kwargs) -> GenerationConfig:
    """A copy of ``generation_config`` (default: an empty one) updated with ``kwargs``.

    Raises :class:`UnsupportedGenerationError` naming every setting the pruned loop cannot honour
    (beam search, unknown keywords, processors it does not implement), instead of ignoring it.
    """
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unknown = config.update(**kwargs)
    problems = [f"unknown generation argument {k!r}" for k in sorted(unknown)]
    for key, value in config.to_dict().items():
        if value is None or key in SUPPORTED_FIELDS or key in NEUTRAL_FIELDS:
            continue
        if isinstance(value, (bool, int, float)) and key.startswith(("output_", "return_")):
            continue
        problems.append(f"{key}={value!r}")
    for key in ("num_beams", "num_return_sequences"):
        if (getattr(config, key, None) or 1) != 1:
            problems.append(f"{key}={getattr(config, key)!r}")
    if config.max_new_tokens is None or config.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    if config.do_sample and config.temperature is not None and config.temperature <= 0:
        problems.append(f"temperature must be > 0 when sampling, got {config.temperature}")
    if problems:
        raise UnsupportedGenerationError(
            "the pruned decoding loop cannot honour: "
            + "; ".join(problems)
            + f" (supported: {', '.join(sorted(SUPPORTED_FIELDS))}; use prune=false for anything else)"
        )
    return config


def logits_processors(config: GenerationConfig, prompt_mask: torch.Tensor) -> LogitsProcessorList:
    """The processors ``model.generate`` would build for ``config``, in its order.

    ``prompt_mask`` (batch, n) marks real prompt tokens; left padding is exempt from the repetition
    penalty, as in ``generate``.
    """
    eos = _eos_list(config.eos_token_id)
    n = prompt_mask.shape[1]
    procs = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        pads = (prompt_mask != 0).int().argmax(dim=1)
        try:
            procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=pads))
        except (TypeError, ValueError):  # releases without prompt_ignore_length, or only an int (5.2)
            procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.min_new_tokens and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(n, config.min_new_tokens, eos, device=prompt_mask.device))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
        if config.min_p is not None:
            procs.append(MinPLogitsWarper(config.min_p))
    return procs


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


@torch.inference_mode()
def generate(
    engine: SDTPEngine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    tokenizer=None,
    prune: bool = True,
    protect: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    timer: StageTimer | None = None,
    **kwargs,
) -> GenerationResult:
    """Generate new tokens for each prompt of a batch: pruned prefill, then decoding on the pruned caches.

    Generation settings come from ``generation_config`` (e.g. ``model.generation_config``) updated with
    ``kwargs`` (any :class:`~transformers.GenerationConfig` field: ``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``min_new_tokens``,
    ``no_repeat_ngram_size``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``), applied with
    the same logits processors as ``model.generate``. Settings it cannot honour (beam search, ...)
    raise :class:`UnsupportedGenerationError`. ``max_new_tokens`` defaults to 128.

    A row stops at an EOS token (kept in the output) or when its generated text contains one of the
    stop strings (needs ``tokenizer``); the batch stops when every row has stopped. ``timer`` (an optional
    :class:`~sdtp_core.timing.StageTimer`) receives the stages of the prefill and of every decoding step.
    """
    kwargs.setdefault("max_new_tokens", (generation_config.max_new_tokens if generation_config else None) or 128)
    config = resolve_generation_config(generation_config, **kwargs)
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    start = time.perf_counter()
    result = engine.prefill(input_ids, attention_mask, protect=protect, prune=prune, logits_to_keep=1, timer=timer)
    _synchronize(result.logits.device)
    prefill_seconds = time.perf_counter() - start
    sequences = decode_loop(
        engine,
        result.cache,
        result.logits[:, -1],
        result.lengths,
        input_ids,
        attention_mask,
        config,
        tokenizer=tokenizer,
        generator=generator,
        timer=timer,
    )
    _synchronize(sequences.device)
    return GenerationResult(sequences, result, prefill_seconds, time.perf_counter() - start)


@torch.inference_mode()
def decode_loop(
    engine: SDTPEngine,
    cache: PrunedCache,
    logits: torch.Tensor,
    lengths: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    *,
    tokenizer=None,
    generator: torch.Generator | None = None,
    timer: StageTimer | None = None,
    reserve: bool = True,
) -> torch.Tensor:
    """The decoding loop of :func:`generate`, from a filled cache and the prompt's last logits.

    Args:
        cache: the (pruned) cache of the prompt; decoded tokens are appended to it in place (room for
            them is reserved up front, see :meth:`PrunedCache.reserve`).
        logits: (batch, vocab) logits of the last prompt token.
        lengths: (batch,) prompt lengths; the first decoded token sits at this position.
        input_ids, attention_mask: the prompt (read by logits processors, as in ``model.generate``).
        config: a resolved configuration (:func:`resolve_generation_config`).
        timer: optional :class:`~sdtp_core.timing.StageTimer`; adds ``decode/select`` (processors,
            token choice, stopping) to the stages of :meth:`SDTPEngine.decode_step`.
        reserve: preallocate the cache for the new tokens (same results; ``False`` concatenates per
            step, the behaviour before preallocation, kept for measuring it).

    Returns:
        (batch, t) new tokens, padded with ``pad_token_id`` after a row stopped.
    """
    batch = logits.shape[0]
    device = logits.device
    prompt = input_ids.to(device)
    prompt_mask = torch.ones_like(prompt) if attention_mask is None else attention_mask.to(device)

    processors = logits_processors(config, prompt_mask)
    stop_strings = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings
    stop = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
    eos = torch.tensor(_eos_list(config.eos_token_id), device=device, dtype=torch.long)
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0

    if reserve:
        cache.reserve(config.max_new_tokens - 1)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    positions = lengths.to(device).clone()
    tokens: list[torch.Tensor] = []
    for step in range(config.max_new_tokens):
        with stage(timer, "decode/select"):
            scores = logits.float()
            if processors:  # they read the whole sequence so far (prompt + generated), as in model.generate
                scores = processors(torch.cat([prompt, *(t.unsqueeze(1) for t in tokens)], dim=1), scores)
            if config.do_sample:
                next_token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                next_token = scores.argmax(-1)
            next_token = next_token.masked_fill(done, pad_token_id)
            tokens.append(next_token)
            done |= torch.isin(next_token, eos)
            if stop is not None:
                done |= stop(torch.stack(tokens, dim=1), scores)
            finished = bool(done.all()) or step == config.max_new_tokens - 1
        if finished:
            break
        logits = engine.decode_step(cache, next_token, positions, timer=timer)
        positions = positions + 1
    return torch.stack(tokens, dim=1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
