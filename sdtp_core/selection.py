"""Which tokens survive a pruning stage: protected tokens plus the best-scored rest, in original order.

Rows of a batch are kept in a *right-aligned* layout: row ``b`` of a width-``K`` tensor holds its
``k_b`` live tokens in the last ``k_b`` slots, in their original order, and padding slots to the left.
That layout keeps causal attention between compact slots identical to causal attention between the
original positions, so the model's own causal kernels stay valid after tokens are dropped.
"""

from __future__ import annotations

import math

import torch


def compact(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align the ``True`` entries of ``valid`` (batch, n).

    Returns ``(index, slot_valid)``, both (batch, k_max): ``index`` gathers from the input layout,
    ``slot_valid`` marks the live slots. Live tokens keep their order.
    """
    n = valid.shape[1]
    k_max = int(valid.sum(1).max().item()) if valid.numel() else 0
    positions = torch.arange(n, device=valid.device).expand_as(valid)
    # Padding sorts first (key -1), live tokens by position; keep the last k_max columns.
    key = torch.where(valid, positions, torch.full_like(positions, -1))
    order = key.sort(dim=1, stable=True).indices[:, n - k_max :]
    return order, valid.gather(1, order)


def keep_counts(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens kept of prompts of ``lengths`` at keep ratio ``ratio``: ``ceil(ratio * n)``, at least 1."""
    counts = [max(1, math.ceil(round(ratio * int(n), 6))) for n in lengths.tolist()]
    return torch.tensor(counts, device=lengths.device, dtype=torch.long)


def recent_count(n: int, keep_recent: float) -> int:
    """How many of the last tokens of an ``n``-token prompt are protected: ``ceil(keep_recent * n)``, at least 1."""
    return min(n, max(1, math.ceil(round(keep_recent * n, 6))))


def recent_slots(positions: torch.Tensor, lengths: torch.Tensor, keep_recent: float) -> torch.Tensor:
    """(batch, k) which slots hold one of the protected most recent tokens of their row's prompt: original
    ``positions`` (batch, k) at or after ``length - recent_count(length)`` and before ``length``."""
    recent = torch.tensor([recent_count(int(n), keep_recent) for n in lengths.flatten().tolist()])
    first = (lengths.flatten() - recent.to(lengths.device))[:, None]
    return (positions >= first) & (positions < lengths.flatten()[:, None])


def protected_mask(
    attention_mask: torch.Tensor, keep_first: int, keep_recent: float, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens that no stage may drop, in the input layout (batch, n).

    The first ``keep_first`` real tokens, the last ``max(1, ceil(keep_recent * length))`` real tokens
    (the last prompt token is always kept: generation continues from it), and any position marked in
    ``extra``.
    """
    valid = attention_mask.bool()
    rank = valid.long().cumsum(1) - 1  # index among the row's real tokens
    lengths = valid.sum(1, keepdim=True)
    recent = torch.tensor(
        [recent_count(int(n), keep_recent) for n in lengths.flatten().tolist()], device=valid.device
    ).unsqueeze(1)
    protect = valid & ((rank < keep_first) | (rank >= lengths - recent))
    if extra is not None:
        protect |= extra.bool() & valid
    return protect


def select(
    scores: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the tokens a stage keeps.

    Args:
        scores: (batch, k) pruner scores of the current live tokens (higher = more important).
        valid: (batch, k) which slots are live.
        protect: (batch, k) slots that must be kept.
        keep: (batch,) how many tokens each row keeps in total. Raised to the number of protected live
            tokens, capped at the number of live tokens.

    Returns:
        ``(index, slot_valid)`` (batch, k_new): indices into the current layout, right-aligned, in
        original order; and which of the new slots are live.

    Ties in score are broken by position (the earlier token wins), so the choice is deterministic.
    """
    live = valid.sum(1)
    n_protected = (protect & valid).sum(1)
    keep = torch.minimum(torch.maximum(keep, n_protected), live)
    k_new = int(keep.max().item())
    key = torch.nan_to_num(scores.float(), nan=0.0)
    key = key.masked_fill(protect & valid, float("inf")).masked_fill(~valid, float("-inf"))
    # A stable descending sort (not topk, whose tie order is unspecified): equal scores keep slot order.
    top = key.sort(dim=1, descending=True, stable=True).indices[:, :k_new]
    chosen = torch.arange(k_new, device=scores.device).unsqueeze(0) < keep.unsqueeze(1)
    # Right-align: unchosen slots first, chosen ones in original order.
    order_key = torch.where(chosen, top, torch.full_like(top, -1))
    order = order_key.sort(dim=1, stable=True).indices
    return top.gather(1, order), chosen.gather(1, order)
