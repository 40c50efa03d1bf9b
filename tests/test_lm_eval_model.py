"""The ``sdtp`` lm-eval model: registration, parity with ``--model hf``, pruning reports, truncation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import offline_env

from sdtp_eval.model import middle_truncate

LM_EVAL = shutil.which("lm_eval") or "lm_eval"


def run_lm_eval(args: list[str], cache: Path, out: Path, timeout: int = 900) -> dict:
    """Run the real ``lm_eval`` console script in a fresh interpreter; return its results JSON."""
    proc = subprocess.run(
        [LM_EVAL, *args, "--output_path", str(out), "--log_samples"],
        env=offline_env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted(out.rglob("results_*.json"))
    assert results, f"no results JSON under {out}\n{proc.stderr[-2000:]}"
    data = json.loads(results[-1].read_text())
    data["_stderr"] = proc.stderr
    return data


def samples(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"no samples for {task} under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


def loglik(rows: list[dict]) -> list[float]:
    """Per-request log-probabilities, in document then choice order."""
    return [float(r[0][0]) for row in sorted(rows, key=lambda r: r["doc_id"]) for r in row["resps"]]


def test_middle_truncation_keeps_exactly_the_first_and_last_halves():
    tokens = list(range(10))
    assert middle_truncate(tokens, 6) == [0, 1, 2, 7, 8, 9]
    assert middle_truncate(tokens, 5) == [0, 1, 7, 8, 9]  # official: half = budget // 2 from the front
    assert middle_truncate(tokens, 10) == tokens
    with pytest.raises(ValueError):
        middle_truncate(tokens, 0)


def test_interpreter_startup_imports_neither_torch_nor_lm_eval():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    ).stderr
    imported = {line.split("|")[-1].strip() for line in out.splitlines() if "|" in line}
    assert "sdtp_eval._startup" in imported  # the hook is installed...
    assert not {m for m in imported if m.split(".")[0] in ("torch", "lm_eval", "transformers")}  # ...and cheap


def test_registration_keeps_lm_evals_builtins_and_adds_sdtp():
    code = (
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('hf').__name__, get_model('sdtp').__name__)\n"
        "from lm_eval.tasks import TaskManager\n"
        "tm = TaskManager()\n"
        "print('copa' in tm.all_tasks, 'longbench_narrativeqa' in tm.all_tasks)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["HFLM", "SDTPLM", "True", "True"]


@pytest.mark.shared_data
def test_prune_false_equals_hf_and_pruning_reports_compression(tiny_hf_dir, hf_datasets_cache, tmp_path):
    """Through the real lm_eval console script: hf vs sdtp(prune=false) vs sdtp(keep_ratio=1) vs pruned."""
    common = ["--tasks", "copa", "--limit", "12", "--batch_size", "4"]
    hf = run_lm_eval(
        ["--model", "hf", "--model_args", f"pretrained={tiny_hf_dir},dtype=float32", *common],
        hf_datasets_cache,
        tmp_path / "hf",
    )
    dense = run_lm_eval(
        ["--model", "sdtp", "--model_args", f"pretrained={tiny_hf_dir},prune=false", *common],
        hf_datasets_cache,
        tmp_path / "dense",
    )
    run_lm_eval(
        [
            "--model",
            "sdtp",
            "--model_args",
            f"pretrained={tiny_hf_dir},pruner=random,keep_ratio=1.0,layers=1:3",
            *common,
        ],
        hf_datasets_cache,
        tmp_path / "ratio1",
    )
    pruned = run_lm_eval(
        [
            "--model",
            "sdtp",
            "--model_args",
            f"pretrained={tiny_hf_dir},pruner=random,keep_ratio=0.7,layers=1:3",
            *common,
        ],
        hf_datasets_cache,
        tmp_path / "pruned",
    )
    ref = loglik(samples(tmp_path / "hf", "copa"))
    assert loglik(samples(tmp_path / "dense", "copa")) == ref  # identical, not just close
    assert loglik(samples(tmp_path / "ratio1", "copa")) == pytest.approx(ref, abs=1e-4)
    pruned_ll = loglik(samples(tmp_path / "pruned", "copa"))
    assert pruned_ll != pytest.approx(ref, abs=1e-4)  # pruning changed the scores...
    assert all(v < 0 for v in pruned_ll)  # ...which are still valid log-probabilities
    acc = pruned["results"]["copa"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    report = pruned["config"]["sdtp"]["per_task"]["copa"]
    assert report["requests"] == 24 and report["mean_compression"] > 1.0
    assert len(report["mean_kept_per_stage"]) == 2
    assert "sdtp pruning (prune=True): copa: 1/tau=" in pruned["_stderr"]
    assert (
        dense["config"]["sdtp"]["prune"] is False
        and hf["results"]["copa"]["acc,none"] == dense["results"]["copa"]["acc,none"]
    )


@pytest.mark.shared_data
def test_generate_until_runs_pruned_with_middle_truncation(tiny_hf_dir, hf_datasets_cache, tmp_path):
    """A LongBench task end to end on the tiny model: chat rule, middle truncation, scores, report."""
    data = run_lm_eval(
        [
            "--model",
            "sdtp",
            "--model_args",
            f"pretrained={tiny_hf_dir},pruner=random,layers=1:3,truncation=middle,max_length=768",
            "--tasks",
            "longbench_multi_news",
            "--limit",
            "2",
            "--gen_kwargs",
            "max_gen_toks=8",
        ],
        hf_datasets_cache,
        tmp_path / "lb",
    )
    result = data["results"]["longbench_multi_news"]
    score = next(v for k, v in result.items() if k.startswith("rouge") or k.startswith("score"))
    assert 0.0 <= score <= 100.0
    report = data["config"]["sdtp"]["per_task"]["longbench_multi_news"]
    assert report["requests"] == 2 and report["mean_compression"] > 1.0
    assert report["mean_prompt_tokens"] <= 768 - 8


@pytest.mark.real_model
@pytest.mark.shared_data
def test_embedded_model_copa_end_to_end_offline(hf_datasets_cache, tmp_path):
    data = run_lm_eval(["--model", "sdtp", "--tasks", "copa", "--limit", "20"], hf_datasets_cache, tmp_path / "copa")
    assert 0.0 <= data["results"]["copa"]["acc,none"] <= 1.0
    assert data["config"]["sdtp"]["per_task"]["copa"]["requests"] == 40


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
@pytest.mark.shared_data
def test_data_parallel_gives_the_same_scores(tiny_hf_dir, hf_datasets_cache, tmp_path):
    args = [
        "--model",
        "sdtp",
        "--model_args",
        f"pretrained={tiny_hf_dir},pruner=random,layers=1:3",
        "--tasks",
        "copa",
        "--limit",
        "16",
        "--output_path",
    ]
    env = offline_env(hf_datasets_cache)
    one = subprocess.run([LM_EVAL, *args, str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            shutil.which("accelerate"),
            "launch",
            "--multi_gpu",  # with ACCELERATE_USE_CPU; on accelerate 1.x "--cpu" alone starts one process
            "--num_processes",
            "2",
            "-m",
            "lm_eval",
            *args,
            str(tmp_path / "two"),
        ],
        env={**env, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    res = [json.loads(sorted((tmp_path / d).rglob("results_*.json"))[-1].read_text()) for d in ("one", "two")]
    assert res[0]["results"]["copa"]["acc,none"] == pytest.approx(res[1]["results"]["copa"]["acc,none"])
    assert "data parallel on CPU over 2 processes" in two.stderr
    assert res[1]["config"]["sdtp"]["per_task"]["copa"]["requests"] == 32  # both ranks' shares, gathered


def test_bad_model_args_give_clear_errors(tiny_hf_dir):
    from sdtp_eval.model import SDTPLM

    with pytest.raises(ValueError, match="truncation must be"):
        SDTPLM(pretrained=str(tiny_hf_dir), truncation="sideways")
    with pytest.raises(ValueError, match="layers must be integers"):
        SDTPLM(pretrained=str(tiny_hf_dir), pruner="random", layers="a:b")
    with pytest.raises(Exception, match="out of range"):
        SDTPLM(pretrained=str(tiny_hf_dir), pruner="random", layers="1:9")
    with pytest.raises(Exception, match=r"must be in \(0, 1\]"):
        SDTPLM(pretrained=str(tiny_hf_dir), pruner="random", layers="1:3", keep_ratio=1.5)
    with pytest.raises(ValueError, match="expected true or false"):
        SDTPLM(pretrained=str(tiny_hf_dir), prune="maybe")


@pytest.mark.shared_data
def test_compare_runs_configurations_back_to_back(tiny_hf_dir, hf_datasets_cache, tmp_path, monkeypatch):
    from sdtp_eval.compare import main as compare

    for key, value in offline_env(hf_datasets_cache).items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "results" / "copa_tiny"
    argv = [
        "--tasks",
        "copa",
        "--limit",
        "8",
        "--batch-size",
        "4",
        "--pretrained",
        str(tiny_hf_dir),
        "--dtype",
        "float32",
        "--run",
        "hf=hf",
        "--run",
        "dense=sdtp:prune=false",
        "--run",
        "pruned=sdtp:pruner=random,layers=1:3,keep_ratio=0.7",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    report = compare(argv)
    hf, dense, pruned = report["runs"]
    assert hf["scores"]["copa"]["acc"] == dense["scores"]["copa"]["acc"]
    assert hf["n_samples"]["copa"] == 8 and hf["wall_ratio_to_first"] == 1.0
    assert f"pretrained={tiny_hf_dir}" in hf["model_args"] and "dtype=float32" in dense["model_args"]
    assert pruned["sdtp"]["per_task"]["copa"]["mean_compression"] > 1.0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["hf", "dense", "pruned"]
    table = out.with_suffix(".md").read_text()
    assert "| copa | acc | 8 |" in table and "wall / hf" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not list((tmp_path / "results").glob("*runs*")), "lm-eval samples must not land next to the results"


def test_compare_rejects_a_malformed_run():
    from sdtp_eval.compare import Run

    with pytest.raises(ValueError, match="NAME=MODEL"):
        Run.parse("sdtp")
    assert Run.parse("dense=sdtp:prune=false,keep_ratio=1.0") == Run("dense", "sdtp", "prune=false,keep_ratio=1.0")
