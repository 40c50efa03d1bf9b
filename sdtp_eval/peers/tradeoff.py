"""Accuracy against cost, one row per method: the paper's Table 1 (SDTP and its peers) and Table 6 (SDTP ∘ press).

It joins three measured sources, each produced by its own command:

* **score**: a paired report of :mod:`sdtp_eval.retention.paired` (e.g. LongBench generation, every method on
  the same documents): the unweighted task mean of each method, its paired Δ to the reference with the 95%
  bootstrap interval, and the retention;
* **what each method kept**, from the per-request ``sdtp`` records in the lm-eval samples of each run
  (``--records LABEL=DIR``): 1/τ (prompt tokens over the mean tokens a layer processed), the fraction of
  the prompt's KV entries each layer holds after the prefill, and LLMLingua's own seconds per request;
  or, once a run's outputs are gone, from a row of an earlier report of this tool
  (``--records LABEL=REPORT.json:METHOD``);
* **speed**: one or more :mod:`sdtp_eval.peers.long_text` reports (each: its methods in one process on the
  same texts), at one prefix length: prefill, per-token decoding and end-to-end (prefill plus the decoding
  steps) speed-ups over that report's own dense run. A method takes its speed-ups from the first report
  that has it.

Labels join the sources: a method's label in the paired report is its label in the speed report
(``dense``, ``sdtp``, ``snapkv``, ``sdtp+snapkv``, ...) and in ``--records``. A source that lacks a method
leaves its cells empty ("—"); nothing is estimated.

Usage::

    python -m sdtp_eval.peers.tradeoff --scores results/table1_longbench_cpu.json \\
        --speed results/table1_speed_cpu.json --length 2048 \\
        --records sdtp=runs/lbgen/attention snapkv=runs/lbgen/snapkv --out results/table1_tradeoff_cpu

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (score Δ against end-to-end speed-up and against KV kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from sdtp_eval.retention import write_report
from sdtp_eval.retention.paired import TASK_MEAN
from sdtp_eval.retention.samples import parse_source, sample_files


def request_records(path: Path) -> dict:
    """Means over the requests of an lm-eval output directory (its ``sdtp`` sample records): ``requests``,
    ``compression`` (1/τ: prompt tokens over the mean tokens a layer processed), ``kv_kept`` (KV entries per
    layer after the prefill / prompt tokens) and, when a prompt compressor ran, ``compressor_seconds``.

    A compressed request counts from the prompt before compression (the compressor's own token counts, in
    the evaluated model's tokenizer): without pruning, every layer processes the compressed prompt; with
    pruning too, the pruning record of the same sample says how many tokens a layer processed of it."""
    requests = []
    for file in sample_files(path, "samples_*.jsonl"):
        for line in file.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            records = json.loads(line).get("sdtp", [])
            lingua = [r for r in records if "compressor_seconds" in r]
            pruned = [r for r in records if "prompt_tokens" in r]
            if lingua:  # a generation request: one compression, at most one pruning record
                requests.append(_request(pruned[0] if pruned else None, lingua[0]))
            else:
                requests += [_request(r, None) for r in pruned]
    if not requests:
        raise ValueError(f"no sample under {path} carries sdtp request records (run with --log_samples)")
    out = {"requests": len(requests)} | {
        key: statistics.fmean(r[key] for r in requests) for key in ("compression", "kv_kept")
    }
    lingua_seconds = [r["compressor_seconds"] for r in requests if "compressor_seconds" in r]
    if lingua_seconds:
        out["compressor_seconds"] = statistics.fmean(lingua_seconds)
    return out


RECORD_KEYS = ("requests", "compression", "kv_kept", "compressor_seconds")


def read_records(path: Path) -> dict:
    """:func:`request_records` of an lm-eval output directory, or the same values of one method's row of an
    earlier report of this tool (``REPORT.json:METHOD``)."""
    report, _, method = str(path).rpartition(".json:")
    if not report:
        return request_records(path)
    rows = {r["method"]: r for r in json.loads(Path(report + ".json").read_text(encoding="utf-8"))["rows"]}
    if method not in rows:
        raise ValueError(f"{report}.json has no method {method!r}; it has {sorted(rows)}")
    out = {k: rows[method][k] for k in RECORD_KEYS if k in rows[method]}
    if "compression" not in out:
        raise ValueError(f"{report}.json has no 1/τ for {method!r} (its records were not given)")
    return out


def _request(pruned: dict | None, lingua: dict | None) -> dict:
    """One request's 1/τ and KV kept from its pruning record and/or its compressor record."""
    if pruned is None:  # the compressed prompt, prefilled dense
        processed = kv = lingua["compressor_tokens_after"]
    else:
        processed = pruned["prompt_tokens"] / pruned["compression"]  # mean tokens a layer processed
        kv = pruned.get("kv_entries_per_layer", processed)  # a press ran: its cache after compression
    before = lingua["compressor_tokens_before"] if lingua else pruned["prompt_tokens"]
    out = {"compression": before / processed, "kv_kept": kv / before}
    return out | ({"compressor_seconds": lingua["compressor_seconds"]} if lingua else {})


def build(scores: dict, speeds: list[dict], length: int | None, records: dict[str, dict]) -> dict:
    """One row per run of the paired report ``scores``, in its order."""
    summary: dict[str, dict] = {}
    for speed in speeds:  # the first report that has a method gives its speed-ups
        summary = speed["summary"].get(str(length), {}) | summary
    rows = []
    for label in scores["runs"]:
        score = scores["tasks"].get(TASK_MEAN, {}).get(label)
        if score is None:
            raise ValueError(f"the scores report has no task mean for {label!r} (it needs two or more tasks)")
        row = {
            "method": label,
            "documents": score["n"],
            "score": score["mean"],
            "reference_score": score["reference_mean"],
            "diff": score["diff"],
            "diff_ci": score["diff_ci"],
            "retention": score["retention"],
        }
        if label == scores["reference"]:
            row |= {"compression": 1.0, "kv_kept": 1.0}
        row |= records.get(label, {})
        if label in summary:
            s = summary[label]
            row |= {k: s[k] for k in ("prefill_speedup", "decode_speedup", "e2e_speedup")}
        rows.append(row)
    return {"reference": scores["reference"], "metric": scores["metric"], "length": length, "rows": rows}


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "—"


def format_markdown(report: dict) -> str:
    ref, n = report["reference"], report["length"]
    lines = [
        f"# {report['metric']} against cost: every method vs `{ref}`",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Score: the unweighted task mean ({report['scores_command']}) over the method's documents, and "
        f"`{ref}`'s on the same documents; Δ paired by document with its 95% "
        "bootstrap interval. 1/τ and KV kept: means over the run's requests (KV kept = entries each layer holds "
        f"after the prefill / prompt tokens). Speed-ups: medians over documents at {n} prompt tokens, every "
        f"method of a speed report in one process, against that report's `{ref}` "
        f"({'; '.join(report.get('speed_commands', [])) or 'no speed report'}); E2E = prefill plus the "
        "decoding steps, a prompt compressor's own seconds included (and listed apart per request).",
        "",
        f"| method | docs | score | {ref} on its docs | Δ [95% CI] | retention | 1/τ | KV kept | prefill speed-up "
        "| decode speed-up | E2E speed-up | compressor s/request |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lo, hi = r["diff_ci"]
        lines.append(
            f"| {r['method']} | {r['documents']} | {r['score']:.4f} | {r['reference_score']:.4f} | "
            f"{r['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
            f"{r['retention']:.3f} | {_cell(r, 'compression', '.2f')} | {_cell(r, 'kv_kept', '.2f')} | "
            f"{_cell(r, 'prefill_speedup', '.2f')} | {_cell(r, 'decode_speedup', '.2f')} | "
            f"{_cell(r, 'e2e_speedup', '.2f')} | {_cell(r, 'compressor_seconds', '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Δ against cost, one point per method: against the E2E speed-up and KV kept when a speed report was given,
    otherwise against 1/τ. Methods labelled ``SCORER/SCHEDULE`` (``line/0.85``) are one scorer at several
    schedules: joined by a line in one colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any("e2e_speedup" in r for r in report["rows"]):
        panels = [
            (
                "e2e_speedup",
                f"E2E speed-up over dense at {report['length']} tokens",
                "accuracy against speed (right and high is better)",
            ),
            ("kv_kept", "KV kept", "accuracy against KV memory (left and high is better)"),
        ]
    else:
        panels = [("compression", "1/τ (prompt tokens / mean tokens a layer processes)", "accuracy against pruning")]
    groups: dict[str, list[dict]] = {}  # SCORER -> its rows, in report order
    for r in report["rows"]:
        groups.setdefault(r["method"].split("/")[0], []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 0.5, 4.2), squeeze=False)
    for ax, (key, xlabel, title) in zip(axes[0], panels):
        for g, members in enumerate(groups.values()):  # one colour per method (per scorer, over its schedules)
            rows = sorted((r for r in members if key in r), key=lambda r: r[key])
            if len(rows) > 1:
                ax.plot([r[key] for r in rows], [r["diff"] for r in rows], color=f"C{g % 10}", linewidth=1, alpha=0.7)
            for r in rows:
                lo, hi = r["diff_ci"]
                yerr = [[r["diff"] - lo], [hi - r["diff"]]]
                ax.errorbar(r[key], r["diff"], yerr=yerr, fmt="o", capsize=3, color=f"C{g % 10}")
                ax.annotate(r["method"], (r[key], r["diff"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"Δ {report['metric']} vs {report['reference']} (task mean)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m sdtp_eval.peers.tradeoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--scores", type=Path, required=True, help="a paired report (sdtp_eval.retention.paired) JSON")
    p.add_argument("--speed", type=Path, nargs="*", default=[], help="long_text reports (sdtp_eval.peers.long_text)")
    p.add_argument("--length", type=int, help="the speed reports' prefix length (default: the first's longest)")
    p.add_argument(
        "--records",
        nargs="*",
        default=[],
        help="LABEL=DIR: a run's lm-eval output (1/τ, KV kept); LABEL=REPORT.json:METHOD: an earlier report's row",
    )
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = p.parse_args(argv)
    scores = json.loads(args.scores.read_text(encoding="utf-8"))
    speeds = [json.loads(path.read_text(encoding="utf-8")) for path in args.speed]
    length = args.length
    for path, speed in zip(args.speed, speeds):
        lengths = [int(k) for k in speed["summary"]]
        length = length or max(lengths)
        if length not in lengths:
            p.error(f"--length {length} is not in the speed report {path} (it has {lengths})")
    sources = dict(map(parse_source, args.records))
    unknown = sorted(set(sources) - set(scores["runs"]))
    if unknown:
        p.error(f"--records labels {unknown} are not runs of the scores report ({scores['runs']})")
    records = {label: read_records(path) for label, path in sources.items()}
    report = {
        "command": "python -m sdtp_eval.peers.tradeoff " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "scores_command": scores["command"],
        **({"speed_commands": [s["command"] for s in speeds], "machine": speeds[0].get("machine")} if speeds else {}),
        **build(scores, speeds, length, records),
    }
    write_report(args.out, report, format_markdown(report), plot)
    return report


if __name__ == "__main__":
    main()
