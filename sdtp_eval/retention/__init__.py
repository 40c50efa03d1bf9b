"""Long-context retention tasks for lm-eval: offline RULER, a needle depth sweep, LongBench answer NLL.

The task YAMLs live in ``tasks/retention/`` (installed as ``sdtp_eval/tasks/retention``); these modules hold
their data generators and metrics (``needle``, ``ruler``, ``longbench_nll``) and the report commands: ``paired``
(paired comparison of logged runs), ``long_prompts`` (the documents the ``min_prompt_tokens=256`` policy prunes)
and ``diagnose`` (where a pruned prefill loses the answer). See ``docs/retention.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

TOKENIZER_KEYS = ("tokenizer", "pretrained", "model")
"""Where a task's ``metadata`` can name the tokenizer, in order (RULER's own rule: lm-eval merges the
``--model_args`` into every task's metadata, so ``pretrained=...`` of the model is found here)."""


def tokenizer_name(metadata: dict[str, Any]) -> str:
    """Tokenizer a synthetic task sizes its data with: ``tokenizer``, else ``pretrained``, else ``model``
    from the task metadata; none of them (or ``embedded``) means the embedded model's converted directory."""
    from sdtp_core.embedded import resolve_pretrained

    for key in TOKENIZER_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return resolve_pretrained(value)
    return resolve_pretrained(None)


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained(name)``, cached (local directories load offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def write_report(out: Path, report: dict, markdown: str, plot: Callable[[dict, Path], None]) -> None:
    """A report command's outputs: ``OUT.json`` (the report), ``OUT.md`` (``markdown``), ``OUT.png``
    (``plot(report, path)``); the Markdown is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown)
    plot(report, out.with_suffix(".png"))
    print(markdown)
