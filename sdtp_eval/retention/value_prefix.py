"""How much of a RULER needle's value a run reproduced, from lm-eval's logged samples.

Usage::

    python -m sdtp_eval.retention.value_prefix --samples late=runs/ruler2048/late_pooled --out OUT

RULER's ``string_match_all`` scores a needle 1 only when its whole value appears in the answer. That cannot
tell a model that picked a wrong needle from one that picked the right one and lost the value's later
tokens. For every gold value this reports the longest *prefix* of it that occurs in the answer
(case-insensitive, as RULER compares): a right first few characters with a short prefix means the right
needle was found and its tail was lost; no prefix means a wrong (or no) needle. Look-alike values share no
structure (random digits or UUIDs), so 2 matching leading characters of a 7-digit value happen by chance
with probability about 1/100 per number in the answer, and of a UUID about 1/256.

Each ``--samples`` value is ``LABEL=PATH``: an lm-eval ``--output_path`` directory (the newest
``samples_<task>_*.jsonl`` of each task; only tasks whose documents carry ``outputs``, RULER's gold values)
or one samples file; the needle tasks (``niah_*``) only, since the other RULER tasks' gold lists are words,
not values. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .heatmap import parse_source, sample_files, task_of

FOUND_CHARS = 2
"""Leading characters that must match for a value to count as "right needle found"."""


def matched_prefix(gold: str, answer: str) -> int:
    """Length of the longest prefix of ``gold`` that occurs in ``answer`` (case-insensitive)."""
    gold, answer = gold.lower(), answer.lower()
    lo, hi = 0, len(gold)
    while lo < hi:  # a prefix that occurs implies every shorter one does: binary search
        mid = (lo + hi + 1) // 2
        if gold[:mid] in answer:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _answer(row: dict[str, Any]) -> str:
    resp = row.get("filtered_resps") or row.get("resps") or [""]
    while isinstance(resp, list):
        resp = resp[0] if resp else ""
    return str(resp)


def task_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-value prefix statistics of one task's logged samples."""
    values = []
    for row in rows:
        answer = _answer(row)
        for gold in row["doc"]["outputs"]:
            gold = str(gold)
            values.append((matched_prefix(gold, answer), len(gold)))
    if not values:
        raise ValueError("no gold values in these samples")
    n = len(values)
    return {
        "values": n,
        "complete": sum(k == size for k, size in values) / n,
        "found": sum(k >= min(FOUND_CHARS, size) for k, size in values) / n,
        "mean_prefix_chars": sum(k for k, _ in values) / n,
        "mean_value_chars": sum(size for _, size in values) / n,
        "mean_prefix_fraction": sum(k / size for k, size in values) / n,
    }


def read_run(path: Path) -> dict[str, dict[str, Any]]:
    """Task -> :func:`task_summary` for every RULER needle task (``niah_*``) below ``path``."""
    out = {}
    for file in sample_files(path, "samples_niah_*.jsonl"):
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line.strip()]
        rows = [r for r in rows if isinstance(r.get("doc", {}).get("outputs"), list)]
        if rows:
            out[task_of(file)] = task_summary(rows)
    if not out:
        raise ValueError(f"no RULER needle samples (samples_niah_*.jsonl with 'outputs') under {path}")
    return out


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# RULER needle values: how much of each gold value the answer reproduced",
        "",
        f"```bash\n{report['command']}\n```",
        "",
        f"complete = whole value in the answer (RULER's score); found = its first {FOUND_CHARS} characters are;"
        " prefix = mean leading characters matched, of the mean value length.",
        "",
        "| run | task | values | complete | found | prefix chars |",
        "|---|---|---:|---:|---:|---|",
    ]
    for label, tasks in report["runs"].items():
        for task, s in tasks.items():
            lines.append(
                f"| {label} | {task} | {s['values']} | {s['complete']:.2f} | {s['found']:.2f} | "
                f"{s['mean_prefix_chars']:.1f} of {s['mean_value_chars']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m sdtp_eval.retention.value_prefix", description=__doc__.split("\n")[0])
    p.add_argument("--samples", nargs="+", required=True, help="LABEL=PATH of lm-eval outputs (--log_samples)")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    command = "python -m sdtp_eval.retention.value_prefix " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    runs = {}
    for value in args.samples:
        label, path = parse_source(value)
        runs[label] = read_run(path)
    report = {"command": command, "found_chars": FOUND_CHARS, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(format_markdown(report), encoding="utf-8")
    print(format_markdown(report))
    return report


if __name__ == "__main__":
    main()
