"""NVIDIA kvpress presses as peers of SDTP, alone and composed with SDTP's pruned prefill.

A *press* (kvpress) compresses each layer's KV cache right after that layer's attention ran during the
prefill: it scores the cached key/value pairs and keeps the best ``1 - compression_ratio`` of them. It
does not shorten the hidden states, so every layer still computes on the whole prompt; the cache that
decoding attends to is what shrinks. SDTP shortens the hidden states themselves. The two compose
(paper, Table 6): run SDTP's pruned prefill with a press active, and layer ``l``'s press compresses the
``k_l`` tokens layer ``l`` processed down to ``compute_n_kept(k_l, ratio)``.

How the composition works, and why it needs one shim: kvpress registers a forward hook on every
``layer.self_attn``; :class:`~sdtp_core.engine.SDTPEngine` calls the model's own decoder layers, which
call their own ``self_attn``, so the hooks fire inside the engine's prefill. The hook tells prefill
from decoding by ``kwargs["cache_position"]``, which transformers < 5.3 passes only when the *model*
(not a single layer) is called; the engine calls layers and passes none (and transformers >= 5.3 no
longer has ``cache_position`` at all). :func:`prefill_cache_position` supplies it during a prefill:
there every attention call covers the whole prompt so far, so ``cache_position = arange(q_len)``. The
press then runs unchanged (same hook, same ``score``/``compress``). After the prefill every layer has
its own key layout, so the engine's :class:`~sdtp_core.cache.PrunedCache` is rebuilt with one segment
per layer and decoding runs on it with :meth:`SDTPEngine.decode_step`.

Batch size 1 only (kvpress presses do not handle padded batches). Press names: see :data:`PRESSES`.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

#: Press name -> kvpress class name. ``observed_attention`` is kvpress's H2O-style press (the mean
#: attention each key received during the prefill); it needs ``attn_implementation="eager"``.
PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "observed_attention": "ObservedAttentionPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
}
ALIASES = {"h2o": "observed_attention", "streamingllm": "streaming_llm", "streaming": "streaming_llm"}
NEEDS_EAGER = {"observed_attention"}


def _kvpress():
    try:
        import kvpress
    except ImportError as e:  # pragma: no cover - exercised only without the peers environment
        raise ImportError(
            "kvpress is not installed; it pins transformers<5.3, so install it in a separate environment "
            "(see docs/peers.md): pip install torch==2.13.0 && pip install -e '.[dev]' kvpress==0.5.5"
        ) from e
    return kvpress


def press_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose one of {sorted(PRESSES)} (aliases: {sorted(ALIASES)})")
    return key


def build_press(name: str, compression_ratio: float, **kwargs):
    """A kvpress press by name at ``compression_ratio`` (fraction of KV pairs removed, in [0, 1)).

    Extra keyword arguments go to the press (e.g. ``window_size`` for SnapKV, ``n_sink`` for
    StreamingLLM); kvpress's defaults otherwise.
    """
    cls = getattr(_kvpress(), PRESSES[press_name(name)])
    return cls(compression_ratio=compression_ratio, **kwargs)


def expected_cache_lengths(layer_lengths: list[int], compression_ratio: float) -> list[int]:
    """KV entries a score-based press leaves in layers that held ``layer_lengths`` tokens (kvpress's rule)."""
    from kvpress.utils import compute_n_kept

    if compression_ratio == 0:
        return list(layer_lengths)
    return [compute_n_kept(n, compression_ratio) for n in layer_lengths]


def _attention_modules(model):
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in inner.layers]


@contextmanager
def prefill_cache_position(model):
    """Supply ``cache_position = arange(q_len)`` to attention calls that get none. Use during a prefill only.

    kvpress's hook needs it to recognise the prefill; :class:`SDTPEngine` calls decoder layers directly
    and passes none. A call that already has one (a plain transformers < 5.3 forward) is left untouched.

    transformers >= 5.3 (checked on 5.24) also renamed the layers' ``past_key_values`` keyword to
    ``cache``, which kvpress 0.5.5's hook reads under the old name; the cache is then passed under both
    names (the attention module uses ``cache`` and ignores the old name with a FutureWarning, silenced
    here). kvpress 0.5.5 itself declares ``transformers<5.3``: that combination is outside its support.
    """

    def pre_hook(module, args, kwargs):
        changed = False
        if kwargs.get("cache_position") is None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
            changed = True
        if "past_key_values" not in kwargs and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
            changed = True
        return (args, kwargs) if changed else None

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in _attention_modules(model)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Both `past_key_values` and `cache` are set", category=FutureWarning
            )
            yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class PressRun:
    """One prefill + greedy decoding with a press (alone or after SDTP).

    Attributes:
        method: press name, prefixed with ``sdtp+`` for the composition.
        compression_ratio: the press's ratio (fraction of each layer's KV pairs removed).
        sequences: (1, t) generated token ids (EOS included when it stopped there).
        text: decoded ``sequences`` when a tokenizer was given.
        prompt_length: prompt tokens (question tokens, if any, not included).
        processed_lengths: tokens each layer computed on during the prefill (SDTP's kept counts; the
            prompt length in every layer for a press alone).
        cache_lengths: KV entries per layer after the prefill and the press.
        kv_cache_bytes: bytes of keys + values over all layers after the prefill and the press.
        prefill_seconds: prompt (+ question) to the first new token's logits.
        total_seconds: the whole call.
    """

    method: str
    compression_ratio: float
    sequences: torch.Tensor
    text: str | None
    prompt_length: int
    processed_lengths: list[int]
    cache_lengths: list[int]
    kv_cache_bytes: int
    prefill_seconds: float
    total_seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sequences"] = self.sequences.tolist()
        return d


def _resolve(press, compression_ratio: float | None, press_kwargs: dict | None):
    if isinstance(press, str):
        name = press_name(press)
        return name, build_press(name, 0.0 if compression_ratio is None else compression_ratio, **(press_kwargs or {}))
    name = next((k for k, v in PRESSES.items() if type(press).__name__ == v), type(press).__name__)
    return name, press


def _check(model, name: str, input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[0] != 1:
        raise ValueError(f"kvpress presses run one prompt at a time (batch 1), got batch {input_ids.shape[0]}")
    impl = model.config._attn_implementation
    if name in NEEDS_EAGER and impl != "eager":
        raise ValueError(
            f"the {name} press reads the attention weights: load the model with attn_implementation='eager' "
            f"(it has {impl!r})"
        )
    return input_ids.to(model.device)


def _kv_bytes(cache) -> int:
    return sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in cache.layers)


def _greedy(step, logits, position: int, max_new_tokens: int, eos_token_id) -> torch.Tensor:
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    tokens = []
    for i in range(max_new_tokens):
        token = logits.argmax(-1)
        tokens.append(token)
        if int(token) in eos or i == max_new_tokens - 1:
            break
        logits = step(token, position)
        position += 1
    return torch.stack(tokens, dim=1)


@torch.inference_mode()
def run_press(
    model,
    input_ids: torch.Tensor,
    press="knorm",
    compression_ratio: float | None = 0.5,
    *,
    question_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    tokenizer=None,
    press_kwargs: dict | None = None,
) -> PressRun:
    """Prefill ``input_ids`` with a press active, then greedy-decode ``max_new_tokens`` tokens.

    This is kvpress's own recipe (``KVPressTextGenerationPipeline``): the context is prefilled inside
    ``with press(model)``; optional ``question_ids`` are then fed uncompressed at positions ``n, n+1, ...``,
    and decoding continues at the original positions. ``press`` is a name from :data:`PRESSES` (built at
    ``compression_ratio`` with ``press_kwargs``) or a kvpress press object.
    """
    from transformers import DynamicCache

    name, press_obj = _resolve(press, compression_ratio, press_kwargs)
    ids = _check(model, name, input_ids)
    n = ids.shape[1]
    start = time.perf_counter()
    cache = DynamicCache()
    with press_obj(model), prefill_cache_position(model):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    cache_lengths = [layer.keys.shape[-2] for layer in cache.layers]
    kv_bytes = _kv_bytes(cache)
    position = n
    if question_ids is not None:
        q = question_ids.view(1, -1).to(model.device)
        pos = torch.arange(n, n + q.shape[1], device=model.device).unsqueeze(0)
        logits = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[:, -1]
        position += q.shape[1]
    prefill_seconds = time.perf_counter() - start

    def step(token, pos):
        p = torch.tensor([[pos]], device=model.device)
        return model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=p).logits[:, -1]

    seq = _greedy(step, logits, position, max_new_tokens, eos_token_id)
    total = time.perf_counter() - start
    return PressRun(
        method=name,
        compression_ratio=float(getattr(press_obj, "compression_ratio", 0.0)),
        sequences=seq.cpu(),
        text=tokenizer.decode(seq[0]) if tokenizer is not None else None,
        prompt_length=n,
        processed_lengths=[n] * len(cache_lengths),
        cache_lengths=cache_lengths,
        kv_cache_bytes=kv_bytes,
        prefill_seconds=prefill_seconds,
        total_seconds=total,
    )


@torch.inference_mode()
def press_prefill(engine, input_ids: torch.Tensor, press=None, *, protect=None, prune: bool = True):
    """The engine's prefill (pruned unless ``prune=False``) with a kvpress press object's hooks active
    (none when ``press`` is None); returns ``(PrefillResult, cache)``.

    ``cache`` is a :class:`~sdtp_core.cache.PrunedCache` with one segment per layer, all slots live, ready
    for :meth:`SDTPEngine.decode_step`: after a press every layer has its own key layout. ``input_ids`` is one
    row (batch 1, no padding).
    """
    from sdtp_core.cache import PrunedCache

    model = engine.model
    if press is None:
        result = engine.prefill(input_ids, protect=protect, prune=prune, logits_to_keep=1)
    else:
        with press(model), prefill_cache_position(model):
            result = engine.prefill(input_ids, protect=protect, prune=prune, logits_to_keep=1)
    kv = result.cache.kv
    lengths = [kv.layers[i].keys.shape[-2] for i in range(engine.num_layers)]
    live = [torch.ones(1, length, dtype=torch.bool, device=model.device) for length in lengths]
    return result, PrunedCache(kv, list(range(engine.num_layers)), live)


@torch.inference_mode()
def run_sdtp_press(
    engine,
    input_ids: torch.Tensor,
    press="knorm",
    compression_ratio: float | None = 0.5,
    *,
    question_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    tokenizer=None,
    press_kwargs: dict | None = None,
    protect: torch.Tensor | None = None,
    prune: bool = True,
) -> PressRun:
    """SDTP ∘ press: SDTP's pruned prefill with the press's hooks active, then greedy decoding on the result.

    Layer ``l`` first processes SDTP's ``k_l`` kept tokens; the press then compresses that layer's cache
    to ``compute_n_kept(k_l, ratio)`` entries. ``question_ids`` (optional) are decoded one token at a
    time after the prefill, uncompressed, as :func:`run_press` feeds them. ``prune=False`` runs the
    engine dense, which must give the same caches as :func:`run_press`.
    """
    model = engine.model
    name, press_obj = _resolve(press, compression_ratio, press_kwargs)
    ids = _check(model, name, input_ids)
    n = ids.shape[1]
    start = time.perf_counter()
    result, cache = press_prefill(engine, ids, press_obj, protect=protect, prune=prune)
    cache_lengths = cache.layer_lengths()
    kv_bytes = _kv_bytes(cache.kv)
    cache.reserve(max_new_tokens + (0 if question_ids is None else question_ids.numel()))  # as generate() does
    logits = result.logits[:, -1]
    position = n

    def step(token, pos):
        return engine.decode_step(cache, token.view(1), torch.tensor([pos], device=model.device))

    if question_ids is not None:
        for token in question_ids.view(-1).to(model.device):
            logits = step(token, position)
            position += 1
    prefill_seconds = time.perf_counter() - start
    seq = _greedy(step, logits, position, max_new_tokens, eos_token_id)
    total = time.perf_counter() - start
    return PressRun(
        method=f"sdtp+{name}" if prune and engine.pruner is not None else f"dense-engine+{name}",
        compression_ratio=float(getattr(press_obj, "compression_ratio", 0.0)),
        sequences=seq.cpu(),
        text=tokenizer.decode(seq[0]) if tokenizer is not None else None,
        prompt_length=n,
        processed_lengths=result.kept_counts[0].tolist(),
        cache_lengths=cache_lengths,
        kv_cache_bytes=kv_bytes,
        prefill_seconds=prefill_seconds,
        total_seconds=total,
        extra={"sdtp_compression": float(result.compression[0])},
    )


def main(argv: list[str] | None = None) -> dict:
    """Every press alone and after SDTP on a pass-key prompt; print a table, optionally write JSON."""
    import argparse
    import json
    from importlib.metadata import version
    from pathlib import Path

    from sdtp_core.bench.machine import machine_info
    from sdtp_core.engine import SDTPEngine
    from sdtp_core.loading import load_model, load_pruner

    from .probe import PASSKEY, passkey_prompt

    parser = argparse.ArgumentParser(prog="python -m sdtp_eval.peers.kvpress_presses", description=main.__doc__)
    parser.add_argument("--model", default=None, help="Hub id or path (default: the embedded model)")
    parser.add_argument(
        "--pruner",
        default=None,
        help="a pruner directory, shipped, line, spread, attention, norm or random (default: the package's, line)",
    )
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    parser.add_argument("--ratio", type=float, default=0.5, help="press compression ratio (fraction removed)")
    parser.add_argument("--length", type=int, default=1024, help="context tokens of the pass-key prompt")
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, args.dtype, "cpu", "sdpa")
    engine = SDTPEngine(model, load_pruner(args.pruner, model, tokenizer=tok))
    context_text, question_text = passkey_prompt(tok, args.length, args.depth)
    context = tok(context_text, add_special_tokens=False).input_ids
    question = tok(question_text, add_special_tokens=False).input_ids
    ids, q = torch.tensor([context]), torch.tensor(question)
    common = dict(question_ids=q, max_new_tokens=args.new_tokens, eos_token_id=tok.eos_token_id, tokenizer=tok)
    rows = []

    def record(label, run):
        row = run.to_dict() | {"label": label, "found_passkey": str(PASSKEY) in (run.text or "")}
        row.pop("sequences")
        rows.append(row)
        mean_len = sum(run.cache_lengths) / len(run.cache_lengths)
        print(
            f"{label:<26} prefill {run.prefill_seconds:6.2f}s total {run.total_seconds:6.2f}s "
            f"KV {run.kv_cache_bytes / 2**20:6.1f} MiB mean cache len {mean_len:7.1f}  -> {run.text!r}",
            flush=True,
        )

    record("dense", run_press(model, ids, "knorm", 0.0, **common))
    record("sdtp", run_sdtp_press(engine, ids, "knorm", 0.0, **common))
    for name in args.presses:
        name = press_name(name)
        model.set_attn_implementation("eager" if name in NEEDS_EAGER else "sdpa")
        record(name, run_press(model, ids, name, args.ratio, **common))
        record(f"sdtp+{name}", run_sdtp_press(engine, ids, name, args.ratio, **common))
    model.set_attn_implementation("sdpa")
    report = {
        "command": "python -m sdtp_eval.peers.kvpress_presses "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": machine_info() | {"kvpress": version("kvpress")},
        "model": str(model.config._name_or_path),
        "dtype": str(model.dtype),
        "context_tokens": len(context),
        "question_tokens": len(question),
        "ratio": args.ratio,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
