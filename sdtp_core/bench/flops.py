"""FLOPs of a prefill, dense or pruned, from the number of tokens each layer processed.

Counted as 2 FLOPs per multiply-add, for the matrix products that dominate a decoder layer:

* attention projections: ``2·k·H·(Hq + 2·Hkv) + 2·k·Hq·H`` for ``k`` tokens;
* attention scores and the weighted sum of values, causal: ``2·2·Hq·k(k+1)/2``;
* MLP (gated, three matrices): ``2·3·k·H·I``;
* the LM head on the positions whose logits are needed (the last one when generating);
* the pruning modules of each stage on the tokens alive at that stage: ``2·k·(H·h + h)``.

Norms, RoPE, softmax and residual adds are linear in ``k`` and tiny next to these; they are left out
of both the dense and the pruned count.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtp_core.config import PrunerConfig


@dataclass
class PrefillFlops:
    """FLOPs of one prefill: per decoder layer, in the pruning modules, in the LM head, and in total."""

    per_layer: list[float]
    pruner: float
    lm_head: float

    @property
    def total(self) -> float:
        return sum(self.per_layer) + self.pruner + self.lm_head


def layer_flops(config, k: int) -> float:
    """FLOPs of one decoder layer of a model with config ``config`` processing ``k`` tokens causally."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    hq = config.num_attention_heads * head_dim
    hkv = config.num_key_value_heads * head_dim
    projections = 2 * k * h * (hq + 2 * hkv) + 2 * k * hq * h
    attention = 2 * 2 * hq * k * (k + 1) / 2
    mlp = 2 * 3 * k * h * config.intermediate_size
    return projections + attention + mlp


def prefill_flops(
    config, kept_counts: list[int], pruner: PrunerConfig | None = None, n_logits: int = 1
) -> PrefillFlops:
    """FLOPs of a prefill in which decoder layer ``l`` processed ``kept_counts[l]`` tokens.

    ``pruner`` adds the cost of its scorers (stage ``s`` scores the tokens alive before layer
    ``layers[s]``, i.e. those layer ``layers[s] - 1`` processed).
    """
    if len(kept_counts) != config.num_hidden_layers:
        raise ValueError(f"need one kept count per layer ({config.num_hidden_layers}), got {len(kept_counts)}")
    per_layer = [layer_flops(config, k) for k in kept_counts]
    scorer = 0.0
    if pruner is not None:
        h, hid = pruner.scorer_input, pruner.scorer_hidden
        scorer = sum(2 * kept_counts[layer - 1] * (h * hid + hid) for layer in pruner.layers)
    lm_head = 2 * n_logits * config.hidden_size * config.vocab_size
    return PrefillFlops(per_layer=per_layer, pruner=scorer, lm_head=lm_head)


def scheduled_counts(config, n: int, pruner: PrunerConfig | None) -> list[int]:
    """Tokens each layer processes for one prompt of length ``n`` under a schedule (no engine run needed)."""
    import torch

    from sdtp_core.selection import keep_counts, recent_count

    counts, current = [], n
    stage_of = dict(zip(pruner.layers, pruner.keep_ratios)) if pruner else {}
    for layer in range(config.num_hidden_layers):
        if layer in stage_of:
            protected = min(n, pruner.keep_first + recent_count(n, pruner.keep_recent))
            target = int(keep_counts(torch.tensor([n]), stage_of[layer])[0])
            current = min(current, max(target, protected))
        counts.append(current)
    return counts
