"""WinoGrande v1.1 (``winogrande_xl``) from the release jsonl files to ``allenai/winogrande``.

Hub features: ``sentence``, ``option1``, ``option2`` and ``answer`` -- all strings, ``answer`` being ``"1"`` or
``"2"``. The dev file's answers are cross-checked against ``dev-labels.lst``; the release's ``qID`` is dropped
because the Hub config has no such column.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Features, Value

from sdtp_eval.datasets.common import DataError, HubTarget, Row, SplitSource, pick, read_jsonl, read_label_lines

DEV, DEV_LABELS, TRAIN = "winogrande/dev.jsonl", "winogrande/dev-labels.lst", "winogrande/train_xl.jsonl"
FIELDS = ["sentence", "option1", "option2", "answer"]


def _rows(path: Path) -> list[Row]:
    rows = []
    for number, raw in enumerate(read_jsonl(path), start=1):
        row = pick(path, number, raw, FIELDS)
        if row["answer"] not in ("1", "2"):
            raise DataError(f"{path}: record {number} has answer {row['answer']!r}, expected '1' or '2'")
        rows.append(row)
    return rows


def read_train(root: Path) -> list[Row]:
    """``train_xl.jsonl`` as Hub rows."""
    return _rows(root / TRAIN)


def read_validation(root: Path) -> list[Row]:
    """``dev.jsonl`` as Hub rows, after checking its answers against ``dev-labels.lst``."""
    path, labels_path = root / DEV, root / DEV_LABELS
    rows, labels = _rows(path), read_label_lines(labels_path)
    if [row["answer"] for row in rows] != labels:
        raise DataError(f"{path}: answers disagree with {labels_path} (or the row counts differ)")
    return rows


TARGETS = [
    HubTarget(
        key="winogrande",
        task="winogrande",
        repo_id="allenai/winogrande",
        config_name="winogrande_xl",
        features=Features({name: Value("string") for name in FIELDS}),
        splits={
            "train": SplitSource((TRAIN,), read_train, 40398),
            "validation": SplitSource((DEV, DEV_LABELS), read_validation, 1267),
        },
        eval_split="validation",
        standin_from="validation",
        absent={"test": "the WinoGrande test answers are not public; lm-eval does not use the test split"},
    )
]
