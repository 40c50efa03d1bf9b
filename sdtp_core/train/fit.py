"""Stage 2 on cached hidden states: fit the scorers to the Stage 1 saliency with the MSE and ranking losses.

``python -m sdtp_core.train fit --saliency-dir SAL --out DIR ...`` (the data settings of Stage 1).

Stage 2 proper (:func:`sdtp_core.train.stage2.train_pruner`) runs the frozen model with simulated pruning for
every sample at every optimizer step. On a CPU that allows a few dozen steps an hour: the long-input run
of ``results/training/README.md`` made 40 steps in 64 minutes, its ranking loss still falling. Here the model runs
once per sample, unpruned, to cache the hidden state at the input of each stage layer (the state Stage 1
defines the saliency on, and the one each scorer reads); then only the scorer MLPs train, on
``w_mse * L_mse + w_rank * L_rank`` (:mod:`.losses`) over each sample's unprotected prompt tokens, for as
many epochs as wanted, seconds each. What it leaves out is what needs the pruned forward: the LM loss and
the pruned hidden states that later stages see at inference.

The cached states go beside the saliency they pair with, ``SAL/features-<layers>/`` (one safetensors file
per sample, bf16, written atomically), so every fit on that saliency reuses them. Outputs under ``--out``:
``log.jsonl``, ``checkpoints/`` (resumable like Stage 2) and ``pruner/``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdtp_core.bench.quality import spearman
from sdtp_core.pruner import TokenPruner
from sdtp_core.selection import keep_counts, protected_mask
from sdtp_core.spans import segment_ids
from sdtp_core.train.checkpoints import save_checkpoint, save_pruner, start_step
from sdtp_core.train.data import Example
from sdtp_core.train.losses import mse_loss_per_sample, rank_loss_per_sample
from sdtp_core.train.masked_forward import decoder_parts
from sdtp_core.train.saliency import SaliencyStore
from sdtp_core.train.steps import (
    epoch_order,
    lr_lambda,
    optimizer_step,
    pruner_config,
    saliency_targets,
    sample_generator,
)


def feature_dir(saliency_dir: Path, layers: list[int]) -> Path:
    """Where the cached states of a schedule's stage layers live, beside the saliency they pair with."""
    return Path(saliency_dir) / ("features-" + "_".join(str(layer) for layer in layers))


@torch.no_grad()
def cache_features(model, examples: list[Example], layers: list[int], directory: Path) -> None:
    """Store each example's prompt hidden states at the input of ``layers`` (stages, prompt_len, hidden),
    from the unpruned forward, as ``directory/feat-<sample_id>.safetensors``; stored samples are skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    name = Path(getattr(model, "name_or_path", "") or "").name  # like the saliency store: the cache may move
    meta = {"model": name, "layers": list(layers), "hidden": model.config.hidden_size}
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        stored = json.loads(meta_path.read_text())
        if stored != meta:
            raise ValueError(f"{directory} holds features of another model or schedule ({stored} vs {meta})")
    else:
        meta_path.write_text(json.dumps(meta))
    pending = [e for e in examples if not (directory / f"feat-{e.sample_id}.safetensors").is_file()]
    device = next(model.parameters()).device
    for e in tqdm(pending, desc="features", unit="sample"):
        ids = torch.tensor([e.ids[: e.prompt_len]], device=device)
        states = decoder_parts(model)[0](ids, output_hidden_states=True).hidden_states  # [i]: input of layer i
        h = torch.stack([states[layer][0] for layer in layers]).to(torch.bfloat16).cpu().contiguous()
        path = directory / f"feat-{e.sample_id}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({"h": h}, str(tmp))
        os.replace(tmp, path)


def whole_prompt(n: int, cfg) -> tuple[torch.Tensor, dict]:
    """For an unpruned ``n``-token prompt: the (1, n) tokens a stage decides among (not protected by ``cfg``)
    and the scorer context (original positions, prompt length, live slots)."""
    decided = ~protected_mask(torch.ones(1, n, dtype=torch.long), cfg.keep_first, cfg.keep_recent)
    context = {"positions": torch.arange(n)[None], "lengths": torch.tensor([n]), "valid": torch.ones(1, n, dtype=bool)}
    return decided, context


@torch.no_grad()
def stage_features(model, pruner: TokenPruner, ids: list[int], hidden: torch.Tensor, line_ends=None):
    """(stages, prompt_len, F) the question-aware features (:mod:`sdtp_core.question_features`) of a sample from
    its cached states ``hidden`` (stages, prompt_len, hidden) and prompt token ``ids``, each stage's computed with
    its decoder layer, as the engine computes them on the unpruned prompt; None for a pruner without features.
    ``line_ends``: the tokenizer's line ends (:func:`~sdtp_core.spans.sentence_ends`), for ``line`` features."""
    cfg = pruner.config
    if not cfg.features:
        return None
    inner, _ = decoder_parts(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    decided, context = whole_prompt(hidden.shape[1], cfg)
    valid, positions = context["valid"].to(device), context["positions"].to(device)
    segments = None
    if line_ends is not None:
        segments = segment_ids(torch.tensor([ids[: hidden.shape[1]]], device=device), valid, line_ends)
    out = []
    for s, layer in enumerate(cfg.layers):
        h = hidden[s][None].to(device, dtype)
        rope = inner.rotary_emb(h, positions)
        kw = {"layer": inner.layers[layer], "position_embeddings": rope, "valid": valid, "segments": segments}
        out.append(pruner.features(h, protected=~decided.to(device), **kw)[0].float().cpu())
    return torch.stack(out)


def sample_loss(
    pruner: TokenPruner,
    hidden: torch.Tensor,
    target: torch.Tensor,
    weights: tuple[float, float],
    max_pairs: int,
    generator: torch.Generator,
    features: torch.Tensor | None = None,
    boundary: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, mse, rank) of one sample, summed over stages, on its unprotected prompt tokens.

    Args:
        hidden: (stages, prompt_len, hidden) cached states; target: (stages, prompt_len) ``|saliency|``.
        weights: ``(w_mse, w_rank)``.
        features: (stages, prompt_len, F) the question-aware features (:func:`stage_features`), if the pruner has
            any.
        boundary: rank pairs cross each stage's keep/drop boundary of the target (``--rank-pairs boundary``):
            one token of the ``ceil(keep_ratio_s * n)`` the stage keeps (less the protected ones), one of the rest.
    """
    cfg = pruner.config
    decided, context = whole_prompt(hidden.shape[1], cfg)
    n, free = hidden.shape[1], int(decided.sum())
    mse = rank = torch.zeros(1)
    for s in range(cfg.num_stages):
        if features is not None:
            context["features"] = features[s][None]
        pred = pruner.score(s, hidden[s][None].float(), **context).float()
        if weights[0] > 0:
            mse = mse + mse_loss_per_sample(pred, target[s][None], decided)
        if weights[1] > 0:
            keep = [keep_counts(torch.tensor([n]), cfg.keep_ratios[s])[0].item() - (n - free)] if boundary else None
            rank = rank + rank_loss_per_sample(pred, target[s][None], decided, max_pairs, generator, keep)
    return weights[0] * mse + weights[1] * rank, mse, rank


@torch.enable_grad()
def fit_pruner(cfg, model, examples: list[Example], model_name: str, line_ends: torch.Tensor | None = None) -> Path:
    """Cache the features, then fit a fresh pruner; returns ``OUT/pruner``. ``cfg`` is a
    :class:`~sdtp_core.train.config.TrainConfig` (its Stage 2 optimizer, schedule, checkpoint and loss settings);
    ``line_ends`` the tokenizer's line ends, needed by ``line`` question-aware features."""

    out = Path(cfg.out)
    pcfg = pruner_config(cfg, model.config)
    store = SaliencyStore(cfg.saliency_path)
    store.check(model.config, pcfg.layers, examples, model_name)
    features = feature_dir(cfg.saliency_path, pcfg.layers)
    cache_features(model, examples, pcfg.layers, features)
    _, w_mse, w_rank = cfg.loss_weights()

    torch.manual_seed(cfg.seed)
    pruner = TokenPruner(pcfg).float().train()
    question = {}  # sample id -> its question-aware features, computed once (they do not depend on the weights)

    def features_of(e: Example, hidden: torch.Tensor) -> torch.Tensor | None:
        if e.sample_id not in question:
            question[e.sample_id] = stage_features(model, pruner, e.ids, hidden, line_ends)
        return question[e.sample_id]

    optimizer = torch.optim.AdamW(pruner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(examples) / batch)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    log_path = out / "log.jsonl"
    start = start_step(out, cfg, pruner, optimizer, scheduler, "fit")

    stop_at = total_steps if cfg.stop_after_steps is None else min(total_steps, start + cfg.stop_after_steps)
    bar = tqdm(range(start, stop_at), initial=start, total=total_steps, desc="fit", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        chosen = [examples[i] for i in epoch_order(len(examples), cfg.seed, epoch)[k * batch : (k + 1) * batch]]
        sums = torch.zeros(3, dtype=torch.float64)
        for e in chosen:
            hidden = load_file(str(features / f"feat-{e.sample_id}.safetensors"))["h"]
            target = saliency_targets(store, [e], pcfg.layers, e.length)[:, 0, : e.prompt_len]
            generator = sample_generator(cfg.seed, step, e.sample_id)
            qf = features_of(e, hidden)
            total, mse, rank = sample_loss(
                pruner, hidden, target, (w_mse, w_rank), cfg.max_pairs, generator, qf, cfg.rank_pairs == "boundary"
            )
            (total.sum() / len(chosen)).backward()
            sums += torch.tensor([float(x.detach().sum()) for x in (total, mse, rank)], dtype=torch.float64)
        grad_norm, lr = optimizer_step(pruner, optimizer, scheduler, cfg.max_grad_norm)
        means = (sums / len(chosen)).tolist()
        record = {"step": step + 1, "epoch": epoch, "lr": lr, "loss": means[0], "mse": means[1], "rank": means[2]}
        record.update(grad_norm=float(grad_norm), seconds=round(time.perf_counter() - t0, 3))
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(mse=f"{means[1]:.3f}", rank=f"{means[2]:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop_at:
            save_checkpoint(out, step + 1, pruner, optimizer, scheduler, cfg)
    bar.close()

    final = out / "pruner"
    if stop_at == total_steps:
        save_pruner(pruner, final)
        summary = {"num_samples": len(examples), "layers": pcfg.layers}
        summary["train_spearman"] = training_spearman(pruner.eval(), examples, features, store, features_of)
        (out / "fit_summary.json").write_text(json.dumps(summary, indent=1))
        print("Spearman with |saliency| on the training samples, per stage:", summary["train_spearman"])
    return final


@torch.no_grad()
def training_spearman(
    pruner: TokenPruner, examples: list[Example], features: Path, store: SaliencyStore, features_of=None
) -> list:
    """Per stage, the mean over ``examples`` of the Spearman correlation between the pruner's scores and
    ``|saliency|`` on the cached states, over each sample's unprotected prompt tokens: how well the fit fits
    its own training data (``sdtp_core.bench.quality`` measures the same on held-out samples)."""
    cfg = pruner.config
    sums = [0.0] * cfg.num_stages
    for e in examples:
        hidden = load_file(str(features / f"feat-{e.sample_id}.safetensors"))["h"].float()
        target = saliency_targets(store, [e], cfg.layers, e.length)[:, 0, : e.prompt_len]
        decided, context = whole_prompt(e.prompt_len, cfg)
        qf = features_of(e, hidden) if features_of is not None else None
        for s in range(cfg.num_stages):
            if qf is not None:
                context["features"] = qf[s][None]
            scores = pruner.score(s, hidden[s][None], **context)[0]
            sums[s] += spearman(scores[decided[0]], target[s][decided[0]])
    return [round(v / max(1, len(examples)), 4) for v in sums]
