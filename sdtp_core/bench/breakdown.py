"""Where the time goes: per-stage breakdown, profiler traces, memory, and our decoding loop vs ``model.generate``.

Run by ``python -m sdtp_core.bench --profile DIR``. For each prompt length, dense and pruned runs of
:func:`~sdtp_core.generate.generate` alternate (order flipped every repetition) with a
:class:`~sdtp_core.timing.StageTimer` attached; each run becomes one JSONL record with

* the prefill split into ``embed``, each segment of layers between pruning stages, each stage's
  ``prune.S`` (scoring + selection + gather) and ``head`` (final norm + LM head), plus ``other`` (the
  part of the measured prefill no stage covers);
* the decoding split per token into the model (``embed`` + layers + ``head``) and the loop's own
  overhead (``cache``: live flags and masks, ``select``: logits processors / token choice / stopping,
  ``other``: Python between stages);
* peak RSS during the run (CUDA peak on GPU) and the KV-cache bytes.

One uninstrumented run per length and mode measures what the timer itself costs. A
:mod:`torch.profiler` Chrome trace of a short run (``--trace-tokens`` new tokens) is written per
configuration. Finally our decoding loop and ``model.generate`` decode the same number of tokens
from copies of the same dense cache, interleaved, to measure the loop's overhead against transformers.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from sdtp_core.bench.breakdown_report import markdown, rebuild_reports, summarize
from sdtp_core.bench.machine import current_rss_mb
from sdtp_core.engine import SDTPEngine, cache_keyword
from sdtp_core.generate import decode_loop, generate, resolve_generation_config
from sdtp_core.timing import StageTimer, group_stages

#: Keys every breakdown record has (the JSONL schema checked by the tests).
RECORD_KEYS = (
    "kind",
    "length",
    "mode",
    "dtype",
    "rep",
    "new_tokens",
    "decode_steps",
    "prefill_s",
    "decode_s",
    "total_s",
    "prefill_stages",
    "prefill_layers",
    "decode_stages",
    "per_token",
    "stage_sum_ratio",
    "kept_counts",
    "kv_cache_bytes",
    "peak_rss_mb",
    "loadavg",
)


class PeakRSS:
    """Samples the resident set size in a background thread; ``peak_mb`` is the maximum seen."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = current_rss_mb() or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb() or 0.0)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb() or 0.0)


def kv_bytes(cache) -> int:
    """Bytes of the live keys and values of a pruned cache (what attention reads)."""
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.kv.layers)


def random_prompt(model, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + length)
    vocab = model.config.vocab_size
    low = 100 if vocab > 1000 else 0  # real vocabularies: skip the first ids (often special tokens)
    return torch.randint(low, min(vocab, 150_000), (1, length), generator=g).to(model.device)


def breakdown_record(engine: SDTPEngine, out, timer: StageTimer, mode: str) -> dict:
    """Turn one instrumented :func:`generate` result into a breakdown record (without run metadata)."""
    config = engine.model.config
    stage_layers = engine.pruner.config.layers if (mode == "pruned" and engine.pruner is not None) else []
    prefill = timer.phase("prefill")
    prefill_stages = group_stages(prefill, config.num_hidden_layers, stage_layers)
    prefill_stages["other"] = out.prefill_seconds - sum(prefill_stages.values())
    decode = timer.phase("decode")
    decode_s = out.total_seconds - out.prefill_seconds
    steps = out.sequences.shape[1] - 1  # the last token needs no forward pass
    layers = sum(v for k, v in decode.items() if k.startswith("layer."))
    model_s = decode.get("embed", 0.0) + layers + decode.get("head", 0.0)
    decode_stages = {
        "embed": decode.get("embed", 0.0),
        "cache": decode.get("cache", 0.0),
        "layers": layers,
        "head": decode.get("head", 0.0),
        "select": decode.get("select", 0.0),
    }
    decode_stages["other"] = decode_s - sum(decode_stages.values())
    per = max(steps, 1)
    per_token = {
        "total_s": decode_s / per,
        "model_s": model_s / per,
        "overhead_s": (decode_s - model_s) / per,
        "cache_s": decode_stages["cache"] / per,
        "select_s": decode_stages["select"] / per,
        "other_s": decode_stages["other"] / per,
    }
    timed = sum(prefill.values()) + sum(decode.values())
    return {
        "decode_steps": steps,
        "prefill_s": out.prefill_seconds,
        "decode_s": decode_s,
        "total_s": out.total_seconds,
        "prefill_stages": prefill_stages,
        "prefill_layers": {k: v for k, v in prefill.items() if k.startswith("layer.")},
        "decode_stages": decode_stages,
        "per_token": per_token,
        "stage_sum_ratio": timed / out.total_seconds,
        "kept_counts": out.prefill.kept_counts[0].tolist(),
        "kv_cache_bytes": None,  # filled by the caller from the prefill cache size
    }


def run_once(engine: SDTPEngine, ids: torch.Tensor, new_tokens: int, mode: str, instrument: bool) -> dict:
    """One generate call (optionally instrumented) with peak memory; returns a partial record."""
    device = engine.model.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timer = StageTimer(device) if instrument else None
    with PeakRSS() as rss:
        out = generate(engine, ids, max_new_tokens=new_tokens, min_new_tokens=0, prune=mode == "pruned", timer=timer)
    prompt_slots = sum(out.prefill.kept_counts[0].tolist())
    record = breakdown_record(engine, out, timer, mode) if instrument else {"prefill_s": out.prefill_seconds}
    record["total_s"] = out.total_seconds
    # the cache holds, per layer, the prompt slots it kept plus the decoded tokens: report the prompt part
    per_slot = 2 * engine.model.config.num_key_value_heads * _head_dim(engine.model.config)
    record["kv_cache_bytes"] = prompt_slots * per_slot * engine.model.dtype.itemsize
    record["kv_cache_bytes_after_decode"] = kv_bytes(out.prefill.cache)
    record["peak_rss_mb"] = rss.peak_mb
    if cuda:
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_trace(engine: SDTPEngine, ids: torch.Tensor, new_tokens: int, mode: str, path: Path) -> dict:
    """Profile one short instrumented run and export a Chrome trace; return its event counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if engine.model.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    timer = StageTimer(engine.model.device)
    with profile(activities=activities) as prof:
        generate(engine, ids, max_new_tokens=new_tokens, min_new_tokens=0, prune=mode == "pruned", timer=timer)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return trace_summary(path)


def trace_summary(path: Path) -> dict:
    """Parse a Chrome trace (must be valid JSON) and count our labelled events per kind."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    names = [e.get("name", "") for e in events]
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "events": len(events),
        "prefill_layer_events": sum(n.startswith("prefill/layer.") for n in names),
        "prune_events": sum(n.startswith("prefill/prune.") for n in names),
        "decode_layer_events": sum(n.startswith("decode/layer.") for n in names),
    }


def decode_vs_generate(engine: SDTPEngine, ids: torch.Tensor, new_tokens: int, reps: int) -> dict:
    """Per-token decoding time of our loop (with and without the preallocated cache) and of
    ``model.generate``, each decoding ``new_tokens`` tokens greedily from a copy of the same dense
    prefill cache, interleaved (rotating order) over ``reps`` timed repetitions after a warm-up."""
    model = engine.model
    with torch.inference_mode():
        base = engine.prefill(ids, prune=False)
    first = base.logits[:, -1].float().argmax(-1)
    hf_input = torch.cat([ids, first[:, None]], dim=1)
    # eos = an id the head cannot produce: generate would otherwise fall back to the model's EOS and
    # stop early on random prompts, while our loop (no EOS) decodes every token
    never = model.config.vocab_size
    hf_config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=never, pad_token_id=0
    )
    # ours: select the first token, then `new_tokens` decode steps, each followed by a selection
    ours_config = resolve_generation_config(None, max_new_tokens=new_tokens + 1, eos_token_id=never, pad_token_id=0)
    cache_kw = cache_keyword(engine.inner.layers[0])  # generate takes the cache by the same keyword

    def ours(reserve: bool):
        cache = copy.deepcopy(base.cache)
        start = time.perf_counter()
        seq = decode_loop(engine, cache, base.logits[:, -1], base.lengths, ids, None, ours_config, reserve=reserve)
        _sync(model.device)
        return time.perf_counter() - start, seq[:, 1:]

    def hf():
        cache = copy.deepcopy(base.cache.kv)
        start = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(
                hf_input, attention_mask=torch.ones_like(hf_input), generation_config=hf_config, **{cache_kw: cache}
            )
        _sync(model.device)
        return time.perf_counter() - start, seq[:, hf_input.shape[1] :]

    runs = {"ours": lambda: ours(True), "ours_no_reserve": lambda: ours(False), "generate": hf}
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens = {}
    names = list(runs)
    for rep in range(reps + 1):
        order = names[rep % 3 :] + names[: rep % 3]
        for name in order:
            seconds, seq = runs[name]()
            tokens[name] = seq
            if rep:
                times[name].append(seconds / new_tokens)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "kind": "decode_vs_generate",
        "length": ids.shape[1],
        "new_tokens": new_tokens,
        "per_token_s": med,
        "times_per_token_s": times,
        "ours_over_generate": med["ours"] / med["generate"],
        "no_reserve_over_generate": med["ours_no_reserve"] / med["generate"],
        "same_tokens": bool(torch.equal(tokens["ours"], tokens["generate"]))
        and bool(torch.equal(tokens["ours"], tokens["ours_no_reserve"])),
        "generated_tokens": int(tokens["generate"].shape[1]),
        "loadavg": os.getloadavg(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_length(
    engine: SDTPEngine,
    length: int,
    new_tokens: int,
    reps: int,
    seed: int,
    trace_dir: Path | None,
    trace_tokens: int,
    plain: bool = True,
) -> list[dict]:
    """All records for one prompt length: ``reps`` instrumented runs per mode, one uninstrumented run
    per mode (when ``plain``) and one profiled run per mode (when ``trace_dir``)."""
    model = engine.model
    ids = random_prompt(model, length, seed)
    dtype = str(model.dtype).replace("torch.", "")
    records = []
    for rep in range(reps):
        for mode in ("dense", "pruned") if rep % 2 == 0 else ("pruned", "dense"):
            rec = run_once(engine, ids, new_tokens, mode, instrument=True)
            head = {"kind": "breakdown", "length": length, "mode": mode, "dtype": dtype, "rep": rep}
            records.append(head | {"new_tokens": new_tokens} | rec | {"loadavg": os.getloadavg()})
    for mode in ("dense", "pruned") if plain else ():
        rec = run_once(engine, ids, new_tokens, mode, instrument=False)
        head = {"kind": "plain", "length": length, "mode": mode, "dtype": dtype, "new_tokens": new_tokens}
        records.append(head | rec | {"loadavg": os.getloadavg()})
    if trace_dir is not None:
        for mode in ("dense", "pruned"):
            path = trace_dir / f"trace_{dtype}_{length}_{mode}.json"
            records.append(
                {"kind": "trace", "length": length, "mode": mode, "dtype": dtype, "new_tokens": trace_tokens}
                | write_trace(engine, ids, trace_tokens, mode, path)
            )
    return records


def run_profile(
    engine: SDTPEngine,
    out_dir: Path,
    lengths: list[int],
    new_tokens: int,
    reps: int,
    seed: int,
    trace_tokens: int,
    trace_max_length: int | None,
    vs_tokens: int,
    vs_reps: int,
    meta: dict,
    plain_max_length: int | None = None,
) -> dict:
    """Profile every length, appending one JSONL record per run to ``out_dir/timing_breakdown.jsonl``
    (records of earlier invocations in the same directory, e.g. another dtype, are kept), then rebuild
    ``timing_breakdown.json`` / ``.md`` / ``.png`` from all records in the file."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "timing_breakdown.jsonl"
    dtype = str(engine.model.dtype).replace("torch.", "")
    # warm-up on a short prompt: one-time initialisation (kernels, allocator) out of the first record
    warm = random_prompt(engine.model, min(256, min(lengths)), seed + 1)
    for mode in ("dense", "pruned"):
        generate(engine, warm, max_new_tokens=2, prune=mode == "pruned")
    for length in tqdm(lengths, desc=f"profile {dtype}", unit="length"):
        trace_dir = out_dir / "traces" if trace_max_length is None or length <= trace_max_length else None
        plain = plain_max_length is None or length <= plain_max_length
        records = profile_length(engine, length, new_tokens, reps, seed, trace_dir, trace_tokens, plain)
        if vs_tokens:
            ids = random_prompt(engine.model, length, seed)
            records.append(decode_vs_generate(engine, ids, vs_tokens, vs_reps) | {"dtype": dtype})
        with jsonl.open("a") as f:
            for r in records:
                f.write(json.dumps(r | {"meta": meta}) + "\n")
        done = summarize(records)
        tqdm.write(markdown(done, [r for r in records if r["kind"] == "decode_vs_generate"]))
    return rebuild_reports(out_dir)
