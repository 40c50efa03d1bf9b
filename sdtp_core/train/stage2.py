"""Stage 2, the paper's pruner training: the frozen model runs with pruning simulated by attention masks
(Gumbel-sigmoid keep decisions, :mod:`.masked_forward`) and only the pruner learns, from
``w_lm * L_lm + w_mse * L_mse + w_rank * L_rank`` (:mod:`.losses`). Data-parallel through accelerate."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdtp_core.pruner import TokenPruner
from sdtp_core.train.checkpoints import save_checkpoint, save_pruner, start_step
from sdtp_core.train.config import TrainConfig
from sdtp_core.train.data import Example, collate
from sdtp_core.train.losses import mse_loss_per_sample, rank_loss_per_sample
from sdtp_core.train.masked_forward import lm_loss_from_hidden, masked_forward
from sdtp_core.train.saliency import SaliencyStore
from sdtp_core.train.steps import (
    epoch_order,
    lr_lambda,
    optimizer_step,
    pruner_config,
    saliency_targets,
    sample_generator,
)


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
