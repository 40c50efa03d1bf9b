"""Data-parallel training with two CPU processes launched by accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from test_train_fixtures import tiny_model_dir, toy_dolly

from sdtp_core.train.run import main

ARGS = [
    "--layers",
    "1,3,4",
    "--keep-ratio",
    "0.7",
    "--keep-first",
    "2",
    "--dtype",
    "float32",
    "--batch-size",
    "1",
    "--epochs",
    "1",
    "--shard-size",
    "2",
]


def test_two_process_run_matches_one_process(tmp_path):
    model, data = tiny_model_dir(tmp_path / "model"), toy_dolly(tmp_path / "data.jsonl", 8)
    common = ["--model", str(model), "--data", str(data), *ARGS]
    # `accelerate launch --cpu` starts a single process unless MPI is set up; `--multi_gpu` uses torchrun,
    # and sdtp_core.train selects gloo on the CPU when CUDA is absent (or ACCELERATE_USE_CPU is set).
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    proc = subprocess.run(
        [
            *launcher,
            "-m",
            "sdtp_core.train",
            "all",
            "--out",
            str(two),
            *common,
            "--grad-accum",
            "1",
            "--threads",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((two / "train_config.json").read_text())
    assert config["num_processes"] == 2
    shards = sorted(p.name for p in (two / "saliency").glob("shard-*.safetensors"))
    assert any(s.startswith("shard-r00") for s in shards) and any(s.startswith("shard-r01") for s in shards)
    assert json.loads((two / "saliency" / "index.json").read_text())["num_samples"] == 8
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4  # 8 samples / (1 per process x 2 processes)

    # One process with the same global batch (2 micro-batches) and the same per-sample randomness
    # computes the same gradients: the weights agree up to float summation order.
    one = tmp_path / "one"
    args = ["prune", "--out", str(one), "--saliency-dir", str(two / "saliency"), *common, "--grad-accum", "2"]
    assert main(args) == 0
    a = load_file(str(two / "pruner" / "model.safetensors"))
    b = load_file(str(one / "pruner" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
