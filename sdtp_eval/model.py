"""The ``sdtp`` lm-eval model: lm-eval's own HF backend with SDTP's pruned prefill and decoding.

``SDTPLM`` subclasses :class:`lm_eval.models.huggingface.HFLM`, so batching, tokenization, chat
templates, request caching, ``model_args`` parsing and data parallelism are lm-eval's. It overrides
only the seams where the model runs:

* ``_model_call`` (loglikelihood): the context is pruned; the continuation tokens and the token before
  them are protected, so every scored logit exists. The logits of the other positions are not
  computed (they are returned as zeros and never read by lm-eval). With ``prune=false`` it is HFLM's own
  forward with the LM head applied to those slots only.
* ``_model_generate`` (generate_until): the generation strategy; by default pruned prefill, then decoding
  on the pruned KV caches.
* ``loglikelihood_rolling`` scores every token, so there is nothing to prune: it runs dense.
* ``tok_batch_encode``: optional middle truncation (``truncation=middle``, as official LongBench).
* ``generate_until``: for this package's LongBench tasks, the official per-task chat-template rule.

Extra ``model_args`` (besides everything HFLM accepts): ``pruner`` (a pruner directory, ``shipped``,
``attention``, ``norm`` or ``random``), ``prune`` (true/false), ``keep_ratio`` (r), ``layers`` (stage
layers separated by ``:``, e.g. ``4:8:12``), ``truncation`` (``left`` or ``middle``),
``min_prompt_tokens`` (shorter prompts run dense; default
:data:`sdtp_core.loading.DEFAULT_MIN_PROMPT_TOKENS`, 0: every prompt is pruned), ``press`` and
``press_ratio`` (a kvpress press compressing the KV cache for generation, alone with ``prune=false`` or
after SDTP's pruned prefill: :mod:`sdtp_eval.peers.press_generation`, the ``peers`` extra),
``compress=llmlingua`` with ``compress_rate`` and ``compress_model`` (generation prompts compressed by
LLMLingua v1 before the model reads them: :mod:`sdtp_eval.peers.llmlingua_prompts`). Without
``pretrained`` the embedded Qwen2.5-Coder-0.5B-Instruct is used.

The peer methods are strategy objects chosen once, at construction (:mod:`sdtp_eval.generation`):
``self.prompts`` rewrites generation prompts, ``self.generation`` runs ``_model_generate``; the defaults
are plain SDTP. The pruning report (per-task means, per-request sample records) is
:mod:`sdtp_eval.pruning_report`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from sdtp_core.embedded import resolve_pretrained
from sdtp_core.engine import SDTPEngine
from sdtp_core.loading import DEFAULT_MIN_PROMPT_TOKENS, RANDOM_PRUNER, default_dtype, load_pruner

from .longbench.spec import NO_CHAT_TEMPLATE, is_longbench_task, uses_chat_template
from .model_args import as_bool, as_layers, generation_for, prompts_for
from .pruning_report import (
    PruningStats,
    SampleRecords,
    annotate_samples,
    install_sample_annotation,
    merge_ranks,
    prefill_record,
)

logger = logging.getLogger("lm_eval.sdtp")


def middle_truncate(tokens: list[int], budget: int) -> list[int]:
    """Keep the first half and the last half of ``budget`` tokens (official LongBench ``pred.py``)."""
    if budget <= 0:
        raise ValueError(f"truncation budget must be positive, got {budget}")
    if len(tokens) <= budget:
        return tokens
    half = budget // 2
    return tokens[:half] + tokens[len(tokens) - (budget - half) :]


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
        self.prune = as_bool(prune)
        #: how _model_generate runs: plain SDTP, or a kvpress press (checked before the model loads)
        self.generation = generation_for(press, press_ratio)
        compress_rate = float(compress_rate)
        layers = as_layers(layers)
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
        #: what generation prompts go through first: nothing, or LLMLingua (its small LM in the model's dtype)
        self.prompts = prompts_for(compress, compress_rate, compress_model, self.model.dtype)
        # With prune=false neither a pruner nor the engine is built: every call runs HFLM's forward.
        self.pruner_module = load_pruner(pruner, self.model, layers, keep_ratio, self.tokenizer) if self.prune else None
        self.pruner_spec = getattr(self.pruner_module, "source", None) if self.prune else None
        self.engine = SDTPEngine(self.model, self.pruner_module, int(min_prompt_tokens)) if self.prune else None
        self.stats = PruningStats(self.pruner_module.config.layers if self.pruner_module else [])
        #: per-request pruning records, (task, doc_id) -> [(request idx, record)], for --log_samples
        self.sample_records: SampleRecords = defaultdict(list)
        self._scoring: dict[tuple[int, ...], tuple[int, list]] = {}
        self._request_keys: dict[tuple, list[tuple[str, int, int]]] = {}
        self._gen_requests: dict[str, list[tuple[str, int, int]]] = {}
        #: the request keys of each row of the generation batch being encoded and run
        self.batch_keys: list[list[tuple[str, int, int]]] = []
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
        self.prompts.check_loglikelihood()
        self.generation.check_loglikelihood()
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
            logger.warning("sdtp: loglikelihood_rolling scores every token, so it runs dense (nothing is pruned).")
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
            self.record_prefill(keys, result, b)
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

    def record_prefill(self, keys: list[tuple[str, int, int]], result, b: int, seconds=None, extra=None) -> None:
        """Add row ``b`` of a prefill to the per-task report and to each request's sample record (with
        ``extra`` fields, e.g. a press's KV figures)."""
        task = keys[0][0] if keys else "unknown"
        self.stats.add(task, result, [b], seconds=seconds)
        self.add_sample_record(keys, prefill_record(result, b, self.stats.stage_layers) | (extra or {}))

    def add_sample_record(self, keys, record: dict) -> None:
        """Log ``record`` for each request in ``keys`` ((task, doc_id, idx) triples; repeats count once)."""
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
        then apply the chat template where the official task uses one. The prompt transform
        (``compress=llmlingua``) sees the truncated prompt, before any template. Never modifies a request."""
        if not is_longbench_task(task):
            return self.prompts(self, context, keys)
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
        context = self.prompts(self, context, keys)
        if uses_chat_template(task) and self._chat_marker is not None:
            context = self.apply_chat_template([{"role": "user", "content": context}])
        return context

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
            self.batch_keys = [self._gen_requests.get(s, []) for s in strings]
            budget = left_truncate_len or self.max_length
            strings = [
                self._prepare_context(s, keys[0][0] if keys else "unknown", budget, keys)
                for s, keys in zip(strings, self.batch_keys)
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
        return self.generation.generate(self, context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------ reporting
    def _gather_stats(self) -> None:
        """Bring every rank's statistics to rank 0 (collective: every rank calls it)."""
        if self.world_size <= 1:
            return
        gathered = self.gather_object((dict(self.stats.sums), dict(self.sample_records)), dst=0)
        self.stats, self.sample_records = merge_ranks(gathered if self.rank == 0 else [], self.stats.stage_layers)

    def annotate_samples(self, samples: dict[str, list[dict]], selected: dict[str, list[int]] | None = None) -> None:
        """Add ``sdtp`` (one record per request of the sample: prompt tokens, tokens kept after each stage,
        1/τ) to every logged sample whose requests this model ran (cached requests were not run).

        ``selected``: lm-eval's ``--samples`` ({task: sorted doc indices}); a request of such a task carries
        its document's position in that list as its doc_id, while the logged sample carries the index."""
        annotate_samples(self.sample_records, samples, selected)

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
            **self.generation.info(),
            **self.prompts.info(),
            "per_task": summary,
        }
        for task, s in summary.items():
            if self.prune and s["mean_compression"] == 1.0:
                logger.warning(
                    "sdtp: nothing was pruned for %s (%d requests, %.0f prompt tokens on average, "
                    "min_prompt_tokens=%d): its scores are the dense model's, not SDTP's.",
                    task,
                    s["requests"],
                    s["mean_prompt_tokens"],
                    self.engine.min_prompt_tokens,
                )
        if summary:
            parts = ", ".join(
                f"{task}: 1/tau={s['mean_compression']:.3f} kept/stage="
                + "/".join(f"{k:.0f}" for k in s["mean_kept_per_stage"])
                for task, s in summary.items()
            )
            logger.info("sdtp pruning (prune=%s): %s", self.prune, parts)
        return info


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


install_sample_annotation(SDTPLM)
