"""Attention masks for the right-aligned, pruned layouts, in the form each attention backend wants."""

from __future__ import annotations

import torch

SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def layout_mask(kv_valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Mask for ``q_len`` queries that are the last ``q_len`` slots of a key layout.

    ``kv_valid`` (batch, kv_len) marks live key slots (right-aligned, original order). Query ``i`` may
    attend to live key ``j`` when ``j <= kv_len - q_len + i`` (causal in original order). A padding
    query attends to itself only, so no softmax row is empty.

    For sdpa and flash-attention, returns ``None`` when no slot is padding (plain causal attention,
    the kernels' fast path); a (batch, kv_len) 0/1 mask for flash-attention (which aligns causality
    bottom-right itself); a boolean (batch, 1, q_len, kv_len) mask for sdpa; an additive float mask
    for eager (which has no implicit causality, so it always gets one).
    """
    if implementation not in SUPPORTED:
        raise NotImplementedError(
            f"attention implementation {implementation!r} is not supported; use one of {SUPPORTED}"
        )
    if implementation != "eager" and bool(kv_valid.all()):
        return None
    if implementation.startswith("flash"):
        return kv_valid.long()
    kv_len = kv_valid.shape[1]
    q_slots = torch.arange(kv_len - q_len, kv_len, device=kv_valid.device).unsqueeze(1)
    k_slots = torch.arange(kv_len, device=kv_valid.device).unsqueeze(0)
    allowed = (k_slots <= q_slots).unsqueeze(0) & kv_valid[:, None, :]
    allowed |= (k_slots == q_slots).unsqueeze(0)
    allowed = allowed.unsqueeze(1)
    if implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
