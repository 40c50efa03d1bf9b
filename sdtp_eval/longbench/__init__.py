"""LongBench v1 / LongBench-E for lm-eval: official prompts, metrics and task groups.

Importing this package is cheap (no torch, lm_eval, jieba or datasets): the ``sdtp`` model calls
:func:`uses_chat_template` for every request.
"""

from sdtp_eval.longbench.spec import (
    CATEGORIES,
    DATASETS,
    E_DATASETS,
    LENGTH_BUCKETS,
    PAPER14,
    is_longbench_task,
    length_bucket,
    parse_task_name,
    task_name,
    uses_chat_template,
)

__all__ = [
    "CATEGORIES",
    "DATASETS",
    "E_DATASETS",
    "LENGTH_BUCKETS",
    "PAPER14",
    "is_longbench_task",
    "length_bucket",
    "parse_task_name",
    "task_name",
    "uses_chat_template",
]
