"""Run the same lm-eval tasks under several model configurations back to back and report them side by side.

    python -m sdtp_eval.compare --tasks copa,piqa,winogrande \\
        --run hf=hf --run dense=sdtp:prune=false --run sdtp=sdtp:pruner=shipped,min_prompt_tokens=0 \\
        --run random=sdtp:pruner=random,min_prompt_tokens=0 \\
        --out results/accuracy_cpu

Each ``--run NAME=MODEL[:MODEL_ARGS]`` is one ``lm_eval`` process (lm-eval's own command-line entry point,
one after the other, on the same machine), timed from start to exit; inside it the model's construction
(load) and lm-eval's ``evaluate`` (evaluation) are timed separately. Every run gets the same
``pretrained`` and ``dtype`` unless its model_args set them (default: the embedded model in the ``sdtp``
model's default dtype), so ``hf`` and ``sdtp`` compare the same weights. Without ``--num-fewshot`` every
task uses its own default number of shots (the report says which). Writes ``OUT.json`` (every
``metric,filter`` lm-eval reports with its standard error, the shots per task, wall, load and evaluation
times and their ratios to the first run, the ``sdtp`` pruning report: 1/τ, kept tokens, prefill and
generation seconds), ``OUT.md`` (tables) and ``OUT.png`` (main score per task and run). The lm-eval
output of every run (with ``--log_samples``) goes to ``--runs-dir`` (default: a folder under the system
temporary directory), not next to ``OUT``: the samples quote the evaluation data.
"""

from __future__ import annotations

import argparse
import functools
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

from .compare_report import fmt_seconds, format_markdown, plot, read_results, skipped_scores, task_scores

#: The child process writes its load / evaluation timings to the file this variable names.
TIMING_ENV = "SDTP_COMPARE_TIMING"
TIMING_FILE = "sdtp_compare_timing.json"
#: A finished run's record, next to its lm-eval output (what ``--resume`` reuses).
RUN_FILE = "sdtp_compare_run.json"
_CHILD = "from sdtp_eval.compare import timed_lm_eval; timed_lm_eval()"


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


def lm_eval_args(run: Run, args: argparse.Namespace, model_args: str, out: Path) -> list[str]:
    """The ``lm_eval`` arguments of one run. ``--num_fewshot`` only if given: else each task's default."""
    cmd = ["--model", run.model, "--model_args", model_args, "--tasks", args.tasks]
    cmd += ["--batch_size", str(args.batch_size), "--output_path", str(out), "--log_samples"]
    if args.num_fewshot is not None:
        cmd += ["--num_fewshot", str(args.num_fewshot)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if args.gen_kwargs:
        cmd += ["--gen_kwargs", args.gen_kwargs]
    return cmd


# ---------------------------------------------------------------- the child process: timed lm_eval


def timed_lm_eval() -> None:
    """lm-eval's command line (``lm_eval.__main__.cli_evaluate``, what the ``lm_eval`` script runs) on
    ``sys.argv[1:]``, timing the model's construction and lm-eval's ``evaluate`` into ``$SDTP_COMPARE_TIMING``.

    Load = ``LM.create_from_arg_string``/``create_from_arg_obj`` (how lm-eval builds every model that does
    not override them, ``hf`` and ``sdtp`` included: weights, tokenizer, pruner). Evaluation =
    ``lm_eval.evaluator.evaluate`` (requests, every model call, metrics). If lm-eval's internals ever
    differ, the timers are skipped (with a warning) and lm-eval runs unchanged.
    """
    path = os.environ.pop(TIMING_ENV, None)
    timing: dict[str, float | int] = {}

    def add(key: str, seconds: float) -> None:
        timing[key] = timing.get(key, 0.0) + seconds
        timing[key.replace("_seconds", "_calls")] = timing.get(key.replace("_seconds", "_calls"), 0) + 1
        if path:
            Path(path).write_text(json.dumps(timing))

    def timed(fn, key):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                add(key, time.perf_counter() - start)

        return wrapper

    from lm_eval.__main__ import cli_evaluate

    try:
        import lm_eval.api.model as lm_model
        import lm_eval.evaluator as evaluator

        for name in ("create_from_arg_string", "create_from_arg_obj"):
            original = lm_model.LM.__dict__[name].__func__
            setattr(lm_model.LM, name, classmethod(timed(original, "load_seconds")))
        evaluator.evaluate = timed(evaluator.evaluate, "evaluation_seconds")
    except Exception as e:  # never break the run for a timer
        print(f"sdtp_eval.compare: load/evaluation timers not installed ({type(e).__name__}: {e})", file=sys.stderr)
    sys.argv[0] = "lm_eval"
    cli_evaluate()


def read_timing(out: Path) -> dict:
    path = out / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- one run


def execute(run: Run, args: argparse.Namespace, defaults: dict[str, str], runs_dir: Path) -> dict:
    """Run one configuration in a fresh ``lm_eval`` process and collect what it measured.

    With ``--resume`` a finished run with the same lm-eval arguments is reused as it is, and an unfinished
    one continues from lm-eval's request cache (``--use_cache``): its wall time then covers only the
    last part and the report marks it ``resumed``.
    """
    out = runs_dir / run.name
    model_args = with_defaults(run.model_args, defaults)
    lm_args = lm_eval_args(run, args, model_args, out)
    cache = runs_dir / f"{run.name}.cache"
    if args.resume:
        lm_args += ["--use_cache", str(cache)]
        finished = out / RUN_FILE
        if finished.exists():
            record = json.loads(finished.read_text())
            if record["command"] != "lm_eval " + shlex.join(lm_args):
                raise SystemExit(
                    f"{out} holds run {run.name!r} with other settings:\n  {record['command']}\nRemove it or use "
                    "another --runs-dir."
                )
            print(f"[{run.name}] finished earlier: reusing {out}", flush=True)
            return record
    resumed = args.resume and any(runs_dir.glob(f"{run.name}.cache*"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-c", _CHILD, *lm_args]
    print(f"[{run.name}] lm_eval {shlex.join(lm_args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, TIMING_ENV: str(out / TIMING_FILE)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.name!r} failed (exit {proc.returncode}); its log is above")
    results = read_results(out)
    timing = read_timing(out)
    load, evaluation = timing.get("load_seconds"), timing.get("evaluation_seconds")
    print(
        f"[{run.name}] {wall:.1f} s (load {fmt_seconds(load)} s, evaluation {fmt_seconds(evaluation)} s)",
        flush=True,
    )
    record = {
        "name": run.name,
        "model": run.model,
        "model_args": model_args,
        "command": "lm_eval " + shlex.join(lm_args),
        "resumed": resumed,
        "process": shlex.join(cmd),
        "wall_seconds": wall,
        "load_seconds": load,
        "evaluation_seconds": evaluation,
        # interpreter start-up, imports, task and dataset loading, writing the results and samples
        "other_seconds": None if load is None or evaluation is None else wall - load - evaluation,
        "lm_eval_total_evaluation_time_seconds": _float(results.get("total_evaluation_time_seconds")),
        "scores": task_scores(results),
        "skipped": skipped_scores(results),
        "n_shot": dict(results.get("n-shot", {})),
        "n_samples": {t: v.get("effective", v.get("original")) for t, v in results.get("n-samples", {}).items()},
        "sdtp": results.get("config", {}).get("sdtp"),
    }
    (out / RUN_FILE).write_text(json.dumps(record, indent=2))
    return record


def add_ratios(runs: list[dict]) -> None:
    """Wall and evaluation time of every run relative to the first run."""
    first = runs[0]
    for r in runs:
        partial = r.get("resumed") or first.get("resumed")  # a resumed run's times cover only its last part
        r["wall_ratio_to_first"] = None if partial else r["wall_seconds"] / first["wall_seconds"]
        e, e0 = r.get("evaluation_seconds"), first.get("evaluation_seconds")
        r["evaluation_ratio_to_first"] = e / e0 if e is not None and e0 and not partial else None


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
    parser.add_argument(
        "--num-fewshot", type=int, default=None, help="lm-eval --num_fewshot (default: each task's own default)"
    )
    parser.add_argument("--batch-size", default="8", help="lm-eval --batch_size")
    parser.add_argument("--gen-kwargs", default=None, help="lm-eval --gen_kwargs")
    parser.add_argument("--pretrained", default=None, help="model for every run (default: the embedded model)")
    parser.add_argument("--dtype", default=None, help="dtype for every run (default: the sdtp model's default)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where each run's lm-eval output goes")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished runs in --runs-dir and continue unfinished ones from lm-eval's request cache",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    names = [r.name for r in args.run]
    if len(set(names)) != len(names):
        raise SystemExit(f"run names must be unique, got {names}")
    if args.limit is not None and args.limit.is_integer():
        args.limit = int(args.limit)
    from sdtp_core.bench.machine import machine_info
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
        "num_fewshot": args.num_fewshot,  # None: each task's default; per task and run: runs[i]["n_shot"]
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in args.run:
        report["runs"].append(execute(run, args, defaults, runs_dir))
        add_ratios(report["runs"])
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
