"""The ``sdtp`` lm-eval model: registration, parity with ``--model hf``, pruning reports, truncation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def run_lm_eval_raw(args: list[str], cache: Path, extra_env: dict | None = None, launcher: list[str] | None = None):
    env = {**offline_env(cache), **(extra_env or {})}
    proc = subprocess.run([*(launcher or [LM_EVAL]), *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def results_json(out: Path) -> dict:
    return json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())


def resps(out: Path, task: str) -> list:
    return [row["resps"] for row in sorted(samples(out, task), key=lambda r: r["doc_id"])]


GEN_TASK = "longbench_trec_e"  # official rule: no chat template, so hf and sdtp see the same prompt


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
    """Through the real lm_eval console script: hf vs sdtp(prune=false) vs sdtp(keep_ratio=1) vs pruned;
    generation too (a LongBench task whose official prompt has no chat template, so both see the same text)."""
    common = ["--tasks", "copa", "--limit", "12", "--batch_size", "4"]
    generation = ["--tasks", f"copa,{GEN_TASK}", "--limit", "12", "--batch_size", "4", "--gen_kwargs", "max_gen_toks=6"]
    hf = run_lm_eval(
        ["--model", "hf", "--model_args", f"pretrained={tiny_hf_dir},dtype=float32", *generation],
        hf_datasets_cache,
        tmp_path / "hf",
    )
    dense = run_lm_eval(
        ["--model", "sdtp", "--model_args", f"pretrained={tiny_hf_dir},prune=false,dtype=float32", *generation],
        hf_datasets_cache,
        tmp_path / "dense",
    )
    run_lm_eval(
        [
            "--model",
            "sdtp",
            "--model_args",
            f"pretrained={tiny_hf_dir},pruner=random,keep_ratio=1.0,layers=1:3,min_prompt_tokens=0,dtype=float32",
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
            f"pretrained={tiny_hf_dir},pruner=random,keep_ratio=0.7,layers=1:3,min_prompt_tokens=0,dtype=float32",
            *common,
        ],
        hf_datasets_cache,
        tmp_path / "pruned",
    )
    ref = loglik(samples(tmp_path / "hf", "copa"))
    assert loglik(samples(tmp_path / "dense", "copa")) == ref  # identical, not just close
    assert resps(tmp_path / "dense", GEN_TASK) == resps(tmp_path / "hf", GEN_TASK)
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
            f"pretrained={tiny_hf_dir},pruner=random,layers=1:3,min_prompt_tokens=0,truncation=middle,max_length=768,dtype=float32",
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
    report = data["config"]["sdtp"]["per_task"]["copa"]
    assert report["requests"] == 40
    assert report["mean_compression"] > 1.1  # every prompt is pruned by default, COPA's 14-35 tokens too


@pytest.mark.shared_data
def test_batch_size_auto_use_cache_and_logged_pruning_records(tiny_hf_dir, hf_datasets_cache, tmp_path):
    """--batch_size auto (HFLM's probe) and --use_cache on loglikelihood and generation tasks; every logged
    sample carries its per-request pruning record; no task-override warnings."""
    args = [
        "--model",
        "sdtp",
        "--model_args",
        f"pretrained={tiny_hf_dir},pruner=random,layers=1:3,min_prompt_tokens=0,dtype=float32",
        "--tasks",
        f"copa,{GEN_TASK}",
        "--limit",
        "3",
        "--gen_kwargs",
        "max_gen_toks=6",
        "--batch_size",
        "auto",
        "--max_batch_size",  # the probe's start: 64 rows x 512 tokens x 151k-token logits exhaust a CPU's RAM
        "4",
        "--use_cache",
        str(tmp_path / "cache" / "db"),
        "--log_samples",
    ]
    first = run_lm_eval_raw([*args, "--output_path", str(tmp_path / "one")], hf_datasets_cache)
    assert "overrides existing task" not in first.stderr
    for task, n_requests in (("copa", 2), (GEN_TASK, 1)):
        rows = samples(tmp_path / "one", task)
        assert len(rows) == 3
        for row in rows:
            assert len(row["sdtp"]) == n_requests
            for record in row["sdtp"]:
                # copa's ~10-token prompts are all protected (first 4 + last 10%): nothing to prune there
                assert len(record["kept_per_stage"]) == 2 and record["compression"] >= 1.0
                assert record["compression"] > 1.0 or task == "copa"
                assert record["prompt_tokens"] >= record["kept_per_stage"][0] >= record["kept_per_stage"][1]
    second = run_lm_eval_raw([*args, "--output_path", str(tmp_path / "two")], hf_datasets_cache)
    assert second.stderr.count("Requests remaining: 0") == 2, second.stderr[-3000:]  # both request types hit
    for task in ("copa", GEN_TASK):
        assert resps(tmp_path / "two", task) == resps(tmp_path / "one", task)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
@pytest.mark.shared_data
def test_data_parallel_gives_the_same_results(tiny_hf_dir, hf_datasets_cache, tmp_path):
    """Two CPU processes vs one, on a loglikelihood and a generation task, with an odd number of documents
    (lm-eval pads the shorter rank by repeating a request: it must not be prepared twice)."""
    args = [
        "--model",
        "sdtp",
        "--model_args",
        f"pretrained={tiny_hf_dir},pruner=random,layers=1:3,min_prompt_tokens=0,dtype=float32,truncation=middle",
        "--tasks",
        f"copa,{GEN_TASK}",
        "--limit",
        "5",
        "--gen_kwargs",
        "max_gen_toks=6",
        "--log_samples",
        "--output_path",
    ]
    run_lm_eval_raw([*args, str(tmp_path / "one")], hf_datasets_cache)
    two = run_lm_eval_raw(
        [*args, str(tmp_path / "two")],
        hf_datasets_cache,
        extra_env={"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
        # with ACCELERATE_USE_CPU; on accelerate 1.x "--cpu" alone starts one process
        launcher=[shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m", "lm_eval"],
    )
    assert "data parallel on CPU over 2 processes" in two.stderr
    one_res, two_res = results_json(tmp_path / "one"), results_json(tmp_path / "two")
    assert one_res["results"]["copa"]["acc,none"] == pytest.approx(two_res["results"]["copa"]["acc,none"])
    # 1 vs 2 threads per process: float sums in another order, so log-probs agree to rounding only
    assert loglik(samples(tmp_path / "two", "copa")) == pytest.approx(
        loglik(samples(tmp_path / "one", "copa")), abs=1e-4
    )
    # lm-eval appends the padding duplicate's response to the same request: compare the first response
    first = [[r[0] for r in row] for row in resps(tmp_path / "two", GEN_TASK)]
    assert first == [[r[0] for r in row] for row in resps(tmp_path / "one", GEN_TASK)]
    for task in ("copa", GEN_TASK):  # each prompt prepared once: same lengths and kept tokens in both runs
        records = [sorted(samples(tmp_path / run, task), key=lambda r: r["doc_id"]) for run in ("one", "two")]
        assert [r["sdtp"] for r in records[0]] == [r["sdtp"] for r in records[1]]
    assert two_res["config"]["sdtp"]["per_task"]["copa"]["requests"] >= 10  # both ranks' shares, gathered
    assert two_res["config"]["sdtp"]["per_task"][GEN_TASK]["requests"] >= 5


def test_prune_false_builds_no_engine_and_templated_longbench_prompts_are_refused(tiny_hf_dir):
    from sdtp_eval.model import SDTPLM

    dense = SDTPLM(pretrained=str(tiny_hf_dir), prune="false", dtype="float32")
    assert dense.engine is None and dense.pruner_module is None
    templated = dense.apply_chat_template([{"role": "user", "content": "Question: who?"}])
    with pytest.raises(ValueError, match="without --apply_chat_template"):
        dense._prepare_context(templated, "longbench_narrativeqa", 100)
    assert dense._prepare_context(templated, "copa", 100) == templated  # other tasks: untouched


def test_default_scorer_is_line16_random_is_loud_and_shipped_needs_a_matching_model(tiny_hf_dir, caplog):
    from sdtp_core.loading import load_pruner
    from sdtp_eval.model import SDTPLM

    lm = SDTPLM(pretrained=str(tiny_hf_dir), layers="1:3", dtype="float32")
    assert lm.pruner_spec == "line16" and "UNTRAINED" not in caplog.text
    lm = SDTPLM(pretrained=str(tiny_hf_dir), pruner="random", layers="1:3", dtype="float32")
    assert lm.pruner_spec == "random" and "UNTRAINED (random) scorers" in caplog.text
    with pytest.raises(ValueError, match="no shipped pruner fits"):
        load_pruner("shipped", lm.model)
    # a union of scorers, from an lm_eval --model_args string
    args = f"pretrained={tiny_hf_dir},pruner=attention+norm,layers=1:3,dtype=float32"
    lm = SDTPLM.create_from_arg_string(args, {"device": "cpu"})
    assert lm.model.config.hidden_size == 64
    assert lm.pruner_spec == "attention+norm" and type(lm.pruner_module).__name__ == "RankUnion"


def test_startup_hook_failures_warn_once_and_never_raise(caplog):
    from sdtp_eval import _startup

    def broken(module):
        raise AttributeError("TaskManager moved")

    _startup._warned = False
    _startup._safely(broken, None)
    _startup._safely(broken, None)
    warnings = [r for r in caplog.records if "could not register" in r.getMessage()]
    assert len(warnings) == 1 and "--include_path" in warnings[0].getMessage()


def test_hf_default_pretrained_leaves_an_explicit_one_alone(tiny_hf_dir):
    from lm_eval.models.huggingface import HFLM

    assert HFLM._sdtp_default_pretrained
    lm = HFLM(pretrained=str(tiny_hf_dir), dtype="float32", device="cpu")
    assert lm.model.config.hidden_size == 64


@pytest.mark.real_model
@pytest.mark.shared_data
def test_lm_eval_without_model_args_runs_longbench_on_the_embedded_model(hf_datasets_cache, tmp_path):
    """`lm_eval --tasks longbench_narrativeqa` (model hf, no pretrained); max_length keeps it cheap."""
    proc = run_lm_eval_raw(
        [
            "--tasks",
            "longbench_narrativeqa",
            "--limit",
            "1",
            "--model_args",
            "max_length=1024",
            "--gen_kwargs",
            "max_gen_toks=4",
            "--output_path",
            str(tmp_path / "out"),
        ],
        hf_datasets_cache,
    )
    assert "using sdtp's embedded Qwen2.5-Coder-0.5B-Instruct" in proc.stderr
    assert "overrides existing task" not in proc.stderr
    assert "longbench_narrativeqa" in results_json(tmp_path / "out")["results"]


def test_press_and_compress_args_are_checked(tiny_hf_dir):
    from sdtp_eval.model import SDTPLM

    with pytest.raises(ValueError, match="unknown press"):
        SDTPLM(pretrained=str(tiny_hf_dir), press="zip")
    with pytest.raises(ValueError, match="compress must be 'llmlingua'"):
        SDTPLM(pretrained=str(tiny_hf_dir), compress="gzip")
    with pytest.raises(ValueError, match="compress_rate"):
        SDTPLM(pretrained=str(tiny_hf_dir), compress="llmlingua", compress_rate=0)
    try:
        import kvpress  # noqa: F401
    except ImportError:  # the main environment: the peers extra is missing, and the error says how to get it
        with pytest.raises(ImportError, match="separate environment"):
            SDTPLM(pretrained=str(tiny_hf_dir), press="knorm")
    else:
        with pytest.raises(ValueError, match="press_ratio"):
            SDTPLM(pretrained=str(tiny_hf_dir), press="knorm", press_ratio=1.5)


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
        "pruned=sdtp:pruner=random,layers=1:3,keep_ratio=0.7,min_prompt_tokens=0",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    report = compare(argv)
    hf, dense, pruned = report["runs"]
    assert hf["scores"]["copa"]["acc,none"] == dense["scores"]["copa"]["acc,none"]
    assert "acc_stderr,none" in hf["scores"]["copa"]
    assert hf["n_samples"]["copa"] == 8 and hf["wall_ratio_to_first"] == 1.0
    # no --num-fewshot: nothing forced, copa's own default (0 shots) is recorded
    assert "--num_fewshot" not in hf["command"] and hf["n_shot"]["copa"] == 0
    for r in report["runs"]:
        assert 0 < r["load_seconds"] and 0 < r["evaluation_seconds"]
        assert r["load_seconds"] + r["evaluation_seconds"] < r["wall_seconds"]
    assert hf["evaluation_ratio_to_first"] == 1.0
    assert f"pretrained={tiny_hf_dir}" in hf["model_args"] and "dtype=float32" in dense["model_args"]
    assert pruned["sdtp"]["per_task"]["copa"]["mean_compression"] > 1.0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["hf", "dense", "pruned"]
    table = out.with_suffix(".md").read_text()
    assert "| copa | acc | none | 0 | 8 |" in table and "wall / hf" in table and "evaluation / hf" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not list((tmp_path / "results").glob("*runs*")), "lm-eval samples must not land next to the results"


def test_compare_rejects_a_malformed_run():
    from sdtp_eval.compare import Run

    with pytest.raises(ValueError, match="NAME=MODEL"):
        Run.parse("sdtp")
    assert Run.parse("dense=sdtp:prune=false,keep_ratio=1.0") == Run("dense", "sdtp", "prune=false,keep_ratio=1.0")


def test_every_prompt_is_pruned_by_default_and_min_prompt_tokens_keeps_short_ones_dense(tiny_hf_dir, caplog):
    """By default every prompt is pruned, as in the paper; ``min_prompt_tokens=N`` runs shorter prompts exactly as
    dense and prunes the rest, and a task whose requests were all left unpruned says so in a warning."""
    from lm_eval.api.instance import Instance

    from sdtp_core.loading import DEFAULT_MIN_PROMPT_TOKENS
    from sdtp_eval.model import SDTPLM

    words = "the cat sat on a mat and looked at the dog near the door".split()
    short = " ".join(words * 2)  # 26 words
    long = " ".join(words * 40)  # 520 words
    requests = [
        Instance("loglikelihood", {}, (ctx, " and then slept"), idx, (task, doc, 1))
        for idx, (task, doc, ctx) in enumerate([("copa", 0, short), ("boolq", 1, long)])
    ]
    dense = SDTPLM(pretrained=str(tiny_hf_dir), prune="false", dtype="float32").loglikelihood(requests)
    default_lm = SDTPLM(pretrained=str(tiny_hf_dir), pruner="random", layers="1:3", dtype="float32")
    assert DEFAULT_MIN_PROMPT_TOKENS == 0 and default_lm.engine.min_prompt_tokens == 0
    default = default_lm.loglikelihood(requests)
    policy_lm = SDTPLM(
        pretrained=str(tiny_hf_dir), pruner="random", layers="1:3", min_prompt_tokens=256, dtype="float32"
    )
    policy = policy_lm.loglikelihood(requests)
    assert default[0][0] != pytest.approx(dense[0][0], abs=1e-3)  # default: the short prompt is pruned too
    assert policy[0][0] == pytest.approx(dense[0][0], abs=1e-4)  # policy: short runs dense
    assert policy[1][0] != pytest.approx(dense[1][0], abs=1e-3)  # ... and long is pruned
    assert policy[1][0] == pytest.approx(default[1][0], abs=1e-4)

    with caplog.at_level("WARNING", logger="lm_eval.sdtp"):
        info = policy_lm.get_model_info()["sdtp"]["per_task"]
    assert info["copa"]["mean_compression"] == 1.0 and info["boolq"]["mean_compression"] > 1.0
    warned = [r.getMessage() for r in caplog.records if "nothing was pruned" in r.getMessage()]
    assert len(warned) == 1 and "for copa (1 requests" in warned[0] and "min_prompt_tokens=256" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm_eval.sdtp"):
        default_lm.get_model_info()
    assert not [r for r in caplog.records if "nothing was pruned" in r.getMessage()]


def test_dense_loglikelihood_runs_the_lm_head_on_continuation_slots_only(tiny_hf_dir):
    """prune=false: the LM head sees only the continuation slots of the batch, and the log-likelihoods equal
    a full forward computed by hand (every slot through the head)."""
    from lm_eval.api.instance import Instance

    from sdtp_eval.model import SDTPLM

    pairs = [("the cat sat on a mat and looked at the dog near the door", " and slept"), ("a dog ran", " home")]
    requests = [Instance("loglikelihood", {}, pair, i, ("copa", i, 1)) for i, pair in enumerate(pairs)]
    lm = SDTPLM(pretrained=str(tiny_hf_dir), prune="false", dtype="float32", batch_size=2)
    head_slots = []
    hook = lm.model.lm_head.register_forward_hook(lambda module, args, out: head_slots.append(args[0].shape[1]))
    try:
        got = lm.loglikelihood(requests)
    finally:
        hook.remove()
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ctx_ids, whole = lm.tok_encode(ctx), lm.tok_encode(ctx + cont)
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
        cont_ids = whole[len(ctx_ids) :]
        expected = sum(logprobs[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids))
        assert ll == pytest.approx(expected, abs=1e-4)
    longest = max(len(lm.tok_encode(c + x)) - 1 for c, x in pairs)
    assert len(head_slots) == 1 and head_slots[0] < longest  # one batch; far fewer slots than its width
