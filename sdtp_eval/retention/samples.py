"""lm-eval's logged samples (``--log_samples``) as the report commands read them: ``LABEL=PATH`` sources, and
the newest samples file of each task below an output directory."""

from __future__ import annotations

from pathlib import Path

SAMPLES_GLOB = "samples_*.jsonl"


def parse_source(value: str) -> tuple[str, Path]:
    """``LABEL=PATH`` or ``PATH`` -> (label, path); the default label is the path's name."""
    label, sep, path = value.partition("=")
    if sep and label and not Path(value).exists():
        return label, Path(path)
    return Path(value).name or value, Path(value)


def sample_files(path: Path, pattern: str = SAMPLES_GLOB) -> list[Path]:
    """The samples JSONL files of a path: itself, or the newest file of each task below a directory."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or directory: {path}")
    newest: dict[str, Path] = {}
    for file in sorted(path.rglob(pattern)):  # names end in the run's timestamp: sorted = oldest first
        newest[task_of(file)] = file
    if not newest:
        raise FileNotFoundError(f"no {pattern} under {path} (run lm_eval with --log_samples)")
    return sorted(newest.values())


def task_of(samples_file: Path) -> str:
    """Task name of an lm-eval samples file ``samples_<task>_<timestamp>.jsonl``."""
    return samples_file.name[len("samples_") :].rsplit("_", 1)[0]
