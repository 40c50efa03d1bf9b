"""Run the same lm-eval tasks under several model configurations back to back and report them side by side.

    python -m sdtp_eval.compare --tasks copa,piqa,winogrande \\
        --run hf=hf --run dense=sdtp:prune=false --run sdtp=sdtp --run random=sdtp:pruner=random \\
        --out results/accuracy_cpu

Each ``--run NAME=MODEL[:MODEL_ARGS]`` is one ``lm_eval`` process (the real console script, one after
the other, on the same machine), timed from start to exit. Every run gets the same ``pretrained`` and
``dtype`` unless its model_args set them (default: the embedded model in the ``sdtp`` model's default
dtype), so ``hf`` and ``sdtp`` compare the same weights. Writes ``OUT.json`` (scores with standard
errors, wall times and their ratio to the first run, the ``sdtp`` pruning report: 1/τ, kept tokens,
prefill and generation seconds), ``OUT.md`` (tables) and ``OUT.png`` (scores per task and run).
The lm-eval output of every run (with ``--log_samples``) goes to ``--runs-dir`` (default: a folder under
the system temporary directory), not next to ``OUT``: the samples quote the evaluation data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

METRICS = ("acc", "acc_norm", "score", "exact_match")


@dataclass
class Run:
    """One configuration: a name for the tables, an lm-eval model and its model_args."""

    name: str
    model: str
    model_args: str

    @classmethod
    def parse(cls, text: str) -> Run:
        """``NAME=MODEL[:MODEL_ARGS]``, e.g. ``dense=sdtp:prune=false``."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(
                f"--run must look like NAME=MODEL[:MODEL_ARGS] (e.g. dense=sdtp:prune=false), got {text!r}"
            )
        model, _, args = rest.partition(":")
        return cls(name, model, args)


def with_defaults(model_args: str, defaults: dict[str, str]) -> str:
    """Add ``defaults`` to a ``k=v,k=v`` string for the keys it does not set."""
    given = {kv.split("=", 1)[0].strip() for kv in model_args.split(",") if "=" in kv}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]
    return ",".join([a for a in [model_args] if a] + extra)


def lm_eval_command(run: Run, args: argparse.Namespace, model_args: str, out: Path) -> list[str]:
    exe = shutil.which("lm_eval")
    cmd = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    cmd += [
        "--model",
        run.model,
        "--model_args",
        model_args,
        "--tasks",
        args.tasks,
        "--batch_size",
        str(args.batch_size),
    ]
    cmd += ["--output_path", str(out), "--log_samples", "--num_fewshot", str(args.num_fewshot)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if args.gen_kwargs:
        cmd += ["--gen_kwargs", args.gen_kwargs]
    return cmd


def read_results(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lm_eval wrote no results JSON under {out}")
    return json.loads(files[-1].read_text())


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, metric_stderr: value}}`` for the metrics in :data:`METRICS`."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        row = {}
        for metric in METRICS:
            value = values.get(f"{metric},none")
            if isinstance(value, (int, float)):
                row[metric] = float(value)
                stderr = values.get(f"{metric}_stderr,none")
                if isinstance(stderr, (int, float)):
                    row[f"{metric}_stderr"] = float(stderr)
        if row:
            scores[task] = row
    return scores


def execute(run: Run, args: argparse.Namespace, defaults: dict[str, str], runs_dir: Path) -> dict:
    """Run one configuration in a fresh ``lm_eval`` process and collect what it measured."""
    out = runs_dir / run.name
    if out.exists():
        shutil.rmtree(out)
    model_args = with_defaults(run.model_args, defaults)
    cmd = lm_eval_command(run, args, model_args, out)
    print(f"[{run.name}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.name!r} failed (exit {proc.returncode}); its log is above")
    results = read_results(out)
    sdtp = results.get("config", {}).get("sdtp")
    print(f"[{run.name}] {wall:.1f} s", flush=True)
    return {
        "name": run.name,
        "model": run.model,
        "model_args": model_args,
        "command": shlex.join(cmd),
        "wall_seconds": wall,
        "scores": task_scores(results),
        "n_samples": {t: v.get("effective", v.get("original")) for t, v in results.get("n-samples", {}).items()},
        "sdtp": sdtp,
    }


def format_markdown(report: dict) -> str:
    runs = report["runs"]
    tasks = sorted({t for r in runs for t in r["scores"]})
    lines = [f"Command: `{report['command']}`", ""]
    lines += ["| task | metric | n | " + " | ".join(r["name"] for r in runs) + " |"]
    lines += ["|---|---|---:|" + "---:|" * len(runs)]
    for task in tasks:
        metrics = [m for m in METRICS if any(m in r["scores"].get(task, {}) for r in runs)]
        n = next((r["n_samples"].get(task) for r in runs if r["n_samples"].get(task) is not None), "")
        for metric in metrics:
            cells = []
            for r in runs:
                s = r["scores"].get(task, {})
                if metric not in s:
                    cells.append("")
                elif metric == "score":
                    cells.append(f"{s[metric]:.2f}")
                else:
                    err = s.get(f"{metric}_stderr")
                    cells.append(f"{s[metric]:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
            lines.append(f"| {task} | {metric} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "| run | model | model_args | wall s | wall / " + runs[0]["name"] + " |", "|---|---|---|---:|---:|"]
    for r in runs:
        lines.append(
            f"| {r['name']} | {r['model']} | `{r['model_args']}` | {r['wall_seconds']:.1f} | "
            f"{r['wall_seconds'] / runs[0]['wall_seconds']:.3f} |"
        )
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


def plot(report: dict, path: Path) -> None:
    """Grouped bars: the main metric of every task, one bar per run, with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    tasks = sorted({t for r in runs for t in r["scores"]})
    metric_of = {t: next(m for m in METRICS if any(m in r["scores"].get(t, {}) for r in runs)) for t in tasks}
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 4))
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(tasks))]
        ys = [r["scores"].get(t, {}).get(metric_of[t], float("nan")) for t in tasks]
        errs = [r["scores"].get(t, {}).get(f"{metric_of[t]}_stderr", 0.0) for t in tasks]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=r["name"])
    ax.set_xticks(range(len(tasks)), [f"{t}\n({metric_of[t]})" for t in tasks])
    ax.set_ylabel("score")
    ax.set_title("lm-eval scores per configuration")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdtp_eval.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    parser.add_argument("--run", action="append", required=True, type=Run.parse, help="NAME=MODEL[:MODEL_ARGS]")
    parser.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.json, OUT.md and OUT.png")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval --limit (documents per task)")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", default="8", help="lm-eval --batch_size")
    parser.add_argument("--gen-kwargs", default=None, help="lm-eval --gen_kwargs")
    parser.add_argument("--pretrained", default=None, help="model for every run (default: the embedded model)")
    parser.add_argument("--dtype", default=None, help="dtype for every run (default: the sdtp model's default)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where each run's lm-eval output goes")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    names = [r.name for r in args.run]
    if len(set(names)) != len(names):
        raise SystemExit(f"run names must be unique, got {names}")
    if args.limit is not None and args.limit.is_integer():
        args.limit = int(args.limit)
    from sdtp_core.bench import machine_info
    from sdtp_core.embedded import resolve_pretrained
    from sdtp_core.loading import default_dtype

    defaults = {
        "pretrained": resolve_pretrained(args.pretrained),
        "dtype": args.dtype or str(default_dtype()).removeprefix("torch."),
    }
    runs_dir = args.runs_dir or Path(tempfile.gettempdir()) / "sdtp_compare" / args.out.name
    report = {
        "command": "python -m sdtp_eval.compare " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "tasks": args.tasks,
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in args.run:
        report["runs"].append(execute(run, args, defaults, runs_dir))
        for r in report["runs"]:
            r["wall_ratio_to_first"] = r["wall_seconds"] / report["runs"][0]["wall_seconds"]
        # Written after every run, so a failure later loses nothing measured so far.
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.out.with_suffix(".json"))
    args.out.with_suffix(".md").write_text(format_markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(format_markdown(report))
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png")
    return report


if __name__ == "__main__":
    main()
