"""How well does a trained pruner predict saliency? ``python -m sdtp_core.bench.quality --pruner DIR ...``.

On held-out samples (use ``--skip`` to leave out the records a training run used), for every stage:

* ``spearman``: rank correlation between the stage's scores and the true ``|saliency|`` (Stage 1's
  definition, computed here), over the prompt tokens the stage decides among (unprotected prompt);
* ``overlap``: the fraction of the tokens kept by top-k on the scores that are also in the top-k of
  ``|saliency|``, with k the stage's keep count among those tokens.

Scores are taken on the *unpruned* model's hidden states at each stage layer (the same states the
saliency is defined on), and compared with two baselines at the same keep ratio: a random scorer, and a
training-free attention score (the attention each token receives at the layer before the stage,
averaged over heads and over the protected most-recent queries, as in H2O/SnapKV-style methods).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdtp_core.pruner import TokenPruner
from sdtp_core.selection import keep_counts, protected_mask
from sdtp_core.spans import segment_ids
from sdtp_core.train.data import Example, collate, load_examples
from sdtp_core.train.masked_forward import decoder_parts
from sdtp_core.train.saliency import compute_saliency

SCORERS = ("pruner", "random", "attention")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position)."""
    if a.numel() < 2:
        return float("nan")
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def topk_overlap(pred: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """``|topk(pred) ∩ topk(target)| / k`` (1.0 when ``k`` is 0)."""
    if k <= 0:
        return 1.0
    a = set(pred.topk(k).indices.tolist())
    b = set(target.topk(k).indices.tolist())
    return len(a & b) / k


@torch.no_grad()
def _stage_inputs(model, input_ids: torch.Tensor, layers: list[int], recent: torch.Tensor):
    """Hidden states at the input of each layer in ``layers`` and the attention score of each token at the
    layer before it (mean over heads and over the ``recent`` query positions)."""
    inner, _ = decoder_parts(model)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        out = model(input_ids, output_hidden_states=True, output_attentions=True)
    finally:
        config._attn_implementation = previous
    hidden = [out.hidden_states[layer] for layer in layers]
    attention = [out.attentions[layer - 1][0][:, recent].mean(dim=(0, 1)) for layer in layers]
    return hidden, attention


@torch.no_grad()
def prompt_scores(pruner, inner, stage: int, hidden, positions, lengths, valid, protect, segments) -> torch.Tensor:
    """(prompt_len,) the pruner's scores of one unpruned prompt at ``stage``, with the context the engine gives
    (the stage's layer of the decoder ``inner`` and its rotary tables, the protected slots and lines, for
    question-aware features)."""
    context = {
        "positions": positions,
        "lengths": lengths,
        "valid": valid,
        "layer": inner.layers[pruner.config.layers[stage]],
        "position_embeddings": inner.rotary_emb(hidden, positions),
        "protected": protect[: hidden.shape[1]][None].to(hidden.device),
        "segments": segments,
    }
    return pruner.score(stage, hidden, **context).float()[0].cpu()


def evaluate(model, pruner: TokenPruner, examples: list[Example], seed: int = 0) -> dict:
    """Per-stage mean Spearman and top-k overlap of the pruner and the two baselines (see module doc)."""
    cfg = pruner.config
    generator = torch.Generator().manual_seed(seed)
    sums = {name: {"spearman": [0.0] * cfg.num_stages, "overlap": [0.0] * cfg.num_stages} for name in SCORERS}
    counted = [0] * cfg.num_stages
    device = next(model.parameters()).device
    inner, _ = decoder_parts(model)
    for e in tqdm(examples, desc="pruner quality", unit="sample"):
        batch = collate([e]).to(device)
        saliency = compute_saliency(model, batch.input_ids, batch.labels, cfg.layers)[0].abs().cpu()
        prompt = batch.prompt_mask[0].cpu()
        protect = protected_mask(prompt.long().unsqueeze(0), cfg.keep_first, cfg.keep_recent)[0]
        candidates = prompt & ~protect
        recent = protect.nonzero().flatten()[-max(1, int(protect[e.prompt_len // 2 :].sum())) :]
        hidden, attention = _stage_inputs(model, batch.input_ids, cfg.layers, recent.to(device))
        n = e.prompt_len
        n_prompt = torch.tensor([n])
        positions = torch.arange(n, device=device)[None]
        real = torch.ones(1, n, dtype=torch.bool, device=device)
        ends = getattr(pruner, "sentence_ends", None)  # line ends of a pruner whose features stay within lines
        segments = segment_ids(batch.input_ids[:, :n], real, ends) if ends is not None else None
        for s in range(cfg.num_stages):
            c = candidates.nonzero().flatten()
            if c.numel() < 2:
                continue
            k = int(keep_counts(n_prompt, cfg.keep_ratios[s])[0]) - int(protect.sum())
            k = max(0, min(k, c.numel()))
            target = saliency[s, c]
            scores = {
                "pruner": prompt_scores(
                    pruner, inner, s, hidden[s][:, :n], positions, n_prompt, real, protect, segments
                )[c],
                "random": torch.rand(c.numel(), generator=generator),
                "attention": attention[s].float().cpu()[c],
            }
            for name, pred in scores.items():
                sums[name]["spearman"][s] += spearman(pred, target)
                sums[name]["overlap"][s] += topk_overlap(pred, target, k)
            counted[s] += 1
    result = {"num_samples": len(examples), "layers": cfg.layers, "keep_ratios": cfg.keep_ratios}
    for name in SCORERS:
        result[name] = {
            metric: [round(v / max(1, n), 4) for v, n in zip(values, counted)] for metric, values in sums[name].items()
        }
        result[name]["mean_spearman"] = round(sum(result[name]["spearman"]) / max(1, cfg.num_stages), 4)
        result[name]["mean_overlap"] = round(sum(result[name]["overlap"]) / max(1, cfg.num_stages), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtp_core.bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruner", required=True, help="trained pruner directory (OUT/pruner)")
    parser.add_argument("--model", default=None, help="model id or path (default: the embedded model)")
    parser.add_argument("--data", required=True, help="held-out data (the formats of training --data)")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N records (the training ones)")
    parser.add_argument("--max-samples", type=int, default=20, help="number of held-out samples")
    parser.add_argument("--max-length", type=int, default=512, help="truncate samples to this many tokens")
    parser.add_argument("--format", default="auto", help="auto, chat or plain (as in training)")
    parser.add_argument(
        "--distractor-tokens",
        type=int,
        default=0,
        help="long inputs, as in training (its --help)",
    )
    parser.add_argument(
        "--context-only", action="store_true", help="only records with a context of their own, as in training"
    )
    parser.add_argument("--mix", action="store_true", help="the training mix of these records, as in training")
    parser.add_argument("--out", default=None, help="write the JSON result here (default: print it)")
    args = parser.parse_args(argv)

    from sdtp_core.loading import load_model, load_pruner

    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    model.requires_grad_(False)
    pruner = load_pruner(args.pruner, model, tokenizer=tokenizer)
    examples = load_examples(
        args.data,
        tokenizer,
        args.format,
        args.max_length,
        args.max_samples,
        skip=args.skip,
        distractor_tokens=args.distractor_tokens,
        context_only=args.context_only,
        mix=args.mix,
    )
    result = evaluate(model, pruner, examples)
    from sdtp_core.bench.machine import machine_info

    result = {
        "command": "python -m sdtp_core.bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "pruner": args.pruner,
        "data": args.data,
        "skip": args.skip,
        "max_length": args.max_length,
        "distractor_tokens": args.distractor_tokens,
        **({"context_only": True} if args.context_only else {}),
        **({"mix": True} if args.mix else {}),
        **result,
    }
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(f"Command: `{result['command']}`\n\n{format_table(result)}")
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out}, .md and .png")
    return 0


def format_table(result: dict) -> str:
    """Markdown table: per stage, Spearman and top-k overlap of each scorer."""
    head = "| stage | layer | keep ratio | " + " | ".join(f"{n} ρ | {n} overlap" for n in SCORERS) + " |"
    lines = [head, "|---:|---:|---:|" + "---:|---:|" * len(SCORERS)]
    for s, (layer, ratio) in enumerate(zip(result["layers"], result["keep_ratios"])):
        cells = " | ".join(f"{result[n]['spearman'][s]:.3f} | {result[n]['overlap'][s]:.3f}" for n in SCORERS)
        lines.append(f"| {s + 1} | {layer} | {ratio:.3f} | {cells} |")
    means = " | ".join(f"**{result[n]['mean_spearman']:.3f}** | **{result[n]['mean_overlap']:.3f}**" for n in SCORERS)
    lines.append(f"| mean | | | {means} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Spearman and top-k overlap per stage, one line per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in zip(axes, ("spearman", "overlap"), ("Spearman ρ with |saliency|", "top-k overlap")):
        for name, style in zip(SCORERS, ("C0-o", "C7--s", "C1-^")):
            ax.plot(result["layers"], result[name][metric], style, label=name)
        ax.set_xlabel("stage layer")
        ax.set_ylabel(label)
        ax.set_xticks(result["layers"])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Pruner vs saliency on {result['num_samples']} held-out samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
