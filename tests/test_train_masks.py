"""Gumbel keep masks and the attention-masked forward used to simulate pruning in Stage 2."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_pruner

from sdtp_core.engine import SDTPEngine
from sdtp_core.selection import keep_counts, protected_mask
from sdtp_core.train.masked_forward import (
    decoder_parts,
    gumbel_keep,
    lm_loss_from_hidden,
    masked_forward,
    policy_attention,
)


def test_gumbel_keep_hard_top_k_with_straight_through_gradient():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 9.0]], requires_grad=True)
    candidates = torch.tensor([[True, True, True, True, True, False]])
    decision, hard = gumbel_keep(scores, candidates, torch.tensor([2]))
    assert hard.tolist() == [[False, True, False, True, False, False]]
    assert decision.detach().tolist() == hard.float().tolist()  # forward value is exactly the hard decision
    decision.sum().backward()
    grad = scores.grad[0]
    assert bool((grad[:5] > 0).all()) and grad[5] == 0  # gradient reaches candidates only


def test_gumbel_keep_with_noise_keeps_exact_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40)
    candidates = torch.rand(3, 40, generator=gen) > 0.3
    n_keep = torch.tensor([5, 0, int(candidates[2].sum())])
    noise = torch.randn(3, 40, generator=gen) * 3
    _, hard = gumbel_keep(scores, candidates, n_keep, noise=noise)
    assert hard.sum(1).tolist() == n_keep.tolist()
    assert not bool((hard & ~candidates).any())


@pytest.mark.parametrize("noise", [False, True])
def test_masks_keep_configured_fraction_protect_and_accumulate(arch, noise):
    model = tiny_model(arch)
    pruner = tiny_pruner(model, keep_first=3, keep_recent=0.1)
    n, prompt_len = 50, 40
    ids = torch.randint(0, 96, (2, n))
    attention = torch.ones(2, n, dtype=torch.long)
    attention[1, 45:] = 0  # right padding
    prompt = torch.zeros(2, n, dtype=torch.bool)
    prompt[:, :prompt_len] = True
    gen = torch.Generator().manual_seed(3) if noise else None
    out = masked_forward(model, pruner, ids, attention, prompt, generator=gen)
    protect = protected_mask(prompt.long(), 3, 0.1)
    previous = attention.bool()
    for s, ratio in enumerate(pruner.config.keep_ratios):
        kept = out.hard[s]
        expected = keep_counts(torch.tensor([prompt_len, prompt_len]), ratio)
        assert (kept & prompt).sum(1).tolist() == expected.tolist()  # keep ratio of the original prompt
        assert bool(kept[protect].all())  # protected prompt tokens stay
        assert bool(kept[attention.bool() & ~prompt].all())  # response tokens are never pruned
        assert not bool((kept & ~previous).any())  # a dropped token never comes back
        assert torch.equal(out.masks[s].detach(), kept.float())
        previous = kept


def test_masked_forward_equals_real_pruning(arch):
    """Deterministic masks reproduce the engine, which really drops tokens: same kept sets, same logits."""
    model = tiny_model(arch)
    pruner = tiny_pruner(model, keep_first=2)
    ids = torch.randint(0, 96, (2, 40))
    ones = torch.ones_like(ids)
    out = masked_forward(model, pruner, ids, ones, ones.bool())
    inner, _ = decoder_parts(model)
    logits = model.lm_head(inner.norm(out.hidden[:, -1]))
    ref = SDTPEngine(model, pruner).prefill(ids, use_cache=False)
    assert torch.allclose(logits, ref.logits[:, -1], atol=1e-5)
    expected = [ref.kept_counts[:, layer].tolist() for layer in pruner.config.layers]
    assert [h.sum(1).tolist() for h in out.hard] == expected
    dense = model(ids).logits[:, -1]
    assert not torch.allclose(logits, dense, atol=1e-3)  # pruning did change the output


def test_dropped_token_is_invisible_to_later_layers(arch):
    """Perturbing a dropped token's hidden state right after its stage leaves every kept token unchanged."""
    model = tiny_model(arch)
    pruner = tiny_pruner(model, layers=(2,), ratios=(0.5,), keep_first=1, keep_recent=0.0)
    ids = torch.randint(0, 96, (1, 30))
    ones = torch.ones_like(ids)
    base = masked_forward(model, pruner, ids, ones, ones.bool())
    kept = base.hard[0][0]
    dropped = int((~kept).nonzero()[0])
    inner, _ = decoder_parts(model)

    def perturb(module, args, kwargs):
        hidden = args[0].clone()
        hidden[:, dropped] += 5.0
        return (hidden, *args[1:]), kwargs

    handle = inner.layers[2].register_forward_pre_hook(perturb, with_kwargs=True)
    try:
        perturbed = masked_forward(model, pruner, ids, ones, ones.bool())
        # Control: the same perturbation with a pruner that keeps everything does change kept tokens.
        keep_all = tiny_pruner(model, layers=(2,), ratios=(1.0,))
        control = masked_forward(model, keep_all, ids, ones, ones.bool())
    finally:
        handle.remove()
    unperturbed_dense = masked_forward(model, keep_all, ids, ones, ones.bool())
    later = torch.arange(30) > dropped
    assert torch.equal(perturbed.hard[0], base.hard[0])
    assert torch.allclose(perturbed.hidden[0, kept], base.hidden[0, kept], atol=1e-6)
    assert not torch.allclose(control.hidden[0, later], unperturbed_dense.hidden[0, later], atol=1e-3)


def test_lm_loss_gradient_reaches_the_pruner_through_the_masks():
    model = tiny_model("qwen2")
    model.requires_grad_(False)
    pruner = tiny_pruner(model).train()
    ids = torch.randint(0, 96, (1, 40))
    ones = torch.ones_like(ids)
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :30] = True
    labels = torch.full_like(ids, -100)
    labels[0, 29:39] = ids[0, 30:40]
    out = masked_forward(model, pruner, ids, ones, prompt, generator=torch.Generator().manual_seed(0))
    lm_loss_from_hidden(model, out.hidden, labels).sum().backward()
    for stage in pruner.stages:
        assert stage.fc1.weight.grad is not None and stage.fc1.weight.grad.abs().sum() > 0


def test_policy_attention_matches_sdpa_for_a_hard_mask():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    policy = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    out, _ = policy_attention(module, q, k, v, None, scaling=8**-0.5, sdtp_policy=policy)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & (policy.bool()[0][None, :] | torch.eye(6, dtype=torch.bool))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
