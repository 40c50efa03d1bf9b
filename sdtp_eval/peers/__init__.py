"""Peer methods as real library calls: NVIDIA kvpress presses and LLMLingua prompt compression.

* :mod:`sdtp_eval.peers.kvpress_presses` — build a named kvpress press at a compression ratio, run
  prefill + greedy decoding with it (alone, or after SDTP's pruned prefill: SDTP ∘ press).
* :mod:`sdtp_eval.peers.llmlingua_compressor` — LLMLingua (v1 ``PromptCompressor``) with a local
  small LM (default: the embedded Qwen2.5 model), offline.
* :mod:`sdtp_eval.peers.press_generation` and :mod:`sdtp_eval.peers.llmlingua_prompts` — the two as
  strategies of the ``sdtp`` lm-eval model (``press=``, ``compress=llmlingua``; :mod:`sdtp_eval.generation`).

Neither library is a dependency of ``sdtp``: kvpress 0.5.5 pins ``transformers<5.3``, so they are
meant for a separate environment (see docs/peers.md). Importing this package imports neither.
"""
