"""Perplexity and decoding speed of long text under KV compression: dense, a press, SDTP, SDTP ∘ press.

The StreamingLLM-style comparison (issue 9, item 4). For every document and prefix length ``L``, each method
prefills the document's first ``L`` tokens, then the next ``M`` tokens (``--continuation``) are fed one at a
time on the resulting cache (teacher forcing): the negative log-likelihood of each of them is what the
method kept of the text's predictability, and the time of each step is its decoding speed. Methods:

* ``dense``: the full cache;
* ``PRESS`` (e.g. ``streaming_llm``): a kvpress press compresses every layer's cache after the prefill,
  removing ``--ratio`` of its entries (kvpress's protocol: the prefill itself is dense; decoded tokens are
  appended uncompressed);
* ``sdtp``: SDTP's pruned prefill (the chosen scorer at the default schedule; first 4 and last 10% of the
  prefix protected), each layer's cache holding the tokens that layer processed;
* ``sdtp+PRESS``: SDTP's pruned prefill, then the press on each layer's pruned cache (paper Table 6);
* ``sdtp_low`` (``--sdtp-low KEEP``): SDTP with the milder keep ratio ``KEEP`` per stage (the paper's SDTP-low);
* ``llmlingua`` (``--llmlingua RATE``): LLMLingua v1 (:mod:`sdtp_eval.peers.llmlingua_compressor`, its small LM
  the evaluated model in the same dtype) rewrites the prefix's text keeping ``RATE`` of it; the compressed
  text is prefilled dense and the same continuation fed after it. Its prefill time includes the compressor's
  own seconds (the paper counts them end to end), which are also reported apart.

All of them run through the same :class:`~sdtp_core.engine.SDTPEngine` prefill and ``decode_step`` loop
(:func:`~sdtp_eval.peers.kvpress_presses.press_prefill`), in one process, in an order rotated per document,
so time ratios compare methods, not code paths. Text: the ``context`` of LongBench rows (default
``narrativeqa``: books and film scripts; :func:`sdtp_eval.longbench.tasks.load_rows`, local copy or the Hub).

Usage (the peers environment, docs/peers.md)::

    python -m sdtp_eval.peers.long_text --lengths 1024 2048 4096 --docs 10 --continuation 128 \\
        --presses streaming_llm --ratio 0.35 --out results/long_text_cpu

Writes ``OUT.json`` (machine, settings, every document's per-method NLL and timings), ``OUT.md`` and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .kvpress_presses import NEEDS_EAGER, _kv_bytes, build_press, press_name, press_prefill

DENSE, SDTP, SDTP_LOW, LLMLINGUA = "dense", "sdtp", "sdtp_low", "llmlingua"


def documents(tokenizer, dataset: str, need: int, count: int) -> list[tuple[int, list[int]]]:
    """The first ``count`` rows of a LongBench dataset whose context has at least ``need`` tokens:
    ``[(row index, token ids)]``, each cut to ``need`` tokens."""
    from sdtp_eval.longbench.tasks import load_rows

    docs = []
    for i, row in enumerate(load_rows(dataset)):
        ids = tokenizer(row["context"], add_special_tokens=False).input_ids
        if len(ids) >= need:
            docs.append((i, ids[:need]))
        if len(docs) == count:
            break
    if len(docs) < count:
        raise ValueError(
            f"{dataset} has only {len(docs)} contexts of at least {need} tokens; ask for fewer --docs or shorter "
            "--lengths, or choose another --dataset"
        )
    return docs


@torch.inference_mode()
def score_method(engine, ids: torch.Tensor, prefix: int, press, prune: bool) -> dict:
    """Prefill ``ids[:, :prefix]`` (pruned or not, with a press or none), then feed the rest of ``ids`` one
    token at a time; return the NLL of every fed token and the timings."""
    start = time.perf_counter()
    result, cache = press_prefill(engine, ids[:, :prefix], press, prune=prune)
    prefill_seconds = time.perf_counter() - start
    lengths = cache.layer_lengths()
    kv_bytes = _kv_bytes(cache.kv)
    continuation = ids[0, prefix:]
    cache.reserve(len(continuation))
    logits = result.logits[:, -1]
    nll, steps = [], []
    for j, token in enumerate(continuation):
        nll.append(-torch.log_softmax(logits.float(), dim=-1)[0, token].item())
        if j == len(continuation) - 1:
            break
        t = time.perf_counter()
        logits = engine.decode_step(cache, token.view(1), torch.tensor([prefix + j]))
        steps.append(time.perf_counter() - t)
    return {
        "nll": statistics.fmean(nll),
        "prefill_seconds": prefill_seconds,
        "decode_step_seconds": statistics.median(steps) if steps else None,
        "decode_seconds": sum(steps),
        "kv_entries_per_layer": statistics.fmean(lengths),
        "kv_cache_bytes": kv_bytes,
        "tokens_per_layer": statistics.fmean(result.kept_counts[0].tolist()),
        "compression": float(result.compression[0]),
    }


def score_compressed(engine, compressor, tokenizer, ids: torch.Tensor, prefix: int, rate: float) -> dict:
    """LLMLingua's row: compress the text of ``ids[:, :prefix]`` to ``rate``, then :func:`score_method` on
    the compressed tokens followed by the same continuation. ``prefill_seconds`` is the compressor's time
    plus the target model's prefill (time to the first token); ``compression`` is prefix tokens over
    compressed tokens (both in the evaluated model's tokenizer)."""
    from .llmlingua_compressor import compress

    out = compress(compressor, tokenizer.decode(ids[0, :prefix]), rate=rate)
    kept = tokenizer(out.text, add_special_tokens=False, return_tensors="pt").input_ids
    row = score_method(engine, torch.cat([kept, ids[:, prefix:]], dim=1), kept.shape[1], None, prune=False)
    return row | {
        "prefill_seconds": out.seconds + row["prefill_seconds"],
        "compressor_seconds": out.seconds,
        "compression": prefix / kept.shape[1],
    }


def methods(presses: list[str], sdtp_low: bool = False, llmlingua: bool = False) -> list[tuple[str, str | None, bool]]:
    """``(label, press name or None, prune)`` for dense, each press, sdtp, sdtp+each press and, when asked,
    sdtp_low and llmlingua."""
    out = [(DENSE, None, False)] + [(p, p, False) for p in presses] + [(SDTP, None, True)]
    out += [(f"{SDTP}+{p}", p, True) for p in presses]
    return out + ([(SDTP_LOW, None, True)] if sdtp_low else []) + ([(LLMLINGUA, None, False)] if llmlingua else [])


def summarise(rows: list[dict], labels: list[str], lengths: list[int], reps: int = 2000) -> dict:
    """Per length and method: mean NLL, perplexity, the paired NLL difference to dense with a bootstrap
    interval over documents, and mean timings, cache size and time ratios to dense (medians over documents)."""
    from sdtp_eval.retention.paired import compare

    per_doc = {label: {} for label in labels}
    for r in rows:
        per_doc[r["method"]].setdefault(f"{r['length']}", {})[r["doc"]] = r["nll"]
    paired = compare(per_doc, DENSE, lower_is_better=True, reps=reps)
    out: dict[str, dict] = {}
    for length in lengths:
        key = f"{length}"
        dense = {r["doc"]: r for r in rows if r["length"] == length and r["method"] == DENSE}
        for label in labels:
            mine = [r for r in rows if r["length"] == length and r["method"] == label]
            stats = paired[key][label]
            out.setdefault(key, {})[label] = {
                "documents": len(mine),
                "nll": stats["mean"],
                "perplexity": math.exp(stats["mean"]),
                "nll_diff": stats["diff"],
                "nll_diff_ci": stats["diff_ci"],
                "kv_cache_mib": statistics.fmean(r["kv_cache_bytes"] for r in mine) / 2**20,
                "kv_entries_per_layer": statistics.fmean(r["kv_entries_per_layer"] for r in mine),
                "compression": statistics.fmean(r["compression"] for r in mine),
                "prefill_seconds": statistics.median(r["prefill_seconds"] for r in mine),
                "decode_tokens_per_second": 1 / statistics.median(r["decode_step_seconds"] for r in mine),
                "prefill_speedup": statistics.median(
                    dense[r["doc"]]["prefill_seconds"] / r["prefill_seconds"] for r in mine
                ),
                "decode_speedup": statistics.median(
                    dense[r["doc"]]["decode_step_seconds"] / r["decode_step_seconds"] for r in mine
                ),
                "e2e_speedup": statistics.median(_e2e_seconds(dense[r["doc"]]) / _e2e_seconds(r) for r in mine),
            }
            if any("compressor_seconds" in r for r in mine):
                out[key][label]["compressor_seconds"] = statistics.median(r["compressor_seconds"] for r in mine)
    return out


def _e2e_seconds(row: dict) -> float:
    """Prefill plus every decoding step of the continuation: one request's end-to-end time."""
    return row["prefill_seconds"] + row["decode_seconds"]


def format_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Long-text perplexity and decoding speed: dense, kvpress press, SDTP, SDTP ∘ press",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Text: the first {s['docs']} `{s['dataset']}` contexts long enough; each prefix of L tokens is prefilled, "
        f"then the next {s['continuation']} tokens are fed one at a time (teacher forcing). NLL: nats per fed token. "
        f"Press ratio {s['ratio']} (fraction of each layer's KV entries removed; after SDTP "
        f"{s.get('sdtp_press_ratio', s['ratio'])}); SDTP scorer `{s['pruner']}`"
        + (f", SDTP-low keeps {s['sdtp_low']} per stage. " if s.get("sdtp_low") else ". ")
        + f"E2E = the prefill plus the {s['continuation'] - 1} decoding steps"
        + (
            f"; LLMLingua keeps {s['llmlingua']} of the prefix's text and its prefill time includes the "
            "compressor's own seconds. "
            if s.get("llmlingua")
            else ". "
        )
        + f"Speed-ups are medians over documents of dense time / method time, measured in one process "
        f"({report['machine'].get('cpu_model', '?')}, {s['dtype']}, {s['threads']} thread(s), load average at start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['loadavg_at_start'])}).",
        "",
        "| L | method | 1/τ | KV entries / layer | KV MiB | NLL | Δ NLL vs dense [95% CI] | perplexity "
        "| prefill s | prefill speed-up | decode tok/s | decode speed-up | E2E speed-up |",
        "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for length, methods_ in report["summary"].items():
        for label, m in methods_.items():
            lo, hi = m["nll_diff_ci"]
            lines.append(
                f"| {length} | {label} | {m['compression']:.2f} | {m['kv_entries_per_layer']:.0f} | "
                f"{m['kv_cache_mib']:.1f} | {m['nll']:.3f} | {m['nll_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                f"{m['perplexity']:.2f} | {m['prefill_seconds']:.2f}{_compressor_note(m)} | "
                f"{m['prefill_speedup']:.2f}x | "
                f"{m['decode_tokens_per_second']:.1f} | {m['decode_speedup']:.2f}x | {m['e2e_speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def _compressor_note(m: dict) -> str:
    return f" (compressor {m['compressor_seconds']:.2f})" if "compressor_seconds" in m else ""


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    lengths = [int(k) for k in summary]
    labels = list(next(iter(summary.values())))
    panels = [
        ("nll_diff", "Δ NLL vs dense (nats/token)"),
        ("kv_cache_mib", "KV cache (MiB)"),
        ("decode_tokens_per_second", "decode tokens/s"),
        ("prefill_speedup", "prefill speed-up vs dense"),
    ]
    if len(lengths) == 1:  # one length: a bar per method rather than lines over length
        panels.append(("e2e_speedup", "E2E speed-up vs dense"))
        methods_ = summary[str(lengths[0])]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.35 * len(labels) + 1.5), sharey=True)
        ys = range(len(labels))
        for ax, (key, title) in zip(axes, panels):
            values = [methods_[label][key] for label in labels]
            err = None
            if key == "nll_diff":
                err = [
                    [v - methods_[label]["nll_diff_ci"][0] for v, label in zip(values, labels)],
                    [methods_[label]["nll_diff_ci"][1] - v for v, label in zip(values, labels)],
                ]
            ax.barh(ys, values, xerr=err, capsize=2, color=["C0" if "sdtp" in label else "C7" for label in labels])
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3, axis="x")
        axes[0].set_yticks(list(ys), labels, fontsize=8)
        axes[0].invert_yaxis()
        fig.suptitle(f"{lengths[0]}-token prefix: SDTP variants (blue) and the rest (grey)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for label in labels:
            ys = [summary[str(n)][label][key] for n in lengths]
            line = ax.plot(lengths, ys, marker="o", label=label)[0]
            if key == "nll_diff":
                lo = [summary[str(n)][label]["nll_diff_ci"][0] for n in lengths]
                hi = [summary[str(n)][label]["nll_diff_ci"][1] for n in lengths]
                ax.fill_between(lengths, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("prefix tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """``OUT.json`` (written atomically), ``OUT.md`` and ``OUT.png``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(format_markdown(report))
    plot(report, out.with_suffix(".png"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdtp_eval.peers.long_text", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or path (default: the embedded model)")
    p.add_argument("--pruner", default="attention", help="SDTP scorer: attention (default), shipped, a directory, ...")
    p.add_argument("--presses", nargs="*", default=["streaming_llm"], help="kvpress presses (default streaming_llm)")
    p.add_argument("--ratio", type=float, default=0.35, help="press ratio: fraction of KV entries removed")
    p.add_argument("--sdtp-press-ratio", type=float, help="the press ratio after SDTP's prefill (default: --ratio)")
    p.add_argument("--sdtp-low", type=float, help="also SDTP at this milder keep ratio per stage (e.g. 0.95)")
    p.add_argument("--llmlingua", type=float, help="also LLMLingua v1 keeping this fraction of the prefix text")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="prefix lengths (tokens)")
    p.add_argument("--continuation", type=int, default=128, help="tokens scored after each prefix")
    p.add_argument("--docs", type=int, default=10, help="documents per length")
    p.add_argument("--dataset", default="narrativeqa", help="LongBench dataset whose contexts are the text")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the package's default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, help="report path without suffix (.json, .md, .png)")
    p.add_argument("--from-json", type=Path, help="rewrite OUT.md and OUT.png of this finished report only")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:  # rewrite the Markdown and the plot of a finished run
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        write_report(report, args.from_json.with_suffix(""))
        return report
    if args.out is None:
        raise SystemExit("--out is required (or --from-json to redraw a finished report)")
    if args.continuation < 2 or args.docs < 1 or min(args.lengths) < 16:
        raise SystemExit("--continuation must be >= 2, --docs >= 1 and every length >= 16 tokens")
    sdtp_ratio = args.ratio if args.sdtp_press_ratio is None else args.sdtp_press_ratio
    if not (0 < args.ratio < 1 and 0 < sdtp_ratio < 1):
        raise SystemExit(f"--ratio and --sdtp-press-ratio must be in (0, 1), got {args.ratio}, {sdtp_ratio}")
    if args.sdtp_low is not None and not 0 < args.sdtp_low < 1:
        raise SystemExit(f"--sdtp-low is a keep ratio per stage, in (0, 1), got {args.sdtp_low}")
    if args.llmlingua is not None and not 0 < args.llmlingua < 1:
        raise SystemExit(f"--llmlingua is the fraction of the text kept, in (0, 1), got {args.llmlingua}")
    presses = [press_name(p) for p in args.presses]
    if args.threads:
        torch.set_num_threads(args.threads)
    from sdtp_core.bench.machine import machine_info
    from sdtp_core.engine import SDTPEngine
    from sdtp_core.loading import load_model, load_pruner

    model, tok = load_model(args.model, args.dtype, "cpu", "sdpa")
    engine = SDTPEngine(model, load_pruner(args.pruner, model, tokenizer=tok))
    lengths = sorted(args.lengths)
    docs = documents(tok, args.dataset, lengths[-1] + args.continuation, args.docs)
    plan = methods(presses, sdtp_low=args.sdtp_low is not None, llmlingua=args.llmlingua is not None)
    engines = (
        {SDTP_LOW: SDTPEngine(model, load_pruner(args.pruner, model, keep_ratio=args.sdtp_low, tokenizer=tok))}
        if args.sdtp_low
        else {}
    )
    compressor = None
    if args.llmlingua is not None:
        from .llmlingua_compressor import load_compressor

        compressor = load_compressor(model.config._name_or_path, dtype=model.dtype)
    press_objects = {
        (p, prune): build_press(p, sdtp_ratio if prune else args.ratio) for p in presses for prune in (False, True)
    }
    report = {
        "command": "python -m sdtp_eval.peers.long_text " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "settings": {
            "model": str(model.config._name_or_path),
            "dtype": str(model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "pruner": args.pruner,
            "presses": presses,
            "ratio": args.ratio,
            "sdtp_press_ratio": sdtp_ratio,
            "sdtp_low": args.sdtp_low,
            "llmlingua": args.llmlingua,
            "lengths": lengths,
            "continuation": args.continuation,
            "docs": args.docs,
            "dataset": args.dataset,
            "rows": [i for i, _ in docs],
        },
        "rows": [],
    }
    # Warm-up (first-call allocations and kernel selection) outside the measurements.
    score_method(engine, torch.tensor([docs[0][1][:64]]), 48, None, prune=True)
    if compressor is not None:
        score_compressed(engine, compressor, tok, torch.tensor([docs[0][1][:64]]), 48, args.llmlingua)
    work = [(n, d) for n in lengths for d in range(len(docs))]
    for n, d in tqdm(work, desc="long text", unit="doc"):
        ids = torch.tensor([docs[d][1][: n + args.continuation]])
        order = plan[d % len(plan) :] + plan[: d % len(plan)]  # rotate which method runs first
        for label, press, prune in order:
            # Only a press that reads attention weights runs (and is timed) with eager attention.
            model.set_attn_implementation("eager" if press in NEEDS_EAGER else "sdpa")
            if label == LLMLINGUA:
                row = score_compressed(engine, compressor, tok, ids, n, args.llmlingua)
            else:
                row = score_method(engines.get(label, engine), ids, n, press_objects.get((press, prune)), prune)
            report["rows"].append({"length": n, "doc": docs[d][0], "method": label, **row})
    report["summary"] = summarise(report["rows"], [label for label, _, _ in plan], lengths)
    write_report(report, args.out)
    print(format_markdown(report))
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png")
    return report


if __name__ == "__main__":
    main()
