"""``press=NAME``: the ``sdtp`` model's generation through a kvpress press (model_args ``press``, ``press_ratio``).

The press compresses the KV cache that decoding reads, alone (``prune=false``) or after SDTP's pruned prefill
(SDTP ∘ press): :mod:`sdtp_eval.peers.kvpress_presses` runs it; this is the
:class:`~sdtp_eval.generation.GenerationStrategy` that puts it behind lm-eval's ``_model_generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtp_core.generate import UnsupportedGenerationError
from sdtp_eval.generation import GenerationStrategy

from .kvpress_presses import _kvpress, press_name, run_press, run_sdtp_press


@dataclass
class _PressPrefill:
    """The fields of a prefill result the report reads, for a generation run through a kvpress press."""

    lengths: torch.Tensor
    kept_counts: torch.Tensor
    compression: torch.Tensor


class PressGeneration(GenerationStrategy):
    """Greedy generation with a kvpress press (kvpress's protocol: one prompt, press active during the prefill),
    alone (``prune=false``) or after SDTP's pruned prefill. Stop strings are applied by lm-eval to the text
    afterwards, as for every model. Loglikelihood requests are refused: they have no cache to compress."""

    def __init__(self, press: str, ratio: float | str):
        """Validated: ``press`` one of :data:`~sdtp_eval.peers.kvpress_presses.PRESSES` (or an alias), ``ratio``
        the fraction of KV pairs removed, and kvpress importable (a clear install hint now rather than at the
        first generation request)."""
        self.press = press_name(str(press))
        self.ratio = float(ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"press_ratio is the fraction of KV pairs removed, in [0, 1); got {self.ratio}")
        _kvpress()

    def check_loglikelihood(self) -> None:
        raise ValueError(
            f"press={self.press} compresses the KV cache that generation reads; loglikelihood requests are "
            "scored in one pass with no cache to compress. Run loglikelihood tasks without press."
        )

    def info(self) -> dict:
        return {"press": self.press, "press_ratio": self.ratio}

    def generate(self, lm, context: torch.Tensor, max_length: int, stop, **generation_kwargs) -> torch.Tensor:
        if context.shape[0] != 1:
            raise ValueError(f"press={self.press} runs one prompt at a time: use --batch_size 1")
        kwargs = dict(generation_kwargs)
        mask = kwargs.pop("attention_mask", None)
        if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0) not in (0, 0.0, None) or kwargs:
            raise UnsupportedGenerationError(
                f"press={self.press} decodes greedily (do_sample=false, temperature 0) and takes no other generation "
                f"settings; got {sorted(generation_kwargs)}"
            )
        ids = context if mask is None else context[:, mask[0].bool()]
        common = {
            "press": self.press,
            "compression_ratio": self.ratio,
            "max_new_tokens": max(1, max_length - context.shape[1]),
            "eos_token_id": lm.model.generation_config.eos_token_id,
        }
        run = run_sdtp_press(lm.engine, ids, **common) if lm.prune else run_press(lm.model, ids, **common)
        processed = torch.tensor([run.processed_lengths], dtype=torch.float)
        result = _PressPrefill(
            lengths=torch.tensor([run.prompt_length]),
            kept_counts=processed,
            compression=torch.tensor([run.prompt_length / float(processed.mean())]),
        )
        keys = lm.batch_keys[0] if len(lm.batch_keys) == 1 else []
        lm.record_prefill(
            keys,
            result,
            0,
            seconds=(run.prefill_seconds, run.total_seconds),
            extra={
                "press": run.method,
                "press_ratio": run.compression_ratio,
                "kv_entries_per_layer": round(sum(run.cache_lengths) / len(run.cache_lengths), 2),
                "kv_cache_bytes": run.kv_cache_bytes,
            },
        )
        return torch.cat([context, run.sequences.to(context.device)], dim=1)
