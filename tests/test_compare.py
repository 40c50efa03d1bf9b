"""Unit tests of ``sdtp_eval.compare`` and ``sdtp_eval.compare_report``: result parsing and report, on hand-made lm-eval
results dicts."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import pytest

from sdtp_eval import compare as C
from sdtp_eval import compare_report as R

# Shaped like lm-eval 0.4.13's results JSON: a plain task, a task with two filters, a LongBench-E group
# with length buckets (one empty: NaN) and an N/A stderr, and a task whose only metric is N/A.
RESULTS = {
    "results": {
        "copa": {"alias": "copa", "acc,none": 0.625, "acc_stderr,none": 0.18298},
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.1,
            "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": 0.125,
        },
        "longbench_e": {
            "alias": "LongBench-E",
            "score,none": 31.5,
            "score_stderr,none": "N/A",
            "score_0-4k,none": 35.0,
            "score_0-4k_stderr,none": 4.5,
            "score_4-8k,none": 28.0,
            "score_4-8k_stderr,none": "N/A",
            "score_8k+,none": math.nan,
            "score_8k+_stderr,none": "N/A",
            "sample_count": {"score,none": 4},
        },
        "broken": {"alias": "broken", "f1,none": "N/A", "f1_stderr,none": "N/A", "bleu,none": None},
    },
    "n-shot": {"copa": 0, "gsm8k": 5, "longbench_e": 0, "broken": 0},
    "n-samples": {"copa": {"original": 100, "effective": 8}, "gsm8k": {"original": 1319, "effective": 4}},
    "total_evaluation_time_seconds": "12.5",
}


def test_task_scores_keeps_every_metric_filter_and_stderr():
    scores = R.task_scores(RESULTS)
    assert scores["copa"] == {"acc,none": 0.625, "acc_stderr,none": 0.18298}
    assert scores["gsm8k"] == {
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.5,
        "exact_match_stderr,flexible-extract": 0.125,
    }
    # buckets kept, N/A stderr dropped (the value stays), NaN bucket and non-metric keys skipped
    assert scores["longbench_e"] == {
        "score,none": 31.5,
        "score_0-4k,none": 35.0,
        "score_0-4k_stderr,none": 4.5,
        "score_4-8k,none": 28.0,
    }
    assert "broken" not in scores
    assert list(scores["gsm8k"])[0] == "exact_match,strict-match"  # lm-eval's order
    json.dumps(scores, allow_nan=False)  # strict JSON


def test_skipped_scores_lists_what_has_no_value():
    assert R.skipped_scores(RESULTS) == [
        {"task": "longbench_e", "metric": "score_8k+,none", "value": "nan"},
        {"task": "broken", "metric": "f1,none", "value": "N/A"},
        {"task": "broken", "metric": "bleu,none", "value": "None"},
    ]


def test_keys():
    assert R.split_key("exact_match,flexible-extract") == ("exact_match", "flexible-extract")
    assert R.stderr_key("score_0-4k,none") == "score_0-4k_stderr,none"
    assert R.metric_keys(RESULTS["results"]["longbench_e"]) == [
        "score,none",
        "score_0-4k,none",
        "score_4-8k,none",
        "score_8k+,none",
    ]


def _args(**kw) -> argparse.Namespace:
    base = dict(tasks="copa", batch_size="4", num_fewshot=None, limit=None, gen_kwargs=None, resume=False)
    return argparse.Namespace(**{**base, **kw})


def test_fewshot_is_passed_only_when_given(tmp_path):
    run = C.Run("hf", "hf", "")
    assert "--num_fewshot" not in C.lm_eval_args(run, _args(), "dtype=float32", tmp_path)
    cmd = C.lm_eval_args(run, _args(num_fewshot=0, limit=8), "dtype=float32", tmp_path)
    assert cmd[cmd.index("--num_fewshot") + 1] == "0" and cmd[cmd.index("--limit") + 1] == "8"
    assert "--log_samples" in cmd and cmd[cmd.index("--output_path") + 1] == str(tmp_path)
    assert C.build_parser().parse_args(["--tasks", "t", "--run", "a=hf", "--out", "o"]).num_fewshot is None


def _run(name: str, results: dict, wall: float, load: float | None, evaluation: float | None) -> dict:
    return {
        "name": name,
        "model": "hf",
        "model_args": "dtype=float32",
        "wall_seconds": wall,
        "load_seconds": load,
        "evaluation_seconds": evaluation,
        "scores": R.task_scores(results),
        "skipped": R.skipped_scores(results),
        "n_shot": results["n-shot"],
        "n_samples": {t: v["effective"] for t, v in results["n-samples"].items()},
        "sdtp": None,
    }


def test_ratios_and_markdown():
    other = json.loads(json.dumps(RESULTS).replace("0.625", "0.5"))
    runs = [
        _run("hf", RESULTS, 20.0, 5.0, 10.0),
        _run("sdtp", other, 30.0, 6.0, 5.0),
        _run("x", RESULTS, 10, None, None),
    ]
    C.add_ratios(runs)
    assert [r["wall_ratio_to_first"] for r in runs] == [1.0, 1.5, 0.5]
    assert [r["evaluation_ratio_to_first"] for r in runs] == [1.0, 0.5, None]
    md = R.format_markdown({"command": "python -m sdtp_eval.compare --tasks copa", "runs": runs})
    assert "| task | metric | filter | n-shot | n | hf | sdtp | x |" in md
    assert "| copa | acc | none | 0 | 8 | 0.6250 ± 0.1830 | 0.5000 ± 0.1830 | 0.6250 ± 0.1830 |" in md
    assert "| gsm8k | exact_match | strict-match | 5 | 4 |" in md
    assert "| gsm8k | exact_match | flexible-extract | 5 | 4 |" in md
    assert "| longbench_e | score_0-4k | none | 0 |  | 35.00 ± 4.50 |" in md
    assert "| longbench_e | score | none | 0 |  | 31.50 | 31.50 | 31.50 |" in md
    assert "score_8k+" not in md.split("Not shown")[0]  # the NaN bucket is only in the footnote
    assert "Values without ± have no standard error" in md
    assert "hf: longbench_e `score_8k+,none` = nan" in md and "hf: broken `f1,none` = N/A" in md
    assert "| run | model | model_args | wall s | load s | evaluation s | wall / hf | evaluation / hf |" in md
    assert "| hf | hf | `dtype=float32` | 20.0 | 5.0 | 10.0 | 1.000 | 1.000 |" in md
    assert "| sdtp | hf | `dtype=float32` | 30.0 | 6.0 | 5.0 | 1.500 | 0.500 |" in md
    assert "| x | hf | `dtype=float32` | 10.0 | n/a | n/a | 0.500 | n/a |" in md


def test_markdown_without_footnotes():
    results = {"results": {"copa": RESULTS["results"]["copa"]}, "n-shot": {"copa": 0}, "n-samples": {}}
    run = _run("hf", results, 1.0, 0.5, 0.25)
    C.add_ratios([run])
    md = R.format_markdown({"command": "c", "runs": [run]})
    assert "Not shown" not in md and "Values without ±" not in md


def test_main_metric_prefers_known_metrics_and_filter_none():
    runs = [{"scores": R.task_scores(RESULTS)}]
    assert R.main_metric(runs, "copa") == "acc,none"
    assert R.main_metric(runs, "gsm8k") == "exact_match,strict-match"
    assert R.main_metric(runs, "longbench_e") == "score,none"
    runs = [{"scores": {"t": {"f1,none": 0.1, "exact_match,flex": 0.2, "exact_match,none": 0.3}}}]
    assert R.main_metric(runs, "t") == "exact_match,none"
    assert R.main_metric([{"scores": {"t": {"f1,none": 0.1}}}], "t") == "f1,none"


def test_timed_lm_eval_times_model_construction_and_evaluate(tmp_path, monkeypatch):
    """The child wiring: lm-eval's CLI runs on the given argv, with load and evaluation timers."""
    import lm_eval.__main__ as lm_main
    import lm_eval.api.model as lm_model
    import lm_eval.evaluator as evaluator

    for name in ("create_from_arg_string", "create_from_arg_obj"):  # restored after the test
        monkeypatch.setattr(lm_model.LM, name, lm_model.LM.__dict__[name])
    monkeypatch.setattr(evaluator, "evaluate", lambda **kw: {"results": {}})

    class Tiny(lm_model.LM):
        def __init__(self, size=1):
            super().__init__()
            self.size = int(size)

        loglikelihood = loglikelihood_rolling = generate_until = None

    seen = {}

    def fake_cli():
        import sys

        seen["argv"] = list(sys.argv)
        seen["lm"] = Tiny.create_from_arg_string("size=3")
        seen["results"] = evaluator.evaluate(lm=seen["lm"])

    monkeypatch.setattr(lm_main, "cli_evaluate", fake_cli)
    timing = tmp_path / "timing.json"
    monkeypatch.setenv(C.TIMING_ENV, str(timing))
    monkeypatch.setattr("sys.argv", ["-c", "--model", "hf", "--tasks", "copa"])
    C.timed_lm_eval()
    assert seen["argv"] == ["lm_eval", "--model", "hf", "--tasks", "copa"]
    assert seen["lm"].size == 3 and seen["results"] == {"results": {}}
    saved = json.loads(timing.read_text())
    assert saved["load_calls"] == 1 and saved["evaluation_calls"] == 1
    assert saved["load_seconds"] >= 0 and saved["evaluation_seconds"] >= 0
    assert C.TIMING_ENV not in __import__("os").environ  # not inherited by lm-eval's own children


@pytest.mark.parametrize("value", ["3.5", 3.5])
def test_float(value):
    assert C._float(value) == 3.5 and C._float(None) is None and C._float("N/A") is None


def test_resume_reuses_finished_runs_and_continues_unfinished_ones(tmp_path, monkeypatch):
    """--resume: a finished run is not run again; an unfinished one reruns with lm-eval's request cache."""
    calls = []

    def fake_run(cmd, env):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output_path") + 1])
        results = {"results": {"copa": {"acc,none": 0.5}}, "n-shot": {"copa": 0}, "n-samples": {}, "config": {}}
        (out / "m").mkdir(parents=True, exist_ok=True)
        (out / "m" / "results_1.json").write_text(json.dumps(results))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(C.subprocess, "run", fake_run)
    run = C.Run("dense", "sdtp", "prune=false")
    args = _args(resume=True)
    (tmp_path / "dense.cache_rank0.db").write_text("")  # lm-eval's cache of an earlier, killed attempt
    first = C.execute(run, args, {"dtype": "float32"}, tmp_path)
    assert len(calls) == 1 and "--use_cache" in calls[0] and first["resumed"] is True
    assert C.execute(run, args, {"dtype": "float32"}, tmp_path) == first and len(calls) == 1  # reused
    with pytest.raises(SystemExit, match="other settings"):
        C.execute(C.Run("dense", "sdtp", "prune=false,keep_ratio=0.5"), args, {"dtype": "float32"}, tmp_path)
    fresh = C.execute(run, _args(resume=False), {"dtype": "float32"}, tmp_path)  # without --resume: run again
    assert len(calls) == 2 and "--use_cache" not in calls[1] and fresh["resumed"] is False
    C.add_ratios([first, fresh])
    assert fresh["wall_ratio_to_first"] is None  # times of a resumed run are partial: no ratio
