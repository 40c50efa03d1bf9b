"""Training-time simulation of token pruning by attention masking (paper Sec. 3.2, after DynamicViT).

At inference :class:`~sdtp_core.engine.SDTPEngine` really removes tokens. Removing tokens is not
differentiable, so training keeps the full sequence and instead makes dropped tokens *invisible as
keys* to every later layer. Each stage turns its scores into a keep decision with a straight-through
Gumbel top-k (:func:`gumbel_keep`): the forward value is the hard top-k decision at the stage's keep
ratio, the gradient is that of a sigmoid relaxation. Decisions accumulate, ``mask_s = mask_{s-1} *
decision_s``, and only still-kept tokens compete at a stage.

The mask enters the model through a custom attention function registered with transformers'
``AttentionInterface`` (:func:`policy_attention`): the decoder layers forward extra keyword arguments
to the attention function, so :func:`masked_forward` runs the layers itself and passes each layer the
current keep mask as ``sdtp_policy``. The attention weights are DynamicViT's policy-weighted softmax,

    A_ij = exp(a_ij) P_j / sum_k exp(a_ik) P_k      (P_i forced to 1 for j = i, causal),

which equals the softmax over kept keys when P is 0/1, and passes gradients to P.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from sdtp_core.pruner import TokenPruner
from sdtp_core.selection import keep_counts, protected_mask

ATTN_NAME = "sdtp_policy"
_EPS = 1e-6


def policy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sdtp_policy: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention where key ``j`` is weighted by ``sdtp_policy[:, j]`` (DynamicViT masked softmax).

    Without a policy this is plain sdpa attention. ``query`` is (batch, heads, q, d), ``key``/``value``
    (batch, kv_heads, k, d), ``sdtp_policy`` (batch, k) with values in [0, 1]. Returns the attention
    output as (batch, q, heads, d), like every transformers attention function.
    """
    if sdtp_policy is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, k_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        causal = causal & attention_mask
    logits = logits.masked_fill(~causal, float("-inf"))
    logits = logits - logits.amax(-1, keepdim=True).detach()
    diag = _diag(q_len, k_len, query.device)
    policy = sdtp_policy.float()[:, None, None, :] * (1.0 - diag) + diag
    weights = logits.exp() * policy
    weights = (weights + _EPS / k_len * causal) / (weights.sum(-1, keepdim=True) + _EPS)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def _diag(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q, k) float matrix with ones where key slot == query slot (queries are the last ``q`` slots)."""
    q = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)
    k = torch.arange(k_len, device=device).unsqueeze(0)
    return (q == k).float()


AttentionInterface.register(ATTN_NAME, policy_attention)


@contextlib.contextmanager
def use_policy_attention(model) -> Iterator[None]:
    """Temporarily route ``model``'s attention through :func:`policy_attention`."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def decoder_parts(model):
    """``(inner, lm_head)`` of a Llama/Qwen2-layout causal LM; a clear error for other layouts."""
    inner = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "rotary_emb", "norm") if not hasattr(inner, n)]
    if missing or not hasattr(model, "lm_head"):
        raise TypeError(f"{type(model).__name__} does not have the Llama/Qwen2 decoder layout (missing {missing})")
    return inner, model.lm_head


def lm_loss_from_hidden(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy from final hidden states (before the final norm).

    Only positions with a label (``labels != -100``; ``labels[b, t]`` is the token that position ``t``
    predicts) go through the final norm and the LM head, which saves most of the head's cost when
    only a response is scored. Returns (batch,).
    """
    inner, lm_head = decoder_parts(model)
    counted = labels != -100
    rows = counted.nonzero()[:, 0]
    logits = lm_head(inner.norm(hidden[counted]))
    ce = torch.nn.functional.cross_entropy(logits.float(), labels[counted], reduction="none")
    total = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    return total / counted.sum(1).clamp(min=1).to(ce.dtype)


def gumbel_keep(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    n_keep: torch.Tensor,
    tau: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel top-k keep decision among ``candidates``.

    Args:
        scores: (batch, n) pruner scores.
        candidates: (batch, n) tokens this stage may drop (alive, prunable, not protected).
        n_keep: (batch,) how many candidates each row keeps.
        tau: temperature of the sigmoid relaxation.
        noise: (batch, n) logistic noise (the difference of two Gumbels) added to the scores, or None
            for the deterministic top-k used at inference.

    Returns:
        ``(decision, hard)``: ``decision`` (batch, n) float whose forward value is ``hard`` (bool: the
        ``n_keep`` best perturbed candidates) and whose gradient is that of
        ``sigmoid((scores + noise - threshold) / tau)``, the threshold sitting halfway between the last
        kept and the first dropped candidate. Non-candidates get decision 0 here.
    """
    perturbed = scores.float() if noise is None else scores.float() + noise
    key = perturbed.detach().masked_fill(~candidates, float("-inf"))
    hard = torch.zeros_like(candidates)
    threshold = torch.zeros(scores.shape[0], 1, device=scores.device)
    for b in range(scores.shape[0]):
        c, k = int(candidates[b].sum()), int(n_keep[b])
        if c == 0:
            continue
        values, order = key[b].topk(c)
        hard[b, order[:k]] = True
        if k == 0:
            threshold[b] = values[0] + 1.0
        elif k >= c:
            threshold[b] = values[c - 1] - 1.0
        else:
            threshold[b] = (values[k - 1] + values[k]) / 2
    soft = torch.sigmoid((perturbed - threshold) / tau) * candidates
    decision = hard.float() + (soft - soft.detach())  # exactly 0/1 forward values
    return decision, hard


Generators = torch.Generator | list[torch.Generator]


def logistic_noise(shape: tuple[int, int], generator: Generators, device: torch.device) -> torch.Tensor:
    """(batch, n) Logistic(0, 1) noise, ``g1 - g2`` of two Gumbels, from CPU generators (reproducible).

    ``generator`` is one generator for the batch or a list with one per row; per-row generators make a
    sample's noise independent of how samples are grouped into batches and processes.
    """
    if isinstance(generator, torch.Generator):
        u = torch.rand(shape, generator=generator)
    else:
        u = torch.stack([torch.rand(shape[1], generator=g) for g in generator])
    u = u.clamp(1e-6, 1 - 1e-6)
    return (u.log() - (-u).log1p()).to(device)


@dataclass
class MaskedOutput:
    """Result of :func:`masked_forward`.

    Attributes:
        hidden: (batch, n, hidden) final hidden states, before the final norm.
        scores: per stage, (batch, n) fp32 pruner scores.
        decided: per stage, (batch, n) bool: the tokens that stage chose among (alive, prunable,
            unprotected): the ones its scores are supervised on.
        masks: per stage, (batch, n) float keep mask after the stage (0/1 forward values,
            straight-through gradients).
        hard: per stage, (batch, n) bool keep mask after the stage.
    """

    hidden: torch.Tensor
    scores: list[torch.Tensor]
    decided: list[torch.Tensor]
    masks: list[torch.Tensor]
    hard: list[torch.Tensor]


def masked_forward(
    model,
    pruner: TokenPruner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    tau: float = 1.0,
    generator: Generators | None = None,
    lm_grad: bool = True,
) -> MaskedOutput:
    """Run ``model`` with pruning simulated by attention masking.

    Args:
        model: frozen causal LM (Llama/Qwen2 layout).
        pruner: the pruning modules being trained.
        input_ids: (batch, n) token ids, right-padded.
        attention_mask: (batch, n) 1 for real tokens.
        prompt_mask: (batch, n) the prunable tokens (the prompt); other real tokens (the response) are
            always kept, like the tokens generated after a pruned prefill.
        tau: Gumbel-sigmoid temperature.
        generator: CPU generator(s) for the Gumbel noise (one, or one per row); ``None`` gives the
            deterministic top-k of the inference engine.
        lm_grad: build the autograd graph through the decoder layers (needed for gradients of the LM loss
            to reach the pruner through the masks); ``False`` keeps only the scorers' graphs.

    Layers before the first stage run without gradient: nothing trainable comes before them.
    """
    inner, _ = decoder_parts(model)
    cfg = pruner.config
    real = attention_mask.bool()
    prompt = prompt_mask.bool() & real
    prompt_len = prompt.sum(1)
    protect = protected_mask(prompt.long(), cfg.keep_first, cfg.keep_recent)
    stage_at = {layer: s for s, layer in enumerate(cfg.layers)}
    first = cfg.layers[0] if cfg.layers else len(inner.layers)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    out = MaskedOutput(hidden=None, scores=[], decided=[], masks=[], hard=[])  # type: ignore[arg-type]
    alive = real.clone()
    mask = real.float()
    policy = None
    with use_policy_attention(model):
        with torch.no_grad():
            hidden = inner.embed_tokens(input_ids)
            rope = inner.rotary_emb(hidden, positions)
            for layer in inner.layers[:first]:
                hidden = layer(hidden, attention_mask=None, position_embeddings=rope, sdtp_policy=None)
        for i in range(first, len(inner.layers)):
            if i in stage_at:
                s = stage_at[i]
                scores = pruner.score(s, hidden, positions=positions, lengths=prompt_len, valid=prompt).float()
                decided = alive & prompt & ~protect
                kept_prompt = keep_counts(prompt_len, cfg.keep_ratios[s])
                n_fixed = (alive & prompt & protect).sum(1)
                n_keep = torch.minimum((kept_prompt - n_fixed).clamp(min=0), decided.sum(1))
                noise = None if generator is None else logistic_noise(tuple(scores.shape), generator, scores.device)
                decision, hard = gumbel_keep(scores, decided, n_keep, tau, noise)
                fixed = (alive & ~decided).float()
                mask = mask * (decision + fixed)
                alive = alive & (hard | ~decided)
                policy = mask
                out.scores.append(scores)
                out.decided.append(decided)
                out.masks.append(mask)
                out.hard.append(alive.clone())
            with torch.set_grad_enabled(lm_grad and torch.is_grad_enabled()):
                hidden = inner.layers[i](hidden, attention_mask=None, position_embeddings=rope, sdtp_policy=policy)
    out.hidden = hidden
    return out
