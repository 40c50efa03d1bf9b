"""Which layer's attention can find a RULER needle: the gold value's score rank at every layer, dense forward.

A stage scorer (``attention``, ``attention:W:P``, ``norm``) sees only the stage layer's input, so which layers a
schedule prunes at decides what it can find. For the first ``--limit`` documents of each RULER ``--tasks`` task
(lm-eval's own generator, :mod:`sdtp_eval.retention.ruler`) this runs the dense model once and scores the prompt
at **every** layer with each ``--scorers`` scorer, as if that layer were a stage. For the gold value's tokens (the
first place the answer occurs in the prompt) it reports their *worst* token's percentile among the unprotected
tokens (1.0 = the highest score; 0.5 = what random scores give): a value is answerable only if every one of its
tokens survives. Also the share of documents where that worst token is in the top 35%, the share of the
unprotected prompt a default schedule (0.9^10) keeps::

    python -m sdtp_eval.retention.ruler_layers --length 2048 --limit 20 \\
        --tasks niah_multikey_2 niah_multikey_3 --scorers attention attention:64:31 --out results/ruler_layers_2k

No pruning happens here: it says what each layer *could* rank, not what a pruned run keeps (scores after
earlier stages differ, since dropped tokens are gone). :mod:`sdtp_eval.retention.needle_survival` follows a
pruned run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import write_report
from .needle_survival import needle_positions, percentile

KEPT_SHARE = 0.9**10
"""The share of the unprotected prompt the default schedule keeps after its last stage (0.349)."""


def ruler_documents(tasks: list[str], length: int, limit: int) -> dict[str, list[dict]]:
    """The first ``limit`` documents of each offline RULER task in ``tasks`` at ``length`` tokens, from one load
    of the group: ``{"prompt", "value", "values", "max_new_tokens"}``, the prompt as lm-eval sends it (input +
    generation prefix), the first gold value, all of them, and the task's generation length."""
    import random

    import numpy as np
    from lm_eval.tasks import TaskManager

    import sdtp_eval.retention.ruler  # noqa: F401  (RULER's nltk download switched off)

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


class ValueInProtectedTail(ValueError):
    """The gold value lies wholly in the protected tokens: every schedule keeps it, so there is nothing to rank."""


@torch.no_grad()
def layer_ranks(model, scorers: dict[str, torch.nn.Module], ids: list[int], positions: list[int], config) -> dict:
    """Per scorer, the worst percentile of the value's droppable tokens at every layer of one dense forward
    (batch 1)."""
    from sdtp_core.selection import protected_mask

    n = len(ids)
    valid = torch.ones(1, n, dtype=torch.bool)
    candidates = ~protected_mask(valid, config.keep_first, config.keep_recent)[0]
    positions = [p for p in positions if candidates[p]]
    if not positions:
        raise ValueInProtectedTail("the gold value sits in the protected tokens")
    out = model(torch.tensor([ids]), output_hidden_states=True)
    embeddings = model.model.rotary_emb(out.hidden_states[0], torch.arange(n).unsqueeze(0))
    ranks = {}
    for name, scorer in scorers.items():
        per_layer = []
        for layer_index, layer in enumerate(model.model.layers):
            scores = scorer.score(
                0,
                out.hidden_states[layer_index],
                layer=layer,
                position_embeddings=embeddings,
                valid=valid,
                protected=~candidates[None],
            )[0].float()
            per_layer.append(min(percentile(scores, candidates, p) for p in positions))  # the worst value token
        ranks[name] = per_layer
    return ranks


def main(argv: list[str] | None = None) -> dict:
    from sdtp_core.config import PrunerConfig
    from sdtp_core.loading import load_model
    from sdtp_core.scorers import training_free

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048, help="RULER max_seq_lengths")
    parser.add_argument("--limit", type=int, default=20, help="first documents of each task")
    parser.add_argument("--tasks", nargs="+", default=["niah_multikey_2", "niah_multikey_3"])
    parser.add_argument("--scorers", nargs="+", default=["attention", "attention:64:31"], help="training-free scorers")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    config = PrunerConfig.for_model(model.config)
    scorers = {spec: training_free(spec, config) for spec in args.scorers}
    report = {
        "command": "python -m sdtp_eval.retention.ruler_layers "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "length": args.length,
        "dtype": args.dtype,
        "default_stage_layers": list(config.layers),
        "tasks": {},
    }
    for task, docs in ruler_documents(args.tasks, args.length, args.limit).items():
        rows, protected = [], 0
        for doc in tqdm(docs, desc=task):
            ids, positions = needle_positions(tokenizer, doc["prompt"], doc["value"])
            try:
                rows.append(layer_ranks(model, scorers, ids, positions, config))
            except ValueInProtectedTail:
                protected += 1
        report["tasks"][task] = {
            "documents": len(rows),
            "skipped_value_in_protected_tail": protected,
            "scorers": {
                spec: {
                    "worst_percentile": [sum(r[spec][i] for r in rows) / len(rows) for i in range(len(rows[0][spec]))],
                    "in_kept_share": [
                        sum(r[spec][i] >= 1 - KEPT_SHARE for r in rows) / len(rows) for i in range(len(rows[0][spec]))
                    ],
                    "per_document": [r[spec] for r in rows],
                }
                for spec in args.scorers
            },
        }
    write_report(args.out, report, format_markdown(report), plot)
    return report


def format_markdown(report: dict) -> str:
    stage_layers = set(report["default_stage_layers"])
    first = next(iter(report["tasks"].values()))
    n_layers = len(next(iter(first["scorers"].values()))["worst_percentile"])
    head = " | ".join(f"**{i}**" if i in stage_layers else str(i) for i in range(n_layers))
    lines = [
        f"# Which layer's attention finds the RULER needle ({report['length']} tokens, dense forward)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['dtype']}. Each cell: the gold value's worst token, its score percentile among the unprotected "
        "tokens when the scorer is applied at that layer's input (1.00 = highest, 0.50 = random), averaged over "
        f"documents; in brackets the share of documents where it is in the top {KEPT_SHARE:.0%} (what the default "
        "schedule keeps). Bold layers: the default schedule's stage layers.",
        "",
    ]
    for task, t in report["tasks"].items():
        skipped = t["skipped_value_in_protected_tail"]
        note = f", {skipped} more with the value in the protected tail left out" if skipped else ""
        lines += [f"## {task} ({t['documents']} documents{note})", ""]
        lines += [f"| scorer | {head} |", "|---|" + "---:|" * n_layers]
        for spec, s in t["scorers"].items():
            cells = [f"{p:.2f} ({k:.1f})" for p, k in zip(s["worst_percentile"], s["in_kept_share"])]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One panel per task: the worst value-token percentile by layer, one line per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        for spec, s in t["scorers"].items():
            ax.plot(range(len(s["worst_percentile"])), s["worst_percentile"], marker="o", markersize=3, label=spec)
        for layer in report["default_stage_layers"]:
            ax.axvline(layer, color="grey", linewidth=0.5, linestyle=":")
        ax.axhline(1 - KEPT_SHARE, color="red", linewidth=0.8, linestyle="--", label="top 35% line")
        ax.set(title=f"{task} ({t['documents']} docs)", xlabel="layer (dotted: default stages)", ylim=(-0.02, 1.02))
        ax.set_ylabel("worst value-token percentile")
        ax.legend(fontsize=8)
    fig.suptitle(f"Which layer's attention finds the RULER needle, {report['length']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
