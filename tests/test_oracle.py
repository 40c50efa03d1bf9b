"""The saliency oracle (``pruner=saliency``): prunes by the Stage 1 target of a known answer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdtp_core.config import PrunerConfig
from sdtp_core.engine import SDTPEngine
from sdtp_core.loading import load_pruner
from sdtp_core.oracle import OracleNotPreparedError, SaliencyOracle
from sdtp_core.selection import keep_counts, protected_mask


def hf_saliency(model, ids: torch.Tensor, labels: torch.Tensor, layer: int) -> torch.Tensor:
    """|grad x input| of ``layer``'s input hidden state, via the plain transformers forward (an oracle
    independent of :func:`sdtp_core.train.saliency.compute_saliency`): (n,)."""
    with torch.enable_grad():
        out = model(ids[None], output_hidden_states=True)
        hidden = out.hidden_states[layer]  # hidden_states[i] is the input of layer i
        hidden.retain_grad()
        counted = labels != -100
        loss = torch.nn.functional.cross_entropy(out.logits[0, counted].float(), labels[counted])
        loss.backward()
    return (hidden.grad[0] * hidden[0]).sum(-1).abs().detach()


def test_oracle_keeps_exactly_the_highest_saliency_tokens_of_padded_rows():
    model = tiny_model("qwen2")
    config = PrunerConfig(model.config.hidden_size, model.config.num_hidden_layers, [2], [0.5], keep_first=2)
    oracle = SaliencyOracle(config)
    engine = SDTPEngine(model, oracle)
    torch.manual_seed(3)
    lengths = [40, 29]
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    labels = torch.full((2, 40), -100)
    rows = []
    for b, n in enumerate(lengths):  # left padding
        row = torch.randint(1, model.config.vocab_size, (n,))
        row_labels = torch.full((n,), -100)
        row_labels[-4:] = torch.randint(1, model.config.vocab_size, (4,))  # the "answer" the last 4 predict
        ids[b, 40 - n :], mask[b, 40 - n :], labels[b, 40 - n :] = row, 1, row_labels
        rows.append((row, row_labels))
    oracle.prepare(model, ids, mask, labels)
    result = engine.prefill(ids, mask, logits_to_keep=1, use_cache=False)

    for b, (row, row_labels) in enumerate(rows):
        n = len(row)
        sal = hf_saliency(model, row, row_labels, 2)
        protect = protected_mask(torch.ones(1, n), config.keep_first, config.keep_recent)[0]
        budget = int(keep_counts(torch.tensor([n]), 0.5)[0]) - int(protect.sum())
        ranked = sorted((i for i in range(n) if not protect[i]), key=lambda i: -float(sal[i]))
        expected = sorted(set(protect.nonzero().flatten().tolist()) | set(ranked[:budget]))
        kept = result.positions[b][result.positions[b] >= 0].tolist()
        assert kept == expected
        # not a trivial selection: the oracle drops tokens a position-only rule would keep
        assert kept != sorted(set(protect.nonzero().flatten().tolist()) | set(ranked[-budget:]))


def test_oracle_refuses_to_score_an_unprepared_batch_and_unlabelled_rows():
    model = tiny_model("qwen2")
    oracle = load_pruner("saliency", model, layers=[2, 4])
    assert isinstance(oracle, SaliencyOracle) and oracle.source == "saliency"
    engine = SDTPEngine(model, oracle)
    ids = torch.randint(1, 90, (1, 30))
    with pytest.raises(OracleNotPreparedError, match="call prepare"):
        engine.prefill(ids, use_cache=False)
    with pytest.raises(ValueError, match="at least one labelled position"):
        oracle.prepare(model, ids, torch.ones_like(ids), torch.full_like(ids, -100))
    labels = torch.full_like(ids, -100)
    labels[0, -1] = 5
    oracle.prepare(model, ids, torch.ones_like(ids), labels)
    with pytest.raises(OracleNotPreparedError):  # prepared for one row, asked for two
        engine.prefill(ids.repeat(2, 1), use_cache=False)


def test_lm_eval_oracle_reads_the_continuation_and_refuses_generation_and_multiple_choice(tiny_hf_dir):
    from lm_eval.api.instance import Instance

    from sdtp_eval.model import SDTPLM

    lm = SDTPLM(pretrained=str(tiny_hf_dir), pruner="saliency", layers="1:3", min_prompt_tokens=0, dtype="float32")
    seen = []
    prepare = lm.pruner_module.prepare

    def recording(model, ids, mask, labels):
        seen.append((ids.clone(), labels.clone()))
        return prepare(model, ids, mask, labels)

    lm.pruner_module.prepare = recording
    context = " ".join("the cat sat on a mat and looked at the dog near the door".split() * 6)
    answer = " and then it slept all day"
    out = lm.loglikelihood([Instance("loglikelihood", {}, (context, answer), 0, ("copa", 0, 1))])
    dense = SDTPLM(pretrained=str(tiny_hf_dir), prune="false", dtype="float32").loglikelihood(
        [Instance("loglikelihood", {}, (context, answer), 0, ("copa", 0, 1))]
    )
    assert out[0][0] != pytest.approx(dense[0][0], abs=1e-4)  # it pruned
    ((ids, labels),) = seen
    assert labels[0][labels[0] != -100].tolist() == lm.tok_encode(answer)
    # the labelled positions are those whose next token is the answer's
    counted = (labels[0] != -100).nonzero().flatten()
    assert ids[0, counted[1:]].tolist() == lm.tok_encode(answer)[:-1]

    with pytest.raises(ValueError, match="oracle"):
        lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"]}), 0, ("copa", 0, 1))])
    for options in ([" A", " B"], [" and then it slept", " and it ran away"]):  # one model input, or two
        choices = [Instance("loglikelihood", {}, (context, c), i, ("copa", 0, 1)) for i, c in enumerate(options)]
        with pytest.raises(ValueError, match="one continuation per context"):
            lm.loglikelihood(choices)
