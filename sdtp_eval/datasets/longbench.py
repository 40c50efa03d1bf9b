"""LongBench / LongBench-E files: copied byte for byte to :func:`sdtp_eval.paths.longbench_file`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdtp_eval.datasets.common import DataError
from sdtp_eval.paths import longbench_file


@dataclass(frozen=True)
class LongBenchCopy:
    """One release file and where sdtp reads it from."""

    dataset: str
    source: Path
    destination: Path

    def unchanged(self) -> bool:
        """Whether the destination already holds exactly the source bytes."""
        return self.destination.is_file() and sha256(self.destination) == sha256(self.source)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan(root: Path) -> list[LongBenchCopy]:
    """``root/longbench/<name>.jsonl`` and ``root/longbench_e/<name>_e.jsonl``, sorted by dataset name."""
    sources = sorted((root / "longbench").glob("*.jsonl")) + sorted((root / "longbench_e").glob("*_e.jsonl"))
    return [LongBenchCopy(path.stem, path, longbench_file(path.stem)) for path in sources]


def validate(path: Path) -> int:
    """Check that every non-blank line of a LongBench file is a JSON object; return the number of rows."""
    rows = 0
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise DataError(f"{path}: line {number} is not valid JSON ({error})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {number} is not a JSON object")
                rows += 1
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    return rows


def install(copy: LongBenchCopy) -> int:
    """Validate and copy one file atomically (temporary file + rename); return its row count."""
    rows = validate(copy.source)
    copy.destination.parent.mkdir(parents=True, exist_ok=True)
    temp = copy.destination.with_name(f".{copy.destination.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(copy.source, temp)
        os.replace(temp, copy.destination)
    finally:
        temp.unlink(missing_ok=True)
    return rows
