"""Per-layer pruned KV caches: layer ``l`` holds exactly the tokens layer ``l`` processed.

Decoding appends one key/value column per layer and one live flag per segment at every step. A plain
:class:`~transformers.DynamicCache` does that with ``torch.cat``, copying the whole cache of every
layer per token; :meth:`PrunedCache.reserve` instead moves each layer into a preallocated buffer
(:class:`ReservedLayer`) and each segment's live flags into one too, so a step writes one column in
place and the attention reads views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sdtp_core.attention import layout_mask


class ReservedLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys and values are views of buffers with room for more tokens.

    ``update`` copies the new columns into the buffers and returns views of the filled part (the same
    values a ``torch.cat`` would return); past the capacity the buffers double.
    """

    def __init__(self, layer: DynamicLayer, extra: int):
        super().__init__()
        b, h, n, d = layer.keys.shape
        self._keys = layer.keys.new_empty(b, h, n + extra, d)
        self._values = layer.values.new_empty(b, h, n + extra, layer.values.shape[-1])
        self._keys[:, :, :n].copy_(layer.keys)
        self._values[:, :, :n].copy_(layer.values)
        self._length = n
        self.device = layer.keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        end = self._length + n
        if end > self._keys.shape[-2]:
            grow = max(end, 2 * self._keys.shape[-2]) - self._keys.shape[-2]
            pad = (0, 0, 0, grow)
            self._keys = torch.nn.functional.pad(self._keys, pad)
            self._values = torch.nn.functional.pad(self._values, pad)
        self._keys[:, :, self._length : end].copy_(key_states)
        self._values[:, :, self._length : end].copy_(value_states)
        self._length = end
        self._views()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._length = max(0, self._length + tokens_to_remove)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._views()

    @property
    def capacity(self) -> int:
        return self._keys.shape[-2]


@dataclass
class PrunedCache:
    """A transformers :class:`DynamicCache` plus which slots of each layer's keys are live.

    Layers between two pruning stages share one key layout, so liveness is stored per *segment*
    (``segment_of[layer]``) and grows by one live column per decoded token.
    """

    kv: DynamicCache
    segment_of: list[int]
    segment_valid: list[torch.Tensor] = field(default_factory=list)
    _valid_buffers: list[torch.Tensor] = field(default_factory=list, repr=False)
    _all_live: list[bool] = field(default_factory=list, repr=False)

    def layer_valid(self, layer: int) -> torch.Tensor:
        return self.segment_valid[self.segment_of[layer]]

    def reserve(self, extra: int) -> None:
        """Preallocate room for ``extra`` more decoded tokens in every layer and segment.

        Results are unchanged (the attention sees the same values, as views); decoding then writes
        one column per layer in place instead of concatenating the whole cache per step.
        """
        if extra < 1:
            return
        for i, layer in enumerate(self.kv.layers):
            if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
                self.kv.layers[i] = ReservedLayer(layer, extra)
        self._valid_buffers = []
        for i, v in enumerate(self.segment_valid):
            buffer = v.new_zeros(v.shape[0], v.shape[1] + extra)
            buffer[:, : v.shape[1]] = v
            self._valid_buffers.append(buffer)
            self.segment_valid[i] = buffer[:, : v.shape[1]]

    def append_live(self, n: int = 1) -> None:
        """Mark ``n`` new live slots (decoded tokens) at the end of every layer."""
        for i, v in enumerate(self.segment_valid):
            length = v.shape[1]
            buffer = self._valid_buffers[i] if i < len(self._valid_buffers) else None
            if buffer is not None and buffer.shape[1] >= length + n:
                buffer[:, length : length + n] = True
                self.segment_valid[i] = buffer[:, : length + n]
            else:
                self.segment_valid[i] = torch.cat([v, v.new_ones(v.shape[0], n)], dim=1)

    def decode_masks(self, implementation: str, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per segment, the attention mask of one decoded query (the last slot) after :meth:`append_live`.

        Equal to :func:`~sdtp_core.attention.layout_mask` ``(valid, 1, ...)``. For one query in the
        last slot every earlier live key is allowed and the query's own slot is live, so for sdpa the
        mask is the live flags themselves (a view, no copy), and ``None`` while a segment has no
        padding (checked once: decoded slots are always live).
        """
        if len(self._all_live) != len(self.segment_valid):
            self._all_live = [bool(v.all()) for v in self.segment_valid]
        masks: list[torch.Tensor | None] = []
        for v, live in zip(self.segment_valid, self._all_live):
            if live and implementation != "eager":
                masks.append(None)
            elif implementation == "sdpa":
                masks.append(v[:, None, None, :])
            else:
                masks.append(layout_mask(v, 1, implementation, dtype))
        return masks

    def layer_lengths(self) -> list[int]:
        """Number of key slots (live or padding) stored per layer."""
        return [self.kv.layers[i].get_seq_length() for i in range(len(self.segment_of))]

    def live_counts(self) -> torch.Tensor:
        """(batch, num_layers) live tokens each layer's cache holds for each row."""
        return torch.stack([self.layer_valid(i).sum(1) for i in range(len(self.segment_of))], dim=1)
