"""The pruned forward and pruned decoding against independent references (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model, tiny_pruner
from oracle import mask_simulated_forward

from sdtp_core.bench.flops import scheduled_counts
from sdtp_core.engine import PromptError, SDTPEngine
from sdtp_core.generate import UnsupportedGenerationError, generate


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test so other test modules keep autograd on."""
    with torch.no_grad():
        yield


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (1, n), generator=g)


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.shape[1] :] = r[0]
        mask[b, width - r.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_logits_equal_transformers(arch, attn):
    model = tiny_model(arch, attn)
    ids = prompt(37)
    ref = model(ids).logits
    for pruner in (None, tiny_pruner(model, ratios=(1.0, 1.0, 1.0))):
        out = SDTPEngine(model, pruner).prefill(ids, logits_to_keep=0)
        torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
        assert out.kept_counts.tolist() == [[37] * 6]
        assert out.compression.item() == 1.0


def test_dense_batch_with_padding_equals_transformers(arch):
    model = tiny_model(arch)
    ids, mask = left_pad([prompt(20, 1), prompt(33, 2), prompt(9, 3)])
    ref = model(ids, attention_mask=mask).logits[:, -1]
    out = SDTPEngine(model, None).prefill(ids, mask)
    torch.testing.assert_close(out.logits[:, -1], ref, rtol=1e-5, atol=1e-5)


def test_greedy_generation_token_identical_to_model_generate(arch):
    model = tiny_model(arch)
    ids, mask = left_pad([prompt(25, 4), prompt(14, 5)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[
        :, ids.shape[1] :
    ]
    for pruner in (None, tiny_pruner(model, ratios=(1.0, 1.0, 1.0))):
        out = generate(SDTPEngine(model, pruner), ids, mask, max_new_tokens=12)
        assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("scorer", ["mlp", "query", "attention_feature"])
@pytest.mark.parametrize("n", [5, 12, 40, 97])
def test_pruned_logits_equal_mask_simulated_forward(arch, n, scorer):
    """The oracle hides dropped tokens by masks; a scorer reading the tail's attention sees the same live keys.
    (The feature window is the protected tail, whose slots are the last ones in both.)"""
    model = tiny_model(arch)
    kw = {
        "mlp": {},
        "query": {"query": True, "input_norm": "rms"},
        "attention_feature": {"features": ["attn"], "feature_window": math.ceil(0.1 * n)},
    }[scorer]
    pruner = tiny_pruner(model, **kw)
    ids = prompt(n, seed=n)
    out = SDTPEngine(model, pruner).prefill(ids, logits_to_keep=0)
    ref_logits, alive = mask_simulated_forward(model, pruner, ids[0].tolist())
    kept = torch.nonzero(alive).flatten()
    valid = out.positions[0] >= 0
    assert out.positions[0][valid].tolist() == kept.tolist()
    torch.testing.assert_close(out.logits[0][valid], ref_logits[kept], rtol=1e-5, atol=1e-5)
    if n >= 40:
        assert len(kept) < n  # pruning really happened


def test_kept_counts_follow_schedule_and_compression_is_hand_computed():
    model = tiny_model()
    out = SDTPEngine(model, tiny_pruner(model)).prefill(prompt(40))
    # layers 0..5, stages before layers 1, 3, 4 keeping ceil(.7*40)=28, ceil(.5*40)=20, ceil(.4*40)=16
    assert out.kept_counts.tolist() == [[40, 28, 28, 20, 16, 16]]
    assert out.compression.item() == pytest.approx(40 / ((40 + 28 + 28 + 20 + 16 + 16) / 6))


def test_cache_lengths_equal_kept_counts_and_grow_by_decoded_tokens():
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    out = engine.prefill(prompt(40))
    assert out.cache.layer_lengths() == out.kept_counts[0].tolist()
    logits = generate(engine, prompt(40), max_new_tokens=5).sequences
    assert logits.shape == (1, 5)
    res = generate(engine, prompt(40), max_new_tokens=5)
    # 4 decode steps ran after the prefill (the 5th token needs no forward pass)
    assert res.prefill.cache.layer_lengths() == [k + 4 for k in res.prefill.kept_counts[0].tolist()]


def test_decoding_attends_to_pruned_caches(arch):
    """Logits of decoded tokens equal the mask simulation in which they see only the kept prompt tokens,
    and differ from decoding against the full prompt (so the comparison can tell the two apart)."""
    model = tiny_model(arch)
    pruner = tiny_pruner(model)
    ids = prompt(50, 7)
    engine = SDTPEngine(model, pruner)
    res = engine.prefill(ids)
    tokens, logits = [int(res.logits[0, -1].argmax())], [res.logits[0, -1]]
    for step in range(5):
        logits.append(engine.decode_step(res.cache, torch.tensor([tokens[-1]]), torch.tensor([50 + step]))[0])
        tokens.append(int(logits[-1].argmax()))
    full = ids[0].tolist() + tokens
    ref_logits, _ = mask_simulated_forward(model, pruner, full, n_prompt=50)
    torch.testing.assert_close(torch.stack(logits), ref_logits[49:55], rtol=1e-5, atol=1e-5)
    dense_logits = model(torch.tensor([full])).logits[0, 49:55]
    assert (torch.stack(logits) - dense_logits).abs().max() > 1e-3  # the pruned caches really changed them


def test_last_prompt_token_is_kept_even_with_keep_recent_zero(monkeypatch):
    model = tiny_model()
    pruner = tiny_pruner(model, keep_first=0, keep_recent=0.0)
    n = 30
    # the last token gets the lowest score at every stage
    monkeypatch.setattr(
        pruner, "score", lambda s, h, **ctx: -torch.arange(h.shape[1], dtype=torch.float32).expand(h.shape[0], -1)
    )
    out = SDTPEngine(model, pruner).prefill(prompt(n))
    kept = out.positions[0][out.positions[0] >= 0].tolist()
    assert kept[-1] == n - 1
    assert kept[:-1] == list(range(len(kept) - 1))  # the rest: the best-scored, i.e. the earliest


@pytest.mark.parametrize("keep_first,keep_recent", [(4, 0.1), (0, 0.0), (2, 0.0), (4, 0.5)])
@pytest.mark.parametrize("n", [1, 3, 7, 40, 101])
def test_scheduled_counts_agree_with_the_engine(keep_first, keep_recent, n):
    model = tiny_model()
    pruner = tiny_pruner(model, keep_first=keep_first, keep_recent=keep_recent)
    out = SDTPEngine(model, pruner).prefill(prompt(n, seed=n))
    assert out.kept_counts[0].tolist() == scheduled_counts(model.config, n, pruner.config)


def test_ties_are_broken_by_position_like_the_oracle(monkeypatch):
    model = tiny_model()
    pruner = tiny_pruner(model)
    n = 40
    ids = prompt(n, 3)
    # every token scores the same: the earliest unprotected tokens must win, in engine and oracle alike
    monkeypatch.setattr(pruner, "score", lambda s, h, **ctx: torch.zeros(h.shape[:2], dtype=h.dtype))
    out = SDTPEngine(model, pruner).prefill(ids, logits_to_keep=0)
    _, alive = mask_simulated_forward(model, pruner, ids[0].tolist())
    kept = out.positions[0][out.positions[0] >= 0].tolist()
    assert kept == torch.nonzero(alive).flatten().tolist()
    recent = math.ceil(0.1 * n)
    assert kept == list(range(16 - recent)) + list(range(n - recent, n))  # ceil(0.4 * 40) = 16 kept


def test_decoder_layers_get_the_current_cache_keyword():
    """No deprecated-keyword FutureWarning from transformers on any layer call."""
    import warnings

    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        generate(engine, prompt(20), max_new_tokens=3)


def test_generation_settings_match_model_generate():
    """Repetition penalty, no-repeat n-grams and min_new_tokens as model.generate applies them (float32)."""
    model = tiny_model().float()
    ids, mask = left_pad([prompt(25, 4), prompt(14, 5)])
    free = generate(SDTPEngine(model, None), ids, mask, max_new_tokens=10).sequences
    settings = dict(repetition_penalty=1.8, no_repeat_ngram_size=2, min_new_tokens=6, eos_token_id=int(free[0, 2]))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **settings)
    ref = ref[:, ids.shape[1] :]
    for pruner in (None, tiny_pruner(model, ratios=(1.0, 1.0, 1.0))):
        out = generate(SDTPEngine(model, pruner), ids, mask, max_new_tokens=10, pad_token_id=0, **settings)
        assert torch.equal(out.sequences, ref[:, : out.sequences.shape[1]])
    assert not torch.equal(free, ref)  # the settings changed the output, so the comparison means something


def test_generation_settings_it_cannot_honour_are_refused():
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    with pytest.raises(UnsupportedGenerationError, match="num_beams=2"):
        generate(engine, prompt(10), max_new_tokens=3, num_beams=2)
    with pytest.raises(UnsupportedGenerationError, match="typical_p"):
        generate(engine, prompt(10), max_new_tokens=3, do_sample=True, typical_p=0.5)
    with pytest.raises(UnsupportedGenerationError, match="unknown generation argument 'bogus'"):
        generate(engine, prompt(10), max_new_tokens=3, bogus=1)


def test_protected_tokens_are_never_dropped():
    model = tiny_model()
    pruner = tiny_pruner(model, ratios=(0.3, 0.2, 0.1))
    n = 60
    extra = torch.zeros(1, n, dtype=torch.bool)
    extra[0, [10, 20, 30]] = True
    out = SDTPEngine(model, pruner).prefill(prompt(n), protect=extra)
    kept = set(out.positions[0][out.positions[0] >= 0].tolist())
    recent = math.ceil(0.1 * n)
    assert set(range(4)) | set(range(n - recent, n)) | {10, 20, 30} <= kept
    # protected tokens (4 + 6 + 3 = 13) exceed ceil(0.1 * 60) = 6: nothing else survives
    assert len(kept) == 13


def test_prompt_shorter_than_protected_tokens_keeps_everything():
    model = tiny_model()
    out = SDTPEngine(model, tiny_pruner(model)).prefill(prompt(3))
    assert out.kept_counts.tolist() == [[3] * 6]


def test_batched_equals_one_by_one(arch):
    model = tiny_model(arch)
    engine = SDTPEngine(model, tiny_pruner(model))
    rows = [prompt(45, 11), prompt(23, 12), prompt(60, 13)]
    ids, mask = left_pad(rows)
    batched = engine.prefill(ids, mask)
    gen_batched = generate(engine, ids, mask, max_new_tokens=8)
    for b, row in enumerate(rows):
        alone = engine.prefill(row)
        assert batched.kept_counts[b].tolist() == alone.kept_counts[0].tolist()
        valid = batched.positions[b] >= 0
        assert batched.positions[b][valid].tolist() == alone.positions[0].tolist()
        torch.testing.assert_close(batched.logits[b], alone.logits[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(gen_batched.sequences[b], generate(engine, row, max_new_tokens=8).sequences[0])


def test_right_padding_is_handled_like_left_padding():
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    row = prompt(30, 3)
    ids = torch.cat([row, torch.zeros(1, 10, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 30), torch.zeros(1, 10)], dim=1).long()
    torch.testing.assert_close(engine.prefill(ids, mask).logits, engine.prefill(row).logits)


def test_eos_stops_a_row_and_pads_it():
    model = tiny_model()
    engine = SDTPEngine(model, None)
    ids, mask = left_pad([prompt(20, 1), prompt(20, 2)])
    free = generate(engine, ids, mask, max_new_tokens=6).sequences
    eos = int(free[0, 1])
    out = generate(engine, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=95).sequences
    for b in range(2):
        row = free[b].tolist()
        stop_at = row.index(eos) + 1 if eos in row else 6
        assert out[b, :stop_at].tolist() == row[:stop_at]
        assert (out[b, stop_at:] == 95).all()
    assert out.shape[1] <= 6


def test_sampling_is_reproducible_with_a_generator_and_differs_from_greedy():
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    ids = prompt(30)
    runs = [
        generate(
            engine,
            ids,
            max_new_tokens=20,
            do_sample=True,
            temperature=2.0,
            top_k=50,
            top_p=0.95,
            generator=torch.Generator().manual_seed(0),
        ).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], generate(engine, ids, max_new_tokens=20).sequences)


def test_bad_prompts_give_clear_errors():
    model = tiny_model()
    engine = SDTPEngine(model, tiny_pruner(model))
    with pytest.raises(PromptError, match="non-empty"):
        engine.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(PromptError, match="empty prompt in batch rows \\[1\\]"):
        engine.prefill(torch.ones(2, 5, dtype=torch.long), torch.tensor([[1] * 5, [0] * 5]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(engine, prompt(5), max_new_tokens=0)


def test_engine_rejects_models_without_the_decoder_layout():
    with pytest.raises(TypeError, match="Llama/Qwen2 decoder layout"):
        SDTPEngine(torch.nn.Linear(2, 2))


def test_prompts_below_min_prompt_tokens_run_dense_in_a_mixed_batch():
    model = tiny_model()
    pruner = tiny_pruner(model)
    engine = SDTPEngine(model, pruner, min_prompt_tokens=40)
    short, long = prompt(30, 1), prompt(60, 2)
    ids, mask = left_pad([short, long])
    out = engine.prefill(ids, mask)
    assert out.kept_counts[0].tolist() == [30] * 6 and out.compression[0].item() == 1.0
    torch.testing.assert_close(out.logits[0], SDTPEngine(model, None).prefill(short).logits[0], rtol=1e-5, atol=1e-5)
    alone = SDTPEngine(model, pruner).prefill(long)  # the long row is pruned exactly as without the policy
    assert out.kept_counts[1].tolist() == alone.kept_counts[0].tolist() and alone.compression.item() > 1.0
    torch.testing.assert_close(out.logits[1], alone.logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        SDTPEngine(model, pruner, min_prompt_tokens=-1)
