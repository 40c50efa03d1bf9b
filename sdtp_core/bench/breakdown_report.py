"""The breakdown's reports: median rows per (dtype, length, mode), Markdown tables and the stacked-bar plot,
rebuilt from every record in ``DIR/timing_breakdown.jsonl`` (see :mod:`.breakdown`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

#: Per-token decoding keys of a breakdown record.
PER_TOKEN_KEYS = ("total_s", "model_s", "overhead_s", "cache_s", "select_s", "other_s")


def summarize(records: list[dict]) -> list[dict]:
    """Median breakdown per (dtype, length, mode), with the plain run's totals beside it."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] == "breakdown":
            groups.setdefault((r["dtype"], r["length"], r["mode"]), []).append(r)
    plain = {(r["dtype"], r["length"], r["mode"]): r for r in records if r["kind"] == "plain"}
    rows = []
    for key, runs in groups.items():

        def med(get, runs=runs):
            return statistics.median(get(r) for r in runs)

        stages = {name: med(lambda r, n=name: r["prefill_stages"][n]) for name in runs[0]["prefill_stages"]}
        decode = {name: med(lambda r, n=name: r["decode_stages"][n]) for name in runs[0]["decode_stages"]}
        row = {
            "dtype": key[0],
            "length": key[1],
            "mode": key[2],
            "runs": len(runs),
            "prefill_s": med(lambda r: r["prefill_s"]),
            "decode_s": med(lambda r: r["decode_s"]),
            "total_s": med(lambda r: r["total_s"]),
            "decode_steps": runs[0]["decode_steps"],
            "prefill_stages": stages,
            "decode_stages": decode,
            "per_token": {k: med(lambda r, k=k: r["per_token"][k]) for k in PER_TOKEN_KEYS},
            "stage_sum_ratio": med(lambda r: r["stage_sum_ratio"]),
            "kv_cache_mb": runs[0]["kv_cache_bytes"] / 2**20,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
        if key in plain:
            row["plain_prefill_s"] = plain[key]["prefill_s"]
            row["plain_total_s"] = plain[key]["total_s"]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["dtype"], r["length"], r["mode"]))


def _segment_cells(stages: dict[str, float]) -> tuple[float, float, float, float, float]:
    layers = sum(v for k, v in stages.items() if k.startswith("layers "))
    prune = sum(v for k, v in stages.items() if k.startswith("prune."))
    return stages.get("embed", 0.0), layers, prune, stages.get("head", 0.0), stages.get("other", 0.0)


def markdown(rows: list[dict], versus: list[dict]) -> str:
    """Markdown tables: prefill stages, decode per token, memory, and decoding loop vs ``model.generate``."""
    out = [
        "| dtype | length | mode | embed s | layers s | prune s | head s | other s | prefill s | "
        "stages/total | plain prefill s | decode s/token | model | cache | select | other | KV MB | peak RSS MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, lay, pr, h, o = _segment_cells(r["prefill_stages"])
        p = r["per_token"]
        out.append(
            f"| {r['dtype']} | {r['length']} | {r['mode']} | {e:.3f} | {lay:.2f} | {pr:.3f} | {h:.3f} | {o:.3f} | "
            f"{r['prefill_s']:.2f} | {r['stage_sum_ratio']:.3f} | {r.get('plain_prefill_s', float('nan')):.2f} | "
            f"{p['total_s'] * 1e3:.1f} ms | {p['model_s'] * 1e3:.1f} | {p['cache_s'] * 1e3:.2f} | "
            f"{p['select_s'] * 1e3:.2f} | {p['other_s'] * 1e3:.2f} | {r['kv_cache_mb']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    if versus:
        out += [
            "",
            "| dtype | context | tokens | ours ms/token | ours, no prealloc | model.generate | ours / generate | "
            "no prealloc / generate | same tokens |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for v in versus:
            t = v["per_token_s"]
            out.append(
                f"| {v['dtype']} | {v['length']} | {v['new_tokens']} | {t['ours'] * 1e3:.1f} | "
                f"{t['ours_no_reserve'] * 1e3:.1f} | {t['generate'] * 1e3:.1f} | {v['ours_over_generate']:.3f} | "
                f"{v['no_reserve_over_generate']:.3f} | {v['same_tokens']} |"
            )
    return "\n".join(out)


def segment_table(row: dict) -> str:
    """One run's prefill stages in execution order (segments and pruning stages)."""
    lines = ["| stage | seconds | share |", "|---|---:|---:|"]
    for name, seconds in row["prefill_stages"].items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / row['prefill_s']:.1%} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Stacked bars per stage (prefill stages + decoding model / overhead), dense vs pruned; one panel
    per (dtype, length), since totals differ by orders of magnitude across lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["length"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1.5, 4.2), squeeze=False)
    parts = ["embed", "layers", "prune (score+select+gather)", "norm+head", "prefill other", "decode: model"]
    parts.append("decode: loop overhead")
    colors = ["C7", "C0", "C3", "C2", "C8", "C1", "C4"]
    for ax, (dtype, length) in zip(axes[0], panels):
        sub = sorted((r for r in rows if (r["dtype"], r["length"]) == (dtype, length)), key=lambda r: r["mode"])
        for i, r in enumerate(sub):
            e, lay, pr, h, o = _segment_cells(r["prefill_stages"])
            steps = r["decode_steps"]
            values = [e, lay, pr, h, o, r["per_token"]["model_s"] * steps, r["per_token"]["overhead_s"] * steps]
            bottom = 0.0
            for part, value, color in zip(parts, values, colors):
                ax.bar(i, value, bottom=bottom, color=color, label=part)
                bottom += value
        ax.set_xticks(range(len(sub)), [r["mode"] for r in sub])
        steps = sub[0]["decode_steps"]
        ax.set_title(f"{dtype}, {length} tokens\n+ {steps} decoding steps", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds (median run)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles[: len(parts)], labels[: len(parts)], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rebuild_reports(out_dir: Path) -> dict:
    """Summaries of every record in ``out_dir/timing_breakdown.jsonl``: JSON, Markdown table and plot."""
    records = [json.loads(line) for line in (out_dir / "timing_breakdown.jsonl").read_text().splitlines() if line]
    rows = summarize(records)
    versus = sorted((r for r in records if r["kind"] == "decode_vs_generate"), key=lambda r: (r["dtype"], r["length"]))
    traces = [r for r in records if r["kind"] == "trace"]
    commands = sorted({r["meta"]["command"] for r in records if "meta" in r})
    machines = {json.dumps(r["meta"]["machine"], sort_keys=True) for r in records if "meta" in r}
    report = {
        "commands": commands,
        "machines": [json.loads(m) for m in machines],
        "settings": sorted({json.dumps(r["meta"]["settings"], sort_keys=True) for r in records if "meta" in r}),
        "rows": rows,
        "decode_vs_generate": versus,
        "traces": traces,
    }
    report["settings"] = [json.loads(s) for s in report["settings"]]
    (out_dir / "timing_breakdown.json").write_text(json.dumps(report, indent=2))
    text = "\n".join(f"    {c}" for c in commands) + "\n\n" + markdown(rows, versus) + "\n"
    (out_dir / "timing_breakdown.md").write_text(text)
    if rows:
        plot(rows, out_dir / "timing_breakdown.png")
    return report
