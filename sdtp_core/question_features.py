"""Question-aware inputs of a trained scorer: what the ``line`` and ``spread`` scorers hard-code, as features.

In a causal model a context token's hidden state cannot depend on the question after it. The prompt's
protected tail (its last ``keep_recent`` share, where a long-context question sits) has read everything, and
the attention it pays a token in the stage layer says whether the question needs that token. The
training-free scorers rank by that attention spread over fixed spans (``attention:64:95:15:l``); a trained
scorer with these features instead learns how far to spread, and when (:class:`~sdtp_core.pruner.TokenPruner`
with ``PrunerConfig.features``).

A feature is named by a spec:

* ``attn``: the attention the last ``window`` slots pay the token (mean over heads and queries);
* ``span:B:A``: the highest ``attn`` among the ``B`` slots before the token, itself and the ``A`` after it;
* ``line:B:A``: the same, without crossing a line end (the engine passes each slot's line, ``segments``).

Each is fed as ``log1p(n * x)`` with ``n`` the row's live slots, so uniform attention is ``log 2`` whatever the
prompt's length. Protected slots (the sinks, the tail) lend nothing to their neighbours' spans, as in
:class:`~sdtp_core.scorers.AttentionScorer`.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

from sdtp_core.spans import segment_span_max, span_max

#: the features of the question-aware scorer the training recipe builds (``--features default``): the raw
#: attention, spans around the ones the training-free scorers use, and the same within lines
DEFAULT_FEATURES = ("attn", "span:15:3", "span:63:15", "span:127:31", "line:31:7", "line:95:15", "line:255:31")
#: queries whose attention the features read: the last ``window`` slots
DEFAULT_WINDOW = 64
_SPEC = re.compile(r"attn|(span|line):(\d+):(\d+)")


def parse_feature(spec: str) -> tuple[str, int, int]:
    """``(kind, before, after)`` of a feature spec (module docstring); ``ValueError`` naming the bad spec."""
    match = _SPEC.fullmatch(spec)
    if not match:
        raise ValueError(f"unknown scorer feature {spec!r}: use attn, span:B:A or line:B:A (B, A >= 0)")
    return ("attn", 0, 0) if spec == "attn" else (match[1], int(match[2]), int(match[3]))


def needs_lines(specs: list[str] | tuple[str, ...]) -> bool:
    """Whether any feature stays within lines (then the scorer needs the tokenizer's line ends)."""
    return any(parse_feature(s)[0] == "line" for s in specs)


def tail_attention(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """(batch, k) the mean attention probability each slot receives from the last ``window`` slots in ``layer``,
    computed with the layer's own norm, q/k projections and RoPE on its input ``hidden_states``.

    Slots are right-aligned (:mod:`sdtp_core.selection`): the last slots are the most recent tokens. Padding
    slots receive nothing, and padding queries contribute nothing."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    x = layer.input_layernorm(hidden_states)
    batch, k, _ = x.shape
    m = min(window, k)
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    q = attn.q_proj(x[:, -m:]).view(batch, m, -1, head_dim).transpose(1, 2)
    keys = attn.k_proj(x).view(batch, k, -1, head_dim).transpose(1, 2)
    q, _ = rotate(q, q, cos[:, -m:], sin[:, -m:])
    _, keys = rotate(keys, keys, cos, sin)
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    logits = (q.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # (batch, heads, m, k)
    query_slot = torch.arange(k - m, k, device=x.device).view(m, 1)
    allowed = (torch.arange(k, device=x.device).view(1, k) <= query_slot).unsqueeze(0) & valid[:, None, :]
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    live_queries = valid[:, -m:].float()  # (batch, m)
    per_query = probs.mean(1)  # over heads -> (batch, m, k)
    return (per_query * live_queries[:, :, None]).sum(1) / live_queries.sum(1, keepdim=True).clamp(min=1)


def question_features(
    specs: list[str] | tuple[str, ...],
    attention: torch.Tensor,
    valid: torch.Tensor,
    protected: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, k, len(specs)) the features ``specs`` of each slot from its ``attention`` (batch, k), as
    :func:`tail_attention` gives it. ``protected`` (batch, k) slots lend nothing to spans; ``segments``
    (batch, k) each slot's line (:func:`~sdtp_core.scorers.segment_ids`), required by ``line`` features.
    Padding slots get 0."""
    attention = attention.float().masked_fill(~valid, 0.0)
    lent = attention if protected is None else attention.masked_fill(protected, 0.0)
    scale = valid.sum(1, keepdim=True).float()
    columns = []
    for spec in specs:
        kind, before, after = parse_feature(spec)
        if kind == "attn":
            x = attention
        elif kind == "span":
            x = span_max(lent, valid, before, after)
        else:
            if segments is None:
                raise ValueError(f"feature {spec!r} stays within lines and needs each slot's line (segments=)")
            x = segment_span_max(lent, segments, valid, before, after)
        columns.append(torch.log1p(scale * x).masked_fill(~valid, 0.0))
    return torch.stack(columns, -1)
