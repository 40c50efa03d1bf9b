"""LongBench tasks end to end on the embedded Qwen2.5-Coder-0.5B-Instruct, offline, through the real ``lm_eval``.

Kept cheap for CI: prompts are middle-truncated to 1536 tokens and generation is capped at 48 tokens.
"""

from __future__ import annotations

import pytest
from test_lm_eval_model import run_lm_eval, samples

pytestmark = [pytest.mark.real_model, pytest.mark.shared_data]

CHEAP = ["--model_args", "truncation=middle,max_length=1536", "--gen_kwargs", "max_gen_toks=48", "--limit", "2"]


def _check(data: dict, out, task: str) -> list[dict]:
    score = data["results"][task]["score,none"]
    assert 0.0 <= score <= 100.0
    report = data["config"]["sdtp"]["per_task"][task]
    assert report["requests"] == 2 and report["mean_compression"] > 1.0
    assert report["mean_prompt_tokens"] <= 1536 - 48
    rows = samples(out, task)
    assert len(rows) == 2 and all(r["resps"][0][0].strip() for r in rows), "empty generations"
    return rows


def test_multi_news_summaries_score_with_rouge(hf_datasets_cache, tmp_path):
    out = tmp_path / "multi_news"
    data = run_lm_eval(["--model", "sdtp", "--tasks", "longbench_multi_news", *CHEAP], hf_datasets_cache, out)
    _check(data, out, "longbench_multi_news")
    # A real summary of a news cluster shares words with the reference one.
    assert data["results"]["longbench_multi_news"]["score,none"] > 0.0


def test_qasper_answers_score_with_qa_f1(hf_datasets_cache, tmp_path):
    out = tmp_path / "qasper"
    data = run_lm_eval(["--model", "sdtp", "--tasks", "longbench_qasper", *CHEAP], hf_datasets_cache, out)
    _check(data, out, "longbench_qasper")
