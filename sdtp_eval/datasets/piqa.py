"""PIQA from the original release (``valid.jsonl`` + ``valid-labels.lst``) to ``baber/piqa``.

Hub features: ``goal``, ``sol1``, ``sol2`` (strings) and ``label`` (``ClassLabel`` ``"0"``/``"1"``: the index of
the correct solution). The release keeps the labels in a separate file, one per line, in row order.
"""

from __future__ import annotations

from pathlib import Path

from datasets import ClassLabel, Features, Value

from sdtp_eval.datasets.common import (
    DataError,
    HubTarget,
    Row,
    SplitSource,
    encode_label,
    pick,
    read_jsonl,
    read_label_lines,
)

VALID, LABELS = "piqa/valid.jsonl", "piqa/valid-labels.lst"
TEXT = ["goal", "sol1", "sol2"]


def read_validation(root: Path) -> list[Row]:
    """Join ``valid.jsonl`` with ``valid-labels.lst`` (the counts must agree)."""
    path, labels_path = root / VALID, root / LABELS
    rows, labels = read_jsonl(path), read_label_lines(labels_path)
    if len(rows) != len(labels):
        raise DataError(f"{path} has {len(rows)} rows but {labels_path} has {len(labels)} labels")
    out = []
    for number, (raw, label) in enumerate(zip(rows, labels), start=1):
        row = pick(path, number, raw, TEXT)
        row["label"] = encode_label(labels_path, number, label, {"0": 0, "1": 1})
        out.append(row)
    return out


TARGETS = [
    HubTarget(
        key="piqa",
        task="piqa",
        repo_id="baber/piqa",
        config_name="default",
        features=Features({**{name: Value("string") for name in TEXT}, "label": ClassLabel(names=["0", "1"])}),
        splits={"validation": SplitSource((VALID, LABELS), read_validation, 1838)},
        eval_split="validation",
        standin_from="validation",
        absent={
            "train": "the PIQA training split (16,113 rows) is not in the local release",
            "test": "the PIQA test labels are not public; lm-eval does not use the test split",
        },
    )
]
