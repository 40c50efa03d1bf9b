"""The saliency oracle: prune by SDTP's own training target, for analysis only.

SDTP trains its scorers to predict the Stage 1 saliency (:mod:`.saliency`): ``|dL/dh * h|`` of each
token's hidden state at the input of each stage layer, where ``L`` is the loss of the *answer*. No
scorer has that at inference time, since it needs the answer. :class:`SaliencyOracle` computes it from a
known continuation and prunes by it, with the schedule, protected tokens and kept counts of any other
scorer. The result bounds what a pruner that imitated its target perfectly would keep: if pruning by the
target itself loses more than a training-free scorer, better training cannot close the gap.

Use: ``scorer.prepare(model, input_ids, attention_mask, labels)`` for a batch, then
``engine.prefill(...)`` on the same batch. In lm-eval: ``--model sdtp --model_args pruner=saliency`` on
loglikelihood tasks with one continuation per context (the continuation is the answer); generation is
refused, since the answer is what is being generated.
"""

from __future__ import annotations

import torch
from torch import nn

from sdtp_core.config import PrunerConfig
from sdtp_core.train.saliency import compute_saliency

ORACLE = "saliency"


class OracleNotPreparedError(RuntimeError):
    """The oracle was asked for scores of a batch it has no saliency for."""


class SaliencyOracle(nn.Module):
    """Scores each token by its Stage 1 saliency for a known continuation (see the module docstring)."""

    #: the sdtp lm-eval model calls :meth:`prepare` with each loglikelihood batch's continuation
    needs_targets = True

    def __init__(self, config: PrunerConfig):
        super().__init__()
        self.config = config
        self._table: torch.Tensor | None = None  # (batch, stages, n): |saliency| by original position

    def prepare(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        """Compute the saliency of every real token of each row for the next :meth:`score` calls.

        Args:
            model: the frozen model the engine runs.
            input_ids: (batch, n) the prompt batch the engine will prefill; rows may be padded on either side.
            attention_mask: (batch, n) 1 for real tokens.
            labels: (batch, n) in the same layout: the token each position must predict (the answer),
                -100 where nothing is scored. Each row needs at least one label.
        """
        mask = attention_mask.bool()
        counted = (labels != -100) & mask
        if not bool(counted.any(1).all()):
            raise ValueError("every row needs at least one labelled position (the answer the oracle is computed for)")
        table = torch.zeros(input_ids.shape[0], self.config.num_stages, int(mask.sum(1).max()))
        for b in range(input_ids.shape[0]):
            ids, row_labels = input_ids[b][mask[b]], labels[b][mask[b]]
            sal = compute_saliency(model, ids[None], row_labels[None], list(self.config.layers))
            table[b, :, : ids.numel()] = sal[0].abs().float().cpu()
        self._table = table

    def score(self, stage: int, hidden_states: torch.Tensor, *, positions: torch.Tensor, **context) -> torch.Tensor:
        """(batch, k) the prepared |saliency| of each slot's token (``positions``: its original position)."""
        table = self._table
        if table is None or table.shape[0] != positions.shape[0] or int(positions.max()) >= table.shape[2]:
            raise OracleNotPreparedError(
                "pruner=saliency is an oracle: call prepare(model, input_ids, attention_mask, labels) with the "
                "answer before each prefill (in lm-eval it works only for loglikelihood requests)"
            )
        return table[:, stage].to(positions.device).gather(1, positions)
