"""Does a pruned run lose a RULER task because it drops the start of the prompt's content?

Every offline RULER prompt opens with a one-line instruction; its content (the haystack, cwe's word list) begins
after the first line break. A scorer whose span stops at line ends (``:l``) no longer lends the instruction's
high scores to the first content tokens, and may drop them. This subcommand tests whether that is what costs the
task: for the first ``--limit`` documents of each ``--tasks`` task it generates the answer (greedy, batch 1, the
task's own generation length) with the pruner as it is and with the ``--protect`` tokens after the first line break
protected (kept at every stage, inside the same keep budget), and scores both with RULER's ``string_match_all``::

    python -m sdtp_eval.retention.diagnose start --length 1024 --limit 20 --tasks ruler_cwe --pruner line \\
        --out results/retention/ruler_start_protected_1k

The prompts and scores are those of an ``lm_eval --model sdtp`` run of the same documents (its unprotected score
is the lm_eval run's, up to batch effects).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

#: the shared options' defaults (:func:`sdtp_eval.retention.diagnose.common_arguments`)
DEFAULTS = {"length": 1024, "limit": 20}


def ruler_documents(tasks: list[str], length: int, limit: int) -> dict[str, list[dict]]:
    """The first ``limit`` documents of each offline RULER task in ``tasks`` at ``length`` tokens, from one load
    of the group: ``{"prompt", "value", "values", "max_new_tokens"}``, the prompt as lm-eval sends it (input +
    generation prefix), the first gold value, all of them, and the task's generation length."""
    import random

    import numpy as np
    from lm_eval.tasks import TaskManager

    from .. import ruler  # noqa: F401  (RULER's nltk download switched off)

    random.seed(0)  # lm_eval's default seeds (--seed 0,1234,1234): the documents an lm_eval run generates
    np.random.seed(1234)
    torch.manual_seed(1234)
    loaded = TaskManager(metadata={"max_seq_lengths": [length]}).load(["sdtp_ruler_offline"])
    members = loaded["tasks"]  # name -> Task, the group's members
    unknown = [t for t in tasks if t not in members]
    if unknown:
        raise ValueError(f"{unknown} are not offline RULER tasks; use some of {sorted(members)}")
    return {
        task: [
            {
                "prompt": members[task].doc_to_text(d) + " " + d["gen_prefix"].strip(),
                "value": d["outputs"][0],
                "values": list(d["outputs"]),
                "max_new_tokens": members[task].config.generation_kwargs["max_gen_toks"],
            }
            for d in list(members[task].eval_docs)[:limit]
        ]
        for task in tasks
    }


def first_line_end(tokenizer, ids: list[int]) -> int:
    """Position of the first token whose text holds a line break (the last position if none does)."""
    texts = tokenizer.batch_decode([[i] for i in ids])
    return next((p for p, text in enumerate(texts) if "\n" in text), len(ids) - 1)


def start_mask(length: int, line_end: int, count: int) -> torch.Tensor:
    """A ``(1, length)`` bool mask of the ``count`` positions right after ``line_end``."""
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, line_end + 1 : line_end + 1 + count] = True
    return mask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=["ruler_cwe"], help="offline RULER tasks")
    parser.add_argument("--pruner", default="line", help="pruner spec (load_pruner)")
    parser.add_argument("--protect", type=int, default=64, help="tokens after the first line break to protect")


def run(args: argparse.Namespace, model, tokenizer) -> dict:
    """The report (after its ``command``): per task, the score as is and with the start of the content protected."""
    from lm_eval.tasks.ruler.common_utils import string_match_all

    from sdtp_core.engine import SDTPEngine
    from sdtp_core.generate import generate
    from sdtp_core.loading import load_pruner

    engine = SDTPEngine(model, load_pruner(args.pruner, model, tokenizer=tokenizer))
    report = {"length": args.length, "dtype": args.dtype, "pruner": args.pruner, "protect": args.protect, "tasks": {}}
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
