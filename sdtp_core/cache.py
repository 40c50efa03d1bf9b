"""Per-layer pruned KV caches: layer ``l`` holds exactly the tokens layer ``l`` processed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class PrunedCache:
    """A transformers :class:`DynamicCache` plus which slots of each layer's keys are live.

    Layers between two pruning stages share one key layout, so liveness is stored per *segment*
    (``segment_of[layer]``) and grows by one live column per decoded token.
    """

    kv: DynamicCache
    segment_of: list[int]
    segment_valid: list[torch.Tensor] = field(default_factory=list)

    def layer_valid(self, layer: int) -> torch.Tensor:
        return self.segment_valid[self.segment_of[layer]]

    def append_live(self, n: int = 1) -> None:
        """Mark ``n`` new live slots (decoded tokens) at the end of every layer."""
        for i, v in enumerate(self.segment_valid):
            self.segment_valid[i] = torch.cat([v, v.new_ones(v.shape[0], n)], dim=1)

    def layer_lengths(self) -> list[int]:
        """Number of key slots (live or padding) stored per layer."""
        return [self.kv.layers[i].get_seq_length() for i in range(len(self.segment_of))]

    def live_counts(self) -> torch.Tensor:
        """(batch, num_layers) live tokens each layer's cache holds for each row."""
        return torch.stack([self.layer_valid(i).sum(1) for i in range(len(self.segment_of))], dim=1)
