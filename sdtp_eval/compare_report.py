"""The results side of :mod:`sdtp_eval.compare`: what lm-eval reported per task (every ``metric,filter`` with its
standard error), and the comparison's ``OUT.md`` tables and ``OUT.png`` plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

#: Preferred metrics for the plot (one bar per task): the first present, filter ``none`` first.
METRICS = ("acc", "acc_norm", "score", "exact_match")


def read_results(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lm_eval wrote no results JSON under {out}")
    return json.loads(files[-1].read_text())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def split_key(key: str) -> tuple[str, str]:
    """``"exact_match,strict-match"`` -> ``("exact_match", "strict-match")``."""
    metric, _, filt = key.partition(",")
    return metric, filt


def stderr_key(key: str) -> str:
    metric, filt = split_key(key)
    return f"{metric}_stderr,{filt}"


def metric_keys(values: dict) -> list[str]:
    """The ``metric,filter`` keys of one task's results, in lm-eval's order (no ``_stderr`` keys)."""
    return [k for k in values if "," in k and not split_key(k)[0].endswith("_stderr")]


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {"metric,filter": value, "metric_stderr,filter": stderr}}``: every metric and filter lm-eval
    reports (groups and LongBench-E buckets included), with its standard error where it has one. Values
    lm-eval could not compute (``"N/A"``, None, NaN: e.g. an empty LongBench-E bucket) are left out:
    :func:`skipped_scores` lists them."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key in metric_keys(values):
            if _number(values[key]):
                row[key] = float(values[key])
                err = values.get(stderr_key(key))
                if _number(err):
                    row[stderr_key(key)] = float(err)
        if row:
            scores[task] = row
    return scores


def skipped_scores(results: dict) -> list[dict]:
    """The ``metric,filter`` entries :func:`task_scores` leaves out, with the value lm-eval reported."""
    skipped = []
    for task, values in results.get("results", {}).items():
        for key in metric_keys(values):
            if not _number(values[key]):
                value = values[key]
                skipped.append({"task": task, "metric": key, "value": value if isinstance(value, str) else repr(value)})
    return skipped


def fmt_seconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f}"


def _fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def _fmt_score(key: str, value: float, err: float | None) -> str:
    digits = 2 if split_key(key)[0].startswith("score") else 4  # LongBench scores are 0-100
    return f"{value:.{digits}f}" + ("" if err is None else f" ± {err:.{digits}f}")


def _one_of(values: list) -> str:
    """One cell for a per-task value every run should share (``a/b`` if they differ)."""
    seen = list(dict.fromkeys(v for v in values if v is not None))
    return "/".join(str(v) for v in seen)


def format_markdown(report: dict) -> str:
    runs = report["runs"]
    tasks = sorted({t for r in runs for t in r["scores"]})
    lines = [f"Command: `{report['command']}`", ""]
    lines += ["| task | metric | filter | n-shot | n | " + " | ".join(r["name"] for r in runs) + " |"]
    lines += ["|---|---|---|---:|---:|" + "---:|" * len(runs)]
    missing_stderr = False
    for task in tasks:
        keys = list(dict.fromkeys(k for r in runs for k in _keys(r, task)))
        shots = _one_of([r.get("n_shot", {}).get(task) for r in runs])
        n = _one_of([r["n_samples"].get(task) for r in runs])
        for key in keys:
            cells = []
            for r in runs:
                s = r["scores"].get(task, {})
                if key not in s:
                    cells.append("")
                    continue
                err = s.get(stderr_key(key))
                missing_stderr |= err is None
                cells.append(_fmt_score(key, s[key], err))
            metric, filt = split_key(key)
            lines.append(f"| {task} | {metric} | {filt} | {shots} | {n} | " + " | ".join(cells) + " |")
    skipped = [(r["name"], s) for r in runs for s in r.get("skipped", [])]
    if missing_stderr or skipped:
        lines.append("")
    if missing_stderr:
        lines.append("Values without ± have no standard error from lm-eval (N/A, e.g. a single document).")
    if skipped:
        listed = "; ".join(f"{name}: {s['task']} `{s['metric']}` = {s['value']}" for name, s in skipped)
        lines.append(f"Not shown (lm-eval reported no value, e.g. an empty LongBench-E bucket): {listed}.")
    first = runs[0]["name"]
    lines += [
        "",
        f"| run | model | model_args | wall s | load s | evaluation s | wall / {first} | evaluation / {first} |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']} | {r['model']} | `{r['model_args']}` | {r['wall_seconds']:.1f}"
            f"{' (resumed)' if r.get('resumed') else ''} | "
            f"{fmt_seconds(r.get('load_seconds'))} | {fmt_seconds(r.get('evaluation_seconds'))} | "
            f"{_fmt_ratio(r.get('wall_ratio_to_first'))} | {_fmt_ratio(r.get('evaluation_ratio_to_first'))} |"
        )
    lines += [
        "",
        "Load = building the model (weights, tokenizer, pruner); evaluation = lm-eval's `evaluate` (every "
        "model call and the metrics); wall = the whole `lm_eval` process (also start-up, imports, task and "
        "dataset loading, writing the samples).",
    ]
    pruned = [r for r in runs if r["sdtp"] and r["sdtp"].get("per_task")]
    if pruned:
        lines += ["", "| run | task | requests | mean prompt tokens | 1/τ | mean prefill s | mean generation s |"]
        lines += ["|---|---|---:|---:|---:|---:|---:|"]
        for r in pruned:
            for task, s in r["sdtp"]["per_task"].items():
                pre, gen = s.get("mean_prefill_seconds"), s.get("mean_generation_seconds")
                lines.append(
                    f"| {r['name']} | {task} | {s['requests']} | {s['mean_prompt_tokens']:.0f} | "
                    f"{s['mean_compression']:.3f} | {'' if pre is None else f'{pre:.2f}'} | "
                    f"{'' if gen is None else f'{gen:.2f}'} |"
                )
    return "\n".join(lines) + "\n"


def _keys(run: dict, task: str) -> list[str]:
    return metric_keys(run["scores"].get(task, {}))


def main_metric(runs: list[dict], task: str) -> str | None:
    """The ``metric,filter`` to plot for ``task``: the first of :data:`METRICS` (filter ``none`` first)."""
    keys = list(dict.fromkeys(k for r in runs for k in _keys(r, task)))
    preferred = [k for m in METRICS for k in keys if split_key(k) == (m, "none")]
    preferred += [k for m in METRICS for k in keys if split_key(k)[0] == m]
    return (preferred or keys or [None])[0]


def plot(report: dict, path: Path) -> None:
    """Grouped bars: the main metric of every task, one bar per run, with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    tasks = sorted({t for r in runs for t in r["scores"]})
    metric_of = {t: main_metric(runs, t) for t in tasks}
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 4))
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(tasks))]
        ys = [r["scores"].get(t, {}).get(metric_of[t], float("nan")) for t in tasks]
        errs = [r["scores"].get(t, {}).get(stderr_key(metric_of[t]), 0.0) for t in tasks]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=r["name"])
    labels = []
    for t in tasks:
        metric, filt = split_key(metric_of[t])
        labels.append(f"{t}\n({metric}{'' if filt == 'none' else ', ' + filt})")
    ax.set_xticks(range(len(tasks)), labels)
    ax.set_ylabel("score")
    ax.set_title("lm-eval scores per configuration")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
