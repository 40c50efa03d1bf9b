"""Plot a training run's losses per epoch from its ``log.jsonl``, to see whether they are flat::

    python -m sdtp_core.train.log_plot runs/train_mix_feat/log.jsonl --out results/training/mix_feat_loss.png

Prints the per-epoch means (the same numbers as the plot) as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LOSSES = ("loss", "lm", "mse", "rank")


def epoch_means(log: Path) -> list[dict]:
    """Per epoch, the mean of every loss term the log records: ``[{"epoch": e, "steps": n, "mse": ..., ...}]``."""
    by_epoch: dict[int, list[dict]] = {}
    for line in log.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch.setdefault(int(record["epoch"]), []).append(record)
    if not by_epoch:
        raise ValueError(f"{log} holds no steps")
    rows = []
    for epoch, records in sorted(by_epoch.items()):
        row = {"epoch": epoch, "steps": len(records)}
        for name in LOSSES:
            values = [r[name] for r in records if r.get(name) is not None]
            if values:
                row[name] = sum(values) / len(values)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LOSSES if n != "loss" and any(n in r for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot([r["epoch"] for r in rows if name in r], [r[name] for r in rows if name in r], marker="o", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"mean {name} loss (sum over stages)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdtp_core.train.log_plot", description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="a training run's log.jsonl")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    rows = epoch_means(args.log)
    names = [n for n in LOSSES if any(n in r for r in rows)]
    print("| epoch | steps | " + " | ".join(names) + " |\n|" + "---:|" * (2 + len(names)))
    for r in rows:
        print(f"| {r['epoch']} | {r['steps']} | " + " | ".join(f"{r[n]:.3f}" if n in r else "–" for n in names) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out, str(args.log))


if __name__ == "__main__":
    main()
