"""What a pruned run keeps of RULER's answers: gold values kept whole, and the tokens after the protected first ones."""

from __future__ import annotations

import torch
from conftest import tiny_pruner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdtp_core.engine import SDTPEngine
from sdtp_eval.retention.needle_survival import occurrences
from sdtp_eval.retention.ruler_survival import survival


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
    text = "Start. The special magic number is 8423917." + filler + " Question: the number?"
    ids, spans = occurrences(tokenizer, text, "8423917")
    config = tiny_pruner(model, layers=(1, 3), ratios=(0.7, 0.5)).config  # first 4 and last 10% protected
    early = survival(SDTPEngine(model, ByPosition(config, -1.0)), ids, [spans], after_first=16)
    late = survival(SDTPEngine(model, ByPosition(config, +1.0)), ids, [spans], after_first=16)
    n = len(ids)
    recent = -(-n // 10)
    free = n - 4 - recent
    kept_free = -(-n // 2) - 4 - recent  # the last stage keeps ceil(0.5 n), protected tokens first
    # keeping the earliest: the value (near the start) and the 16 tokens after the first 4 all survive
    assert early == {"answers_whole": 1.0, "after_first_kept": 1.0, "kept_share": kept_free / free}
    # keeping the latest: neither survives; the same number of tokens does
    assert late == {"answers_whole": 0.0, "after_first_kept": 0.0, "kept_share": kept_free / free}
    # two values, one kept: half
    assert survival(SDTPEngine(model, ByPosition(config, -1.0)), ids, [spans, [[n - 30]]], 16)["answers_whole"] == 0.5
