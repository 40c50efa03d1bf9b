"""An independent reference for the pruned forward: simulate pruning with attention masks.

The whole sequence runs through the unmodified decoder layers. At each stage the oracle scores the
tokens still alive, keeps the protected ones plus the best-scored rest, and from then on hides every
dropped token (as a key) from all later layers with an additive attention mask. No gathering, no
compaction, no cache: a second implementation of the same semantics.
"""

from __future__ import annotations

import math

import torch


def keep_count(ratio: float, n: int) -> int:
    return max(1, math.ceil(round(ratio * n, 6)))


@torch.no_grad()
def mask_simulated_forward(model, pruner, ids: list[int], n_prompt: int | None = None, extra_protect=()):
    """Logits (seq, vocab) of one unpadded sequence and the alive flags of its prompt tokens.

    Only the first ``n_prompt`` tokens (default: all) are candidates for pruning; tokens after them
    (decoded tokens) are always alive, like tokens appended to pruned caches.
    """
    inner = model.model
    n = len(ids)
    n_prompt = n if n_prompt is None else n_prompt
    cfg = pruner.config
    input_ids = torch.tensor([ids])
    hidden = inner.embed_tokens(input_ids)
    rope = inner.rotary_emb(hidden, torch.arange(n).unsqueeze(0))
    alive = [True] * n
    recent = max(1, math.ceil(round(cfg.keep_recent * n_prompt, 6)))  # the last prompt token is always kept
    protected = {i for i in range(n_prompt) if i < cfg.keep_first or i >= n_prompt - recent} | set(extra_protect)
    stage_at = dict(zip(cfg.layers, range(cfg.num_stages)))
    for i, layer in enumerate(inner.layers):
        if i in stage_at:
            s = stage_at[i]
            # the engine's scorer context: live slots (dead tokens are hidden keys here), the stage layer, RoPE
            context = dict(
                positions=torch.arange(n)[None],
                lengths=torch.tensor([n_prompt]),
                valid=torch.tensor([alive]),
                layer=layer,
                position_embeddings=rope,
                protected=torch.tensor([[j in protected for j in range(n)]]),
            )
            scores = pruner.score(s, hidden, **context)
            scores = scores[0].tolist()
            live = [j for j in range(n_prompt) if alive[j]]
            keep = keep_count(cfg.keep_ratios[s], n_prompt)
            must = [j for j in live if j in protected]
            rest = sorted((j for j in live if j not in protected), key=lambda j: -scores[j])
            kept = set(must) | set(rest[: max(0, keep - len(must))])
            for j in live:
                alive[j] = j in kept
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for k in range(q + 1):
                allowed[q, k] = alive[k] or k == q
        mask = torch.zeros(1, 1, n, n, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        out = layer(hidden, attention_mask=mask, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(inner.norm(hidden))[0]
    return logits, torch.tensor(alive[:n_prompt])
