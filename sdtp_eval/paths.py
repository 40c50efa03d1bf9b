"""Where sdtp keeps local copies of evaluation data (installed by ``python -m sdtp_eval.data install``)."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """Root of sdtp's local data: ``$SDTP_DATA_HOME``, else ``<sdtp cache>/data`` (``~/.cache/sdtp/data``)."""
    if os.environ.get("SDTP_DATA_HOME"):
        return Path(os.environ["SDTP_DATA_HOME"]).expanduser()
    from sdtp_core.embedded import cache_dir

    return cache_dir() / "data"


def longbench_file(dataset: str) -> Path:
    """Local official JSONL of a LongBench dataset (``<name>`` or ``<name>_e`` for LongBench-E)."""
    sub = "longbench_e" if dataset.endswith("_e") else "longbench"
    return data_home() / sub / f"{dataset}.jsonl"
