"""Retention tasks: offline RULER group, needle depth sweep, LongBench answer NLL, longbench_retention."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from collections import Counter

import pytest
from test_lm_eval_model import run_lm_eval, samples

from sdtp_eval import tasks_dir
from sdtp_eval.retention import longbench_nll, needle, ruler

TINY_ARGS = "pruner=random,layers=1:3,min_prompt_tokens=0,dtype=float32,max_length=4096"
NEW_TASKS = [
    "sdtp_ruler_offline",
    "sdtp_needle_depth",
    *(f"sdtp_needle_depth_{k}" for k in ("1k", "2k", "4k")),
    "longbench_nll",
    *(longbench_nll.task_name(d) for d in longbench_nll.DATASETS),
    "longbench_retention",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def _haystack(doc: dict) -> str:
    head, tail = needle.PROMPT.split("{haystack}")
    assert doc["input"].startswith(head) and doc["input"].endswith(tail)
    return doc["input"][len(head) : len(doc["input"]) - len(tail)]


# ------------------------------------------------------------------------------------------- needle data


def test_needle_documents_are_deterministic_per_seed(tokenizer):
    first = needle.documents(tokenizer, 1024, items=2, seed=7)
    assert first == needle.documents(tokenizer, 1024, items=2, seed=7)
    other = needle.documents(tokenizer, 1024, items=2, seed=8)
    assert [d["answer"] for d in first] != [d["answer"] for d in other]
    assert [d["input"] for d in first] != [d["input"] for d in other]


def test_every_length_depth_cell_has_its_items_within_the_token_length(tokenizer):
    docs = needle.documents(tokenizer, 1024)  # the task's defaults: 20 items per depth
    assert Counter(d["depth"] for d in docs) == {depth: 20 for depth in range(0, 101, 10)}
    assert [d["depth"] for d in docs[:11]] == list(needle.DEPTHS)  # --limit 11 covers every depth once
    for doc in docs:
        tokens = len(tokenizer(doc["input"], add_special_tokens=False)["input_ids"])
        assert tokens == doc["prompt_tokens"] and 1024 - 40 <= tokens <= 1024
        assert len(doc["answer"]) == 7 and doc["answer"].isdigit()
        assert doc["input"].count(needle.NEEDLE.format(number=doc["answer"])) == 1
    # Within an item only the needle moves: same number, same filler at every depth.
    item0 = [d for d in docs if d["item"] == 0]
    assert len({d["answer"] for d in item0}) == 1
    sentence = needle.NEEDLE.format(number=item0[0]["answer"])
    assert len({" ".join(_haystack(d).replace(sentence, " ").split()) for d in item0}) == 1


@pytest.mark.parametrize("length", [1024, 4096])
def test_needle_is_where_its_depth_says(tokenizer, length):
    for doc in needle.documents(tokenizer, length, items=2):
        haystack = _haystack(doc)
        sentence = needle.NEEDLE.format(number=doc["answer"])
        start = haystack.index(sentence)
        filler_chars = len(haystack) - len(sentence) - (1 if 0 < doc["depth"] < 100 else 0)
        char_fraction = start / filler_chars
        assert abs(char_fraction - doc["depth"] / 100) <= 0.02, (doc["id"], char_fraction)
        assert abs(doc["needle_char_fraction"] - char_fraction) <= 0.002
        before = len(tokenizer(haystack[:start], add_special_tokens=False)["input_ids"])
        total = len(tokenizer(haystack.replace(sentence, ""), add_special_tokens=False)["input_ids"])
        assert abs(before / total - doc["depth"] / 100) <= 0.03, (doc["id"], before / total)
    assert _haystack(doc).endswith(sentence)  # depth 100: right before the question


def test_needle_scoring_takes_the_first_number():
    doc = {"answer": "7364281", "depth": 30}
    assert needle.process_results(doc, [" 7364281.\n"]) == {"exact_match": 1.0, "exact_match_d030": 1.0}
    assert needle.process_results(doc, [" 736428 or 7364281"])["exact_match"] == 0.0
    assert needle.process_results(doc, [" seven million"])["exact_match"] == 0.0
    assert needle.process_results(doc, ["73642810"])["exact_match"] == 0.0


# ------------------------------------------------------------------------------------------- LongBench NLL


def _lm_eval_split(tokenizer, context: str, continuation: str) -> list[int]:
    """Continuation tokens exactly as lm-eval's HF models split a loglikelihood request."""
    from lm_eval.api.model import TemplateLM

    stub = types.SimpleNamespace(
        backend="causal", tok_encode=lambda text, **_: tokenizer.encode(text, add_special_tokens=False)
    )
    return TemplateLM._encode_pair(stub, context, continuation)[1]


def test_nll_per_token_on_a_made_up_document(tokenizer):
    row = {"context": "Alice owns a red bicycle.", "input": "What colour is the bicycle?", "answers": ["red"]}
    (doc,) = longbench_nll.build_docs(tokenizer, "qasper_e", [row], budget=2048)
    template = longbench_nll.official_template("qasper")
    expected = template.replace("{{context}}", row["context"]).replace("{{input}}", row["input"])
    assert doc["prompt"] == expected and doc["prompt"].endswith("Question: What colour is the bicycle?\n\nAnswer:")
    assert doc["continuation"] == " red" and doc["answer_tokens"] == 1  # " red" is one Qwen2 token
    # lm-eval's loglikelihood of the continuation is -3.0: NLL per token = 3.0 / 1.
    assert longbench_nll.process_results(doc, [(-3.0, True)]) == {
        "nll_per_token": 3.0,
        "loglikelihood": -3.0,
        "greedy": 1.0,
    }
    row["answers"] = ["forty-two bicycles, all of them red"]
    (doc,) = longbench_nll.build_docs(tokenizer, "qasper_e", [row], budget=2048)
    n = len(_lm_eval_split(tokenizer, doc["prompt"], doc["continuation"]))
    assert doc["answer_tokens"] == n > 5
    assert longbench_nll.process_results(doc, [(-2.5 * n, False)])["nll_per_token"] == pytest.approx(2.5)


def test_nll_prompt_is_middle_truncated_to_the_budget_and_chinese_has_no_space(tokenizer):
    row = {"context": " ".join(f"word{i}" for i in range(3000)), "input": "Which word comes last?", "answers": ["x"]}
    (doc,) = longbench_nll.build_docs(tokenizer, "qasper", [row], budget=512)
    tokens = tokenizer.encode(doc["prompt"], add_special_tokens=False)
    assert abs(len(tokens) - 512) <= 2 and doc["prompt_tokens_full"] > 3000
    assert doc["prompt"].startswith("You are given a scientific article") and doc["prompt"].endswith("Answer:")
    assert "word0 " in doc["prompt"] and "word2999" in doc["prompt"] and "word1500 " not in doc["prompt"]
    zh = {"context": "小明有一辆红色的自行车。", "input": "自行车是什么颜色？", "answers": ["红色"]}
    (doc,) = longbench_nll.build_docs(tokenizer, "multifieldqa_zh", [zh], budget=2048)
    assert doc["continuation"] == "红色"
    assert doc["answer_tokens"] == len(_lm_eval_split(tokenizer, doc["prompt"], "红色"))


def test_answer_tokens_follow_lm_evals_split_of_trailing_whitespace(tokenizer):
    for context, continuation in [("Answer:\n", " yes"), ("Summary: ", "A short one."), ("The cat", "s are here")]:
        expected = len(_lm_eval_split(tokenizer, context, continuation))
        assert longbench_nll.continuation_tokens(tokenizer, context, continuation) == expected
    # "The cats are here" is The| cats| are| here: lm-eval scores 2 tokens, not the 3 of "s are here" alone.
    assert longbench_nll.continuation_tokens(tokenizer, "The cat", "s are here") == 2


# ------------------------------------------------------------------------------------------- RULER, groups


def test_ruler_wrapper_defaults_to_the_embedded_tokenizer_and_1k_2k_4k(embedded_dir):
    kwargs = ruler.offline_kwargs({"version": 1.0})
    assert kwargs["tokenizer"] == str(embedded_dir) and kwargs["max_seq_lengths"] == [1024, 2048, 4096]
    kwargs = ruler.offline_kwargs({"pretrained": "/some/model", "max_seq_lengths": [8192]})
    assert kwargs["tokenizer"] == "/some/model" and kwargs["max_seq_lengths"] == [8192]
    assert ruler.offline_kwargs({"tokenizer": "tok", "pretrained": "/m"})["tokenizer"] == "tok"


def _yaml(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(tasks_dir() / "retention" / name, resolve_func=False, recursive=False)


def test_group_files_list_the_intended_tasks():
    from sdtp_eval.longbench.spec import CATEGORIES, DATASETS, parse_task_name

    offline = _yaml("sdtp_ruler_offline.yaml")["task"]
    assert [entry["task"] for entry in offline] == list(ruler.OFFLINE_TASKS)
    assert not set(ruler.OFFLINE_TASKS) & set(ruler.ONLINE_TASKS)
    assert _yaml("longbench_nll.yaml")["task"] == [longbench_nll.task_name(d) for d in longbench_nll.DATASETS]
    retention = _yaml("longbench_retention.yaml")["task"]
    assert len(retention) >= 6
    categories = {DATASETS[parse_task_name(name)[0]].category for name in retention}
    assert categories == set(CATEGORIES)


def test_new_tasks_are_registered_with_lm_eval():
    code = (
        "import json\nfrom lm_eval.tasks import TaskManager\n"
        f"names = {NEW_TASKS!r}\n"
        "tm = TaskManager()\nprint(json.dumps([n for n in names if n not in tm.all_tasks]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------------------------------- end to end


def test_needle_depth_task_end_to_end_on_the_tiny_model(tiny_hf_dir, tmp_path):
    out = tmp_path / "needle"
    args = ["--model", "sdtp", "--model_args", f"pretrained={tiny_hf_dir},{TINY_ARGS}"]
    data = run_lm_eval([*args, "--tasks", "sdtp_needle_depth_1k", "--limit", "2"], tmp_path, out)
    result = data["results"]["sdtp_needle_depth_1k"]
    assert 0.0 <= result["exact_match,none"] <= 1.0 and "exact_match_d000,none" in result
    rows = samples(out, "sdtp_needle_depth_1k")
    assert [(r["doc"]["length"], r["doc"]["depth"]) for r in rows] == [(1024, 0), (1024, 10)]
    for row in rows:
        assert row["exact_match"] == float(needle.first_number(row["filtered_resps"][0]) == row["doc"]["answer"])
    assert all(r["sdtp"][0]["prompt_tokens"] <= 1024 for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("wonderwords") is None, reason="RULER needs wonderwords (lm_eval[ruler])")
def test_ruler_offline_group_end_to_end_on_the_tiny_model(tiny_hf_dir, tmp_path):
    out = tmp_path / "ruler"
    args = ["--model", "sdtp", "--model_args", f"pretrained={tiny_hf_dir},{TINY_ARGS}"]
    meta = ["--metadata", json.dumps({"max_seq_lengths": [1024]})]
    data = run_lm_eval([*args, "--tasks", "sdtp_ruler_offline", *meta, "--limit", "2"], tmp_path, out)
    for task in ruler.OFFLINE_TASKS:
        assert 0.0 <= data["results"][task]["1024,none"] <= 1.0, task
        rows = samples(out, task)
        assert len(rows) == 2 and all(r["doc"]["max_length"] == 1024 for r in rows)
    assert "1024,none" in data["results"]["sdtp_ruler_offline"]
    assert "nltk_data" not in data["_stderr"] and "punkt" not in data["_stderr"]  # no download attempted


@pytest.mark.shared_data
def test_longbench_nll_and_retention_end_to_end_on_the_tiny_model(tiny_hf_dir, hf_datasets_cache, tmp_path):
    out = tmp_path / "nll"
    tasks = "longbench_nll_qasper,longbench_nll_multifieldqa_zh,longbench_retention"
    args = ["--model", "sdtp", "--model_args", f"pretrained={tiny_hf_dir},{TINY_ARGS},truncation=middle"]
    data = run_lm_eval(
        [*args, "--tasks", tasks, "--limit", "2", "--gen_kwargs", "max_gen_toks=4"], hf_datasets_cache, out
    )
    for task in ("longbench_nll_qasper", "longbench_nll_multifieldqa_zh"):
        assert data["results"][task]["nll_per_token,none"] > 0.0
        for row in samples(out, task):
            doc = row["doc"]
            prompt_tokens = len(longbench_nll.load_tokenizer(str(tiny_hf_dir)).encode(doc["prompt"]))
            assert prompt_tokens <= 2048 + 2 and doc["budget"] == 2048  # re-encoding a decoded cut may differ by 1-2
            if doc["prompt_tokens_full"] > 2048:
                assert prompt_tokens >= 2048 - 2
            loglikelihood = float(row["resps"][0][0][0])
            assert row["nll_per_token"] == pytest.approx(-loglikelihood / doc["answer_tokens"])
            assert row["loglikelihood"] == pytest.approx(loglikelihood)
    retention = _yaml("longbench_retention.yaml")["task"]
    assert all(0.0 <= data["results"][task]["score,none"] <= 100.0 for task in retention)
    assert "score,none" in data["results"]["longbench_retention"]


def test_long_prompt_documents_are_the_ones_the_default_policy_prunes(tiny_hf_dir, hf_datasets_cache, tmp_path):
    """The COPA documents listed for --min-tokens 15 are exactly those the sdtp model prunes at
    min_prompt_tokens=15 (its own per-request records), and lm_eval --samples runs just them."""
    from test_lm_eval_model import offline_env, run_lm_eval_raw

    listed = tmp_path / "long.json"
    subprocess.run(
        [sys.executable, "-m", "sdtp_eval.retention.long_prompts", "--tasks", "copa", "--min-tokens", "15",
         "--pretrained", str(tiny_hf_dir), "--out", str(listed)],
        env=offline_env(hf_datasets_cache), check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    docs = json.loads(listed.read_text())["copa"]
    assert 0 < len(docs) < 100
    policy = f"pretrained={tiny_hf_dir},pruner=random,layers=1:3,min_prompt_tokens=15,dtype=float32"
    run_lm_eval(["--model", "sdtp", "--model_args", policy, "--tasks", "copa"], hf_datasets_cache, tmp_path / "all")
    everything = {r["doc_id"]: r for r in samples(tmp_path / "all", "copa")}
    assert sorted(d for d, r in everything.items() if any(x["compression"] > 1 for x in r["sdtp"])) == docs
    out = tmp_path / "some"
    run_lm_eval_raw(["--model", "sdtp", "--model_args", policy, "--tasks", "copa", "--samples", str(listed),
                     "--log_samples", "--output_path", str(out)], hf_datasets_cache)  # fmt: skip
    some = samples(out, "copa")
    assert sorted(r["doc_id"] for r in some) == docs
    # each logged sample carries its own document's pruning records (lm-eval numbers a --samples run's
    # requests by position in the list, its logged samples by document index)
    assert all(r["sdtp"] == everything[r["doc_id"]]["sdtp"] for r in some)
