"""Training settings: :class:`TrainConfig`, its command line and config files (defaults < file < CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from sdtp_core.loading import DTYPES
from sdtp_core.question_features import DEFAULT_FEATURES, parse_feature
from sdtp_core.train.data import DEFAULT_DATA, FORMATS

STAGES = ("saliency", "prune", "all", "fit")


class TrainConfigError(ValueError):
    """The training settings are invalid."""


@dataclass
class TrainConfig:
    """All training settings; see ``python -m sdtp_core.train --help`` for each one."""

    stage: str = "all"
    model: str | None = None
    data: str = DEFAULT_DATA
    out: str = "sdtp-train"
    saliency_dir: str | None = None
    format: str = "auto"
    text_prompt_fraction: float = 0.75
    distractor_tokens: int = 0
    context_only: bool = False
    mix: bool = False
    max_samples: int | None = None
    max_length: int = 512
    dtype: str = "auto"
    layers: list[int] | None = None
    keep_ratio: float = 0.9
    keep_first: int = 4
    keep_recent: float = 0.1
    mlp_ratio: float = 0.125
    scorer_input_norm: str = "none"
    scorer_query: bool = False
    features: list[str] | None = None
    feature_window: int = 64
    saliency_batch_size: int = 1
    shard_size: int = 64
    epochs: int = 1
    batch_size: int = 1
    grad_accum: int = 4
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    w_lm: float = 1.0
    w_mse: float = 1.0
    w_rank: float = 1.0
    no_rank: bool = False
    no_mse: bool = False
    max_pairs: int = 16384
    rank_pairs: str = "uniform"
    tau: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after_steps: int | None = None
    threads: int | None = None
    config: str | None = None

    def validate(self) -> None:
        """Raise :class:`TrainConfigError` naming the first invalid setting."""
        if self.stage not in STAGES:
            raise TrainConfigError(f"unknown stage {self.stage!r}; choose one of {STAGES}")
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.format not in FORMATS:
            raise TrainConfigError(f"unknown format {self.format!r}; choose one of {FORMATS}")
        if self.rank_pairs not in ("uniform", "boundary"):
            raise TrainConfigError(f"unknown --rank-pairs {self.rank_pairs!r}; choose uniform or boundary")
        if self.rank_pairs == "boundary" and self.stage != "fit":
            raise TrainConfigError("--rank-pairs boundary trains with the fit stage")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise TrainConfigError(f"unknown schedule {self.schedule!r}; choose cosine, linear or constant")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise TrainConfigError(f"--keep-ratio {self.keep_ratio} is outside (0, 1]")
        positive = (
            "max_length",
            "epochs",
            "batch_size",
            "grad_accum",
            "saliency_batch_size",
            "shard_size",
            "checkpoint_every",
            "keep_checkpoints",
            "max_pairs",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.mix and (self.distractor_tokens or self.context_only):
            raise TrainConfigError("--mix sets the prompt lengths itself: drop --distractor-tokens and --context-only")
        if self.distractor_tokens < 0:
            raise TrainConfigError(f"--distractor-tokens must be >= 0, got {self.distractor_tokens}")
        if self.max_samples is not None and self.max_samples < 1:
            raise TrainConfigError(f"--max-samples must be >= 1, got {self.max_samples}")
        for name in ("lr", "tau"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("w_lm", "w_mse", "w_rank", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainConfigError("--warmup must be in [0, 1) and --min-lr-ratio in [0, 1]")
        if self.stage != "saliency" and self.loss_weights() == (0.0, 0.0, 0.0):
            raise TrainConfigError("all loss terms are disabled: nothing to train")
        if self.features and self.stage in ("prune", "all"):
            raise TrainConfigError(
                "--features train with the fit stage (it reads the unpruned prompt's attention): run "
                "'saliency', then 'fit'"
            )
        for spec in self.features or []:
            try:
                parse_feature(spec)
            except ValueError as e:
                raise TrainConfigError(str(e)) from e
        if self.stage == "fit" and self.loss_weights()[1:] == (0.0, 0.0):
            raise TrainConfigError("the fit stage trains on the MSE and ranking losses only; both are disabled")

    def loss_weights(self) -> tuple[float, float, float]:
        """Effective ``(w_lm, w_mse, w_rank)`` after the ablation switches."""
        return self.w_lm, 0.0 if self.no_mse else self.w_mse, 0.0 if self.no_rank else self.w_rank

    @property
    def saliency_path(self) -> Path:
        return Path(self.saliency_dir) if self.saliency_dir else Path(self.out) / "saliency"

    def fingerprint(self) -> dict:
        """The settings a Stage 2 checkpoint depends on (a resumed run must not change them)."""
        skip = {
            "stage",
            "out",
            "saliency_dir",
            "resume",
            "stop_after_steps",
            "threads",
            "config",
            "checkpoint_every",
            "keep_checkpoints",
            "shard_size",
            "saliency_batch_size",
        }
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if self.stage == "fit":  # cached-feature checkpoints must never resume a Stage 2 run, or vice versa
            settings["objective"] = "fit"
        return settings


HELP = {
    "model": "Hugging Face Hub id or local directory of the (Qwen2/Llama layout) model; default: the embedded "
    "Qwen2.5-Coder-0.5B-Instruct",
    "data": "Hub dataset id (train split) or local .jsonl/.json (instruction/context/response or text fields) or "
    ".txt file",
    "out": "output directory (train_config.json, saliency/, log.jsonl, checkpoints/, pruner/)",
    "saliency_dir": "where Stage 1 stores / Stage 2 reads the saliency shards (default OUT/saliency)",
    "format": "prompt formatting of instruction records: 'chat' (the tokenizer's chat template), 'plain' "
    "('instruction\\n\\ncontext\\n\\n' + response + EOS) or 'auto' (chat if the tokenizer has a template)",
    "text_prompt_fraction": "for 'text' records: the leading fraction of tokens that is the prunable prompt; the "
    "rest is the scored target",
    "distractor_tokens": "long-input training: hide each instruction record's context among other records' "
    "contexts until the passages reach about N tokens, the instruction after them (0: off; raise --max-length)",
    "context_only": "use only the instruction records that have a context of their own (the answer depends on a "
    "passage, as in long-context QA; with --distractor-tokens it is the passage hidden among the others); "
    "--max-samples then counts those records",
    "mix": "build the long-prompt training mix from instruction records: passage QA (a record's context among "
    "distractor passages, 768-3584 tokens, question last), key-value retrieval in the same prose, and short "
    "prompts (sdtp_core/train/data.py, training_mix); raise --max-length to fit (e.g. 4096)",
    "max_samples": "use only the first N records of the data",
    "max_length": "truncate samples to this many tokens (prompt middle-truncated, target kept >= 1/4)",
    "dtype": "compute dtype of the frozen model: auto (bfloat16 on GPU, float32 on CPU, where bfloat16 matmuls "
    "without AMX/AVX512-BF16 are far slower), bfloat16, float16 or float32; the pruner trains in float32",
    "layers": "comma-separated decoder layers of the pruning stages (default: the paper's schedule, 10 stages "
    "from layer 4)",
    "keep_ratio": "geometric keep ratio r: stage s keeps r**s of the original prompt tokens",
    "keep_first": "the first N prompt tokens are never pruned",
    "keep_recent": "the last fraction of the prompt is never pruned",
    "mlp_ratio": "hidden width of each scorer MLP as a fraction of the model's hidden size",
    "scorer_input_norm": "none (the paper: the scorer reads the raw hidden state) or rms (divided by its root "
    "mean square first; the hidden-state norm grows ~6x with depth)",
    "scorer_query": "each scorer also reads the mean state of the prompt's protected most recent tokens, where "
    "the question of a long-context prompt sits (not in the paper; needs --scorer-input-norm rms)",
    "features": "question-aware scorer inputs, comma-separated (attn, span:B:A, line:B:A; 'default': "
    + ",".join(DEFAULT_FEATURES)
    + "): the attention the prompt's last tokens pay each token at the stage layer, max over spans around it; "
    "trained with the fit stage (not in the paper; sdtp_core/question_features.py)",
    "feature_window": "how many of the prompt's most recent tokens the features read the attention of",
    "saliency_batch_size": "samples per Stage 1 forward/backward",
    "shard_size": "samples per Stage 1 safetensors shard (the unit of resumption)",
    "epochs": "Stage 2 passes over the data",
    "batch_size": "Stage 2 samples per forward pass (per process)",
    "grad_accum": "Stage 2 forward passes per optimizer step (per process)",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup": "fraction of the optimizer steps spent in linear warmup",
    "schedule": "learning-rate decay after warmup: cosine, linear or constant",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine/linear)",
    "max_grad_norm": "gradient clipping norm (0 disables clipping)",
    "w_lm": "weight of the pruned model's LM loss on the response (0 also skips backprop through the LLM)",
    "w_mse": "weight of the MSE between standardised scores and saliency, summed over stages",
    "w_rank": "weight of the pairwise ranking loss, summed over stages",
    "no_rank": "ablation: drop the ranking loss",
    "no_mse": "ablation: drop the MSE loss",
    "max_pairs": "ranking-loss pairs per sample and stage; more pairs are subsampled uniformly",
    "rank_pairs": "uniform (the paper: pairs drawn over all prompt tokens) or boundary (each pair one token the "
    "target keeps at that stage, one it drops: the order pruning decides on; fit stage only)",
    "tau": "temperature of the Gumbel-sigmoid relaxation of the keep decisions",
    "seed": "seed of the pruner initialisation, data order, Gumbel noise and pair sampling",
    "checkpoint_every": "save a resumable Stage 2 checkpoint every N optimizer steps",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "resume": "continue Stage 2 from the newest checkpoint in OUT/checkpoints (Stage 1 always skips stored samples)",
    "stop_after_steps": "stop Stage 2 (or fit) after N optimizer steps in this run, as if killed (for time-slicing; "
    "continue with --resume)",
    "threads": "torch CPU threads (default: torch's choice)",
}


def _feature_list(text: str) -> list[str]:
    names = [x for x in str(text).replace(" ", "").split(",") if x]
    return list(DEFAULT_FEATURES) if names == ["default"] else names


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdtp_core.train",
        description="Train SDTP pruning modules. Stage 1 'saliency' computes gradient-times-input token saliency "
        "of the frozen model; Stage 2 'prune' trains the pruners with LM + MSE + ranking losses under simulated "
        "pruning; 'all' runs both; 'fit' is a fast Stage 2 on cached unpruned hidden states with the MSE + ranking "
        "losses only (needs Stage 1's saliency; --w-lm does not apply). Settings may come from --config FILE "
        "(YAML or JSON, keys as the long option names); command-line options override the file.",
    )
    defaults = TrainConfig()
    p.add_argument(
        "stage_pos", nargs="?", choices=STAGES, metavar="STAGE", help="saliency | prune | all | fit (same as --stage)"
    )
    p.add_argument("--stage", choices=STAGES, default=None, help="saliency | prune | all | fit (default: all)")
    p.add_argument("--config", default=None, help="YAML or JSON file of settings (CLI options override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("stage", "config"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
        elif f.name == "layers":
            p.add_argument(flag, type=_int_list, default=None, help=HELP[f.name])
        elif f.name == "features":
            p.add_argument(flag, type=_feature_list, default=None, help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(type(default).__name__, str)
            if f.name in ("max_samples", "stop_after_steps", "threads"):
                kind = int
            p.add_argument(flag, type=kind, default=None, help=HELP[f.name] + f" (default: {default})")
    return p


def load_file_settings(path: str) -> dict:
    """Settings from a YAML/JSON file, keys normalised to field names; unknown keys are an error."""
    file = Path(path)
    if not file.is_file():
        raise TrainConfigError(f"config file {file} does not exist")
    text = file.read_text()
    if file.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"config file {file} must hold a mapping of settings")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"config"}
    settings = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TrainConfigError(f"config file {file} has unknown settings {unknown}")
    if isinstance(settings.get("layers"), str):
        settings["layers"] = _int_list(settings["layers"])
    if isinstance(settings.get("features"), str):
        settings["features"] = _feature_list(settings["features"])
    return settings


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < ``--config`` file < command line."""
    args = vars(build_parser().parse_args(argv))
    stage_pos = args.pop("stage_pos")
    if stage_pos and args["stage"] and stage_pos != args["stage"]:
        raise TrainConfigError(f"stage given twice: {stage_pos!r} and --stage {args['stage']!r}")
    args["stage"] = args["stage"] or stage_pos
    settings = load_file_settings(args["config"]) if args["config"] else {}
    settings.update({k: v for k, v in args.items() if v is not None})
    cfg = TrainConfig(**settings)
    cfg.validate()
    return cfg
