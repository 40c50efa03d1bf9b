"""What a pruned run keeps of RULER's answers: gold values kept whole, the tokens after the protected first ones and
after the first line break."""

from __future__ import annotations

import torch
from conftest import tiny_pruner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdtp_core.engine import SDTPEngine
from sdtp_eval.retention.needle_survival import occurrences
from sdtp_eval.retention.ruler_survival import first_line_end, mean, survival


class ByPosition(torch.nn.Module):
    """Keeps the earliest slots (``sign=-1``) or the latest (``sign=+1``)."""

    def __init__(self, config, sign: float):
        super().__init__()
        self.config, self.sign = config, sign

    def score(self, stage, hidden_states, *, positions, **context):
        return self.sign * positions.float()


def test_occurrences_finds_every_occurrence_by_token_offsets(tiny_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    text = "VAR QPRSX = 79253. Then VAR ABC = VAR QPRSX. The end."
    ids, spans = occurrences(tokenizer, text, "QPRSX")
    assert len(spans) == 2 and spans[0][-1] < spans[1][0]
    for span in spans:
        assert tokenizer.decode([ids[p] for p in span]).strip() == "QPRSX"
    assert occurrences(tokenizer, text, "absent")[1] == []


def test_survival_counts_what_the_last_stage_keeps(tiny_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    filler = " The grass is green." * 30
    text = "Start. Find the number.\nThe special magic number is 8423917." + filler + " Question: the number?"
    ids, spans = occurrences(tokenizer, text, "8423917")
    line_end = first_line_end(tokenizer, ids)
    assert "\n" in tokenizer.decode([ids[line_end]]) and "\n" not in tokenizer.decode(ids[:line_end])
    config = tiny_pruner(model, layers=(1, 3), ratios=(0.7, 0.5)).config  # first 4 and last 10% protected
    earliest, latest = SDTPEngine(model, ByPosition(config, -1.0)), SDTPEngine(model, ByPosition(config, +1.0))
    early = survival(earliest, ids, [spans], 16, line_end)
    late = survival(latest, ids, [spans], 16, line_end)
    n = len(ids)
    recent = -(-n // 10)
    free = n - 4 - recent
    kept_free = -(-n // 2) - 4 - recent  # the last stage keeps ceil(0.5 n), protected tokens first
    # keeping the earliest: the value (near the start) and the 16 tokens after the first 4 all survive
    assert early == {
        "answers_whole": 1.0,
        "after_first_kept": 1.0,
        "after_line_kept": 1.0,
        "kept_share": kept_free / free,
    }
    # keeping the latest: none survives; the same number of tokens does
    assert late == {
        "answers_whole": 0.0,
        "after_first_kept": 0.0,
        "after_line_kept": 0.0,
        "kept_share": kept_free / free,
    }
    # two values, one kept: half
    both = survival(earliest, ids, [spans, [[n - 30]]], 16, line_end)
    assert both["answers_whole"] == 0.5
    # a line break late in the prompt: the tokens after it are among the latest, which the earliest-first scorer drops
    assert (
        survival(SDTPEngine(model, ByPosition(config, -1.0)), ids, [spans], 16, n - recent - 40)["after_line_kept"] == 0
    )
    # one just before the protected last tokens: nothing to measure after it
    assert (
        survival(SDTPEngine(model, ByPosition(config, -1.0)), ids, [spans], 16, n - recent - 1)["after_line_kept"]
        is None
    )
    assert mean([None, 1.0, 0.0]) == 0.5 and mean([None]) is None


def test_first_line_end_without_a_line_break_is_the_last_position(tiny_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ids = tokenizer("no line break here").input_ids
    assert first_line_end(tokenizer, ids) == len(ids) - 1


def test_start_mask_protects_the_tokens_after_the_line_break_through_every_stage(tiny_hf_dir):
    from sdtp_eval.retention.start_protected import start_mask

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
