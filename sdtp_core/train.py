"""Train SDTP pruning modules: ``python -m sdtp_core.train {saliency,prune,all,fit} --out DIR ...``.

Stage 1 (``saliency``) stores gradient-times-input saliency of the frozen model (:mod:`.saliency`).
Stage 2 (``prune``) trains only the pruner, with pruning simulated by attention masks
(:mod:`.masked_forward`) and the loss ``w_lm * L_lm + w_mse * L_mse + w_rank * L_rank`` (:mod:`.losses`).
``all`` runs both. ``fit`` is a fast Stage 2 without the LM loss, on cached unpruned hidden states
(:mod:`.fit`). Data-parallel with ``accelerate launch [--cpu] --num_processes N -m sdtp_core.train``.

Outputs under ``--out``: ``train_config.json`` (effective settings), ``saliency/`` (Stage 1 shards),
``saliency_summary.json`` + ``.png``, ``log.jsonl`` (one line per optimizer step), ``checkpoints/``
(resumable, atomic) and ``pruner/`` (the trained :class:`~.pruner.TokenPruner`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import PrunerConfig, PrunerConfigError
from .loading import DTYPES, load_model
from .losses import mse_loss_per_sample, rank_loss_per_sample
from .masked_forward import lm_loss_from_hidden, masked_forward
from .pruner import TokenPruner
from .saliency import SaliencyMismatchError, SaliencyStore, run_saliency, summarize
from .train_data import DEFAULT_DATA, FORMATS, Example, TrainDataError, collate, load_examples

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


# ------------------------------------------------------------------------------------------------
# Command line

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
    "tau": "temperature of the Gumbel-sigmoid relaxation of the keep decisions",
    "seed": "seed of the pruner initialisation, data order, Gumbel noise and pair sampling",
    "checkpoint_every": "save a resumable Stage 2 checkpoint every N optimizer steps",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "resume": "continue Stage 2 from the newest checkpoint in OUT/checkpoints (Stage 1 always skips stored samples)",
    "stop_after_steps": "stop Stage 2 (or fit) after N optimizer steps in this run, as if killed (for time-slicing; "
    "continue with --resume)",
    "threads": "torch CPU threads (default: torch's choice)",
}


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


# ------------------------------------------------------------------------------------------------
# Setup helpers


def load_model_and_tokenizer(cfg: TrainConfig, device: torch.device):
    """The frozen model (eval mode, no parameter requires grad), its tokenizer and its resolved path.

    ``--dtype auto`` is :func:`~.loading.default_dtype` for the device (bf16 only where it is fast)."""
    model, tokenizer = load_model(cfg.model, None if cfg.dtype == "auto" else cfg.dtype, str(device), "sdpa")
    model.requires_grad_(False)
    return model, tokenizer, model.name_or_path


def pruner_config(cfg: TrainConfig, model_config) -> PrunerConfig:
    """The pruning schedule: ``--layers`` (default: the paper's placement) with geometric ratios."""
    return PrunerConfig.for_model(
        model_config,
        layers=cfg.layers,
        r=cfg.keep_ratio,
        keep_first=cfg.keep_first,
        keep_recent=cfg.keep_recent,
        mlp_ratio=cfg.mlp_ratio,
        input_norm=cfg.scorer_input_norm,
        query=cfg.scorer_query,
    )


def saliency_meta(cfg: TrainConfig, model_config, model_name: str, layers: list[int]) -> dict:
    return {
        "model": model_name,
        "num_hidden_layers": model_config.num_hidden_layers,
        "hidden_size": model_config.hidden_size,
        "vocab_size": model_config.vocab_size,
        "layers": layers,
        "data": cfg.data,
        "format": cfg.format,
        "max_length": cfg.max_length,
        "text_prompt_fraction": cfg.text_prompt_fraction,
        **({"distractor_tokens": cfg.distractor_tokens} if cfg.distractor_tokens else {}),  # old stores lack it
        **({"context_only": True} if cfg.context_only else {}),
        "loss": "mean next-token cross-entropy over the response (target) tokens",
        "saliency": "sum over hidden of dL/dh * h at the input of each layer",
    }


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak LR at each step: linear warmup, then cosine/linear/constant decay."""
    warmup = int(round(cfg.warmup * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation that depends only on ``(seed, epoch)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def sample_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """Randomness of one sample at one optimizer step (Gumbel noise, ranking pairs): a function of
    ``(seed, step, sample_id)`` only, so a resumed run draws exactly what an uninterrupted one would, and
    the draws do not depend on the number of processes."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + sample_id) % (2**63))


def saliency_targets(store: SaliencyStore, batch_examples: list[Example], layers: list[int], n: int) -> torch.Tensor:
    """(stages, batch, n) target importance ``|saliency|`` at the pruning layers, zero-padded."""
    rows = [store.layers.index(layer) for layer in layers]
    out = torch.zeros(len(layers), len(batch_examples), n)
    for b, e in enumerate(batch_examples):
        sal = store.get(e.sample_id).saliency[rows].abs()
        out[:, b, : sal.shape[1]] = sal
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(out: Path, step: int, pruner, optimizer, scheduler, cfg: TrainConfig) -> Path:
    """Write ``OUT/checkpoints/step-N`` atomically (temp dir + rename), then point ``latest`` at it."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    if (final / "state.json").is_file():  # this step is already saved (the state of a step is deterministic)
        _atomic_write_text(root / "latest", final.name)
        return final
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in pruner.state_dict().items()}
    save_file(weights, str(tmp / "pruner.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg.fingerprint()}, indent=1))
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    old = sorted(p for p in root.glob("step-*") if p.is_dir())[: -cfg.keep_checkpoints]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(out: Path, pruner, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Restore the newest checkpoint; returns its step (0 if there is none)."""
    root = out / "checkpoints"
    if not (root / "latest").is_file():
        return 0
    ckpt = root / (root / "latest").read_text().strip()
    state = json.loads((ckpt / "state.json").read_text())
    now = cfg.fingerprint()
    defaults = dataclasses.asdict(TrainConfig())  # settings added later: an older checkpoint used their default
    changed = sorted(k for k in now if state["config"].get(k, defaults.get(k)) != now[k])
    if changed:
        raise TrainConfigError(f"cannot resume from {ckpt}: settings changed since it was written: {changed}")
    pruner.load_state_dict(load_file(str(ckpt / "pruner.safetensors")))
    optim = torch.load(ckpt / "optim.pt", weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return int(state["step"])


def start_step(out: Path, cfg: TrainConfig, pruner, optimizer, scheduler, kind: str, writes_log: bool = True) -> int:
    """The step a run starts from: 0 for a fresh run (refused if ``out`` has checkpoints and ``--resume`` is
    not set), else the newest checkpoint's, restored into ``pruner``, ``optimizer`` and ``scheduler``. The
    process that ``writes_log`` drops a fresh run's old log and the lines of steps after the checkpoint."""
    if (out / "checkpoints" / "latest").is_file() and not cfg.resume:
        raise TrainConfigError(f"{out} already has {kind} checkpoints: pass --resume to continue, or use a new --out")
    start = load_checkpoint(out, pruner, optimizer, scheduler, cfg) if cfg.resume else 0
    if writes_log:
        log_path = out / "log.jsonl"
        if start == 0 and log_path.exists():
            log_path.unlink()
        truncate_log(log_path, start)
    return start


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (written by a run that was killed after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    _atomic_write_text(path, "".join(ln + "\n" for ln in lines))


# ------------------------------------------------------------------------------------------------
# Stage 2: the training loop


@torch.enable_grad()  # needs autograd even if the caller disabled it
def train_pruner(cfg: TrainConfig, accelerator, model, examples: list[Example], model_name: str, pad_id: int) -> Path:
    """Stage 2. Returns the directory of the trained pruner (``OUT/pruner``)."""
    out = Path(cfg.out)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    pcfg = pruner_config(cfg, model.config)
    store = SaliencyStore(cfg.saliency_path)
    store.check(model.config, pcfg.layers, examples, model_name)
    w_lm, w_mse, w_rank = cfg.loss_weights()

    # Pruner (float32 master weights), optimizer, schedule.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    pruner = TokenPruner(pcfg).float().to(device).train()
    optimizer = torch.optim.AdamW(pruner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    log_path = out / "log.jsonl"
    start = start_step(out, cfg, pruner, optimizer, scheduler, "Stage 2", accelerator.is_main_process)
    accelerator.wait_for_everyone()

    stop_at = total_steps if cfg.stop_after_steps is None else min(total_steps, start + cfg.stop_after_steps)
    bar = tqdm(
        range(start, stop_at),
        initial=start,
        total=total_steps,
        desc="prune",
        unit="step",
        disable=not accelerator.is_main_process,
    )
    running: dict[str, float] = {}
    for step in bar:
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        global_ids = epoch_order(len(examples), cfg.seed, epoch)[k * global_batch : (k + 1) * global_batch]
        mine = [examples[i] for i in global_ids[rank::world]]
        sums = torch.zeros(5, dtype=torch.float64)  # total, lm, mse, rank, kept fraction (sums over samples)

        for micro in range(0, len(mine), cfg.batch_size):
            chunk = mine[micro : micro + cfg.batch_size]
            batch = collate(chunk, pad_id).to(device)
            generator = [sample_generator(cfg.seed, step, e.sample_id) for e in chunk]
            res = masked_forward(
                model,
                pruner,
                batch.input_ids,
                batch.attention_mask,
                batch.prompt_mask,
                tau=cfg.tau,
                generator=generator,
                lm_grad=w_lm > 0,
            )
            zero = torch.zeros(len(chunk), device=device)
            lm = lm_loss_from_hidden(model, res.hidden, batch.labels)
            mse, rnk = zero.clone(), zero.clone()
            if w_mse > 0 or w_rank > 0:
                targets = saliency_targets(store, chunk, pcfg.layers, batch.input_ids.shape[1]).to(device)
                for s in range(pcfg.num_stages):
                    if w_mse > 0:
                        mse = mse + mse_loss_per_sample(res.scores[s], targets[s], res.decided[s])
                    if w_rank > 0:
                        rnk = rnk + rank_loss_per_sample(
                            res.scores[s], targets[s], res.decided[s], cfg.max_pairs, generator
                        )
            total = w_lm * lm + w_mse * mse + w_rank * rnk
            # Sum over samples / global batch size: with the all-reduce below, the gradient is exactly
            # the mean over the global batch, whatever the process count and micro-batch split.
            (total.sum() / len(global_ids)).backward()
            kept = (res.hard[-1] & batch.prompt_mask).sum(1).float() / batch.prompt_mask.sum(1).float()
            for j, v in enumerate((total, lm, mse, rnk, kept)):
                sums[j] += float(v.detach().double().sum())

        # Data parallel: sum gradients and logged sums over processes.
        for p in pruner.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if world > 1:
                p.grad = accelerator.reduce(p.grad, reduction="sum")
        if world > 1:
            sums = accelerator.reduce(sums.to(device), reduction="sum").cpu()
        grad_norm, lr = optimizer_step(pruner, optimizer, scheduler, cfg.max_grad_norm)

        means = (sums / len(global_ids)).tolist()
        record = {
            "step": step + 1,
            "epoch": epoch,
            "lr": lr,
            "loss": means[0],
            "lm": means[1],
            "mse": means[2],
            "rank": means[3],
            "kept_prompt_fraction": means[4],
            "grad_norm": float(grad_norm),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        for key in ("loss", "lm", "mse", "rank"):
            running[key] = record[key] if key not in running else 0.9 * running[key] + 0.1 * record[key]
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps:
                save_checkpoint(out, step + 1, pruner, optimizer, scheduler, cfg)
        accelerator.wait_for_everyone()
    bar.close()

    final = out / "pruner"
    if stop_at < total_steps:
        if accelerator.is_main_process:
            save_checkpoint(out, stop_at, pruner, optimizer, scheduler, cfg)
            print(f"stopped after step {stop_at} of {total_steps}; continue with --resume", file=sys.stderr)
        return final
    if accelerator.is_main_process:
        save_pruner(pruner, final)
    accelerator.wait_for_everyone()
    return final


def optimizer_step(pruner: TokenPruner, optimizer, scheduler, max_grad_norm: float) -> tuple[torch.Tensor, float]:
    """Clip the gradients (0: no clipping), step the optimizer and the schedule, clear the gradients;
    returns the gradient norm before clipping and the learning rate the step used."""
    grad_norm = torch.nn.utils.clip_grad_norm_(pruner.parameters(), max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def save_pruner(pruner: TokenPruner, final: Path) -> None:
    """Write the trained pruner to ``final`` atomically (a temporary directory, then a rename)."""
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pruner.eval().save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------
# Entry point


def run(cfg: TrainConfig) -> Path:
    """Run the configured stage(s); returns the output directory."""
    from accelerate import Accelerator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Accelerate only sets up multi-process CPU training (gloo) when asked for the CPU; without CUDA there
    # is nothing else to use. (`accelerate launch --cpu` itself starts one process unless MPI is configured:
    # launch with `--multi_gpu --num_processes N` or `torchrun --nproc_per_node N` on a CPU-only machine.)
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu)
    out = Path(cfg.out)
    model, tokenizer, model_name = load_model_and_tokenizer(cfg, accelerator.device)
    pcfg = pruner_config(cfg, model.config)  # validates --layers / --keep-ratio against the model
    examples = load_examples(
        cfg.data,
        tokenizer,
        cfg.format,
        cfg.max_length,
        cfg.max_samples,
        cfg.text_prompt_fraction,
        distractor_tokens=cfg.distractor_tokens,
        seed=cfg.seed,
        context_only=cfg.context_only,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        effective = {
            **dataclasses.asdict(cfg),
            "resolved_model": model_name,
            "pruner": pcfg.to_dict(),
            "num_examples": len(examples),
            "num_processes": accelerator.num_processes,
        }
        _atomic_write_text(out / "train_config.json", json.dumps(effective, indent=2))
    accelerator.wait_for_everyone()

    if cfg.stage in ("saliency", "all"):
        store = SaliencyStore(cfg.saliency_path)
        meta = saliency_meta(cfg, model.config, model_name, pcfg.layers)
        run_saliency(
            model,
            examples,
            pcfg.layers,
            store,
            meta,
            accelerator.process_index,
            accelerator.num_processes,
            cfg.saliency_batch_size,
            cfg.shard_size,
            pad_id,
            show_progress=accelerator.is_local_main_process,
            barrier=accelerator.wait_for_everyone,
        )
        if accelerator.is_main_process:
            summary = summarize(store, examples, out)
            print("saliency sparsity per layer:", dict(zip(summary["layers"], summary["fraction_above_10pct_of_max"])))
    if cfg.stage in ("prune", "all"):
        train_pruner(cfg, accelerator, model, examples, model_name, pad_id)
    if cfg.stage == "fit":
        if accelerator.num_processes > 1:
            raise TrainConfigError("the fit stage runs in one process (its per-step work is a few small MLPs)")
        from .fit import fit_pruner

        fit_pruner(cfg, model, examples, model_name)
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (TrainConfigError, PrunerConfigError, TrainDataError, SaliencyMismatchError) as e:
        print(f"sdtp_core.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
