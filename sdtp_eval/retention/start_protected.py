"""Does a pruned run lose a RULER task because it drops the start of the prompt's content?

Every offline RULER prompt opens with a one-line instruction; its content (the haystack, cwe's word list) begins
after the first line break. A scorer whose span stops at line ends (``:l``) no longer lends the instruction's
high scores to the first content tokens, and ``ruler_survival`` shows it dropping them (``after line``). This
command tests whether that is what costs the task: for the first ``--limit`` documents of each ``--tasks`` task it
generates the answer (greedy, batch 1, the task's own generation length) with the pruner as it is and with the
``--protect`` tokens after the first line break protected (kept at every stage, inside the same keep budget), and
scores both with RULER's ``string_match_all``::

    python -m sdtp_eval.retention.start_protected --length 1024 --limit 20 --tasks ruler_cwe --pruner line \\
        --out results/ruler_start_protected_1k

The prompts and scores are those of an ``lm_eval --model sdtp`` run of the same documents (its unprotected score
is the lm_eval run's, up to batch effects).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import write_report
from .ruler_survival import first_line_end


def start_mask(length: int, line_end: int, count: int) -> torch.Tensor:
    """A ``(1, length)`` bool mask of the ``count`` positions right after ``line_end``."""
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, line_end + 1 : line_end + 1 + count] = True
    return mask


def main(argv: list[str] | None = None) -> dict:
    from lm_eval.tasks.ruler.common_utils import string_match_all

    from sdtp_core.engine import SDTPEngine
    from sdtp_core.generate import generate
    from sdtp_core.loading import load_model, load_pruner

    from .ruler_layers import ruler_documents

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024, help="RULER max_seq_lengths")
    parser.add_argument("--limit", type=int, default=20, help="first documents of each task")
    parser.add_argument("--tasks", nargs="+", default=["ruler_cwe"])
    parser.add_argument("--pruner", default="line", help="pruner spec (load_pruner)")
    parser.add_argument("--protect", type=int, default=64, help="tokens after the first line break to protect")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    engine = SDTPEngine(model, load_pruner(args.pruner, model, tokenizer=tokenizer))
    report = {
        "command": "python -m sdtp_eval.retention.start_protected "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "length": args.length,
        "dtype": args.dtype,
        "pruner": args.pruner,
        "protect": args.protect,
        "tasks": {},
    }
    for task, docs in ruler_documents(args.tasks, args.length, args.limit).items():
        rows = []
        for doc in tqdm(docs, desc=task):
            ids = tokenizer(doc["prompt"], return_tensors="pt").input_ids
            protect = start_mask(ids.shape[1], first_line_end(tokenizer, ids[0].tolist()), args.protect)
            row = {}
            for name, mask in (("as_is", None), ("start_protected", protect)):
                out = generate(engine, ids, protect=mask, max_new_tokens=doc["max_new_tokens"], do_sample=False)
                answer = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
                row[name] = string_match_all([answer], [doc["values"]])
            rows.append(row)
        report["tasks"][task] = {
            name: sum(r[name] for r in rows) / len(rows) for name in ("as_is", "start_protected")
        } | {"documents": len(rows), "per_document": rows}
    write_report(args.out, report, format_markdown(report), plot)
    return report


def format_markdown(report: dict) -> str:
    lines = [
        f"# Protecting the start of the content: RULER {report['length']} with `{report['pruner']}`",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['dtype']}, greedy, batch 1. start protected: the {report['protect']} tokens after the first line "
        "break are kept at every stage (inside the same keep budget). Score: RULER's string_match_all.",
        "",
        "| task | docs | as is | start protected |",
        "|---|---:|---:|---:|",
    ]
    for task, r in report["tasks"].items():
        lines.append(f"| {task} | {r['documents']} | {r['as_is']:.3f} | {r['start_protected']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Paired bars per task: the score as is and with the start of the content protected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(tasks), 3.6))
    for i, (name, label) in enumerate((("as_is", "as is"), ("start_protected", "start protected"))):
        ax.bar([j + i * 0.4 for j in range(len(tasks))], [report["tasks"][t][name] for t in tasks], 0.4, label=label)
    ax.set_xticks([j + 0.2 for j in range(len(tasks))], tasks, fontsize=8)
    ax.set(ylabel="string_match_all", ylim=(0, 1.05), title=f"RULER {report['length']}, {report['pruner']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
