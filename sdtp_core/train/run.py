"""Train SDTP pruning modules: ``python -m sdtp_core.train {saliency,prune,all,fit} --out DIR ...``.

Stage 1 (``saliency``) stores gradient-times-input saliency of the frozen model (:mod:`.saliency`).
Stage 2 (``prune``) trains only the pruner, with pruning simulated by attention masks
(:mod:`.masked_forward`) and the loss ``w_lm * L_lm + w_mse * L_mse + w_rank * L_rank`` (:mod:`.losses`).
``all`` runs both. ``fit`` is a fast Stage 2 without the LM loss, on cached unpruned hidden states
(:mod:`.fit`). Data-parallel with ``accelerate launch [--cpu] --num_processes N -m sdtp_core.train``.

Outputs under ``--out``: ``train_config.json`` (effective settings), ``saliency/`` (Stage 1 shards),
``saliency_summary.json`` + ``.png``, ``log.jsonl`` (one line per optimizer step), ``checkpoints/``
(resumable, atomic) and ``pruner/`` (the trained :class:`~.pruner.TokenPruner`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from sdtp_core.config import PrunerConfigError
from sdtp_core.loading import load_model
from sdtp_core.question_features import needs_lines
from sdtp_core.spans import line_ends
from sdtp_core.train.checkpoints import _atomic_write_text
from sdtp_core.train.config import TrainConfig, TrainConfigError, parse_config
from sdtp_core.train.data import TrainDataError, load_examples
from sdtp_core.train.saliency import SaliencyMismatchError, SaliencyStore, run_saliency, summarize
from sdtp_core.train.stage2 import train_pruner
from sdtp_core.train.steps import pruner_config, saliency_meta


def portable_path(value: str | None) -> str | None:
    """``value`` as a run's record may show it on any machine: a local path relative to the working
    directory, or ``~/...`` when it is under the home directory and not under the working directory;
    anything else (a Hub id, a relative path) unchanged."""
    if not value or not os.path.isabs(os.path.expanduser(value)):
        return value
    path = Path(value).expanduser().resolve()
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if path.is_relative_to(home) and not path.is_relative_to(cwd):
        return "~/" + path.relative_to(home).as_posix()
    return os.path.relpath(path, cwd)


def load_model_and_tokenizer(cfg: TrainConfig, device: torch.device):
    """The frozen model (eval mode, no parameter requires grad), its tokenizer and its resolved path.

    ``--dtype auto`` is :func:`~.loading.default_dtype` for the device (bf16 only where it is fast)."""
    model, tokenizer = load_model(cfg.model, None if cfg.dtype == "auto" else cfg.dtype, str(device), "sdpa")
    model.requires_grad_(False)
    return model, tokenizer, model.name_or_path


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
        mix=cfg.mix,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        paths = ("model", "data", "out", "saliency_dir", "config")
        effective = {
            **dataclasses.asdict(cfg),
            **{k: portable_path(getattr(cfg, k)) for k in paths},
            "resolved_model": portable_path(model_name),
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
        from sdtp_core.train.fit import fit_pruner

        ends = None
        if needs_lines(cfg.features or []):
            ends = line_ends(tokenizer, model.config.vocab_size).to(accelerator.device)
        fit_pruner(cfg, model, examples, model_name, ends)
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
