"""SuperGLUE (COPA, BoolQ, CB, WiC, WSC) from the original jsonl release to ``aps/super_glue``.

The Hub features are those of the ``super_glue`` loading script that ``aps/super_glue`` was exported from: the
text fields as strings, integer offsets and ``idx`` as int32 and ``label`` as a ``ClassLabel`` (COPA
``choice1``/``choice2``, CB ``entailment``/``contradiction``/``neutral``, the rest ``False``/``True``). The
``wsc.fixed`` config repairs span texts that are not substrings of the passage, exactly as that script does.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Features, Value

from sdtp_eval.datasets.common import DataError, HubTarget, Row, SplitSource, encode_label, pick, read_jsonl

REPO = "aps/super_glue"
BOOL_LABEL = ClassLabel(names=["False", "True"])
BOOL_CODES = {False: 0, True: 1}
NO_TEST = {"test": "the unlabelled SuperGLUE test split is not in the local release; lm-eval does not use it"}


def _features(fields: list[str], ints: list[str], label: ClassLabel) -> Features:
    columns: dict[str, Any] = {name: Value("int32" if name in ints else "string") for name in fields}
    columns["idx"] = Value("int32")
    columns["label"] = label
    return Features(columns)


def _convert(
    path_name: str, root: Path, *, fields: list[str], ints: list[str], codes: dict[Any, int], wsc: bool = False
) -> list[Row]:
    """Read ``root/path_name`` and return rows in the Hub field order with integer labels."""
    path = root / path_name
    rows = []
    for number, raw in enumerate(read_jsonl(path), start=1):
        if wsc:
            target = raw.get("target")
            if not isinstance(target, dict):
                raise DataError(f"{path}: record {number} lacks the 'target' object of the WSC release")
            raw = {**raw, **target}
        row = pick(path, number, raw, [*fields, "idx", "label"])
        for name in [*ints, "idx"]:
            if not isinstance(row[name], int) or isinstance(row[name], bool):
                raise DataError(f"{path}: record {number} field {name!r} is {row[name]!r}, expected an integer")
        if wsc:
            row = fix_wsc_spans(row)
        row["label"] = encode_label(path, number, row["label"], codes)
        rows.append(row)
    return rows


def fix_wsc_spans(row: Row) -> Row:
    """The ``wsc.fixed`` repair of the ``super_glue`` script: make span texts substrings of ``text``.

    Behaviour is kept identical to the script, including its quirks: the two "Kamenev ..." spans stay as they
    are, and for the "theyscold" span only ``span2_index`` is set to 10 (the script's text replacement has no
    effect because its result is discarded).
    """
    fixed = dict(row)
    for span in ("span1", "span2"):
        span_text, index = fixed[f"{span}_text"], fixed[f"{span}_index"]
        if span_text in fixed["text"] or span_text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in span_text:
            fixed["span2_index"] = 10
        first_word = fixed["text"].split()[index]
        head = span_text[0].lower() if first_word[0].islower() else span_text[0].upper()
        fixed[f"{span}_text"] = (head + span_text[1:]).rstrip(".").replace("\n", " ")
    return fixed


def _target(
    key: str,
    config: str,
    folder: str,
    fields: list[str],
    ints: list[str],
    label: ClassLabel,
    codes: dict[Any, int],
    counts: tuple[int, int],
    wsc: bool = False,
    absent_train: str | None = None,
) -> HubTarget:
    read = partial(_convert, fields=fields, ints=ints, codes=codes, wsc=wsc)
    train, validation = f"{folder}/train.jsonl", f"{folder}/val.jsonl"
    return HubTarget(
        key=key,
        task=key,
        repo_id=REPO,
        config_name=config,
        features=_features(fields, ints, label),
        splits={
            "train": SplitSource((train,), partial(read, train), counts[0]),
            "validation": SplitSource((validation,), partial(read, validation), counts[1]),
        },
        eval_split="validation",
        standin_from="validation",
        absent={**NO_TEST, "train": absent_train} if absent_train else NO_TEST,
    )


TARGETS = [
    _target(
        "copa",
        "copa",
        "copa",
        ["premise", "choice1", "choice2", "question"],
        [],
        ClassLabel(names=["choice1", "choice2"]),
        {0: 0, 1: 1},
        (400, 100),
    ),
    _target(
        "boolq",
        "boolq",
        "superglue/boolq",
        ["question", "passage"],
        [],
        BOOL_LABEL,
        BOOL_CODES,
        (9427, 3270),
        absent_train="the BoolQ training split (9,427 rows) is not in the local release",
    ),
    _target(
        "cb",
        "cb",
        "superglue/cb",
        ["premise", "hypothesis"],
        [],
        ClassLabel(names=["entailment", "contradiction", "neutral"]),
        {"entailment": 0, "contradiction": 1, "neutral": 2},
        (250, 56),
    ),
    _target(
        "wic",
        "wic",
        "superglue/wic",
        ["word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"],
        ["start1", "start2", "end1", "end2"],
        BOOL_LABEL,
        BOOL_CODES,
        (5428, 638),
    ),
    _target(
        "wsc",
        "wsc.fixed",
        "superglue/wsc",
        ["text", "span1_index", "span2_index", "span1_text", "span2_text"],
        ["span1_index", "span2_index"],
        BOOL_LABEL,
        BOOL_CODES,
        (554, 104),
        wsc=True,
    ),
]
