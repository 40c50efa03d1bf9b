"""Latency benchmark: dense vs pruned prefill and prefill + decoding, same process, same inputs.

    python -m sdtp_core.bench --lengths 512 1024 2048 4096 --new-tokens 128 --json results/speed/bench.json

For each prompt length it runs the dense and the pruned path *interleaved* (alternating which goes
first) for several repetitions after a warm-up, and reports median times, the measured speedups,
the FLOPs-ideal prefill speedup, the efficiency (measured / ideal), the KV-cache sizes and peak
memory. Both paths run through the same engine and decoding loop (dense = pruning switched off), so
the ratio isolates what pruning changes; a plain ``transformers`` forward is timed as a reference for
the dense prefill. Prompts are random token ids (seeded); speed does not depend on their content, and
untrained (random) pruners are fine for speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdtp_core.bench.flops import prefill_flops
from sdtp_core.bench.machine import machine_info
from sdtp_core.engine import SDTPEngine
from sdtp_core.generate import generate
from sdtp_core.loading import RANDOM_PRUNER, load_model, load_pruner


def kv_cache_bytes(result) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in result.prefill.cache.kv.layers)


def bench_length(engine: SDTPEngine, length: int, new_tokens: int, reps: int, seed: int) -> dict:
    """Time dense and pruned runs for one prompt length; return one row of the report."""
    model = engine.model
    g = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(100, min(model.config.vocab_size, 150_000), (1, length), generator=g).to(model.device)
    times: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "e2e": []} for m in ("dense", "pruned")}
    hf_prefill: list[float] = []
    last = {}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        order = ("dense", "pruned") if rep % 2 else ("pruned", "dense")
        for mode in order:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            out = generate(engine, ids, max_new_tokens=new_tokens, prune=mode == "pruned")
            if rep:
                times[mode]["prefill"].append(out.prefill_seconds)
                times[mode]["e2e"].append(out.total_seconds)
            last[mode] = (out, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
            del out
        if rep:
            with torch.inference_mode():
                start = time.perf_counter()
                model(ids, logits_to_keep=1, use_cache=True)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                hf_prefill.append(time.perf_counter() - start)

    dense, pruned = last["dense"][0], last["pruned"][0]
    config = model.config
    flops_dense = prefill_flops(config, dense.prefill.kept_counts[0].tolist())
    flops_pruned = prefill_flops(config, pruned.prefill.kept_counts[0].tolist(), engine.pruner.config)
    med = {m: {k: statistics.median(v) for k, v in times[m].items()} for m in times}
    ideal = flops_dense.total / flops_pruned.total
    speedup = med["dense"]["prefill"] / med["pruned"]["prefill"]
    row = {
        "length": length,
        "new_tokens": new_tokens,
        "dense_prefill_s": med["dense"]["prefill"],
        "pruned_prefill_s": med["pruned"]["prefill"],
        "hf_dense_prefill_s": statistics.median(hf_prefill),
        "dense_e2e_s": med["dense"]["e2e"],
        "pruned_e2e_s": med["pruned"]["e2e"],
        "prefill_speedup": speedup,
        "flops_ideal_speedup": ideal,
        "efficiency": speedup / ideal,
        "e2e_speedup": med["dense"]["e2e"] / med["pruned"]["e2e"],
        "compression": float(pruned.prefill.compression[0]),
        "dense_prefill_tflops": flops_dense.total / 1e12,
        "pruned_prefill_tflops": flops_pruned.total / 1e12,
        "pruner_flops_fraction": flops_pruned.pruner / flops_pruned.total,
        "dense_kv_cache_mb": kv_cache_bytes(dense) / 2**20,
        "pruned_kv_cache_mb": kv_cache_bytes(pruned) / 2**20,
        "kept_counts": pruned.prefill.kept_counts[0].tolist(),
        "times": times,
    }
    if last["dense"][1] is not None:
        row["dense_peak_mem_mb"] = last["dense"][1] / 2**20
        row["pruned_peak_mem_mb"] = last["pruned"][1] / 2**20
    return row


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'length':>6} | {'dense pf s':>10} | {'pruned pf s':>11} | {'pf speedup':>10} | {'FLOPs ideal':>11} | "
        f"{'efficiency':>10} | {'dense e2e s':>11} | {'pruned e2e s':>12} | {'e2e speedup':>11} | {'1/tau':>5} | "
        f"{'KV MB d/p':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['length']:>6} | {r['dense_prefill_s']:>10.2f} | {r['pruned_prefill_s']:>11.2f} | "
            f"{r['prefill_speedup']:>9.2f}x | {r['flops_ideal_speedup']:>10.2f}x | {r['efficiency']:>10.2f} | "
            f"{r['dense_e2e_s']:>11.2f} | {r['pruned_e2e_s']:>12.2f} | {r['e2e_speedup']:>10.2f}x | "
            f"{r['compression']:>5.2f} | {r['dense_kv_cache_mb']:>5.0f}/{r['pruned_kv_cache_mb']:<5.0f}"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The report as Markdown: command, machine, settings and one table row per prompt length."""
    m, st, rows = report["machine"], report["settings"], report["rows"]
    flags = ", ".join(k for k, v in m.get("cpu_flags", {}).items() if v) or "none recorded"
    lines = [
        "# Latency, FLOPs and KV memory: dense vs SDTP, same process, same prompts",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('logical_cpus', '?')} logical CPUs, "
        f"{m.get('cpu_count')} torch threads, CPU flags: {flags}; torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}; load average (1/5/15 min) "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}.",
        "",
        f"Settings: {st['dtype']}, attention `{st['attn_implementation']}`, pruner `{st['pruner']}`, "
        f"layers {st['schedule']['layers']}, keep ratio 0.9^s; medians of {st['reps']} repetitions after a "
        f"warm-up, dense and pruned interleaved; end-to-end = prefill + {rows[0]['new_tokens']} decoded tokens. "
        f"Peak RSS of the process: {report['peak_rss_mb']:.0f} MB.",
        "",
        "| prompt tokens | dense prefill s | SDTP prefill s | prefill speedup | FLOPs-ideal | efficiency "
        "| dense TFLOPs | SDTP TFLOPs | dense e2e s | SDTP e2e s | e2e speedup | 1/τ | KV cache MB dense / SDTP |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['dense_prefill_s']:.2f} | {r['pruned_prefill_s']:.2f} | "
            f"{r['prefill_speedup']:.2f}x | {r['flops_ideal_speedup']:.2f}x | {r['efficiency']:.2f} | "
            f"{r['dense_prefill_tflops']:.2f} | {r['pruned_prefill_tflops']:.2f} | {r['dense_e2e_s']:.2f} | "
            f"{r['pruned_e2e_s']:.2f} | {r['e2e_speedup']:.2f}x | {r['compression']:.2f} | "
            f"{r['dense_kv_cache_mb']:.0f} / {r['pruned_kv_cache_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, path: Path) -> None:
    """``path`` (JSON, written atomically) plus a Markdown table and a PNG plot beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(report))
    plot(report["rows"], path.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Measured vs FLOPs-ideal speedups per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["flops_ideal_speedup"] for r in rows], "k--o", label="FLOPs-ideal prefill")
    ax.plot(lengths, [r["prefill_speedup"] for r in rows], "C0-o", label="measured prefill")
    ax.plot(
        lengths, [r["e2e_speedup"] for r in rows], "C1-s", label=f"measured prefill + {rows[0]['new_tokens']} tokens"
    )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title("SDTP speedup, pruned vs dense, same process")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sdtp_core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id or path of a Qwen2-family model (default: embedded)")
    parser.add_argument(
        "--pruner",
        default=RANDOM_PRUNER,
        help="pruner directory, or 'random' for untrained scorers (default; speed does not depend on them)",
    )
    parser.add_argument("--keep-ratio", type=float, default=None, help="geometric keep ratio r (default 0.9)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded after the prefill")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per length (after one warm-up)")
    parser.add_argument(
        "--dtype",
        default="default",
        help="bfloat16 | float16 | float32 | default (bf16 on GPUs and bf16-capable CPUs, else float32)",
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation: sdpa | eager | flash_attention_2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the report here (and a Markdown table and a PNG plot beside it)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: rewrite the Markdown table and the plot beside a report written by --json",
    )
    prof = parser.add_argument_group("--profile: where the time goes (sdtp_core.bench.breakdown)")
    prof.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="per-stage breakdown instead of the speedup table: DIR/timing_breakdown.{jsonl,json,md,png} "
        "(records are appended, so runs with other dtypes can share DIR) and DIR/traces/*.json Chrome traces",
    )
    prof.add_argument("--trace-tokens", type=int, default=4, help="new tokens in each profiled (traced) run")
    prof.add_argument("--trace-max-length", type=int, default=None, help="no traces for longer prompts")
    prof.add_argument(
        "--vs-tokens", type=int, default=16, help="tokens decoded by our loop vs model.generate (0: skip)"
    )
    prof.add_argument("--vs-reps", type=int, default=3, help="timed repetitions of the loop vs generate")
    prof.add_argument(
        "--plain-max-length", type=int, default=None, help="no uninstrumented reference run for longer prompts"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        write_report(report, args.from_json)
        print(f"wrote {args.from_json.with_suffix('.md')} and {args.from_json.with_suffix('.png')}")
        return report
    if any(n < 8 for n in args.lengths) or args.reps < 1 or args.new_tokens < 1:
        parser.error("lengths must be >= 8, --reps and --new-tokens >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, args.dtype, args.device, args.attn)
    pruner = load_pruner(args.pruner, model, keep_ratio=args.keep_ratio, tokenizer=tokenizer)
    engine = SDTPEngine(model, pruner)
    command = "python -m sdtp_core.bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    settings = {
        "model": str(model.config._name_or_path),
        "pruner": args.pruner,
        "schedule": pruner.config.to_dict(),
        "dtype": str(model.dtype),
        "attn_implementation": model.config._attn_implementation,
        "device": str(model.device),
        "reps": args.reps,
        "new_tokens": args.new_tokens,
    }
    if args.profile is not None:
        from sdtp_core.bench.breakdown import run_profile

        meta = {"command": command, "machine": machine_info(), "settings": settings}
        return run_profile(
            engine,
            args.profile,
            args.lengths,
            args.new_tokens,
            args.reps,
            args.seed,
            args.trace_tokens,
            args.trace_max_length,
            args.vs_tokens,
            args.vs_reps,
            meta,
            args.plain_max_length,
        )
    machine = machine_info()  # before the measurements, so the load average is the machine's, not ours
    rows = []
    for length in tqdm(args.lengths, desc="benchmark", unit="length"):
        rows.append(bench_length(engine, length, args.new_tokens, args.reps, args.seed))
        tqdm.write(format_table(rows[-1:]).splitlines()[-1])
    print(format_table(rows))
    report = {
        "command": command,
        "machine": machine,
        "settings": settings
        | {
            "dense_baseline": "same engine and decoding loop with pruning off; hf_dense_prefill_s is a plain "
            "transformers forward (logits_to_keep=1) for reference",
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json} and its .md and .png")
    return report
