"""Training-free token scorers, usable wherever a trained :class:`~sdtp_core.pruner.TokenPruner` is.

They run at the same stages with the same keep ratios and protected tokens as a trained pruner, so
kept counts and 1/τ are identical and only the choice of tokens differs. Baselines a trained pruner
must beat:

* ``norm``: the L2 norm of the token's hidden state at the stage.
* ``attention``: the attention the most recent tokens pay to each token in the stage layer, averaged
  over heads and over the last ``window`` tokens (as FastV / LazyLLM rank tokens); computed with the
  stage layer's own q/k projections and RoPE on its input, i.e. what that layer would attend to.
  Pooled (``attention:W:P``), each token then takes the highest score within ``P // 2`` slots on either side
  (SnapKV's pooling of attention scores, here a max), so a span the queries attend to anywhere is kept
  whole: a 7-digit number is 7 tokens, and dropping any one of them loses it. Spread
  (``attention:W:B:A``), it takes the highest score among the ``B`` slots before it and the ``A`` after it:
  with ``B`` > ``A`` an attended token keeps what *follows* it. A question names a key, the queries attend to
  the key where the context states it, and the value comes after the key ("the uuid for KEY is: VALUE"),
  out of reach of a centred pool when key and value are 30 tokens each.
  Within sentences (``attention:W:B:A:s``), the span stops at the sentence's ends: a token takes scores only from
  its own sentence (a token whose text holds ``.``, ``!``, ``?`` or a newline ends one, :func:`sentence_ends`), so
  an attended key keeps its sentence whole, value included, and no budget goes to the filler around it. Within
  lines (``:l``), only a newline ends the unit.

(``random``, an untrained seeded scorer MLP, is built by :meth:`TokenPruner.for_model`.)

:class:`RankUnion` combines scorers (``pruner=shipped+attention``): a token survives if any of them
ranks it high. Measured motivation (docs/history.md, "Every scorer at one schedule"): the trained pruner leads on
LongBench generation and the attention scorer on retrieval (RULER, needles).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from sdtp_core.config import PrunerConfig, earlier_layers
from sdtp_core.question_features import tail_attention
from sdtp_core.spans import LINE_END_CHARS, SENTENCE_END_CHARS, segment_span_max, sentence_ends, span_max


class Preset(NamedTuple):
    """A named training-free scorer: the scorer ``spec`` it stands for, and its default stage ``layers`` for a
    model with that many decoder layers (:func:`sdtp_core.loading.load_pruner` uses them when none are given)."""

    spec: str
    layers: Callable[[int], list[int]]


#: ``spread``: the attention scorer spread over 63 slots before and 15 after, at the paper's layers each one
#: earlier (docs/history.md, "Spreading the score forward");
#: ``line``: spread over 95 slots before and 15 after without crossing a newline, at the same layers
#: (results/retention/README.md; docs/history.md, "Within lines");
#: ``line16``: ``line`` with a line of fewer than 16 tokens (a title, a ``Passage 1:``) joined to the line below it,
#: the default (results/default/README.md; docs/history.md, "Lines with their headers").
PRESETS = {
    "spread": Preset("attention:64:63:15", earlier_layers),
    "line": Preset("attention:64:95:15:l", earlier_layers),
    "line16": Preset("attention:64:95:15:l16", earlier_layers),
}
#: the spec suffix of a scorer whose span stays inside a unit -> the characters that end the unit:
#: ``:s`` sentences, ``:l`` lines; ``:lN`` (``:sN``): a line (sentence) of fewer than ``N`` tokens joins the next
UNIT_ENDS = {"s": SENTENCE_END_CHARS, "l": LINE_END_CHARS}


class Unit(NamedTuple):
    """A scorer's unit (:func:`unit_of`): the characters that end one, and the fewest tokens one must have to
    end there (a shorter one, such as a title or a ``Passage 1:`` line, joins the unit after it)."""

    ends: str
    min_tokens: int = 0


TRAINING_FREE = ("attention", "norm", *PRESETS)


class NormScorer(nn.Module):
    """Scores each token by the L2 norm of its hidden state."""

    def __init__(self, config: PrunerConfig):
        super().__init__()
        self.config = config

    def score(self, stage: int, hidden_states: torch.Tensor, **context) -> torch.Tensor:
        return hidden_states.float().norm(dim=-1)


class AttentionScorer(nn.Module):
    """Scores each token by the attention it receives from the last ``window`` tokens in the stage layer,
    then takes the highest such score among the ``before`` slots before it and the ``after`` slots after it
    (both 0: no pooling). With ``ends`` (:func:`sentence_ends`) the span stops at sentence ends: the engine
    then passes each slot's sentence (``segments``, :func:`segment_ids`, ``min_unit_tokens`` its ``min_tokens``)
    to :meth:`score`."""

    def __init__(
        self,
        config: PrunerConfig,
        window: int = 8,
        before: int = 0,
        after: int = 0,
        ends: torch.Tensor | None = None,
        min_unit_tokens: int = 0,
    ):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if before < 0 or after < 0:
            raise ValueError(f"before and after must be >= 0, got {before} and {after}")
        self.config = config
        self.window = window
        self.before = before
        self.after = after
        #: (vocab,) which token ids end a sentence, or None (spans cross sentences)
        self.register_buffer("sentence_ends", ends, persistent=False)
        #: a unit of fewer tokens joins the next one (:func:`segment_ids`)
        self.min_unit_tokens = min_unit_tokens

    def score(
        self,
        stage: int,
        hidden_states: torch.Tensor,
        *,
        layer: nn.Module,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        valid: torch.Tensor,
        protected: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        **context,
    ) -> torch.Tensor:
        """(batch, k) mean attention probability each slot receives (the highest over its pooling span).

        Slots are right-aligned (see :mod:`sdtp_core.selection`): the last ``window`` slots are the most
        recent tokens, and causal order between slots is causal order between original positions.
        Padding slots receive no attention; the pooled score a live slot takes never comes from padding.
        ``protected`` (batch, k) marks slots every stage keeps (the first tokens, the recent tail): their
        scores lend nothing to their neighbours, since the attention they receive (the sink's, the
        recent tokens' attention to each other) says nothing about which context is worth keeping.
        ``segments`` (batch, k): each slot's sentence (:func:`segment_ids`), required when the scorer has
        ``sentence_ends``: the span then takes scores from the slot's own sentence only.
        """
        if self.sentence_ends is not None and segments is None:
            raise ValueError("a scorer within sentences needs each slot's sentence (segments=, see segment_ids)")
        scores = tail_attention(layer, hidden_states, position_embeddings, valid, self.window)
        if protected is not None and (self.before or self.after):
            scores = scores.masked_fill(protected, 0.0)
        if self.sentence_ends is not None:
            return segment_span_max(scores, segments, valid, self.before, self.after)
        return span_max(scores, valid, self.before, self.after)


def rank_fractions(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, k) each live slot's rank among its row's live slots, scaled to [0, 1] (1 = highest score).

    Ties are broken by slot (the earlier slot ranks lower); padding slots get 0; NaN scores count as 0.
    """
    key = torch.nan_to_num(scores.float(), nan=0.0)
    if valid is None:
        valid = torch.ones_like(key, dtype=torch.bool)
    key = key.masked_fill(~valid, float("-inf"))
    rank = key.argsort(dim=1, stable=True).argsort(dim=1)  # padding (-inf) takes the lowest ranks
    n_pad = (~valid).sum(1, keepdim=True)
    n_live = valid.sum(1, keepdim=True)
    return ((rank - n_pad).float() / (n_live - 1).clamp(min=1)).masked_fill(~valid, 0.0)


class RankUnion(nn.Module):
    """Keeps what any of ``scorers`` ranks high: a token's score is the highest of its rank fractions
    (:func:`rank_fractions`) under each scorer. With two unrelated scorers a stage keeping ``k`` tokens
    keeps roughly each one's top ``k / 2`` (more of each where they agree). All scorers must share one
    schedule (``config``)."""

    def __init__(self, scorers: list[nn.Module], config: PrunerConfig):
        super().__init__()
        if len(scorers) < 2:
            raise ValueError(f"a union needs at least two scorers, got {len(scorers)}")
        self.parts = nn.ModuleList(scorers)
        self.config = config

    def score(
        self, stage: int, hidden_states: torch.Tensor, *, valid: torch.Tensor | None = None, **context
    ) -> torch.Tensor:
        ranks = [rank_fractions(part.score(stage, hidden_states, valid=valid, **context), valid) for part in self.parts]
        return torch.stack(ranks).amax(0)

    @property
    def sentence_ends(self) -> torch.Tensor | None:
        """The first part's sentence ends (:class:`AttentionScorer`), if any part scores within sentences."""
        return self._unit_part.sentence_ends if self._unit_part is not None else None

    @property
    def min_unit_tokens(self) -> int:
        """The same part's ``min_unit_tokens`` (0 if no part scores within units)."""
        return self._unit_part.min_unit_tokens if self._unit_part is not None else 0

    @property
    def _unit_part(self) -> nn.Module | None:
        return next((p for p in self.parts if getattr(p, "sentence_ends", None) is not None), None)


def is_training_free(spec: str) -> bool:
    """Whether ``spec`` names a training-free scorer (``norm``, ``attention``, ``attention:W``, ``attention:W:P``,
    ``attention:W:B:A``, either of the last two with ``:s`` or ``:l``, or a name in :data:`PRESETS`)."""
    return spec.partition(":")[0] in TRAINING_FREE


def unit_of(spec: str) -> Unit | None:
    """The unit a training-free scorer ``spec`` keeps its span inside, or None: the last field of
    ``attention:W:P:u`` / ``attention:W:B:A:u`` (a name in :data:`PRESETS` resolved), ``s`` (sentences) or ``l``
    (lines), optionally followed by the fewest tokens a unit needs to end (``l16``)."""
    kind, _, arg = PRESETS[spec].spec.partition(":") if spec in PRESETS else spec.partition(":")
    parts = arg.split(":") if arg else []
    if kind != "attention" or len(parts) not in (3, 4):
        return None
    match = re.fullmatch(r"([a-z])(\d*)", parts[-1])
    if not match or match[1] not in UNIT_ENDS:
        return None
    return Unit(UNIT_ENDS[match[1]], int(match[2] or 0))


def needs_tokenizer(spec: str) -> bool:
    """Whether the scorer ``spec`` names (or any part of a ``+`` union) scores within sentences or lines (``:s``,
    ``:l``), which needs the model's tokenizer (:func:`sentence_ends`)."""
    return any(unit_of(s) for s in spec.split("+"))


def training_free(spec: str, config: PrunerConfig, tokenizer=None, vocab_size: int = 0) -> nn.Module:
    """A training-free scorer by name for the schedule ``config``: ``norm``, ``attention`` (window 8, no
    pooling), ``attention:W`` (the attention of the last ``W`` tokens), ``attention:W:P`` (also max-pooled over
    ``P`` neighbouring slots, ``P`` odd: ``P // 2`` on either side) or ``attention:W:B:A`` (the highest score
    among ``B`` slots before and ``A`` after); either of the last two ending in ``:s`` (``:l``) keeps the span
    inside each sentence (line), ``:sN`` (``:lN``) the same with a sentence (line) of fewer than ``N`` tokens
    joined to the next (``tokenizer`` required, ``vocab_size`` the model's); or a name in :data:`PRESETS`
    (``spread``, ``line``, ``line16``)."""
    if spec in PRESETS:
        spec = PRESETS[spec].spec
    kind, _, arg = spec.partition(":")
    if kind == "norm" and not arg:
        return NormScorer(config)
    if kind == "attention":
        parts = arg.split(":") if arg else []
        ends, unit = None, unit_of(spec)
        if unit:
            if tokenizer is None:
                raise ValueError(f"{spec!r} scores within sentences or lines and needs the model's tokenizer")
            parts, ends = parts[:-1], sentence_ends(tokenizer, vocab_size, unit.ends)
        try:
            values = [int(p) for p in parts]
            if len(values) == 2:  # attention:W:P, a centred pool
                window, pool = values
                if pool < 1 or pool % 2 == 0:
                    raise ValueError(f"pool must be a positive odd number, got {pool}")
                values = [window, pool // 2, pool // 2]
            if len(values) > 3:
                raise ValueError("too many fields")
            return AttentionScorer(config, *values, ends=ends, min_unit_tokens=unit.min_tokens if unit else 0)
        except ValueError as e:
            raise ValueError(
                f"attention:W[:P[:s]] or attention:W:B:A[:s] needs a positive integer window W, a positive odd pool P, "
                f"and spans B, A >= 0 (:s within sentences, :l within lines, :l16 joining lines under 16 tokens to "
                f"the next); got {spec!r} ({e})"
            ) from e
    raise ValueError(
        f"unknown training-free scorer {spec!r}; use one of {TRAINING_FREE} "
        "(attention:W[:P] for a query window W and pooling P, attention:W:B:A for a span B before and A after, "
        "either with :s to keep the span inside sentences)"
    )
