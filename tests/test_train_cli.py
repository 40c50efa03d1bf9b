"""``python -m sdtp_core.train`` end to end on a tiny model: training, resumption, config handling, errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_fixtures import char_tokenizer, tiny_model_dir, toy_dolly

from sdtp_core.engine import SDTPEngine
from sdtp_core.pruner import TokenPruner
from sdtp_core.train.config import build_parser
from sdtp_core.train.data import Example
from sdtp_core.train.run import main

SCHEDULE = ["--layers", "1,3,4", "--keep-ratio", "0.7", "--keep-first", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tiny model directory, toy Dolly-style data and its Stage 1 saliency (computed once)."""
    root = tmp_path_factory.mktemp("train")
    paths = {
        "model": tiny_model_dir(root / "model"),
        "data": toy_dolly(root / "data.jsonl", 12),
        "saliency": root / "stage1" / "saliency",
        "root": root,
    }
    assert (
        main(
            [
                "saliency",
                "--model",
                str(paths["model"]),
                "--data",
                str(paths["data"]),
                "--out",
                str(root / "stage1"),
                *SCHEDULE,
            ]
        )
        == 0
    )
    return paths


def _args(work: dict, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "--model",
        str(work["model"]),
        "--data",
        str(work["data"]),
        "--out",
        str(out),
        "--saliency-dir",
        str(work["saliency"]),
        *SCHEDULE,
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        *extra,
    ]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_saliency_stage_outputs(work):
    out = work["root"] / "stage1"
    summary = json.loads((out / "saliency_summary.json").read_text())
    assert summary["layers"] == [1, 3, 4] and summary["num_samples"] == 12
    assert all(0 < f <= 1 for f in summary["fraction_above_10pct_of_max"])
    assert (out / "saliency_summary.png").stat().st_size > 1000
    index = json.loads((work["saliency"] / "index.json").read_text())
    assert index["num_samples"] == 12


def test_training_lowers_the_loss_and_yields_a_usable_pruner(work, tmp_path):
    out = tmp_path / "run"
    assert main(_args(work, out, "--epochs", "6", "--lr", "2e-2", "--warmup", "0")) == 0
    log = _log(out)
    assert len(log) == 36 and [r["step"] for r in log] == list(range(1, 37))
    assert {"loss", "lm", "mse", "rank", "lr", "grad_norm", "kept_prompt_fraction"} <= set(log[0])
    first = sum(r["loss"] for r in log[:6]) / 6
    last = sum(r["loss"] for r in log[-6:]) / 6
    assert last < first - 0.3, (first, last)
    pruner = TokenPruner.from_pretrained(out / "pruner")
    assert pruner.config.layers == [1, 3, 4] and pruner.config.keep_ratios == pytest.approx([0.7, 0.49, 0.343])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work["model"])
    result = SDTPEngine(model, pruner).prefill(torch.randint(0, 90, (1, 40)), use_cache=False)
    assert result.kept_counts[0].tolist()[-1] < 40
    config = json.loads((out / "train_config.json").read_text())
    assert config["lr"] == 2e-2 and config["pruner"]["layers"] == [1, 3, 4]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pruner" / "model.safetensors"))


def test_resume_after_a_kill_is_bit_identical(work, tmp_path):
    common = ("--epochs", "2", "--checkpoint-every", "2", "--keep-checkpoints", "5")
    ref = tmp_path / "ref"
    assert main(_args(work, ref, *common)) == 0

    # Run 7 of 12 steps, then simulate a kill after step 5: lose the newer checkpoint and leave a
    # half-written one and log lines of steps that were never checkpointed.
    out = tmp_path / "killed"
    assert main(_args(work, out, *common, "--stop-after-steps", "7")) == 0
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-0000007")
    (ckpts / "latest").write_text("step-0000006")
    shutil.rmtree(ckpts / "step-0000006")
    (ckpts / "latest").write_text("step-0000004")
    (ckpts / ".tmp-step-0000006").mkdir()
    assert not (out / "pruner").exists()
    assert main(_args(work, out, *common, "--resume")) == 0

    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _log(ref)] == [r["loss"] for r in _log(out)]

    # A clean stop/resume (time slicing) gives the same weights too.
    sliced = tmp_path / "sliced"
    assert main(_args(work, sliced, *common, "--stop-after-steps", "5")) == 0
    assert main(_args(work, sliced, *common, "--resume")) == 0
    c = _weights(sliced)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_changed_settings_and_unflagged_restarts(work, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(work, out, "--stop-after-steps", "1")) == 0
    assert main(_args(work, out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(_args(work, out, "--resume", "--lr", "0.1")) == 2
    assert "settings changed since it was written: ['lr']" in capsys.readouterr().err


def test_config_file_with_cli_override(work, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 0.02\nepochs: 1\nw-rank: 0.5\nno_mse: true\nlayers: 1,3,4\n")
    out = tmp_path / "run"
    assert main([*_args(work, out), "--config", str(cfg), "--lr", "0.03"]) == 0
    effective = json.loads((out / "train_config.json").read_text())
    assert effective["lr"] == 0.03 and effective["epochs"] == 1 and effective["w_rank"] == 0.5
    assert effective["no_mse"] is True
    assert all(r["mse"] == 0.0 and r["rank"] > 0 for r in _log(out))  # the --no-mse ablation


def test_no_rank_ablation_and_lm_only(work, tmp_path):
    out = tmp_path / "run"
    assert main(_args(work, out, "--no-rank", "--w-mse", "0", "--epochs", "1")) == 0
    assert all(r["rank"] == 0.0 and r["mse"] == 0.0 and r["loss"] == pytest.approx(r["lm"]) for r in _log(out))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "1,9"], "stage layer 9 is out of range"),
        (["--layers", "3,1"], "strictly increasing"),
        (["--keep-ratio", "1.5"], "--keep-ratio 1.5 is outside (0, 1]"),
        (["--keep-ratio", "0"], "--keep-ratio 0.0 is outside (0, 1]"),
        (["--layers", "1,2"], "not the pruning layers [2]"),
        (["--max-length", "24"], "stored tokens differ from the current tokenization"),
        (["--max-samples", "0"], "--max-samples must be >= 1"),
        (["--no-rank", "--no-mse", "--w-lm", "0"], "all loss terms are disabled"),
        (["--saliency-dir", "/nonexistent/sal"], "run the 'saliency' stage first"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(work, tmp_path, capsys, extra, message):
    assert main([*_args(work, tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_data_and_config_files(work, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([*_args(work, tmp_path / "a"), "--data", str(empty)]) == 2
    assert "no records in" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert main([*_args(work, tmp_path / "b"), "--data", str(wrong)]) == 2
    assert "expected instruction/context/response or text" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    assert main([*_args(work, tmp_path / "c"), "--config", str(bad)]) == 2
    assert "unknown settings ['learning_rate']" in capsys.readouterr().err
    assert main(["saliency", "--stage", "prune", "--out", str(tmp_path / "d")]) == 2
    assert "stage given twice" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--out",
        "--max-samples",
        "--max-length",
        "--epochs",
        "--seed",
        "--resume",
        "--lr",
        "--batch-size",
        "--grad-accum",
        "--w-lm",
        "--w-mse",
        "--w-rank",
        "--no-rank",
        "--no-mse",
        "--checkpoint-every",
        "--dtype",
        "--layers",
        "--keep-ratio",
        "--config",
        "--format",
    ):
        assert flag in text
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_sigkill_at_an_arbitrary_point_then_resume_is_bit_identical(work, tmp_path):
    """A real kill (SIGKILL, possibly in the middle of writing a checkpoint), then --resume."""
    common = ("--epochs", "4", "--checkpoint-every", "1")
    ref = tmp_path / "ref"
    assert main(_args(work, ref, *common)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtp_core.train", *_args(work, out, *common)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = out / "log.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "pruner").exists(), "the run finished before it could be killed"
    assert main(_args(work, out, *common, "--resume")) == 0
    a, b = _weights(ref), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fit_args(work: dict, out: Path, *extra: str) -> list[str]:
    return ["fit", *_args(work, out, *extra)[1:]]


def test_fit_caches_the_unpruned_states_and_fits_the_saliency(work, tmp_path):
    from transformers import AutoModelForCausalLM

    from sdtp_core.train.fit import sample_loss
    from sdtp_core.train.saliency import SaliencyStore

    out = tmp_path / "fit"
    assert main(_fit_args(work, out, "--epochs", "30", "--lr", "2e-2", "--warmup", "0")) == 0
    log = _log(out)
    assert len(log) == 180 and {"mse", "rank", "loss", "lr"} <= set(log[0])
    first, last = (sum(r["mse"] for r in rows) / 6 for rows in (log[:6], log[-6:]))
    assert last < 0.8 * first, (first, last)

    # The cached states are the plain transformers forward's inputs of the stage layers (prompt tokens).
    model = AutoModelForCausalLM.from_pretrained(work["model"]).eval()
    store = SaliencyStore(work["saliency"])
    sample = store.get(0)
    h = load_file(str(work["saliency"] / "features-1_3_4" / "feat-0.safetensors"))["h"]
    with torch.no_grad():
        states = model(sample.ids[None, : sample.prompt_len], output_hidden_states=True).hidden_states
    assert h.shape == (3, sample.prompt_len, model.config.hidden_size)
    for s, layer in enumerate([1, 3, 4]):
        torch.testing.assert_close(h[s].float(), states[layer][0], atol=0.05, rtol=0.02)  # stored in bf16

    # The fitted pruner beats a fresh one on the loss it was fitted to, and the engine runs it.
    fitted = TokenPruner.from_pretrained(out / "pruner")
    fresh = TokenPruner(fitted.config)
    target = sample.saliency[:, : sample.prompt_len].abs()
    with torch.no_grad():
        losses = [
            float(sample_loss(p, h, target, (1.0, 1.0), 16384, torch.Generator().manual_seed(0))[0])
            for p in (fitted, fresh)
        ]
    assert losses[0] < losses[1] - 0.5, losses
    # The run reports how well it fits its training samples; a fresh pruner ranks at about chance.
    from sdtp_core.train.fit import training_spearman

    summary = json.loads((out / "fit_summary.json").read_text())
    examples = [Example(i, store.get(i).ids.tolist(), store.get(i).prompt_len) for i in range(12)]
    features = work["saliency"] / "features-1_3_4"
    assert summary["train_spearman"] == training_spearman(fitted, examples, features, store)
    fresh_rho = training_spearman(fresh, examples, features, store)
    assert sum(summary["train_spearman"]) / 3 > sum(fresh_rho) / 3 + 0.2, (summary, fresh_rho)
    assert SDTPEngine(model, fitted).prefill(torch.randint(0, 90, (1, 40)), use_cache=False).kept_counts[0, -1] < 40


def test_fit_resumes_bit_identically_and_never_from_a_stage2_checkpoint(work, tmp_path, capsys):
    common = ("--epochs", "2", "--checkpoint-every", "2")
    ref, sliced = tmp_path / "ref", tmp_path / "sliced"
    assert main(_fit_args(work, ref, *common)) == 0
    assert main(_fit_args(work, sliced, *common, "--stop-after-steps", "5")) == 0
    assert not (sliced / "pruner").exists()
    assert main(_fit_args(work, sliced, *common, "--resume")) == 0
    a, b = _weights(ref), _weights(sliced)
    assert all(torch.equal(a[k], b[k]) for k in a)

    stage2 = tmp_path / "stage2"
    assert main(_args(work, stage2, "--stop-after-steps", "1")) == 0
    assert main(_fit_args(work, stage2, "--resume")) == 2
    assert "settings changed since it was written: ['objective']" in capsys.readouterr().err
    assert main(_fit_args(work, tmp_path / "none", "--no-rank", "--no-mse")) == 2
    assert "MSE and ranking losses only" in capsys.readouterr().err


def test_fit_trains_a_query_scorer(work, tmp_path):
    out = tmp_path / "query"
    args = _fit_args(work, out, "--epochs", "1", "--scorer-query", "--scorer-input-norm", "rms")
    assert main(args) == 0
    pruner = TokenPruner.from_pretrained(out / "pruner")
    assert pruner.config.query and pruner.stages[0].fc1.in_features == 2 * pruner.config.hidden_size


def test_fit_trains_question_aware_features_and_resumes(work, tmp_path, capsys):
    """--features: the fit stage computes each sample's features once from the stage layers (line ends from the
    tokenizer), fits both MLPs with rank pairs across the keep boundary, resumes bit-identically, and the saved
    pruner runs in the engine."""
    from transformers import AutoModelForCausalLM

    common = (
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
        "--features",
        "attn,span:4:1,line:8:2",
        "--feature-window",
        "3",
        "--rank-pairs",
        "boundary",
    )
    ref, sliced = tmp_path / "ref", tmp_path / "sliced"
    assert main(_fit_args(work, ref, *common)) == 0
    assert main(_fit_args(work, sliced, *common, "--stop-after-steps", "3")) == 0
    assert main(_fit_args(work, sliced, *common, "--resume")) == 0
    a, b = _weights(ref), _weights(sliced)
    assert any(k.startswith("stages.0.feature_mlp") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    pruner = TokenPruner.from_pretrained(ref / "pruner")
    assert pruner.config.features == ["attn", "span:4:1", "line:8:2"] and pruner.config.feature_window == 3
    assert json.loads((ref / "train_config.json").read_text())["features"] == pruner.config.features

    from sdtp_core.loading import load_pruner

    model = AutoModelForCausalLM.from_pretrained(work["model"]).eval()
    loaded = load_pruner(str(ref / "pruner"), model)  # line ends from the tokenizer saved beside the model
    newline = char_tokenizer()("\n", add_special_tokens=False)["input_ids"][0]
    assert bool(loaded.sentence_ends[newline]) and int(loaded.sentence_ends.sum()) == 1
    ids = torch.tensor([char_tokenizer()("line one\nline two\n" * 3, add_special_tokens=False)["input_ids"]])
    assert SDTPEngine(model, loaded).prefill(ids, use_cache=False).kept_counts[0, -1] < ids.shape[1]
    # Stage 2 cannot train them (its masked forward scores prompt and response together)
    assert main(_args(work, tmp_path / "s2", "--features", "default")) == 2
    assert "train with the fit stage" in capsys.readouterr().err
    assert main(_args(work, tmp_path / "s2", "--rank-pairs", "boundary")) == 2
    assert "fit stage" in capsys.readouterr().err


def test_recorded_paths_are_portable(work, tmp_path, monkeypatch):
    from sdtp_core.train.run import portable_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert portable_path(str(tmp_path / "proj" / "runs" / "x")) == "runs/x"
    assert portable_path(str(tmp_path / "home" / ".cache" / "m")) == "~/.cache/m"
    assert portable_path(str(tmp_path / "data" / "d.jsonl")) == "../data/d.jsonl"
    assert portable_path("Qwen/Qwen2-7B") == "Qwen/Qwen2-7B" and portable_path(None) is None
    out = tmp_path / "proj" / "run"
    assert main(_args(work, out, "--epochs", "1")) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["out"] == "run" and not any(str(v).startswith("/") for v in config.values())


def test_log_plot_averages_each_epoch_and_writes_a_png(tmp_path, capsys):
    from sdtp_core.train.log_plot import epoch_means
    from sdtp_core.train.log_plot import main as plot_main

    log = tmp_path / "log.jsonl"
    steps = [(0, 4.0, 2.0), (0, 2.0, 1.0), (1, 1.0, 0.5)]
    log.write_text("\n".join(json.dumps({"step": i, "epoch": e, "loss": m + r, "mse": m, "rank": r, "lm": None})
                             for i, (e, m, r) in enumerate(steps)))  # fmt: skip
    rows = epoch_means(log)
    assert rows == [
        {"epoch": 0, "steps": 2, "loss": 4.5, "mse": 3.0, "rank": 1.5},
        {"epoch": 1, "steps": 1, "loss": 1.5, "mse": 1.0, "rank": 0.5},
    ]
    plot_main([str(log), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 | 1 | 1.500 | 1.000 | 0.500 |" in capsys.readouterr().out
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no steps"):
        epoch_means(tmp_path / "empty.jsonl")
