"""MathQA from the original ``dev.json``/``test.json`` to ``regisss/math_qa``.

Hub features (all strings, in this order): ``Problem``, ``Rationale``, ``options``, ``correct``,
``annotated_formula``, ``linear_formula``, ``category``. ``dev.json`` is the Hub ``validation`` split.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Features, Value

from sdtp_eval.datasets.common import DataError, HubTarget, Row, SplitSource, pick, read_json_list

FIELDS = ["Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category"]
DEV, TEST = "mathqa/dev.json", "mathqa/test.json"


def _reader(name: str):
    def read(root: Path) -> list[Row]:
        path = root / name
        rows = []
        for number, raw in enumerate(read_json_list(path), start=1):
            row = pick(path, number, raw, FIELDS)
            if row["correct"] not in ("a", "b", "c", "d", "e"):
                raise DataError(f"{path}: record {number} has correct={row['correct']!r}, expected a-e")
            rows.append(row)
        return rows

    read.__doc__ = f"``{name}`` as Hub rows."
    return read


TARGETS = [
    HubTarget(
        key="mathqa",
        task="mathqa",
        repo_id="regisss/math_qa",
        config_name="default",
        features=Features({name: Value("string") for name in FIELDS}),
        splits={
            "validation": SplitSource((DEV,), _reader(DEV), 4475),
            "test": SplitSource((TEST,), _reader(TEST), 2985),
        },
        eval_split="test",
        standin_from="validation",
        absent={"train": "the MathQA training split (29,837 rows) is not in the local release"},
    )
]
