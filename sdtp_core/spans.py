"""Spans and units of a prompt's slots: the highest score within a span (:func:`span_max`), within a span that
stays inside a sentence or line (:func:`segment_span_max`), and the units themselves (:func:`sentence_ends`,
:func:`segment_ids`). Used by the training-free scorers (:mod:`sdtp_core.scorers`), the question-aware features
(:mod:`sdtp_core.question_features`) and the engine, which numbers units once and gathers them with the kept
tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: characters whose presence in a token's text ends a sentence (:func:`sentence_ends`)
SENTENCE_END_CHARS = ".!?\n"
#: ... and a line (:func:`line_ends`)
LINE_END_CHARS = "\n"


def span_max(scores: torch.Tensor, valid: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(batch, k) each live slot's highest score among the ``before`` slots before it, itself and the ``after``
    slots after it; padding slots get 0. ``scores`` must be >= 0 (padding, and the row's ends, count as 0)."""
    if not (before or after):
        return scores
    span = F.pad(scores[:, None], (before, after))
    return F.max_pool1d(span, before + after + 1, stride=1)[:, 0].masked_fill(~valid, 0.0)


def segment_span_max(
    scores: torch.Tensor, segments: torch.Tensor, valid: torch.Tensor, before: int, after: int
) -> torch.Tensor:
    """:func:`span_max` within segments: each live slot's highest score among the slots up to ``before`` before
    it and ``after`` after it that share its segment (``segments`` (batch, k), each segment a run of consecutive
    slots, as :func:`segment_ids` numbers them); padding slots get 0.

    A range-maximum query: maxima over power-of-two windows (``log2(before + after + 1)`` max-pools), then each
    slot's clipped window ``[max(j - before, start), min(j + after, end)]`` is covered by two of them. A fixed
    handful of tensor operations, whatever the span."""
    batch, k = scores.shape
    slot = torch.arange(k, device=scores.device).expand(batch, k)
    starts = segments != F.pad(segments, (1, 0), value=-2)[:, :-1]  # first slot of a segment
    ends = segments != F.pad(segments, (0, 1), value=-2)[:, 1:]  # last slot of a segment
    first = torch.where(starts, slot, 0).cummax(1).values
    last = torch.where(ends, slot, k - 1).flip(1).cummin(1).values.flip(1)
    lo = torch.maximum(slot - before, first)
    hi = torch.minimum(slot + after, last)
    levels = [scores]  # levels[l][:, i] = max(scores[:, i : i + 2**l])
    while 2 ** len(levels) <= before + after + 1:
        width = 2 ** (len(levels) - 1)
        prev = levels[-1]
        levels.append(torch.maximum(prev, F.pad(prev[:, width:], (0, min(width, k)))))
    table = torch.stack(levels, 1).flatten(1)  # (batch, levels * k)
    level = torch.log2((hi - lo + 1).float()).floor().long()
    left = table.gather(1, level * k + lo)
    right = table.gather(1, level * k + hi - (1 << level) + 1)
    return torch.maximum(left, right).masked_fill(~valid, 0.0)


def sentence_ends(tokenizer, vocab_size: int = 0, chars: str = SENTENCE_END_CHARS) -> torch.Tensor:
    """(max(len(tokenizer), vocab_size),) bool: the token ids whose text contains one of ``chars`` (default
    :data:`SENTENCE_END_CHARS`: ``.``, ``!``, ``?`` or a newline; ``"\n"`` for lines). Ids the tokenizer does not
    know end nothing."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    ends = torch.zeros(max(n, vocab_size), dtype=torch.bool)
    ends[:n] = torch.tensor([any(c in t for c in chars) for t in texts])
    return ends


def line_ends(tokenizer, vocab_size: int = 0) -> torch.Tensor:
    """:func:`sentence_ends` for lines: the token ids whose text contains a newline."""
    return sentence_ends(tokenizer, vocab_size, LINE_END_CHARS)


def segment_ids(ids: torch.Tensor, valid: torch.Tensor, ends: torch.Tensor, min_tokens: int = 0) -> torch.Tensor:
    """(batch, k) the sentence of each slot of ``ids`` (batch, k), numbered from 0 in slot order: a token that
    ends a sentence (``ends[id]``, :func:`sentence_ends`) belongs to it, the next token starts the next one.
    An end token closing fewer than ``min_tokens`` tokens since the previous end token (the text's own
    sentences or lines, counted over live slots) ends nothing: that short one joins the next. Padding slots get
    -1. Computed once on the whole prompt, then gathered with the kept tokens, so a sentence stays one sentence
    when its end token is pruned."""
    end = ends.to(ids.device)[ids] & valid
    if min_tokens > 1:
        count = valid.long().cumsum(1)  # live slots up to and including each slot
        last = torch.where(end, count, torch.zeros_like(count)).cummax(1).values  # count at the latest end so far
        before = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], 1)  # ... strictly before each slot
        end = end & (count - before >= min_tokens)
    return (end.long().cumsum(1) - end.long()).masked_fill(~valid, -1)
