"""Which tokens of a WinoGrande prompt survive pruning (lm-eval's partial scoring puts the option in the context).

lm-eval scores WinoGrande by *partial evaluation*: the context is the sentence up to the blank with one
option filled in, the continuation is the rest of the sentence, and the option whose context makes the
continuation likelier wins. The ``sdtp`` model prunes the context and protects the continuation plus
the token before it. This probe builds exactly those inputs for the first ``--limit`` validation
sentences and reports, after the last pruning stage, the fraction of kept tokens among the option's
tokens and among the rest of the context, with the prompt lengths and 1/τ::

    python -m sdtp_eval.retention.option_survival --data ../shared/data/winogrande/dev.jsonl \\
        --pruners shipped attention norm random --limit 200 --out results/winogrande_option_survival
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm


def partial_inputs(tokenizer, sentence: str, option: str) -> tuple[list[int], list[int], range]:
    """(context tokens, continuation tokens, positions of the option within the context), as lm-eval splits."""
    blank = sentence.index("_")
    context = sentence[:blank] + option
    continuation = " " + sentence[blank + 1 :].strip()
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    continuation_enc = whole[len(context_enc) :]
    prefix = tokenizer.encode(sentence[:blank].rstrip(), add_special_tokens=False)
    return context_enc, continuation_enc, range(min(len(prefix), len(context_enc) - 1), len(context_enc))


def survival(engine, tokenizer, sentence: str, option: str) -> dict:
    """Kept fractions of the option's tokens and of the other context tokens after the last stage."""
    context_enc, continuation_enc, option_positions = partial_inputs(tokenizer, sentence, option)
    ids = torch.tensor([context_enc + continuation_enc[:-1]])
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[0, len(context_enc) - 1 :] = True  # the continuation and the token before it, as the sdtp model does
    result = engine.prefill(ids, protect=protect, logits_to_keep=None, use_cache=False)
    kept = set(result.positions[0][result.positions[0] >= 0].tolist())
    others = [p for p in range(len(context_enc)) if p not in option_positions]
    return {
        "prompt_tokens": ids.shape[1],
        "option_tokens": len(option_positions),
        "option_kept": sum(p in kept for p in option_positions) / len(option_positions),
        "other_context_kept": sum(p in kept for p in others) / max(1, len(others)),
        "compression": float(result.compression[0]),
    }


def main(argv: list[str] | None = None) -> dict:
    from sdtp_core.engine import SDTPEngine
    from sdtp_core.loading import load_model, load_pruner

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="WinoGrande dev.jsonl (official release)")
    parser.add_argument("--pruners", nargs="+", default=["shipped", "attention", "norm", "random"])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    docs = [json.loads(line) for line in args.data.read_text(encoding="utf-8").split("\n") if line.strip()]
    docs = docs[: args.limit]
    report = {
        "command": "python -m sdtp_eval.retention.option_survival "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "documents": len(docs),
        "pruners": {},
    }
    for spec in args.pruners:
        engine = SDTPEngine(model, load_pruner(spec, model, tokenizer=tokenizer))
        rows = [
            survival(engine, tokenizer, doc["sentence"], doc[key])
            for doc in tqdm(docs, desc=f"pruner={spec}")
            for key in ("option1", "option2")
        ]
        report["pruners"][spec] = {
            key: sum(r[key] for r in rows) / len(rows)
            for key in ("prompt_tokens", "option_tokens", "option_kept", "other_context_kept", "compression")
        }
    lines = [
        "# WinoGrande: what pruning keeps of the partial-scoring context",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{len(docs)} validation sentences × 2 options. Means over requests, after the last pruning stage.",
        "",
        "| pruner | prompt tokens | option tokens | option tokens kept | other context tokens kept | 1/τ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for spec, s in report["pruners"].items():
        lines.append(
            f"| {spec} | {s['prompt_tokens']:.1f} | {s['option_tokens']:.2f} | {s['option_kept']:.3f} | "
            f"{s['other_context_kept']:.3f} | {s['compression']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
