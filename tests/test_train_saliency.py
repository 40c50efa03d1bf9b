"""Stage 1: gradient-times-input saliency, its storage, resumption and mismatch errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdtp_core.train.data import Example, collate
from sdtp_core.train.masked_forward import decoder_parts
from sdtp_core.train.saliency import (
    SaliencyMismatchError,
    SaliencyStore,
    compute_saliency,
    run_saliency,
    sparsity_fraction,
)

LAYERS = [1, 3, 5]


def _sample(n: int = 20, prompt_len: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (1, n), generator=gen)
    batch = collate([Example(0, ids[0].tolist(), prompt_len)])
    return batch.input_ids, batch.labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # eager has no implicit causal mask: it must get one
def test_saliency_matches_autograd_through_the_models_own_forward(arch, attn):
    model = tiny_model(arch, attn=attn).double()
    ids, labels = _sample()
    sal = compute_saliency(model, ids, labels, LAYERS)
    out = model(ids, output_hidden_states=True)  # hidden_states[l] is the input of layer l
    counted = labels[0] != -100
    loss = torch.nn.functional.cross_entropy(out.logits[0, counted], labels[0, counted])
    inputs = [out.hidden_states[layer] for layer in LAYERS]
    grads = torch.autograd.grad(loss, inputs)
    ref = torch.stack([(g * h).sum(-1) for g, h in zip(grads, inputs)], dim=1)
    assert torch.allclose(sal.double(), ref, rtol=1e-5, atol=1e-9)


def test_saliency_equals_the_directional_derivative_of_the_loss():
    """By hand: sum_d dL/dh[t,d] h[t,d] = d/de L(h with row t scaled by 1+e) at e=0 (central difference)."""
    model = tiny_model("qwen2").double()
    ids, labels = _sample()
    sal = compute_saliency(model, ids, labels, LAYERS)
    inner, _ = decoder_parts(model)
    counted = labels[0] != -100

    def loss_with_scaled(layer: int, token: int, eps: float) -> float:
        def hook(module, args, kwargs):
            hidden = args[0].clone()
            hidden[:, token] *= 1 + eps
            return (hidden, *args[1:]), kwargs

        handle = inner.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = model(ids).logits
        finally:
            handle.remove()
        return torch.nn.functional.cross_entropy(logits[0, counted], labels[0, counted]).item()

    eps = 2e-3  # RMSNorm computes in float32 even in a float64 model, so the step cannot be tiny
    for s, layer in enumerate(LAYERS):
        for token in (0, 5, 11, 15):
            numeric = (loss_with_scaled(layer, token, eps) - loss_with_scaled(layer, token, -eps)) / (2 * eps)
            assert numeric == pytest.approx(sal[0, s, token].item(), rel=2e-3, abs=2e-5)
    # Hand-derived zeros: the last token predicts nothing that is scored and nothing attends to it.
    assert torch.all(sal[0, :, -1] == 0)
    assert torch.all(sal[0, :, :-1].abs().sum(-1) > 0)


def test_batched_saliency_equals_per_sample():
    model = tiny_model("llama")
    examples = [Example(0, list(range(3, 23)), 10), Example(1, list(range(30, 44)), 8)]
    batch = collate(examples)
    together = compute_saliency(model, batch.input_ids, batch.labels, LAYERS)
    for row, e in enumerate(examples):
        single = collate([e])
        alone = compute_saliency(model, single.input_ids, single.labels, LAYERS)
        assert torch.allclose(together[row, :, : e.length], alone[0], atol=1e-6)


def test_sparsity_fraction_hand_value():
    sal = torch.tensor([[10.0, -2.0, 0.5, 0.9, 1.1], [1.0, 1.0, 1.0, 1.0, 0.0]])
    assert sparsity_fraction(sal).tolist() == [pytest.approx(0.6), pytest.approx(0.8)]


def _examples(n: int = 6) -> list[Example]:
    gen = torch.Generator().manual_seed(1)
    return [Example(i, torch.randint(0, 96, (12 + i,), generator=gen).tolist(), 8 + i // 2) for i in range(n)]


META = {"model": "tiny", "num_hidden_layers": 6, "hidden_size": 64, "vocab_size": 96, "layers": LAYERS}


def test_store_roundtrip_and_resume_skips_done_samples(tmp_path):
    model = tiny_model("qwen2")
    examples = _examples()
    store = SaliencyStore(tmp_path / "sal")
    assert run_saliency(model, examples[:4], LAYERS, store, META, shard_size=3, show_progress=False) == 4
    # A "killed" shard write leaves only a temporary file, which is ignored.
    (tmp_path / "sal" / "shard-r00-00099.safetensors.tmp").write_bytes(b"partial")
    store = SaliencyStore(tmp_path / "sal")
    assert store.done == {0, 1, 2, 3}
    assert run_saliency(model, examples, LAYERS, store, META, shard_size=3, show_progress=False) == 2
    store = SaliencyStore(tmp_path / "sal")
    assert store.done == set(range(6))
    for e in examples:
        stored = store.get(e.sample_id)
        batch = collate([e])
        direct = compute_saliency(model, batch.input_ids, batch.labels, LAYERS)[0]
        assert stored.ids.tolist() == e.ids and stored.prompt_len == e.prompt_len
        # fp16 with a per-layer scale: relative error ~1e-3 of the layer's max.
        assert torch.allclose(stored.saliency, direct, atol=2e-3 * float(direct.abs().max()))
    store.check(model.config, [1, 5], examples, "tiny")
    assert (tmp_path / "sal" / "index.json").is_file()


def test_store_mismatches_are_named(tmp_path):
    model = tiny_model("qwen2")
    examples = _examples(3)
    store = SaliencyStore(tmp_path / "sal")
    run_saliency(model, examples, LAYERS, store, META, show_progress=False)
    with pytest.raises(SaliencyMismatchError, match=r"not the pruning layers \[2\]"):
        store.check(model.config, [1, 2], examples)
    other = [Example(e.sample_id, [(t + 1) % 96 for t in e.ids], e.prompt_len) for e in examples]
    with pytest.raises(SaliencyMismatchError, match="sample 0: stored tokens differ"):
        store.check(model.config, LAYERS, other)
    with pytest.raises(SaliencyMismatchError, match="lacks 1 of the 4"):
        store.check(model.config, LAYERS, examples + [Example(9, [1, 2, 3], 2)])
    bigger = tiny_model("qwen2").config
    bigger.num_hidden_layers = 8
    with pytest.raises(SaliencyMismatchError, match="num_hidden_layers=6"):
        store.check(bigger, LAYERS, examples)
    with pytest.raises(SaliencyMismatchError, match="other settings.*layers"):
        store.init({**META, "layers": [1, 2]})
    with pytest.raises(SaliencyMismatchError, match="run the 'saliency' stage first"):
        SaliencyStore(tmp_path / "empty").check(model.config, LAYERS, examples)
