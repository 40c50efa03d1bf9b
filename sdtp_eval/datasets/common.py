"""Shared pieces of the offline-data converters: the target description and strict readers of the release files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

Row = dict[str, Any]


class DataError(Exception):
    """A source file is missing, unreadable or does not look like the original release (the message names it)."""


@dataclass(frozen=True)
class SplitSource:
    """Where one Hub split comes from in the local release, and how to convert it.

    ``files`` are paths relative to the release directory (``--from DIR``); ``read`` gets that directory and
    returns the rows already in the Hub encoding. ``expected_rows`` is the official size of the split: a file
    with another count is reported as corrupt or incomplete.
    """

    files: tuple[str, ...]
    read: Callable[[Path], list[Row]]
    expected_rows: int | None = None

    def missing(self, root: Path) -> list[Path]:
        """The source files of this split that do not exist under ``root``."""
        return [root / name for name in self.files if not (root / name).is_file()]


@dataclass(frozen=True)
class HubTarget:
    """One (Hub dataset id, config) that an upstream lm-eval task loads, rebuilt from the local release.

    ``splits`` maps Hub split names to their sources. When the local release has no training split (or its files
    are missing), ``train`` is materialised as a *stand-in*: a copy of ``standin_from``, because lm-eval 0.4.13
    builds every task's few-shot sampler from ``training_split`` at start-up and fails with a ``KeyError`` when the
    split does not exist (even for zero-shot runs). ``absent`` names Hub splits the release does not contain
    (they are never written; lm-eval's task does not read them).
    """

    key: str
    task: str
    repo_id: str
    config_name: str
    features: datasets.Features
    splits: Mapping[str, SplitSource]
    eval_split: str
    standin_from: str | None = None
    absent: Mapping[str, str] = field(default_factory=dict)

    def source_files(self) -> list[str]:
        """Every source file this target may read, in a stable order."""
        return sorted({name for source in self.splits.values() for name in source.files})


def read_jsonl(path: Path) -> list[Row]:
    """Read a JSON-lines file (blank lines ignored); errors name the file and line."""
    rows: list[Row] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    detail = f"{error.msg}, column {error.colno}"
                    raise DataError(f"{path}: line {number} is not valid JSON ({detail})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {number} is not a JSON object")
                rows.append(row)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    return rows


def read_json_list(path: Path) -> list[Row]:
    """Read a JSON file holding a list of objects (the original MathQA format)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def read_label_lines(path: Path) -> list[str]:
    """Read a one-label-per-line ``.lst`` file (blank lines ignored)."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from None


def pick(path: Path, number: int, row: Row, names: Iterable[str]) -> Row:
    """The fields ``names`` of ``row`` (record ``number`` of ``path``); a missing field is a :class:`DataError`."""
    missing = [name for name in names if name not in row]
    if missing:
        raise DataError(f"{path}: record {number} lacks field(s) {', '.join(missing)}")
    return {name: row[name] for name in names}


def encode_label(path: Path, number: int, value: Any, mapping: Mapping[Any, int]) -> int:
    """Map a release label to its Hub class index; an unknown value is a :class:`DataError`."""
    # bool is a subclass of int: look booleans up by identity of type so True never matches 1 by accident.
    for key, index in mapping.items():
        if type(key) is type(value) and key == value:
            return index
    raise DataError(f"{path}: record {number} has label {value!r}, expected one of {list(mapping)}")
