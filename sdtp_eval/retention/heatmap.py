"""Length x depth accuracy heatmap of ``sdtp_needle_depth_*`` runs, from lm-eval's logged samples.

Usage::

    python -m sdtp_eval.retention.heatmap --samples dense=runs/dense sdtp=runs/sdtp --out results/needle_depth

Each ``--samples`` value is one configuration (one panel): an lm-eval ``--output_path`` directory (searched
recursively for ``samples_sdtp_needle_depth_*.jsonl``; the newest file of each task is used) or one samples
JSONL file, optionally prefixed by ``LABEL=``. Writes ``OUT.png`` (one heatmap per configuration, the accuracy
written in each cell), ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

SAMPLES_GLOB = "samples_sdtp_needle_depth_*.jsonl"
METRIC = "exact_match"


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


def read_scores(files: list[Path]) -> dict[tuple[int, int], list[float]]:
    """Per-sample ``exact_match`` grouped by (length, depth) of the document."""
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for file in files:
        for line in file.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            row = json.loads(line)
            doc = row["doc"]
            cells[(int(doc["length"]), int(doc["depth"]))].append(float(row[METRIC]))
    if not cells:
        raise ValueError(f"no samples in {', '.join(map(str, files))}")
    return dict(cells)


def summarise(cells: dict[tuple[int, int], list[float]]) -> dict[str, Any]:
    """Lengths, depths, accuracy and counts matrices (rows = lengths, columns = depths; None = empty cell)."""
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    accuracy = [
        [(sum(cells[(n, d)]) / len(cells[(n, d)])) if cells.get((n, d)) else None for d in depths] for n in lengths
    ]
    counts = [[len(cells.get((n, d), [])) for d in depths] for n in lengths]
    scores = [s for values in cells.values() for s in values]
    return {
        "lengths": lengths,
        "depths": depths,
        "accuracy": accuracy,
        "counts": counts,
        "overall": sum(scores) / len(scores),
        "samples": len(scores),
    }


def format_markdown(report: dict[str, Any]) -> str:
    """One accuracy table per configuration (rows = length, columns = depth %)."""
    lines = ["# Needle depth sweep: exact match by prompt length and needle depth", ""]
    for label, summary in report["configurations"].items():
        lines += [f"## {label}", "", f"overall {summary['overall']:.3f} over {summary['samples']} samples", ""]
        lines.append("| length \\ depth | " + " | ".join(f"{d}%" for d in summary["depths"]) + " |")
        lines.append("|---" * (len(summary["depths"]) + 1) + "|")
        for length, row, counts in zip(summary["lengths"], summary["accuracy"], summary["counts"]):
            cells = ["–" if acc is None else f"{acc:.2f} ({n})" for acc, n in zip(row, counts)]
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Cells: accuracy (number of samples).", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """One heatmap panel per configuration, accuracy written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = report["configurations"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs) + 1, 3.4), squeeze=False)
    image = None
    for ax, (label, summary) in zip(axes[0], configs.items()):
        data = np.array([[np.nan if a is None else a for a in row] for row in summary["accuracy"]], dtype=float)
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(summary["depths"])), [str(d) for d in summary["depths"]])
        ax.set_yticks(range(len(summary["lengths"])), [str(n) for n in summary["lengths"]])
        ax.set_xlabel("needle depth (%)")
        ax.set_ylabel("prompt tokens")
        ax.set_title(f"{label} (overall {summary['overall']:.2f})")
        for i, row in enumerate(summary["accuracy"]):
            for j, acc in enumerate(row):
                if acc is not None:
                    ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="exact match")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def build_report(sources: list[tuple[str, Path]], command: str) -> dict[str, Any]:
    """The JSON report: per configuration its summary and the sample files it was read from."""
    configurations = {}
    for label, path in sources:
        if label in configurations:
            raise ValueError(f"duplicate configuration label {label!r}: name them with LABEL=PATH")
        files = sample_files(path)
        configurations[label] = {**summarise(read_scores(files)), "files": [str(f) for f in files]}
    return {"metric": METRIC, "command": command, "configurations": configurations}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples",
        nargs="+",
        action="extend",
        required=True,
        help="lm-eval output dir or samples JSONL, optionally LABEL=PATH; one panel each",
    )
    parser.add_argument("--out", type=Path, required=True, help="output stem: writes OUT.png, OUT.json and OUT.md")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "sdtp_eval.retention.heatmap", *(sys.argv[1:] if argv is None else argv)])
    report = build_report([parse_source(value) for value in args.samples], command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stem = str(args.out)
    Path(stem + ".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(stem + ".md").write_text(format_markdown(report), encoding="utf-8")
    plot(report, Path(stem + ".png"))
    print(f"wrote {stem}.png, {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
