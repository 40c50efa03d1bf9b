"""Paired comparison of configurations from lm-eval's logged samples, with bootstrap intervals.

Usage::

    python -m sdtp_eval.retention.paired --metric nll_per_token --lower-is-better \\
        --samples dense=runs/dense sdtp=runs/sdtp random=runs/random --out results/retention_nll

Every configuration ran the same documents (``--log_samples``), so each document gives a *paired*
difference against the reference (the first ``--samples``, or ``--reference``). Per task and pooled over
all tasks (documents pooled, and the unweighted mean over tasks, as papers average benchmarks) it reports
the mean of each configuration, the mean paired difference to the reference with a
95% bootstrap interval (documents resampled, seeded) and a retention figure:

* higher-is-better metrics (accuracy, exact match): mean / reference mean, with its bootstrap interval;
* ``--lower-is-better`` metrics measured in nats per token (answer NLL): ``exp(-Δ)``, the fraction of the
  reference's per-token answer probability (geometric mean) that the configuration keeps.

A document counts as the same in two runs when its ``doc_id`` and lm-eval's ``doc_hash`` agree; a run
whose document differs (data regenerated differently, another limit or seed) is refused by name.

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (differences with their intervals). ``OUT.json`` keeps
every run's per-document values, so a later run can be paired against a committed report without the
lm-eval outputs it came from: ``--samples dense=results/OLD.json`` takes run ``dense`` from that report
(``LABEL=REPORT.json:RUN`` takes run ``RUN`` under the new label; ``LABEL='DIR/*.json:RUN'`` merges the
tasks of run ``RUN`` from every report the glob matches, e.g. one report per task written over several
sessions).

``--fill TARGET=SOURCE`` gives run ``TARGET`` the value of run ``SOURCE`` on every document (and task)
``TARGET`` did not run. It is for a policy whose result is ``SOURCE``'s by construction outside the
documents it was run on: the deployment policy (``min_prompt_tokens=256``) computes shorter prompts
unpruned, so ``--fill default=dense`` completes a policy run of only the documents with longer
prompts (listed by :mod:`sdtp_eval.retention.long_prompts`). The report counts the filled documents per
task (``filled``, and in OUT.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
import shlex
import sys
from pathlib import Path

from . import write_report
from .samples import parse_source, sample_files, task_of

POOLED = "all tasks"
#: Unweighted mean over tasks (as papers average benchmarks), bootstrapped within each task.
TASK_MEAN = "task mean"


Run = dict[str, dict[int, float]]
"""``{task: {doc_id: value}}``"""


def read_samples(path: Path, metric: str, label: str | None = None) -> tuple[Run, dict[str, dict[int, str]]]:
    """``({task: {doc_id: value}}, {task: {doc_id: doc_hash}})`` from an lm-eval output directory (newest
    samples file per task), a samples file, or a report of this tool (``REPORT.json`` or ``REPORT.json:RUN``;
    the run is ``label`` when not named)."""
    report, _, run = str(path).rpartition(".json:")
    if report and "*" in report:
        return _read_reports(report + ".json", run, metric)
    if report:
        return _read_report(Path(report + ".json"), run, metric)
    if path.suffix == ".json":
        return _read_report(path, label, metric)
    values: Run = {}
    hashes: dict[str, dict[int, str]] = {}
    for file in sample_files(path, "samples_*.jsonl"):
        task = task_of(file)
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line.strip()]
        scored = {int(r["doc_id"]): float(r[metric]) for r in rows if metric in r}
        if scored:
            values[task] = scored
            hashes[task] = {int(r["doc_id"]): r["doc_hash"] for r in rows if metric in r and "doc_hash" in r}
    if not values:
        raise ValueError(f"no sample under {path} has the metric {metric!r}")
    return values, hashes


def _read_report(path: Path, run: str | None, metric: str) -> tuple[Run, dict[str, dict[int, str]]]:
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("metric") != metric:
        raise ValueError(f"{path} reports the metric {report.get('metric')!r}, not {metric!r}")
    documents = report.get("documents")
    if not documents:
        raise ValueError(f"{path} has no per-document values (written before they were kept)")
    if run not in documents:
        raise ValueError(f"{path} has no run {run!r}; it has {sorted(documents)}")
    values = {task: {int(d): v for d, (v, _) in docs.items()} for task, docs in documents[run].items()}
    hashes = {task: {int(d): h for d, (_, h) in docs.items() if h} for task, docs in documents[run].items()}
    return values, hashes


def _read_reports(pattern: str, run: str, metric: str) -> tuple[Run, dict[str, dict[int, str]]]:
    """Run ``run`` of every report matching the glob ``pattern`` (e.g. one report per task, or per chunk of
    a task's documents, written over several sessions), merged by document; a document in two reports is
    refused."""
    paths = [Path(p) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise FileNotFoundError(f"no report matches {pattern}")
    values: Run = {}
    hashes: dict[str, dict[int, str]] = {}
    for path in paths:
        more, more_hashes = _read_report(path, run, metric)
        for task, docs in more.items():
            have = values.setdefault(task, {})
            twice = sorted(set(docs) & set(have))
            if twice:
                raise ValueError(
                    f"{path} repeats documents {twice[:5]}{' ...' if len(twice) > 5 else ''} of task {task!r} "
                    f"from an earlier report matching {pattern}"
                )
            have |= docs
            hashes.setdefault(task, {}).update(more_hashes.get(task, {}))
    return values, hashes


def fill_missing(read: dict[str, tuple[Run, dict[str, dict[int, str]]]], target: str, source: str) -> dict[str, int]:
    """Give run ``target`` run ``source``'s value (and doc_hash) on every document it lacks, in place;
    returns the number filled per task."""
    values, hashes = read[target]
    counts: dict[str, int] = {}
    for task, docs in read[source][0].items():
        have = values.setdefault(task, {})
        missing = [d for d in docs if d not in have]
        for d in missing:
            have[d] = docs[d]
            if d in read[source][1].get(task, {}):
                hashes.setdefault(task, {})[d] = read[source][1][task][d]
        if missing:
            counts[task] = len(missing)
    return counts


def check_same_documents(hashes: dict[str, dict[str, dict[int, str]]], reference: str) -> None:
    """Refuse a run whose document ``doc_id`` differs from the reference's (by lm-eval's ``doc_hash``)."""
    ref = hashes[reference]
    for name, run in hashes.items():
        for task, docs in run.items():
            differ = sorted(d for d, h in docs.items() if d in ref.get(task, {}) and ref[task][d] != h)
            if differ:
                raise ValueError(
                    f"run {name!r} task {task!r}: documents {differ[:5]}{' ...' if len(differ) > 5 else ''} are not "
                    f"the documents of {reference!r} with the same doc_id (doc_hash differs): they cannot be paired"
                )


def bootstrap(groups: list[list[tuple[float, float]]], stat, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``stat(groups)`` over ``reps`` resamples, each group (task) of pairs
    resampled within itself (one group: the plain bootstrap over documents)."""
    rng = random.Random(seed)
    draws = sorted(stat([[g[rng.randrange(len(g))] for _ in g] for g in groups]) for _ in range(reps))
    return draws[int(0.025 * reps)], draws[min(reps - 1, int(0.975 * reps))]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def compare(
    runs: dict[str, dict[str, dict[int, float]]], reference: str, lower_is_better: bool, reps: int = 2000
) -> dict:
    """Per task (and pooled) statistics of every run against ``reference``, on the documents both have."""
    ref = runs[reference]
    table: dict[str, dict[str, dict]] = {}
    for name, run in runs.items():
        pooled: list[tuple[float, float]] = []
        by_task: list[list[tuple[float, float]]] = []
        for task in sorted(ref):
            if task not in run:
                continue
            docs = sorted(set(ref[task]) & set(run[task]))
            pairs = [(run[task][d], ref[task][d]) for d in docs]
            if not pairs:
                continue
            pooled += pairs
            by_task.append(pairs)
            table.setdefault(task, {})[name] = _stats([pairs], lower_is_better, reps)
        if pooled:
            table.setdefault(POOLED, {})[name] = _stats([pooled], lower_is_better, reps)
        if len(by_task) > 1:
            table.setdefault(TASK_MEAN, {})[name] = {**_stats(by_task, lower_is_better, reps), "tasks": len(by_task)}
    return table


def _stats(groups: list[list[tuple[float, float]]], lower_is_better: bool, reps: int) -> dict:
    """Mean, reference mean, Δ and retention of the unweighted mean over ``groups`` (one group: over its
    documents), with bootstrap intervals."""

    def means(gs) -> tuple[float, float]:
        return _mean(_mean(a for a, _ in g) for g in gs), _mean(_mean(b for _, b in g) for g in gs)

    def diff(gs):
        a, b = means(gs)
        return a - b

    def retention(gs):
        a, b = means(gs)
        if lower_is_better:
            return math.exp(-(a - b))
        return a / b if b else float("nan")

    mean, reference_mean = means(groups)
    return {
        "n": sum(len(g) for g in groups),
        "mean": mean,
        "reference_mean": reference_mean,
        "diff": diff(groups),
        "diff_ci": bootstrap(groups, diff, reps),
        "retention": retention(groups),
        "retention_ci": bootstrap(groups, retention, reps),
    }


def format_markdown(report: dict) -> str:
    metric, ref = report["metric"], report["reference"]
    better = "lower" if report["lower_is_better"] else "higher"
    retention = "exp(-Δ) (per-token probability kept)" if report["lower_is_better"] else f"mean / {ref} mean"
    lines = [
        f"# {metric} ({better} is better): every configuration against `{ref}`, paired by document",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Δ = configuration − {ref} per document, averaged; retention = {retention}. Brackets: 95% bootstrap "
        f"intervals over documents ({report['bootstrap_reps']} resamples, seed 0).",
        "",
        *[
            f"Filled: `{target}` takes `{f['from']}`'s value on the documents it did not run: "
            + ", ".join(f"{task} {n}" for task, n in f["tasks"].items())
            + ".\n"
            for target, f in report.get("filled", {}).items()
        ],
        "| task | run | n | mean | Δ [95% CI] | retention [95% CI] |",
        "|---|---|---:|---:|---|---|",
    ]
    for task, rows in report["tasks"].items():
        for name, s in rows.items():
            lines.append(
                f"| {task} | {name} | {s['n']} | {s['mean']:.4f} | {s['diff']:+.4f} "
                f"[{s['diff_ci'][0]:+.4f}, {s['diff_ci'][1]:+.4f}] | {s['retention']:.3f} "
                f"[{s['retention_ci'][0]:.3f}, {s['retention_ci'][1]:.3f}] |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    names = [n for n in report["runs"] if n != report["reference"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(names)) / 2), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for t, task in enumerate(tasks):
            s = report["tasks"][task].get(name)
            if s is None:
                continue
            xs.append(t + (i - (len(names) - 1) / 2) * width)
            ys.append(s["diff"])
            lo.append(s["diff"] - s["diff_ci"][0])
            hi.append(s["diff_ci"][1] - s["diff"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=8)
    worse = "higher = worse" if report["lower_is_better"] else "lower = worse"
    ax.set_ylabel(f"Δ {report['metric']} vs {report['reference']} ({worse})")
    ax.set_title("Paired differences with 95% bootstrap intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--samples",
        nargs="+",
        required=True,
        help="LABEL=DIR|FILE|REPORT.json[:RUN], one per configuration (a report: that run's per-document values)",
    )
    parser.add_argument("--metric", required=True, help="per-sample metric key, e.g. acc, exact_match, nll_per_token")
    parser.add_argument("--lower-is-better", action="store_true")
    parser.add_argument("--reference", help="label of the reference run (default: the first)")
    parser.add_argument(
        "--fill",
        nargs="+",
        default=[],
        metavar="TARGET=SOURCE",
        help="documents and tasks run TARGET lacks take run SOURCE's values (e.g. default=dense: the default "
        "policy computes prompts under min_prompt_tokens unpruned); counted in the report",
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    sources = [parse_source(s) for s in args.samples]
    labels = [label for label, _ in sources]
    if len(set(labels)) != len(labels):
        parser.error(f"labels must be unique, got {labels}")
    reference = args.reference or labels[0]
    if reference not in labels:
        parser.error(f"--reference {reference!r} is not one of {labels}")
    read = {label: read_samples(path, args.metric, label) for label, path in sources}
    check_same_documents({label: hashes for label, (_, hashes) in read.items()}, reference)
    filled = {}
    for spec in args.fill:
        target, _, source = spec.partition("=")
        if target not in labels or source not in labels or target == source:
            parser.error(f"--fill {spec!r}: expected TARGET=SOURCE, two different labels of {labels}")
        filled[target] = {"from": source, "tasks": fill_missing(read, target, source)}
    runs = {label: values for label, (values, _) in read.items()}
    report = {
        "command": "python -m sdtp_eval.retention.paired " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "metric": args.metric,
        "lower_is_better": args.lower_is_better,
        "reference": reference,
        "runs": labels,
        "bootstrap_reps": args.bootstrap,
        **({"filled": filled} if filled else {}),
        "tasks": compare(runs, reference, args.lower_is_better, args.bootstrap),
        "documents": {
            label: {
                task: {str(d): [v, read[label][1].get(task, {}).get(d)] for d, v in sorted(docs.items())}
                for task, docs in values.items()
            }
            for label, values in runs.items()
        },
    }
    write_report(args.out, report, format_markdown(report), plot)
    return report


if __name__ == "__main__":
    main()
