"""Training losses of Stage 2 (paper eq. 4-8): LM loss, MSE to the saliency, pairwise ranking loss.

All three are *per sample*; the training loop sums them over a batch and divides by the global batch
size. Token sets are given as boolean masks over a padded (batch, n) layout.

Normalisation (our reading of the paper, documented in ``docs/training.md``):

* MSE: predicted scores and target saliency are each standardised (zero mean, unit variance) over the
  supervised tokens of the sample, so the loss is ``2 * (1 - pearson(pred, target))`` up to the
  variance estimator and does not depend on the arbitrary scale of gradient-times-input saliency.
* Ranking: the mean over pairs (not the sum) of ``log(1 + exp(-(pi_i - pi_j) * sign(t_i - t_j)))``
  on the raw predicted scores, so its size does not grow with the square of the sequence length.
  Pairs with tied targets carry no ranking information and are left out. Long sequences use a fixed
  number of uniformly sampled pairs, so memory stays bounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample.

    Args:
        logits: (batch, t, vocab) logits at the positions that predict ``labels``.
        labels: (batch, t) target token ids, ``-100`` where a position does not count.

    Returns:
        (batch,) mean cross-entropy over each sample's counted positions (0 for a sample with none).
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counted = (labels != -100).float()
    return (ce * counted).sum(1) / counted.sum(1).clamp(min=1.0)


def standardize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-mean, unit-variance (population) version of ``x`` over ``mask`` per row; 0 outside ``mask``."""
    m = mask.to(x.dtype)
    count = m.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(-1, keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(-1, keepdim=True) / count
    return (x - mean) / (var + eps).sqrt() * m


def mse_loss_per_sample(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between per-sample standardised ``pred`` and ``target`` over ``mask`` (batch, n) -> (batch,).

    Rows with fewer than two supervised tokens contribute 0.
    """
    pred, target = pred.float(), target.float()
    diff = standardize(pred, mask) - standardize(target, mask)
    count = mask.float().sum(-1)
    loss = (diff**2).sum(-1) / count.clamp(min=1.0)
    return torch.where(count >= 2, loss, torch.zeros_like(loss))


def sample_pairs(
    n_valid: int, max_pairs: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``(i, j)``, ``i < j``, over ``n_valid`` items: all of them if there are at most
    ``max_pairs``, else ``max_pairs`` pairs drawn uniformly (with replacement) from all ``i != j``."""
    total = n_valid * (n_valid - 1) // 2
    if total <= max_pairs:
        i, j = torch.triu_indices(n_valid, n_valid, offset=1)
        return i, j
    a = torch.randint(0, n_valid, (max_pairs,), generator=generator)
    b = torch.randint(0, n_valid - 1, (max_pairs,), generator=generator)
    b = b + (b >= a).long()  # uniform over b != a
    return torch.minimum(a, b), torch.maximum(a, b)


def boundary_pairs(
    target: torch.Tensor, keep: int, max_pairs: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``(i, j)`` over the items of ``target`` (n,), ``i`` among the ``keep`` highest targets and ``j``
    among the rest: every such pair if there are at most ``max_pairs``, else ``max_pairs`` drawn uniformly
    (with replacement). These are the pairs whose order decides which tokens a stage keeping ``keep`` drops."""
    order = torch.argsort(target.float().cpu(), descending=True, stable=True)
    top, rest = order[:keep], order[keep:]
    if top.numel() * rest.numel() <= max_pairs:
        i, j = torch.cartesian_prod(top, rest).unbind(-1)
        return i, j
    a = torch.randint(0, top.numel(), (max_pairs,), generator=generator)
    b = torch.randint(0, rest.numel(), (max_pairs,), generator=generator)
    return top[a], rest[b]


def rank_loss_per_sample(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    max_pairs: int = 16384,
    generator: torch.Generator | list[torch.Generator] | None = None,
    keep: list[int] | None = None,
) -> torch.Tensor:
    """Pairwise logistic ranking loss (paper eq. 6) per sample, averaged over non-tied pairs.

    ``mean_{i<j, t_i != t_j} log(1 + exp(-(pred_i - pred_j) * sign(t_i - t_j)))`` over the tokens in
    ``mask``; pairs are sampled (see :func:`sample_pairs`) when there are more than ``max_pairs``.

    Args:
        pred: (batch, n) predicted scores.
        target: (batch, n) target saliency.
        mask: (batch, n) supervised tokens.
        max_pairs: cap on the number of pairs per sample.
        generator: CPU generator for pair sampling (for reproducibility), or one per row.
        keep: per row, how many of its ``mask`` tokens the stage keeps: pairs then only cross that boundary
            (:func:`boundary_pairs`; not in the paper, whose pairs are uniform over all tokens). None: uniform.

    Returns:
        (batch,) losses; 0 for a row with no informative pair.
    """
    losses = []
    for b in range(pred.shape[0]):
        idx = mask[b].nonzero().flatten()
        if idx.numel() < 2:
            losses.append(pred.new_zeros((), dtype=torch.float32))
            continue
        row_generator = generator[b] if isinstance(generator, list) else generator
        if keep is not None and 0 < keep[b] < idx.numel():
            i, j = boundary_pairs(target[b, idx], keep[b], max_pairs, row_generator)
        else:
            i, j = sample_pairs(idx.numel(), max_pairs, row_generator)
        i, j = idx[i.to(idx.device)], idx[j.to(idx.device)]
        sign = torch.sign(target[b, i].float() - target[b, j].float())
        informative = sign != 0
        if not bool(informative.any()):
            losses.append(pred.new_zeros((), dtype=torch.float32))
            continue
        margin = (pred[b, i].float() - pred[b, j].float()) * sign
        losses.append(F.softplus(-margin[informative]).mean())
    return torch.stack(losses)
