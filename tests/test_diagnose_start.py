"""``diagnose start``: a RULER prompt's first line break, and protecting the tokens after it through every stage."""

from __future__ import annotations

import torch
from conftest import tiny_pruner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdtp_core.engine import SDTPEngine
from sdtp_eval.retention.diagnose.start import first_line_end, start_mask


class ByPosition(torch.nn.Module):
    """Keeps the earliest slots (``sign=-1``) or the latest (``sign=+1``)."""

    def __init__(self, config, sign: float):
        super().__init__()
        self.config, self.sign = config, sign

    def score(self, stage, hidden_states, *, positions, **context):
        return self.sign * positions.float()


def test_first_line_end_is_the_first_token_holding_a_line_break(tiny_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ids = tokenizer("Start. Find the number.\nThe special magic number is 8423917. The grass is green.").input_ids
    line_end = first_line_end(tokenizer, ids)
    assert "\n" in tokenizer.decode([ids[line_end]]) and "\n" not in tokenizer.decode(ids[:line_end])


def test_first_line_end_without_a_line_break_is_the_last_position(tiny_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ids = tokenizer("no line break here").input_ids
    assert first_line_end(tokenizer, ids) == len(ids) - 1


def test_start_mask_protects_the_tokens_after_the_line_break_through_every_stage(tiny_hf_dir):
    assert start_mask(10, 3, 4).tolist() == [[False] * 4 + [True] * 4 + [False] * 2]
    assert start_mask(6, 3, 4).tolist() == [[False] * 4 + [True] * 2]  # cut at the prompt's end
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    config = tiny_pruner(model, layers=(1, 3), ratios=(0.7, 0.5)).config
    ids = torch.arange(5, 125)[None]
    latest = SDTPEngine(model, ByPosition(config, +1.0))  # drops the early positions the mask protects
    unprotected = latest.prefill(ids, logits_to_keep=1, use_cache=False).positions[0].tolist()
    kept = latest.prefill(ids, logits_to_keep=1, use_cache=False, protect=start_mask(120, 9, 16)).positions[0].tolist()
    assert not set(range(10, 26)) & set(unprotected)
    assert set(range(10, 26)) <= set(kept) and len(kept) == len(unprotected)
