"""lm-eval glue for the LongBench tasks: data loading, per-example scoring and score aggregation.

The task YAMLs in ``tasks/longbench/`` reach these functions through ``tasks/longbench/longbench_hooks.py``
(lm-eval's ``!function`` only loads python files next to the YAMLs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sdtp_eval.longbench.spec import HUB_DATASET, length_bucket, parse_task_name
from sdtp_eval.paths import longbench_file

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (LF or CRLF line endings, blank lines ignored)."""
    rows = []
    for line in path.read_bytes().split(b"\n"):
        line = line.strip(b"\r\n\t ")
        if line:
            rows.append(json.loads(line.decode("utf-8")))
    return rows


def offline_setting() -> str | None:
    """The offline environment variable that is switched on (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def _normalise(row: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Official field names for a row: the question is ``input`` (the Hub copy may call it ``question``)."""
    row = dict(row)
    if "input" not in row and "question" in row:
        row["input"] = row.pop("question")
    row["dataset"] = dataset
    return row


def load_rows(dataset: str) -> list[dict[str, Any]]:
    """Official rows of a LongBench dataset (``"trec"``) or LongBench-E dataset (``"trec_e"``).

    Uses the local JSONL of :func:`sdtp_eval.paths.longbench_file` when it exists, else downloads
    ``Xnhyacinth/LongBench`` (config ``dataset``, split ``test``) from the Hugging Face Hub. When the Hub is
    switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) and the file is absent, raises
    ``FileNotFoundError`` naming the file and how to provide it.
    """
    if parse_task_name(dataset) is None:
        raise ValueError(f"not a LongBench dataset: {dataset!r}")
    path = longbench_file(dataset)
    if path.is_file():
        rows = read_jsonl(path)
    else:
        setting = offline_setting()
        if setting is not None:
            raise FileNotFoundError(
                f"LongBench data {path} is missing and {setting} forbids downloading {HUB_DATASET}. Install the "
                "official JSONL files with `python -m sdtp_eval.data install --from DIR` (DIR/longbench/*.jsonl, "
                "DIR/longbench_e/*_e.jsonl), or set SDTP_DATA_HOME to a directory holding "
                f"{path.parent.name}/{path.name}."
            )
        import datasets

        rows = list(datasets.load_dataset(HUB_DATASET, dataset, split="test"))
    return [_normalise(row, dataset) for row in rows]


def load_dataset(longbench_dataset: str, **_: Any):
    """lm-eval ``custom_dataset`` hook: ``DatasetDict({"test": ...})`` of one LongBench dataset.

    ``longbench_dataset`` comes from the task's ``dataset_kwargs``; lm-eval also passes the task metadata
    (and the model arguments), which are ignored.
    """
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_rows(longbench_dataset))})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Per-example metrics: ``score`` (official score in [0, 1]) and, for LongBench-E, ``score_<bucket>``.

    Only the example's own length bucket is reported, so each bucket's mean runs over its own examples
    (as official ``scorer_e`` does); a bucket without examples is absent from the results.
    """
    from sdtp_eval.longbench.metrics import score_example

    parsed = parse_task_name(doc["dataset"])
    if parsed is None:
        raise ValueError(f"not a LongBench dataset: {doc['dataset']!r}")
    dataset, is_e = parsed
    score = score_example(dataset, results[0], doc["answers"], doc.get("all_classes"))
    out = {"score": score}
    if is_e:
        out[f"score_{length_bucket(int(doc['length']))}"] = score
    return out


def percent_mean(items: list[float]) -> float:
    """Task score as official ``eval.py`` reports it: ``round(100 * mean, 2)`` (NaN for no items)."""
    if not items:
        return math.nan
    return round(100 * sum(items) / len(items), 2)
