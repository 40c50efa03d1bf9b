"""Load a model, its tokenizer and a pruner by name, the same way for every command."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdtp_core import fingerprint
from sdtp_core.embedded import resolve_pretrained
from sdtp_core.oracle import ORACLE, SaliencyOracle
from sdtp_core.pruner import TokenPruner
from sdtp_core.scorers import PRESETS, RankUnion, is_training_free, needs_tokenizer, training_free
from sdtp_core.spans import line_ends

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
SHIPPED_PRUNER = "shipped"
#: Joins pruner specs into a :class:`~sdtp_core.scorers.RankUnion` (``shipped+attention``).
UNION = "+"
#: The scorer used when none is named: ``line16`` (``attention:64:95:15:l16`` at
#: :func:`~sdtp_core.config.earlier_layers`: the attention of the last 64 tokens, each token taking the highest score
#: among the 95 slots before it and 15 after it on its own line, a line of fewer than 16 tokens joined to the next).
#: Chosen on the dev split over ``line`` (the same without joining short lines): the same on RULER 2K/4K (document
#: for document) and Table 3 (the same mean), better on LongBench generation (results/default/README.md).
#: ``pruner=line``, ``spread``, ``attention`` and ``shipped`` select the earlier defaults and the trained pruner.
DEFAULT_PRUNER = "line16"
#: Prompts shorter than this run dense in the lm-eval ``sdtp`` model (``min_prompt_tokens``). 0: every prompt is
#: pruned, as in the paper, so an evaluation measures the pruning.
DEFAULT_MIN_PROMPT_TOKENS = 0
#: The deployment policy's threshold (``min_prompt_tokens=256``), measured on the embedded model
#: (results/speed/README.md, "Short prompts", batch 1, attention scorer): below 256 tokens pruning saves at most
#: 1.16x (bf16) / 1.42x (fp32) of a prefill that already takes < 0.8 s, while short prompts are where it costs the
#: most accuracy (Table 3, results/paper_tables/README.md).
POLICY_MIN_PROMPT_TOKENS = 256
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


def shipped_pruners() -> list[Path]:
    """Directories of the pruners shipped inside the package."""
    if not SHIPPED_PRUNERS_DIR.is_dir():
        return []
    return sorted(p for p in SHIPPED_PRUNERS_DIR.iterdir() if (p / "config.json").is_file())


def shipped_pruner_dir(model) -> Path | None:
    """The shipped pruner trained for this model, recognised by architecture and a weight fingerprint
    (so the same weights from any directory, or the Hub checkpoint they were quantized from, match)."""
    for directory in shipped_pruners():
        reference = fingerprint.load(directory)
        if reference is not None and fingerprint.matches(model, reference):
            return directory
    return None


def load_pruner(
    spec: str | None, model, layers: list[int] | None = None, keep_ratio: float | None = None, tokenizer=None
):
    """Resolve a pruner for ``model``; the returned module's ``source`` says where it came from.

    ``spec`` is a pruner directory; ``"shipped"`` (the pruner shipped for this model: an error if none
    fits its architecture, a warning if its weights differ from the model it was trained on);
    ``"random"`` (untrained scorers, seeded: fine for speed, meaningless for accuracy, and said loudly);
    ``"attention"`` (``"attention:W"`` for a window of ``W`` recent tokens, ``"attention:W:P"`` pooled over ``P``
    slots, ``"attention:W:B:A"`` over ``B`` slots before and ``A`` after, ``:s`` / ``:l`` appended: not crossing a
    sentence / line end; ``:l16``: a line under 16 tokens joins the next), ``"line16"``
    (``attention:64:95:15:l16``, the default), ``"line"`` (``attention:64:95:15:l``) and ``"spread"``
    (``attention:64:63:15``), all at their own default layers
    (:data:`~sdtp_core.scorers.PRESETS`), or ``"norm"`` (training-free scorers,
    :mod:`sdtp_core.scorers`); ``"saliency"`` (the answer-aware oracle of :mod:`sdtp_core.oracle`,
    analysis only); ``A+B`` (a :class:`~sdtp_core.scorers.RankUnion`: what either ranks high, e.g.
    ``shipped+attention``); or ``None``
    (:data:`DEFAULT_PRUNER`, for every model).
    ``layers`` / ``keep_ratio`` override the schedule; with a trained pruner only a keep ratio change
    is allowed (its scorers are tied to their layers). ``tokenizer`` (the model's) is what scorers within
    sentences or lines (``line``, ``attention:…:s``, ``attention:…:l``) read their ends from; without it, the
    one saved beside the model's weights is loaded.
    """
    from sdtp_core.config import PrunerConfig, geometric_keep_ratios

    if spec is None:
        spec = DEFAULT_PRUNER
    if needs_tokenizer(spec) and tokenizer is None:
        tokenizer = _saved_tokenizer(model)
    if UNION in spec:
        return _load_union(spec, model, layers, keep_ratio, tokenizer)
    if spec == SHIPPED_PRUNER:
        spec = str(_shipped_for_shape(model))
    kwargs = {} if keep_ratio is None else {"r": keep_ratio}
    if spec == RANDOM_PRUNER:
        logger.warning(
            "pruner=random: UNTRAINED (random) scorers. Use them to measure speed or as the chance baseline; "
            "their accuracy is not SDTP's."
        )
        pruner = TokenPruner.for_model(model, layers=layers, **kwargs)
        pruner.source = RANDOM_PRUNER
        return pruner
    if spec == ORACLE:
        scorer = SaliencyOracle(PrunerConfig.for_model(model.config, layers=layers, **kwargs))
        scorer.source = ORACLE
        return scorer
    if is_training_free(spec):
        if layers is None and spec in PRESETS:
            layers = PRESETS[spec].layers(model.config.num_hidden_layers)
        config = PrunerConfig.for_model(model.config, layers=layers, **kwargs)
        scorer = training_free(spec, config, tokenizer, model.config.vocab_size)
        scorer.source = spec
        return scorer
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
    if pruner.needs_lines:  # its features stay within lines: it reads the line ends from the tokenizer
        pruner.set_line_ends(line_ends(tokenizer or _saved_tokenizer(model), model.config.vocab_size))
    pruner.source = str(spec)
    return pruner


def _saved_tokenizer(model):
    """The tokenizer saved beside ``model``'s weights (its ``name_or_path``), for scorers within sentences."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path:
        raise ValueError("a scorer within sentences needs the model's tokenizer: pass tokenizer= to load_pruner")
    return AutoTokenizer.from_pretrained(path)


def _load_union(spec: str, model, layers: list[int] | None, keep_ratio: float | None, tokenizer=None) -> RankUnion:
    """``A+B[+...]``: a :class:`~sdtp_core.scorers.RankUnion` of the named pruners at one schedule. Without
    ``layers``, the first trained pruner named fixes the schedule (its scorers are tied to their layers) and
    the training-free scorers take it; without a trained one, a named preset's schedule (``line``, ``spread``) does."""
    specs = spec.split(UNION)
    if len(specs) < 2 or not all(specs):
        raise ValueError(f"a union of pruners is written A+B (e.g. shipped+attention), got {spec!r}")
    trained = [s for s in specs if not (is_training_free(s) or s in (RANDOM_PRUNER, ORACLE))]
    loaded, schedule = {}, None
    if layers is None and trained:
        loaded[trained[0]] = load_pruner(trained[0], model, keep_ratio=keep_ratio)
        schedule = loaded[trained[0]].config
        layers = schedule.layers
    elif layers is None:  # training-free parts only: a preset's own schedule, if one is named, for all
        preset = next((PRESETS[s] for s in specs if s in PRESETS), None)
        layers = preset.layers(model.config.num_hidden_layers) if preset else None
    parts = []
    for s in specs:
        if s in loaded:
            part = loaded.pop(s)
        elif schedule is not None and is_training_free(s):
            part = training_free(s, schedule, tokenizer, model.config.vocab_size)
            part.source = s
        else:
            part = load_pruner(s, model, layers, keep_ratio, tokenizer)
        parts.append(part)
    schedules = {(tuple(p.config.layers), tuple(round(r, 9) for r in p.config.keep_ratios)) for p in parts}
    if len(schedules) > 1:
        raise ValueError(f"the pruners of {spec!r} have different schedules (layers, keep ratios): {sorted(schedules)}")
    union = RankUnion(parts, parts[0].config)
    union.source = UNION.join(p.source for p in parts)
    return union


def _shipped_for_shape(model) -> Path:
    """``pruner=shipped``: the shipped pruner trained for ``model`` (by fingerprint), else the first whose
    architecture fits it (with a warning)."""
    recognised = shipped_pruner_dir(model)
    if recognised is not None:
        return recognised
    for directory in shipped_pruners():
        reference = fingerprint.load(directory)
        if reference is not None and fingerprint.same_architecture(model, reference):
            similarity = fingerprint.weight_similarity(model, reference)
            if similarity < fingerprint.MIN_COSINE:
                logger.warning(
                    "pruner=shipped: %s was trained on another model with this architecture (weight similarity "
                    "%.2f); its scores may not transfer.",
                    directory.name,
                    similarity,
                )
            return directory
    names = ", ".join(p.name for p in shipped_pruners()) or "none"
    raise ValueError(f"pruner=shipped: no shipped pruner fits this model's architecture (shipped: {names})")
