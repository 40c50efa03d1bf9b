"""How the ``sdtp`` model serves generation requests: the two strategy objects it holds.

:class:`~sdtp_eval.model.SDTPLM` chooses both once, at construction, from its model_args, and then calls them
without knowing which they are:

* ``lm.prompts``, a :class:`PromptTransform`, rewrites each generation prompt before it is tokenized (after
  LongBench's truncation, before any chat template). The default, :class:`PromptTransform` itself, leaves the
  prompt as it is; ``compress=llmlingua`` chooses :class:`~sdtp_eval.peers.llmlingua_prompts.LLMLinguaPrompts`.
* ``lm.generation``, a :class:`GenerationStrategy`, runs ``_model_generate``. The default,
  :class:`SDTPGeneration`, is SDTP's pruned prefill then decoding on the pruned KV caches (HFLM's own
  ``generate`` with ``prune=false``); ``press=NAME`` chooses :class:`~sdtp_eval.peers.press_generation.PressGeneration`.

A strategy that cannot serve loglikelihood requests raises in :meth:`~PromptTransform.check_loglikelihood`, and
:meth:`~PromptTransform.info` gives its fields of the ``sdtp`` model info. Neither default imports a peer library.
"""

from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM

from sdtp_core.generate import generate


class PromptTransform:
    """The default prompt transform: generation prompts reach the model unchanged. Peers subclass it."""

    def __call__(self, lm, context: str, keys) -> str:
        """The prompt the model reads instead of ``context``; ``keys`` are the (task, doc_id, idx) of the
        requests it answers (for their sample records, ``lm.add_sample_record``)."""
        return context

    def check_loglikelihood(self) -> None:
        """Raise if loglikelihood requests cannot run under this transform (they score exact contexts)."""

    def info(self) -> dict:
        return {"compress": None, "compress_rate": None, "compress_dtype": None}


class GenerationStrategy:
    """How ``_model_generate`` runs one batch of prompts; the subclasses say how."""

    def generate(self, lm, context: torch.Tensor, max_length: int, stop, **generation_kwargs) -> torch.Tensor:
        """``context`` followed by the generated tokens, as HFLM's ``_model_generate`` returns them."""
        raise NotImplementedError

    def check_loglikelihood(self) -> None:
        """Raise if loglikelihood requests cannot run under this strategy."""

    def info(self) -> dict:
        return {"press": None, "press_ratio": None}


class SDTPGeneration(GenerationStrategy):
    """The default: SDTP's pruned prefill, then decoding on the pruned KV caches (:func:`sdtp_core.generate.generate`),
    with lm-eval's greedy convention; with ``prune=false``, HFLM's own ``model.generate``."""

    def generate(self, lm, context: torch.Tensor, max_length: int, stop, **generation_kwargs) -> torch.Tensor:
        if not lm.prune:
            return HFLM._model_generate(lm, context, max_length, stop, **generation_kwargs)
        # lm-eval's greedy convention, as HFLM._model_generate applies it before model.generate.
        kwargs = dict(generation_kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        temperature = kwargs.setdefault("temperature", 0.0)
        if temperature == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if kwargs.get("do_sample") is False and temperature == 0.0:
            kwargs.pop("temperature")
        out = generate(
            lm.engine,
            context,
            attention_mask,
            generation_config=lm.model.generation_config,  # as model.generate: the model's defaults first
            tokenizer=lm.tokenizer,
            max_new_tokens=max(1, max_length - context.shape[1]),
            pad_token_id=lm.tokenizer.pad_token_id,
            stop_strings=list(stop) if stop else None,
            **kwargs,
        )
        keys = lm.batch_keys if len(lm.batch_keys) == context.shape[0] else [[]] * context.shape[0]
        for b, row_keys in enumerate(keys):
            lm.record_prefill(row_keys, out.prefill, b, seconds=(out.prefill_seconds, out.total_seconds))
        return torch.cat([context, out.sequences.to(context.device)], dim=1)
