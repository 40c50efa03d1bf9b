"""The pieces both Stage 2 loops share (:mod:`.stage2` and :mod:`.fit`): the schedule, the data order,
per-sample randomness, the saliency targets and one optimizer step."""

from __future__ import annotations

import math

import torch

from sdtp_core.config import PrunerConfig
from sdtp_core.pruner import TokenPruner
from sdtp_core.train.config import TrainConfig
from sdtp_core.train.data import Example
from sdtp_core.train.saliency import SaliencyStore


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
        features=cfg.features or [],
        feature_window=cfg.feature_window,
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
        **({"mix": True} if cfg.mix else {}),
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


def optimizer_step(pruner: TokenPruner, optimizer, scheduler, max_grad_norm: float) -> tuple[torch.Tensor, float]:
    """Clip the gradients (0: no clipping), step the optimizer and the schedule, clear the gradients;
    returns the gradient norm before clipping and the learning rate the step used."""
    grad_norm = torch.nn.utils.clip_grad_norm_(pruner.parameters(), max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
