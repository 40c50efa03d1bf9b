"""Resumable, atomic Stage 2 checkpoints (``OUT/checkpoints/step-N``), the step log and the final pruner."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdtp_core.pruner import TokenPruner
from sdtp_core.train.config import TrainConfig, TrainConfigError


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


def save_pruner(pruner: TokenPruner, final: Path) -> None:
    """Write the trained pruner to ``final`` atomically (a temporary directory, then a rename)."""
    tmp = final.with_name("." + final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pruner.eval().save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
