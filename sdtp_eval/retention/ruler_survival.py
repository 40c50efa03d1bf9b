"""What a pruned run keeps of RULER's answers: for each scorer, whether each gold value survives whole.

For the first ``--limit`` documents of each offline RULER ``--tasks`` task (the documents an lm_eval run
generates, :func:`~sdtp_eval.retention.ruler_layers.ruler_documents`) this runs the pruned prefill of each
``--pruners`` scorer (batch 1) and reports, per task and scorer:

* ``answers_whole``: the share of gold values (every one of them: vt's five variable names, not just the first)
  with at least one occurrence in the prompt whose tokens all survive the last stage. A value that is gone is
  one the model cannot copy; one that survives may still be missed (this is not the task score).
* ``after_first_kept``: the share of the ``--after-first`` tokens right after the protected first ones that
  survive, against ``kept_share``, the share of all unprotected tokens that survive. A scorer that spreads the
  sink's attention to its neighbours keeps the start of the prompt whatever it says.
* ``after_line_kept``: the same share for the ``--after-first`` tokens after the first line break, where most
  RULER prompts' content (the haystack, cwe's word list) begins after a one-line instruction; ``None`` where those
  tokens are all protected (fwe's one line break is just before its question). A scorer whose span stops at line
  ends (``:l``) no longer lends the instruction's scores to them::

    python -m sdtp_eval.retention.ruler_survival --length 1024 --limit 10 --tasks ruler_vt niah_multikey_3 \\
        --pruners attention attention:64:63:15 --layers 3:5:7:9:11:13:15:17:19:21 --out results/ruler_survival_1k

It costs one pruned prefill per document and scorer, minutes where an lm_eval run takes half an hour, so it
screens scorer variants before they are run as tasks; the task scores remain the measure.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import write_report
from .needle_survival import occurrences


def survival(
    engine, ids: list[int], spans_per_value: list[list[list[int]]], after_first: int, first_line_end: int
) -> dict:
    """One document: which original positions survive ``engine``'s pruned prefill, summarised (module docstring).
    ``first_line_end`` is the position of the first token holding a line break."""
    from sdtp_core.selection import protected_mask

    result = engine.prefill(torch.tensor([ids]), logits_to_keep=1, use_cache=False)
    kept = set(result.positions[0][result.positions[0] >= 0].tolist())
    cfg = engine.pruner.config
    protected = protected_mask(torch.ones(1, len(ids)), cfg.keep_first, cfg.keep_recent)[0]
    free = [p for p in range(len(ids)) if not protected[p]]
    after = [p for p in free if p < cfg.keep_first + after_first]
    after_line = [p for p in free if first_line_end < p <= first_line_end + after_first]
    whole = [any(all(p in kept for p in span) for span in spans) for spans in spans_per_value]
    return {
        "answers_whole": sum(whole) / len(whole),
        "after_first_kept": sum(p in kept for p in after) / max(1, len(after)),
        "after_line_kept": sum(p in kept for p in after_line) / len(after_line) if after_line else None,
        "kept_share": sum(p in kept for p in free) / max(1, len(free)),
    }


def main(argv: list[str] | None = None) -> dict:
    from sdtp_core.engine import SDTPEngine
    from sdtp_core.loading import load_model, load_pruner

    from .ruler_layers import ruler_documents

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048, help="RULER max_seq_lengths")
    parser.add_argument("--limit", type=int, default=10, help="first documents of each task")
    parser.add_argument("--tasks", nargs="+", default=["niah_multikey_2", "niah_multikey_3", "ruler_vt"])
    parser.add_argument("--pruners", nargs="+", default=["attention", "spread"], help="pruner specs (load_pruner)")
    parser.add_argument("--layers", default=None, help="stage layers for every pruner, e.g. 3:5:7 (default: each own)")
    parser.add_argument("--after-first", type=int, default=64, help="tokens after the protected first ones")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    layers = [int(x) for x in args.layers.split(":")] if args.layers else None
    engines = {spec: SDTPEngine(model, load_pruner(spec, model, layers, tokenizer=tokenizer)) for spec in args.pruners}
    report = {
        "command": "python -m sdtp_eval.retention.ruler_survival "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "length": args.length,
        "dtype": args.dtype,
        "layers": {spec: list(e.pruner.config.layers) for spec, e in engines.items()},
        "tasks": {},
    }
    for task, docs in ruler_documents(args.tasks, args.length, args.limit).items():
        rows = {spec: [] for spec in engines}
        for doc in tqdm(docs, desc=task):
            found = [occurrences(tokenizer, doc["prompt"], value) for value in doc["values"]]
            ids, spans = found[0][0], [s for _, s in found]
            line_end = first_line_end(tokenizer, ids)
            for spec, engine in engines.items():
                rows[spec].append(survival(engine, ids, spans, args.after_first, line_end))
        report["tasks"][task] = {
            spec: {key: mean([r[key] for r in rs]) for key in rs[0]} | {"documents": len(rs), "per_document": rs}
            for spec, rs in rows.items()
        }
    write_report(args.out, report, format_markdown(report), plot)
    return report


def mean(values: list[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if all are)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def first_line_end(tokenizer, ids: list[int]) -> int:
    """Position of the first token whose text holds a line break (the last position if none does)."""
    texts = tokenizer.batch_decode([[i] for i in ids])
    return next((p for p, text in enumerate(texts) if "\n" in text), len(ids) - 1)


def format_markdown(report: dict) -> str:
    lines = [
        f"# What a pruned run keeps of RULER's answers ({report['length']} tokens)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['dtype']}, batch 1. answers whole: share of gold values with an occurrence whose tokens all survive "
        "the last stage; after first: share of the tokens right after the protected first ones that survive; kept: "
        "share of all unprotected tokens that survive; after line: the same for the tokens after the first line break. "
        "Stage layers: "
        + "; ".join(f"{spec} {':'.join(map(str, layers))}" for spec, layers in report["layers"].items()),
        "",
        "| task | pruner | docs | answers whole | after first | after line | kept |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, by_spec in report["tasks"].items():
        for spec, r in by_spec.items():
            lines.append(
                f"| {task} | {spec} | {r['documents']} | {r['answers_whole']:.2f} | {r['after_first_kept']:.2f} | "
                f"{_share(r['after_line_kept'])} | {r['kept_share']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Grouped bars, one bar per pruner: answers kept whole per task (left), and what survives of the tokens
    after the first line break (right; no bar where it is not defined)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    specs = list(report["layers"])
    width = 0.8 / len(specs)
    panels = (
        ("answers_whole", "gold values kept whole", "answers that survive"),
        ("after_line_kept", "share kept", "tokens after the first line break"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(2.6 + 3.2 * len(tasks), 3.8))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, spec in enumerate(specs):
            values = [report["tasks"][t][spec].get(key) for t in tasks]
            ax.bar([j + i * width for j in range(len(tasks))], [v or 0 for v in values], width, label=spec)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, fontsize=8)
        ax.set(ylabel=ylabel, ylim=(0, 1.05), title=f"RULER {report['length']}: {title}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
