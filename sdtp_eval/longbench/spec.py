"""Static description of LongBench v1: datasets, categories, metrics and the official per-task choices.

Everything here mirrors the official THUDM/LongBench ``pred.py`` / ``eval.py`` (v1). It is pure Python with no
third-party imports, so the ``sdtp`` model can consult it cheaply for every request.
"""

from __future__ import annotations

from dataclasses import dataclass

HUB_DATASET = "Xnhyacinth/LongBench"
"""Hub repository lm-eval 0.4.13's own longbench tasks load (parquet; THUDM/LongBench needs a loading script)."""

TASK_PREFIX = "longbench_"
E_SUFFIX = "_e"


@dataclass(frozen=True)
class DatasetSpec:
    """One LongBench v1 dataset.

    Attributes:
        name: official dataset name (key of ``dataset2prompt.json``), e.g. ``"repobench-p"``.
        language: ``"en"`` or ``"zh"`` (the language of the task, as grouped in the paper).
        category: one of :data:`CATEGORIES`.
        metric: name of the official metric (a key of ``sdtp_eval.longbench.metrics.METRICS``).
        has_e: whether LongBench-E has a ``<name>_e`` variant.
    """

    name: str
    language: str
    category: str
    metric: str
    has_e: bool


CATEGORIES: dict[str, str] = {
    "single": "Single-Document QA",
    "multi": "Multi-Document QA",
    "summarization": "Summarization",
    "fewshot": "Few-shot Learning",
    "synthetic": "Synthetic Tasks",
    "code": "Code Completion",
}
"""Category key (used in group names ``longbench_<key>``) -> the paper's category title."""

_SPECS = (
    DatasetSpec("narrativeqa", "en", "single", "qa_f1_score", False),
    DatasetSpec("qasper", "en", "single", "qa_f1_score", True),
    DatasetSpec("multifieldqa_en", "en", "single", "qa_f1_score", True),
    DatasetSpec("multifieldqa_zh", "zh", "single", "qa_f1_zh_score", False),
    DatasetSpec("hotpotqa", "en", "multi", "qa_f1_score", True),
    DatasetSpec("2wikimqa", "en", "multi", "qa_f1_score", True),
    DatasetSpec("musique", "en", "multi", "qa_f1_score", False),
    DatasetSpec("dureader", "zh", "multi", "rouge_zh_score", False),
    DatasetSpec("gov_report", "en", "summarization", "rouge_score", True),
    DatasetSpec("qmsum", "en", "summarization", "rouge_score", False),
    DatasetSpec("multi_news", "en", "summarization", "rouge_score", True),
    DatasetSpec("vcsum", "zh", "summarization", "rouge_zh_score", False),
    DatasetSpec("trec", "en", "fewshot", "classification_score", True),
    DatasetSpec("triviaqa", "en", "fewshot", "qa_f1_score", True),
    DatasetSpec("samsum", "en", "fewshot", "rouge_score", True),
    DatasetSpec("lsht", "zh", "fewshot", "classification_score", False),
    DatasetSpec("passage_count", "en", "synthetic", "count_score", True),
    DatasetSpec("passage_retrieval_en", "en", "synthetic", "retrieval_score", True),
    DatasetSpec("passage_retrieval_zh", "zh", "synthetic", "retrieval_zh_score", False),
    DatasetSpec("lcc", "en", "code", "code_sim_score", True),
    DatasetSpec("repobench-p", "en", "code", "code_sim_score", True),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
"""All 21 LongBench v1 datasets, in the official order of ``pred.py``."""

E_DATASETS: tuple[str, ...] = tuple(spec.name for spec in _SPECS if spec.has_e)
"""The 13 datasets with a LongBench-E variant (official ``pred.py --e`` list)."""

NO_CHAT_TEMPLATE: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
"""Datasets whose prompt official ``pred.py`` sends *without* the chat template (few-shot and code)."""

FIRST_LINE_ONLY: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Datasets whose prediction official ``eval.py`` cuts to its first line before scoring."""

PAPER14: tuple[str, ...] = tuple(
    spec.name for spec in _SPECS if spec.language == "en" and spec.name not in {"passage_count", "passage_retrieval_en"}
)
"""The 14 English datasets whose mean is the usual headline number (English minus the two synthetic tasks)."""

LENGTH_BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")
"""LongBench-E length buckets of official ``eval.py`` ``scorer_e`` (by the ``length`` field)."""


def task_name(dataset: str, e: bool = False) -> str:
    """lm-eval task name of an official dataset name: ``longbench_<dataset>`` or ``longbench_<dataset>_e``."""
    if dataset not in DATASETS or (e and not DATASETS[dataset].has_e):
        raise ValueError(f"not a LongBench{'-E' if e else ''} dataset: {dataset!r}")
    return f"{TASK_PREFIX}{dataset}{E_SUFFIX if e else ''}"


def parse_task_name(name: str) -> tuple[str, bool] | None:
    """``(dataset, is_e)`` of a LongBench lm-eval task name (``longbench_trec_e`` -> ``("trec", True)``), else None.

    Also accepts official dataset names themselves (``"trec"``, ``"trec_e"``), as found in the data's
    ``dataset`` field.
    """
    base = name[len(TASK_PREFIX) :] if name.startswith(TASK_PREFIX) else name
    if base in DATASETS:
        return base, False
    if base.endswith(E_SUFFIX) and base[: -len(E_SUFFIX)] in E_DATASETS:
        return base[: -len(E_SUFFIX)], True
    return None


def is_longbench_task(name: str) -> bool:
    """Whether ``name`` is one of this package's LongBench / LongBench-E lm-eval task names."""
    return name.startswith(TASK_PREFIX) and parse_task_name(name) is not None


_MISSING = object()


def uses_chat_template(task_name: str, default: object = _MISSING) -> bool:
    """Whether official ``pred.py`` wraps this task's prompt in the model's chat template.

    ``task_name`` is lm-eval's task name (``longbench_trec``, ``longbench_trec_e``, ...). Official pred.py
    uses the chat template for every dataset except trec, triviaqa, samsum, lsht, lcc and repobench-p.
    For a name that is not a LongBench task, returns ``default`` if given, else raises ``ValueError``.
    """
    parsed = parse_task_name(task_name) if task_name.startswith(TASK_PREFIX) else None
    if parsed is None:
        if default is _MISSING:
            raise ValueError(f"not a LongBench task: {task_name!r}")
        return bool(default)
    return parsed[0] not in NO_CHAT_TEMPLATE


def length_bucket(length: int) -> str:
    """LongBench-E bucket of an example's ``length`` field: ``<4000`` -> 0-4k, ``<8000`` -> 4-8k, else 8k+."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"
