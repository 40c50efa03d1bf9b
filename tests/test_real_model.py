"""Integration checks of the engine on the real embedded Qwen2.5-Coder-0.5B-Instruct (short prompts)."""

from __future__ import annotations

import pytest
import torch
from oracle import mask_simulated_forward

from sdtp_core.bench.flops import prefill_flops, scheduled_counts
from sdtp_core.config import PrunerConfig
from sdtp_core.engine import SDTPEngine
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


def test_dense_greedy_equals_model_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = chat(tokenizer, "Write a Python function that returns the square of x.")
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    out = generate(SDTPEngine(model, None), inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12)
    assert out.sequences[0].tolist() == ref.tolist()


def test_pruned_prefill_and_decoding_match_the_mask_simulation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "def fibonacci(n):\n    # return the n-th Fibonacci number\n" * 3 + "Explain what this code does."
    inputs = chat(tokenizer, text)
    n = inputs["input_ids"].shape[1]
    pruner = load_pruner("random", model)
    engine = SDTPEngine(model, pruner)
    result = engine.prefill(inputs["input_ids"], logits_to_keep=0)
    assert result.kept_counts[0].tolist() == scheduled_counts(model.config, n, pruner.config)
    assert result.compression.item() > 1.3
    ref_logits, alive = mask_simulated_forward(model, pruner, inputs["input_ids"][0].tolist())
    kept = torch.nonzero(alive).flatten()
    assert result.positions[0].tolist() == kept.tolist()
    torch.testing.assert_close(result.logits[0], ref_logits[kept], rtol=1e-3, atol=1e-3)

    # decoding on the pruned caches: each new token's logits equal the oracle's on prompt + generated tokens
    out = generate(engine, inputs["input_ids"], max_new_tokens=6)
    generated = out.sequences[0].tolist()
    full = inputs["input_ids"][0].tolist() + generated
    ref_logits, _ = mask_simulated_forward(model, pruner, full, n_prompt=n)
    assert ref_logits[n - 1 : n - 1 + len(generated)].argmax(-1).tolist() == generated


def test_flops_count_equals_one_from_the_models_parameters(model_and_tokenizer):
    """prefill_flops against an independent count: 2 FLOPs per weight per token for every Linear of the
    decoder layers (read off the loaded model), plus causal attention; the pruner's term against its own
    parameters; and the scorers are well under 1% of a pruned 2K prefill."""
    model, _ = model_and_tokenizer
    cfg = PrunerConfig.for_model(model.config)
    n = 2048
    counts = scheduled_counts(model.config, n, cfg)
    flops = prefill_flops(model.config, counts, cfg, n_logits=1)
    hq = model.config.num_attention_heads * (model.config.hidden_size // model.config.num_attention_heads)
    expected_layers = 0.0
    for layer, k in zip(model.model.layers, counts):
        linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        expected_layers += 2 * linear * k + 2 * 2 * hq * k * (k + 1) / 2
    assert sum(flops.per_layer) == pytest.approx(expected_layers, rel=1e-9)
    assert flops.lm_head == 2 * model.lm_head.weight.numel()
    scorer = TokenPruner(cfg)
    per_token = 2 * sum(p.numel() for name, p in scorer.stages[0].named_parameters() if "weight" in name)
    assert flops.pruner == pytest.approx(sum(per_token * counts[layer - 1] for layer in cfg.layers), rel=1e-3)
    assert flops.pruner / flops.total < 0.005


def test_shipped_pruner_is_found_for_the_same_weights_in_another_directory(model_and_tokenizer, embedded_dir, tmp_path):
    """The shipped pruner follows the model's identity (architecture + weight fingerprint), not its path."""
    from sdtp_core.loading import EMBEDDED_PRUNER_DIR, shipped_pruner_dir

    copy = tmp_path / "my-copy"
    copy.mkdir()
    for f in embedded_dir.iterdir():
        (copy / f.name).symlink_to(f)
    moved, _ = load_model(str(copy), dtype="bfloat16", device="cpu")  # another path and another dtype
    assert shipped_pruner_dir(moved) == EMBEDDED_PRUNER_DIR
    assert load_pruner("shipped", moved).source == str(EMBEDDED_PRUNER_DIR)
    with torch.no_grad():  # the same architecture with other weights is not the model the pruner was trained on
        for p in moved.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    assert shipped_pruner_dir(moved) is None


def test_shipped_pruner_beats_random_scores_on_held_out_text(model_and_tokenizer, data_dir):
    """The committed pruner loads with pruner=shipped for the embedded model, and on Dolly records it was
    not trained on (its training used the first 400) it ranks tokens by saliency better than chance."""
    from sdtp_core.bench.quality import evaluate
    from sdtp_core.loading import EMBEDDED_PRUNER_DIR
    from sdtp_core.train.data import load_examples

    model, tokenizer = model_and_tokenizer
    pruner = load_pruner("shipped", model)
    assert pruner.source == str(EMBEDDED_PRUNER_DIR)
    assert pruner.config.to_dict() == PrunerConfig.for_model(model.config).to_dict()
    examples = load_examples(str(data_dir / "dolly" / "dolly_subset_1000.jsonl"), tokenizer, "auto", 256, 4, skip=900)
    result = evaluate(model, pruner, examples)
    assert result["pruner"]["mean_spearman"] > result["random"]["mean_spearman"] + 0.1
    assert result["pruner"]["mean_overlap"] > result["random"]["mean_overlap"]
