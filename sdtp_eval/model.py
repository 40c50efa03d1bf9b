"""The ``sdtp`` lm-eval model: lm-eval's own HF backend with SDTP's pruned prefill and decoding.

``SDTPLM`` subclasses :class:`lm_eval.models.huggingface.HFLM`, so batching, tokenization, chat
templates, request caching, ``model_args`` parsing and data parallelism are lm-eval's. It overrides
only the seams where the model runs:

* ``_model_call`` (loglikelihood): the context is pruned; the continuation tokens and the token before
  them are protected, so every scored logit exists. The logits of the other positions are not
  computed (they are returned as zeros and never read by lm-eval).
* ``_model_generate`` (generate_until): pruned prefill, then decoding on the pruned KV caches.
* ``loglikelihood_rolling`` scores every token, so there is nothing to prune: it runs dense.
* ``tok_batch_encode``: optional middle truncation (``truncation=middle``, as official LongBench).
* ``generate_until``: for this package's LongBench tasks, the official per-task chat-template rule.

Extra ``model_args`` (besides everything HFLM accepts): ``pruner`` (a pruner directory or ``random``),
``prune`` (true/false), ``keep_ratio`` (r), ``layers`` (stage layers separated by ``:``, e.g.
``4:8:12``), ``truncation`` (``left`` or ``middle``). Without ``pretrained`` the embedded
Qwen2.5-Coder-0.5B-Instruct is used.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from sdtp_core.embedded import resolve_pretrained
from sdtp_core.engine import SDTPEngine
from sdtp_core.generate import generate
from sdtp_core.loading import default_dtype, load_pruner

from .longbench.spec import is_longbench_task, uses_chat_template

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
        dtype: str | None = None,
        device: str | None = None,
        **kwargs,
    ):
        if truncation not in ("left", "middle", True, False, "True", "False"):
            raise ValueError(f"truncation must be 'left' or 'middle', got {truncation!r}")
        self.truncation_mode = truncation if truncation in ("left", "middle") else "left"
        self.prune = _as_bool(prune)
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
        # With prune=false no pruner is needed (or loaded): every call goes to HFLM's dense path.
        self.pruner_module = load_pruner(pruner, self.model, layers, keep_ratio) if self.prune else None
        self.pruner_spec = (pruner or "default") if self.prune else None
        self.engine = SDTPEngine(self.model, self.pruner_module)
        self.stats = PruningStats(self.pruner_module.config.layers if self.pruner_module else [])
        self._scoring: dict[tuple[int, ...], tuple[int, str]] = {}
        self._task_of_context: dict[str, str] = {}
        self._batch_tasks: list[str] = []
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
        self._request_tasks = {req.args: req.task_name or "unknown" for req in requests}
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_tasks = {}
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
        # Remember, for every model input lm-eval will build, how many continuation logits it reads.
        tasks = getattr(self, "_request_tasks", {})
        self._scoring = {}
        for key, context_enc, continuation_enc in requests:
            inp = tuple((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])
            contlen = max(len(continuation_enc), self._scoring.get(inp, (0, ""))[0])
            self._scoring[inp] = (contlen, tasks.get(key, "unknown"))
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scoring = {}

    def _lookup(self, row: torch.Tensor) -> tuple[int, int, str]:
        """(input length, continuation length, task) of a right-padded row lm-eval built."""
        tokens = row.tolist()
        nonzero = [i for i, t in enumerate(tokens) if t != 0]
        start = nonzero[-1] + 1 if nonzero else 1
        for length in range(start, len(tokens) + 1):
            hit = self._scoring.get(tuple(tokens[:length]))
            if hit is not None:
                return length, hit[0], hit[1]
        raise RuntimeError("sdtp: could not match a model input to its loglikelihood request")

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if not self.prune or getattr(self, "_rolling", False) or not self._scoring:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        batch, width = inps.shape
        found = [self._lookup(row) for row in inps]
        mask = torch.zeros_like(inps)
        protect = torch.zeros_like(inps, dtype=torch.bool)
        for b, (length, contlen, _) in enumerate(found):
            mask[b, :length] = 1
            protect[b, length - contlen : length] = True
        keep = max(contlen for _, contlen, _ in found)
        result = self.engine.prefill(inps, mask, protect=protect, logits_to_keep=keep, use_cache=False)
        logits = torch.zeros(batch, width, result.logits.shape[-1], dtype=result.logits.dtype, device=inps.device)
        positions = result.positions[:, -keep:]
        for b, (_, contlen, task) in enumerate(found):
            pos = positions[b, -contlen:]
            logits[b, pos] = result.logits[b, -contlen:]
            self.stats.add(task, result, [b])
        return logits

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

    def _prepare_context(self, context: str, task: str, max_gen_toks: int) -> str:
        """Official LongBench order for this package's LongBench tasks: truncate, then chat template."""
        if not is_longbench_task(task):
            return context
        if self.truncation_mode == "middle":
            tokens = self.tokenizer.encode(context, add_special_tokens=False)
            budget = self.max_length - max_gen_toks
            if len(tokens) > budget:
                context = self.tokenizer.decode(middle_truncate(tokens, budget), skip_special_tokens=True)
        already = self._chat_marker is not None and self._chat_marker in context
        if uses_chat_template(task) and not already and self._chat_marker is not None:
            context = self.apply_chat_template([{"role": "user", "content": context}])
        return context

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._task_of_context = {}
        for req in requests:
            context, gen_kwargs = req.args
            task = req.task_name or "unknown"
            max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            new_context = self._prepare_context(context, task, max_gen)
            if new_context != context:
                req.arguments = (new_context, gen_kwargs)
            self._task_of_context[new_context] = task
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._task_of_context = {}
            self._gather_stats()

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        self._batch_tasks = [self._task_of_context.get(s, "unknown") for s in strings]
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

    def _model_generate(self, context, max_length, stop, attention_mask=None, **generation_kwargs):
        do_sample = bool(generation_kwargs.get("do_sample", False))
        temperature = float(generation_kwargs.get("temperature", 1.0) or 0.0)
        if temperature == 0.0:
            do_sample = False
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        out = generate(
            self.engine,
            context,
            attention_mask,
            max_new_tokens=max(1, max_length - context.shape[1]),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_k=generation_kwargs.get("top_k"),
            top_p=generation_kwargs.get("top_p"),
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id or 0,
            stop_strings=list(stop) if stop else None,
            tokenizer=self.tokenizer,
            prune=self.prune,
        )
        tasks = self._batch_tasks if len(self._batch_tasks) == context.shape[0] else ["unknown"] * context.shape[0]
        for b, task in enumerate(tasks):
            self.stats.add(task, out.prefill, [b], seconds=(out.prefill_seconds, out.total_seconds))
        return torch.cat([context, out.sequences.to(context.device)], dim=1)

    # ------------------------------------------------------------------ reporting
    def _gather_stats(self) -> None:
        """Bring every rank's statistics to rank 0 (collective: every rank calls it)."""
        if self.world_size <= 1:
            return
        gathered = self.gather_object(dict(self.stats.sums), dst=0)
        if self.rank == 0:
            merged = PruningStats(self.stats.stage_layers)
            for part in gathered:
                merged.merge(part)
            self.stats = merged
        else:
            self.stats = PruningStats(self.stats.stage_layers)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        summary = self.stats.summary()
        info["sdtp"] = {
            "prune": self.prune,
            "pruner": self.pruner_spec,
            "schedule": self.pruner_module.config.to_dict() if self.pruner_module else None,
            "truncation": self.truncation_mode,
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
