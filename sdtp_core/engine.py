"""The pruned forward: the frozen model's own layers, with tokens really dropped at the pruning stages.

:class:`SDTPEngine` wraps a Hugging Face decoder-only model with the Llama/Qwen2 layout
(``model.model.embed_tokens``, ``.layers``, ``.rotary_emb``, ``.norm`` and ``model.lm_head``) and a
:class:`~sdtp_core.pruner.TokenPruner`. Before each stage layer it scores the live tokens, keeps the
protected ones plus the best-scored rest, and gathers them into a smaller tensor, so every later layer
computes only on the kept tokens. Kept tokens keep their original RoPE positions (the rotary tables
are computed once for the original positions and gathered with the tokens). The KV cache filled during
prefill therefore holds, per layer, exactly the tokens that layer processed; :meth:`decode_step`
appends new tokens at positions ``n, n+1, ...`` and attends to those pruned caches.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from sdtp_core.attention import layout_mask
from sdtp_core.cache import PrunedCache
from sdtp_core.pruner import TokenPruner
from sdtp_core.selection import compact, keep_counts, protected_mask, select
from sdtp_core.spans import segment_ids
from sdtp_core.timing import StageTimer, stage


class PromptError(ValueError):
    """A prompt cannot be run (empty, or otherwise malformed)."""


@dataclass
class PrefillResult:
    """What a (pruned) prefill produced.

    Attributes:
        logits: (batch, t, vocab) logits of the last ``t`` slots (``t`` = ``logits_to_keep``), or None.
        positions: (batch, k) original position of each final slot, -1 for padding slots.
        kept_counts: (batch, num_layers) tokens each layer processed, per prompt.
        lengths: (batch,) prompt lengths (real tokens).
        cache: the pruned KV cache, when ``use_cache`` was set.
    """

    logits: torch.Tensor | None
    positions: torch.Tensor
    kept_counts: torch.Tensor
    lengths: torch.Tensor
    cache: PrunedCache | None

    @property
    def compression(self) -> torch.Tensor:
        """(batch,) the paper's 1/τ: prompt length over the mean number of tokens a layer processed."""
        return self.lengths.double() / self.kept_counts.double().mean(1)


class SDTPEngine:
    """Pruned prefill and decoding for one model and one pruner.

    Args:
        model: a Hugging Face causal LM with the Llama/Qwen2 module layout.
        pruner: the pruning modules; ``None`` runs dense (useful as a reference and for parity checks).
        min_prompt_tokens: prompts shorter than this are not pruned (every token kept, so they compute
            exactly as dense); a batch of only such prompts skips the scorers too.
    """

    def __init__(self, model, pruner: TokenPruner | None = None, min_prompt_tokens: int = 0):
        inner = getattr(model, "model", None)
        missing = [name for name in ("embed_tokens", "layers", "rotary_emb", "norm") if not hasattr(inner, name)] + (
            [] if hasattr(model, "lm_head") else ["lm_head"]
        )
        if missing:
            raise TypeError(f"{type(model).__name__} does not have the Llama/Qwen2 decoder layout (missing {missing})")
        layer_types = getattr(model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError("sliding-window attention layers are not supported by the pruned forward")
        if pruner is not None:
            pruner.config.check_model(model.config)
        self.model = model
        self.pruner = pruner
        self.inner = inner
        self._cache_kwarg = cache_keyword(inner.layers[0])
        if min_prompt_tokens < 0:
            raise ValueError(f"min_prompt_tokens must be >= 0, got {min_prompt_tokens}")
        #: prompts shorter than this run dense (every token kept): too short for pruning to save time
        self.min_prompt_tokens = min_prompt_tokens

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation or "eager"

    @property
    def num_layers(self) -> int:
        return len(self.inner.layers)

    def _mask(self, valid: torch.Tensor, q_len: int) -> torch.Tensor | None:
        return layout_mask(valid, q_len, self.attn_implementation, self.model.dtype)

    def _run_layer(self, layer, hidden, mask, rope, cache) -> torch.Tensor:
        out = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rope,
            use_cache=cache is not None,
            **{self._cache_kwarg: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        protect: torch.Tensor | None = None,
        prune: bool = True,
        logits_to_keep: int = 1,
        use_cache: bool = True,
        timer: StageTimer | None = None,
    ) -> PrefillResult:
        """Run a prompt batch through the model, pruning at the pruner's stages.

        Args:
            input_ids: (batch, n) token ids; rows may be padded on either side.
            attention_mask: (batch, n) 1 for real tokens, 0 for padding. Defaults to all ones.
            protect: optional (batch, n) mask of extra positions that must never be pruned.
            prune: ``False`` (or no pruner) runs the dense model.
            logits_to_keep: logits for the last this many slots (0 = all slots).
            use_cache: fill and return a :class:`PrunedCache` for decoding.
            timer: optional :class:`~sdtp_core.timing.StageTimer`; times (and labels for the profiler)
                ``prefill/embed``, every ``prefill/layer.NN``, every ``prefill/prune.S`` (scoring,
                selection, gather) and ``prefill/head``.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise PromptError(f"input_ids must be a non-empty (batch, n) tensor, got shape {tuple(input_ids.shape)}")
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        lengths = mask.bool().sum(1)
        if bool((lengths == 0).any()):
            raise PromptError(f"empty prompt in batch rows {torch.nonzero(lengths == 0).flatten().tolist()}")
        short = lengths < self.min_prompt_tokens
        pruning = prune and self.pruner is not None and self.pruner.config.num_stages > 0 and not bool(short.all())
        cfg = self.pruner.config if pruning else None

        with stage(timer, "prefill/embed"):
            index, valid = compact(mask.bool())
            ids = input_ids.gather(1, index)
            positions = (mask.long().cumsum(1) - 1).gather(1, index).clamp(min=0)
            if protect is not None:
                protect = protect.to(device)
            protected = (
                (protected_mask(mask, cfg.keep_first, cfg.keep_recent, protect) | short[:, None]).gather(1, index)
                if pruning
                else None
            )
            stage_at = {layer: s for s, layer in enumerate(cfg.layers)} if pruning else {}
            ends = getattr(self.pruner, "sentence_ends", None) if pruning else None
            min_tokens = getattr(self.pruner, "min_unit_tokens", 0)
            segments = segment_ids(ids, valid, ends, min_tokens) if ends is not None else None  # each slot's unit

            hidden = self.inner.embed_tokens(ids)
            cos, sin = self.inner.rotary_emb(hidden, positions)
            cache = PrunedCache(DynamicCache(), [], [valid]) if use_cache else None
            attn_mask = self._mask(valid, valid.shape[1])
        kept = []
        for i, layer in enumerate(self.inner.layers):
            if i in stage_at:
                s = stage_at[i]
                with stage(timer, f"prefill/prune.{s}"):
                    scores = self.pruner.score(
                        s,
                        hidden,
                        layer=layer,
                        position_embeddings=(cos, sin),
                        valid=valid,
                        positions=positions,
                        lengths=lengths,
                        protected=protected,
                        segments=segments,
                    )
                    slots, valid = select(scores, valid, protected, keep_counts(lengths, cfg.keep_ratios[s]))
                    hidden = _gather(hidden, slots)
                    cos, sin = _gather(cos, slots), _gather(sin, slots)
                    positions, protected = positions.gather(1, slots), protected.gather(1, slots)
                    if segments is not None:
                        segments = segments.gather(1, slots).masked_fill(~valid, -1)
                    attn_mask = self._mask(valid, valid.shape[1])
                    if cache is not None:
                        cache.segment_valid.append(valid)
            if cache is not None:
                cache.segment_of.append(len(cache.segment_valid) - 1)
            kept.append(valid.sum(1))
            with stage(timer, f"prefill/layer.{i:02d}"):
                hidden = self._run_layer(layer, hidden, attn_mask, (cos, sin), cache.kv if cache else None)

        logits = None
        if logits_to_keep is not None and logits_to_keep >= 0:
            with stage(timer, "prefill/head"):
                tail = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
                logits = self.model.lm_head(self.inner.norm(tail))
        return PrefillResult(
            logits=logits,
            positions=positions.masked_fill(~valid, -1),
            kept_counts=torch.stack(kept, dim=1),
            lengths=lengths,
            cache=cache,
        )

    @torch.inference_mode()
    def decode_step(
        self,
        cache: PrunedCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        timer: StageTimer | None = None,
    ) -> torch.Tensor:
        """Append one token per row at original ``positions`` (batch,) and return its logits (batch, vocab).

        ``timer`` (optional) times ``decode/embed``, ``decode/cache`` (live flags and masks), every
        ``decode/layer.NN`` and ``decode/head``.
        """
        device = self.model.device
        with stage(timer, "decode/embed"):
            hidden = self.inner.embed_tokens(tokens.to(device).view(-1, 1))
            cos, sin = self.inner.rotary_emb(hidden, positions.to(device).view(-1, 1))
        with stage(timer, "decode/cache"):
            cache.append_live(1)
            masks = cache.decode_masks(self.attn_implementation, self.model.dtype)
        for i, layer in enumerate(self.inner.layers):
            with stage(timer, f"decode/layer.{i:02d}"):
                hidden = self._run_layer(layer, hidden, masks[cache.segment_of[i]], (cos, sin), cache.kv)
        with stage(timer, "decode/head"):
            return self.model.lm_head(self.inner.norm(hidden))[:, -1]


def cache_keyword(layer) -> str:
    """The keyword a decoder layer takes its KV cache by: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (earlier 5.x releases)."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _gather(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Gather (batch, k, ...) rows of ``x`` (batch, n, ...) along dim 1."""
    return x.gather(1, slots.view(*slots.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
