"""Where a scorer loses the needle: survival and score rank of the passkey's tokens, stage by stage.

For the first ``--limit`` documents of the needle depth sweep (:mod:`sdtp_eval.retention.needle`) this runs
the pruned prefill of each ``--pruners`` scorer and follows the passkey's digit tokens through every stage:
the fraction still kept after the stage, and (while kept) their score's percentile among the stage's
candidates (live, unprotected tokens; 1.0 = the highest score). A scorer that answers the needle task keeps
the digits to the last stage; the stage where they go, and how they ranked there, says why one does not::

    python -m sdtp_eval.retention.diagnose needle --length 2048 --limit 33 \\
        --pruners shipped attention norm random --out results/training/needle_survival_2k

``saliency`` in ``--pruners`` is the training target as an oracle: the |gradient x hidden state| of the gold
passkey's loss (SDTP's Stage 1 saliency, which no scorer has at inference time, since it needs the answer),
on the dense forward at each stage layer. Its percentile is among the prompt's unprotected tokens; "kept"
counts the digits among the ``ceil(keep_ratio * n)`` tokens a one-shot selection by saliency would keep at
that stage (protected tokens first). It says whether the target a trained pruner imitates ranks the needle
high; the other rows say what the scorers do.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

#: the shared options' defaults (:func:`sdtp_eval.retention.diagnose.common_arguments`): 33 documents = 3 items
#: at each of the 11 depths
DEFAULTS = {"length": 2048, "limit": 33}


@contextmanager
def recorded_selections():
    """Record every stage's ``(scores, valid, protected, index)`` while the engine prunes (read-only)."""
    from sdtp_core import engine as engine_module

    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = engine_module.select

    def recording(scores, valid, protect, keep):
        index, slot_valid = original(scores, valid, protect, keep)
        calls.append((scores.float(), valid, protect & valid, index))
        return index, slot_valid

    engine_module.select = recording
    try:
        yield calls
    finally:
        engine_module.select = original


def occurrences(tokenizer, text: str, value: str) -> tuple[list[int], list[list[int]]]:
    """(prompt token ids, for every occurrence of ``value`` in ``text`` the positions of the tokens overlapping it)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, start = [], text.find(value)
    while start >= 0:
        end = start + len(value)
        spans.append([i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start])
        start = text.find(value, start + 1)
    return enc["input_ids"], spans


def needle_positions(tokenizer, text: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, positions of the tokens that overlap the first occurrence of ``answer``)."""
    ids, spans = occurrences(tokenizer, text, answer)
    if not spans:
        raise ValueError(f"the gold value {answer!r} does not occur in the prompt")
    return ids, spans[0]


def percentile(scores: torch.Tensor, candidates: torch.Tensor, slot: int) -> float:
    """The share of the other ``candidates`` whose score is below ``scores[slot]`` (1.0 = the highest)."""
    below = (scores[candidates] < scores[slot]).sum().item()
    return below / max(1, int(candidates.sum()) - 1)


def follow(engine, ids: list[int], needle: list[int]) -> list[dict]:
    """Per stage: the fraction of ``needle`` positions kept after it, and their mean score percentile
    (among the stage's live unprotected tokens, while still live). One prompt, batch 1."""
    with recorded_selections() as calls:
        engine.prefill(torch.tensor([ids]), logits_to_keep=1, use_cache=False)
    slot_of = {p: p for p in needle}  # original position -> slot in the current layout
    stages = []
    for scores, valid, protected, index in calls:
        s, v, prot = scores[0], valid[0], protected[0]
        candidates = v & ~prot
        ranks = [percentile(s, candidates, slot) for slot in slot_of.values() if candidates[slot]]
        kept_slots = index[0].tolist()
        new_slot = {old: new for new, old in enumerate(kept_slots)}
        slot_of = {p: new_slot[slot] for p, slot in slot_of.items() if slot in new_slot}
        stages.append({"kept": len(slot_of) / len(needle), "percentile": sum(ranks) / len(ranks) if ranks else None})
    return stages


def saliency_stages(model, ids: list[int], answer_ids: list[int], needle: list[int], config) -> list[dict]:
    """Per stage layer of ``config`` (a :class:`~sdtp_core.config.PrunerConfig`): the mean percentile of the
    ``needle`` positions' |saliency| of the ``answer_ids`` loss among the prompt's unprotected tokens, and
    the fraction of them the engine's selection (:func:`~sdtp_core.selection.select`) would keep from the
    whole prompt at that stage's keep ratio, ranked by |saliency|."""
    from sdtp_core.selection import keep_counts, protected_mask, select
    from sdtp_core.train.saliency import compute_saliency

    n = len(ids)
    full = torch.tensor([ids + answer_ids])
    labels = torch.full_like(full, -100)
    labels[0, n - 1 : n - 1 + len(answer_ids)] = torch.tensor(answer_ids)
    saliency = compute_saliency(model, full, labels, list(config.layers))[:, :, :n].abs()
    valid = torch.ones(1, n, dtype=torch.bool)
    protect = protected_mask(valid, config.keep_first, config.keep_recent)
    candidates = ~protect[0]
    stages = []
    for stage, ratio in enumerate(config.keep_ratios):
        scores = saliency[:, stage]
        ranks = [percentile(scores[0], candidates, p) for p in needle if candidates[p]]
        index, slot_valid = select(scores, valid, protect, keep_counts(torch.tensor([n]), ratio))
        kept = set(index[0][slot_valid[0]].tolist())
        stages.append(
            {
                "kept": sum(p in kept for p in needle) / len(needle),
                "percentile": sum(ranks) / len(ranks) if ranks else None,
            }
        )
    return stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pruners", nargs="+", default=["shipped", "attention", "norm", "random"])


def run(args: argparse.Namespace, model, tokenizer) -> dict:
    """The report (after its ``command``): per pruner, the passkey's survival and rank at every stage."""
    from sdtp_core.config import PrunerConfig
    from sdtp_core.engine import SDTPEngine
    from sdtp_core.loading import load_pruner

    from ..needle import documents

    docs = documents(tokenizer, args.length, items=-(-args.limit // 11))[: args.limit]
    inputs = [needle_positions(tokenizer, d["input"], d["answer"]) + (d["depth"],) for d in docs]
    report = {"length": args.length, "documents": len(docs), "dtype": args.dtype, "pruners": {}}
    for spec in args.pruners:
        if spec == "saliency":
            schedule = PrunerConfig.for_model(model.config)  # the default schedule every scorer here uses
            answers = [tokenizer(d["answer"], add_special_tokens=False)["input_ids"] for d in docs]
            rows = [
                (depth, saliency_stages(model, ids, answer, needle, schedule))
                for (ids, needle, depth), answer in tqdm(list(zip(inputs, answers)), desc="saliency (oracle)")
            ]
        else:
            pruner = load_pruner(spec, model, tokenizer=tokenizer)
            schedule = pruner.config
            engine = SDTPEngine(model, pruner)
            rows = [(depth, follow(engine, ids, needle)) for ids, needle, depth in tqdm(inputs, desc=f"pruner={spec}")]
        n_stages = len(schedule.layers)
        per_stage = []
        for s in range(n_stages):
            ranked = [r[s]["percentile"] for _, r in rows if r[s]["percentile"] is not None]
            per_stage.append(
                {
                    "layer": schedule.layers[s],
                    "kept": sum(r[s]["kept"] for _, r in rows) / len(rows),
                    "percentile": sum(ranked) / len(ranked) if ranked else None,
                    "ranked_documents": len(ranked),
                }
            )
        unprotected = [r for depth, r in rows if depth < 100]  # depth 100 sits in the protected recent tail
        report["pruners"][spec] = {
            "stages": per_stage,
            "kept_to_the_end": sum(r[-1]["kept"] == 1.0 for _, r in rows) / len(rows),
            "kept_to_the_end_depth_below_100": sum(r[-1]["kept"] == 1.0 for r in unprotected) / len(unprotected),
        }
    return report


def format_markdown(report: dict) -> str:
    specs = list(report["pruners"])
    layers = [s["layer"] for s in report["pruners"][specs[0]]["stages"]]
    lines = [
        f"# Needle survival at {report['length']} tokens: where each scorer loses the passkey",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['documents']} documents of the depth sweep ({report['dtype']}). Per stage: the fraction of the "
        "passkey's digit tokens still kept after the stage, and in brackets their mean score percentile among "
        "the stage's candidates while still live (1.00 = highest score; 0.50 = what random scores give).",
        "",
        "| scorer | all digits kept to the end | same, needle not in the protected tail | "
        + " | ".join(f"layer {layer}" for layer in layers)
        + " |",
        "|---|---:|---:|" + "---|" * len(layers),
    ]
    for spec in specs:
        r = report["pruners"][spec]
        cells = [
            f"{s['kept']:.2f}" + (f" ({s['percentile']:.2f})" if s["percentile"] is not None else "")
            for s in r["stages"]
        ]
        lines.append(
            f"| {spec} | {r['kept_to_the_end']:.2f} | {r['kept_to_the_end_depth_below_100']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Two panels over the stage layers: passkey tokens kept, and their score percentile while live."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kept_ax, rank_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for spec, r in report["pruners"].items():
        layers = [s["layer"] for s in r["stages"]]
        kept_ax.plot(layers, [s["kept"] for s in r["stages"]], marker="o", label=spec)
        ranked = [(s["layer"], s["percentile"]) for s in r["stages"] if s["percentile"] is not None]
        rank_ax.plot([x for x, _ in ranked], [y for _, y in ranked], marker="o", label=spec)
    kept_ax.set(xlabel="stage layer", ylabel="passkey tokens kept after the stage", ylim=(-0.05, 1.05))
    rank_ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    rank_ax.set(xlabel="stage layer", ylabel="score percentile among candidates", ylim=(-0.05, 1.05))
    kept_ax.legend(fontsize=8)
    fig.suptitle(f"Needle survival at {report['length']} tokens ({report['documents']} documents)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
