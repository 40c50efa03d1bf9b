"""Integration checks of the engine on the real embedded Qwen2.5-Coder-0.5B-Instruct (short prompts)."""

from __future__ import annotations

import pytest
import torch
from oracle import mask_simulated_forward

from sdtp_core.config import PrunerConfig
from sdtp_core.engine import SDTPEngine
from sdtp_core.flops import prefill_flops, scheduled_counts
from sdtp_core.generate import generate
from sdtp_core.loading import load_model, load_pruner
from sdtp_core.pruner import TokenPruner

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model_and_tokenizer(embedded_dir):
    model, tokenizer = load_model(str(embedded_dir), dtype="float32", device="cpu")
    return model, tokenizer


def chat(tokenizer, text: str):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_embedded_model_shape_and_default_schedule(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size) == ("qwen2", 24, 896)
    pruner = load_pruner("random", model)
    assert pruner.config.layers == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22]


def test_dense_greedy_equals_model_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = chat(tokenizer, "Write a Python function that returns the square of x.")
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    out = generate(SDTPEngine(model, None), inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12)
    assert out.sequences[0].tolist() == ref.tolist()


def test_pruned_prefill_matches_mask_simulation_and_generates_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "def fibonacci(n):\n    # return the n-th Fibonacci number\n" * 3 + "Explain what this code does."
    inputs = chat(tokenizer, text)
    n = inputs["input_ids"].shape[1]
    pruner = load_pruner("random", model)
    engine = SDTPEngine(model, pruner)
    result = engine.prefill(inputs["input_ids"], logits_to_keep=0)
    assert result.kept_counts[0].tolist() == scheduled_counts(model.config, n, pruner.config)
    ref_logits, alive = mask_simulated_forward(model, pruner, inputs["input_ids"][0].tolist())
    kept = torch.nonzero(alive).flatten()
    assert result.positions[0].tolist() == kept.tolist()
    torch.testing.assert_close(result.logits[0], ref_logits[kept], rtol=1e-3, atol=1e-3)

    out = generate(
        engine,
        inputs["input_ids"],
        max_new_tokens=40,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=["\n\n"],
        tokenizer=tokenizer,
    )
    decoded = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    assert decoded.strip() and out.sequences.shape[1] <= 40
    assert "\n\n" not in decoded[:-2]  # stopped at the first blank line, if any
    assert out.prefill.compression.item() > 1.3


def test_pruner_flops_are_well_under_one_percent(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cfg = PrunerConfig.for_model(model.config)
    flops = prefill_flops(model.config, scheduled_counts(model.config, 2048, cfg), cfg)
    assert flops.pruner / flops.total < 0.005
    assert sum(p.numel() for p in TokenPruner(cfg).parameters()) < 0.005 * model.num_parameters()


def test_shipped_pruner_is_the_default_and_beats_random_scores_on_held_out_text(model_and_tokenizer, data_dir):
    """The committed pruner loads by default for the embedded model, and on Dolly records it was not
    trained on (its training used the first 400) it ranks tokens by saliency better than chance."""
    from sdtp_core.loading import EMBEDDED_PRUNER_DIR
    from sdtp_core.pruner_eval import evaluate
    from sdtp_core.train_data import load_examples

    model, tokenizer = model_and_tokenizer
    pruner = load_pruner(None, model)
    assert (EMBEDDED_PRUNER_DIR / "model.safetensors").is_file()
    assert pruner.config.to_dict() == PrunerConfig.for_model(model.config).to_dict()
    examples = load_examples(str(data_dir / "dolly" / "dolly_subset_1000.jsonl"), tokenizer, "auto", 256, 4, skip=900)
    result = evaluate(model, pruner, examples)
    assert result["pruner"]["mean_spearman"] > result["random"]["mean_spearman"] + 0.1
    assert result["pruner"]["mean_overlap"] > result["random"]["mean_overlap"]
