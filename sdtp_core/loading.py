"""Load a model, its tokenizer and a pruner by name, the same way for every command."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .embedded import converted_dir, resolve_pretrained
from .pruner import TokenPruner

logger = logging.getLogger("lm_eval.sdtp")

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "auto": "auto",
}
RANDOM_PRUNER = "random"
#: Pruners shipped inside the package.
SHIPPED_PRUNERS_DIR = Path(__file__).resolve().parent / "pruners"
EMBEDDED_PRUNER_DIR = SHIPPED_PRUNERS_DIR / "qwen2.5-coder-0.5b-instruct"


def parse_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> torch.dtype | str:
    """A dtype from its name; ``None`` or ``"default"`` picks :func:`default_dtype` for the device."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "default"):
        return default_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str | None = None) -> torch.dtype:
    """bf16 on GPUs and on CPUs with native bf16 matmuls; float32 on other CPUs.

    On an AVX2-only CPU, torch's bf16 matrix products fall back to a slow path: measured on this
    project's 2-core AVX2 machine, a 512x896x4864 bf16 matmul ran ~100x slower than in float32, and a
    512-token prefill of the 0.5B model took 65 s in bf16 against 18 s in float32.
    """
    device = device or default_device()
    if device.startswith("cuda") or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def load_model(
    pretrained: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)``; ``pretrained=None`` is the embedded Qwen2.5-Coder-0.5B-Instruct.

    ``dtype=None`` picks bf16 where the hardware computes it natively, else float32 (see :func:`default_dtype`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_pretrained(pretrained)
    device = device or default_device()
    kwargs = {"dtype": parse_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def shipped_pruner_dir(model) -> Path | None:
    """The pruner shipped for this model, if there is one (today: only for the embedded model)."""
    path = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if (
        path.exists()
        and path.resolve() == converted_dir().resolve()
        and (EMBEDDED_PRUNER_DIR / "config.json").is_file()
    ):
        return EMBEDDED_PRUNER_DIR
    return None


def load_pruner(spec: str | None, model, layers: list[int] | None = None, keep_ratio: float | None = None):
    """Resolve a pruner for ``model``.

    ``spec`` is a pruner directory, ``"random"`` (untrained scorers, seeded: fine for speed, not for
    accuracy), or ``None`` (the pruner shipped for this model if any, else ``"random"`` with a warning).
    ``layers`` / ``keep_ratio`` override the schedule; with a trained pruner only a keep ratio change
    is allowed (its scorers are tied to their layers).
    """
    from .config import PrunerConfig, geometric_keep_ratios

    if spec is None:
        shipped = shipped_pruner_dir(model)
        if shipped is None:
            logger.warning("No trained pruner ships for this model: using an untrained (random) pruner.")
            spec = RANDOM_PRUNER
        else:
            spec = str(shipped)
    if spec == RANDOM_PRUNER:
        kwargs = {} if keep_ratio is None else {"r": keep_ratio}
        return TokenPruner.for_model(model, layers=layers, **kwargs)
    pruner = TokenPruner.from_pretrained(spec, dtype=model.dtype).to(model.device)
    if layers is not None and list(layers) != pruner.config.layers:
        raise ValueError(
            f"pruner {spec} was trained for layers {pruner.config.layers}, not {list(layers)} "
            "(train a pruner for those layers, or use pruner=random to measure speed)"
        )
    if keep_ratio is not None:
        cfg = pruner.config.to_dict()
        cfg["keep_ratios"] = geometric_keep_ratios(len(cfg["layers"]), keep_ratio)
        pruner.config = PrunerConfig(**cfg)
    pruner.config.check_model(model.config)
    return pruner
