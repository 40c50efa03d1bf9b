"""LongBench answer log-likelihood: how well the model still predicts the gold answer after a long prompt.

Each ``longbench_nll_<dataset>`` task is a ``loglikelihood`` task. The context is the official LongBench prompt of
the dataset (the ``doc_to_text`` of this package's ``tasks/longbench/<dataset>.yaml``, filled with the row's
``context`` and ``input``), middle-truncated to a token budget the way official ``pred.py`` does (first
``budget // 2`` tokens + last ``budget - budget // 2``, :func:`sdtp_eval.model.middle_truncate`). The
continuation is ``" " + answers[0]`` (``answers[0]`` alone for the Chinese datasets, whose prompts end in a
full-width colon and whose text has no spaces). No chat template is applied (the prompts end in ``Answer:``,
``Summary:`` ...).

Metrics per document: ``nll_per_token`` = ``-loglikelihood / answer_tokens`` (mean negative log-likelihood per
answer token, lower is better), ``loglikelihood`` (lm-eval's sum over the answer tokens) and ``greedy`` (lm-eval's
"every answer token is the argmax"). ``answer_tokens`` is counted as lm-eval's HF models split a request: tokens of
``context + continuation`` minus tokens of ``context``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sdtp_eval.retention import load_tokenizer, tokenizer_name

DATASETS: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_zh",
    "multi_news",
    "qasper_e",
    "multifieldqa_en_e",
    "hotpotqa_e",
    "2wikimqa_e",
    "gov_report_e",
    "multi_news_e",
)
"""QA and summarisation datasets (LongBench and LongBench-E) with a ``longbench_nll_<name>`` task."""

BUDGET = 2048
"""Default prompt budget in tokens (``nll_budget`` in the task metadata; ``--metadata`` overrides it)."""

CHINESE: frozenset[str] = frozenset({"multifieldqa_zh"})
"""Datasets whose answer follows the prompt without a space."""

_FIELD = re.compile(r"\{\{(context|input)\}\}")


def task_name(dataset: str) -> str:
    """lm-eval task name of a dataset: ``longbench_nll_<dataset>``."""
    return f"longbench_nll_{dataset}"


def official_template(dataset: str) -> str:
    """The Jinja ``doc_to_text`` of ``tasks/longbench/<base dataset>.yaml`` (the official prompt)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from sdtp_eval import tasks_dir
    from sdtp_eval.longbench.spec import parse_task_name

    parsed = parse_task_name(dataset)
    if parsed is None:
        raise ValueError(f"not a LongBench dataset: {dataset!r}")
    path = Path(tasks_dir()) / "longbench" / f"{parsed[0]}.yaml"
    return load_yaml(path, resolve_func=False, recursive=False)["doc_to_text"]


def fill(template: str, row: dict[str, Any]) -> str:
    """Render ``{{context}}`` / ``{{input}}`` of an official prompt template in one pass."""
    return _FIELD.sub(lambda m: str(row[m.group(1)]), template)


def truncate(tokenizer: Any, prompt: str, budget: int) -> tuple[str, int]:
    """Official middle truncation of a prompt to ``budget`` tokens; returns (prompt, its token count before)."""
    from sdtp_eval.model import middle_truncate

    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    if len(tokens) <= budget:
        return prompt, len(tokens)
    return tokenizer.decode(middle_truncate(tokens, budget), skip_special_tokens=True), len(tokens)


def continuation_tokens(tokenizer: Any, context: str, continuation: str) -> int:
    """Tokens lm-eval's HF models score for ``continuation`` after ``context`` (their ``_encode_pair``)."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    return len(whole) - len(tokenizer.encode(context, add_special_tokens=False))


def build_docs(tokenizer: Any, dataset: str, rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Documents of one dataset: truncated ``prompt``, ``answer`` (first gold answer), the scored
    ``continuation`` and its token count ``answer_tokens``. Rows without an answer are skipped."""
    template = official_template(dataset)
    docs = []
    for index, row in enumerate(rows):
        answers = row.get("answers") or []
        if not answers or not str(answers[0]).strip():
            continue
        prompt, full_tokens = truncate(tokenizer, fill(template, row), budget)
        answer = str(answers[0])
        continuation = answer if dataset in CHINESE else " " + answer
        docs.append(
            {
                "id": str(row.get("_id", index)),
                "dataset": dataset,
                "prompt": prompt,
                "answer": answer,
                "continuation": continuation,
                "answer_tokens": continuation_tokens(tokenizer, prompt, continuation),
                "prompt_tokens_full": full_tokens,
                "budget": budget,
                "length": int(row.get("length", 0) or 0),
            }
        )
    return docs


def load_dataset(longbench_nll_dataset: str, nll_budget: int = BUDGET, **metadata: Any):
    """lm-eval ``custom_dataset`` hook: ``DatasetDict({"test": ...})`` of one dataset's NLL documents.

    The rows come from the project's LongBench loader (:func:`sdtp_eval.longbench.tasks.load_rows`: local
    official JSONL, else the Hub copy unless offline). The tokenizer is ``tokenizer``/``pretrained`` of the
    metadata (lm-eval merges ``--model_args`` into it), else the embedded model's.
    """
    import datasets

    from sdtp_eval.longbench.tasks import load_rows

    tokenizer = load_tokenizer(tokenizer_name(metadata))
    docs = build_docs(tokenizer, longbench_nll_dataset, load_rows(longbench_nll_dataset), int(nll_budget))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """``nll_per_token`` (= -loglikelihood / answer_tokens), ``loglikelihood`` and ``greedy`` of one document."""
    loglikelihood, greedy = results[0]
    return {
        "nll_per_token": -float(loglikelihood) / int(doc["answer_tokens"]),
        "loglikelihood": float(loglikelihood),
        "greedy": float(bool(greedy)),
    }
