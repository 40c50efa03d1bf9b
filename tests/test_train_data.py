"""Training data: Dolly loading (real subset), formatting, truncation, batching, refusal of eval sets."""

from __future__ import annotations

import json

import pytest
from test_train_fixtures import char_tokenizer

from sdtp_core.train.data import (
    TrainDataError,
    collate,
    encode_record,
    load_examples,
    load_records,
    with_distractors,
)


@pytest.mark.shared_data
def test_real_dolly_subset_loads_and_formats(data_dir):
    path = data_dir / "dolly" / "dolly_subset_1000.jsonl"
    records = load_records(str(path))
    assert len(records) == 1000
    assert {"instruction", "context", "response", "category"} <= set(records[0])
    tok = char_tokenizer()
    examples = load_examples(str(path), tok, fmt="auto", max_length=256, max_samples=200)
    assert len(examples) >= 190  # only records with an empty response are skipped
    assert all(e.length <= 256 and 0 < e.prompt_len < e.length for e in examples)
    with_context = next(i for i, r in enumerate(records[:200]) if r["context"].strip() and len(r["context"]) < 150)
    e = next(x for x in examples if x.sample_id == with_context)
    r = records[with_context]
    text = tok.decode(e.ids)
    prompt = tok.decode(e.ids[: e.prompt_len])
    # The character tokenizer has no chat template, so 'auto' is the plain format.
    assert prompt == tok.decode(tok(f"{r['instruction'].strip()}\n\n{r['context'].strip()}\n\n")["input_ids"])
    assert text.endswith("<eos>")
    long = [x for x in examples if x.length == 256]
    assert long, "some Dolly samples exceed 256 characters and must be truncated"


def test_chat_format_uses_the_template_and_scores_only_the_answer():
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    record = {"instruction": "Name a cat.", "context": "Pets.", "response": "Tom"}
    e = encode_record(record, 0, tok, "chat", 512)
    assert e.ids[: e.prompt_len] == tok("<user>Name a cat.\n\nPets.\n<assistant>")["input_ids"]
    assert e.ids[e.prompt_len :] == tok("Tom\n")["input_ids"]
    batch = collate([e])
    counted = batch.labels[0] != -100
    assert counted.sum() == e.length - e.prompt_len
    assert batch.labels[0, e.prompt_len - 1] == e.ids[e.prompt_len]  # the last prompt token predicts the answer


def test_truncation_keeps_both_ends_of_the_prompt_and_part_of_the_answer():
    tok = char_tokenizer()
    record = {"instruction": "Q" * 10 + "x" * 200 + "END", "context": "", "response": "a" * 100}
    e = encode_record(record, 0, tok, "plain", 64)
    assert e.length == 64
    assert e.length - e.prompt_len == 16  # the answer keeps max_length // 4 tokens
    prompt = tok.decode(e.ids[: e.prompt_len]).replace(" ", "")
    assert prompt.startswith("QQQQ") and prompt.endswith("END\n\n")


def test_text_records_and_txt_files(tmp_path):
    tok = char_tokenizer()
    txt = tmp_path / "corpus.txt"
    txt.write_text("first block of text here\n\nsecond block, a bit longer than the first\n")
    examples = load_examples(str(txt), tok, max_length=16, text_prompt_fraction=0.75)
    assert [e.length for e in examples] == [16, 16] and [e.prompt_len for e in examples] == [12, 12]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"text": "hello world, this is text"}) + "\n")
    assert load_examples(str(jsonl), tok, max_length=64)[0].prompt_len == int(25 * 0.75)


def test_evaluation_sets_and_missing_files_are_refused(tmp_path):
    for name in ("/data/longbench/qasper.jsonl", "aps/super_glue", "allenai/winogrande"):
        with pytest.raises(TrainDataError, match="evaluation sets"):
            load_records(name)
    with pytest.raises(TrainDataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "norecords.jsonl"
    empty.write_text(json.dumps({"instruction": "x", "context": "", "response": ""}) + "\n")
    with pytest.raises(TrainDataError, match="no usable sample"):
        load_examples(str(empty), char_tokenizer())


def test_distractors_hide_the_own_context_among_others_and_put_the_question_last(tmp_path):
    tok = char_tokenizer()
    records = [
        {"instruction": f"Question {i}?", "context": f"passage number {i} " * 3, "response": f"answer {i}"}
        for i in range(12)
    ] + [{"instruction": "No context?", "context": "", "response": "fine"}, {"text": "plain text record"}]
    long = with_distractors(records, tok, tokens=150, seed=7)
    assert long == with_distractors(records, tok, tokens=150, seed=7)  # deterministic
    assert long != with_distractors(records, tok, tokens=150, seed=8)
    assert long[-1] == records[-1]  # text records pass unchanged
    for before, after in zip(records[:12], long[:12]):
        passages = after["context"].split("\n\n")
        assert passages.count(before["context"].strip()) == 1  # its own passage, exactly once
        assert sum(len(p) for p in passages) >= 150 and len(passages) >= 3
        assert all(p.strip() == p and p in {r["context"].strip() for r in records[:12]} for p in passages)
    assert long[12]["context"] and "No context" in long[12]["instruction"]  # only distractors
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:12]))
    e = load_examples(str(path), tok, fmt="plain", max_length=400, distractor_tokens=150, seed=7)[3]
    prompt = tok.decode(e.ids[: e.prompt_len])

    def text(s: str) -> str:  # as the character tokenizer decodes it
        return tok.decode(tok(s)["input_ids"])

    assert prompt.endswith(text("Question 3?\n\n"))  # the question after the passages
    assert prompt.index(text("passage number 3")) < prompt.index(text("Question 3?"))
    with pytest.raises(TrainDataError, match="non-empty context"):
        with_distractors([{"instruction": "a", "response": "b"}], tok, tokens=10)


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path):
    records = [{"instruction": "Q\u2028?", "context": "x\x85y", "response": "a\u2029b"} for _ in range(2)]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    assert load_records(str(path)) == records


def test_context_only_keeps_records_with_their_own_passage_and_counts_them(tmp_path):
    tok = char_tokenizer()
    # records 0, 3, 6, ... have a context; the others none (or blank), and one is a text record
    records = [
        {"instruction": f"Q{i}?", "context": f"passage {i}" if i % 3 == 0 else " ", "response": f"a{i}"}
        for i in range(12)
    ] + [{"text": "plain text record"}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    ids = [e.sample_id for e in load_examples(str(path), tok, fmt="plain", max_length=200, context_only=True)]
    assert ids == [0, 3, 6, 9]  # the records' indices in the full source
    # skip and max_samples count the eligible records: skip 0 and 3, then take two
    kept = load_examples(str(path), tok, fmt="plain", max_length=200, context_only=True, skip=2, max_samples=2)
    assert [e.sample_id for e in kept] == [6, 9]

    def text(s: str) -> str:  # as the character tokenizer decodes it
        return tok.decode(tok(s)["input_ids"])

    assert tok.decode(kept[0].ids[: kept[0].prompt_len]).startswith(text("Q6?"))
    # with distractors every passage comes from an eligible record, the own one included
    long = load_examples(str(path), tok, fmt="plain", max_length=400, context_only=True, distractor_tokens=20)
    prompt = tok.decode(long[1].ids[: long[1].prompt_len])
    assert text("passage 3") in prompt and prompt.count(text("passage")) >= 2 and text("Q3?") in prompt
    with pytest.raises(TrainDataError, match="no instruction record .* context of its own"):
        load_examples(str(path), tok, context_only=True, skip=4)


def test_training_mix_builds_long_qa_retrieval_and_short_prompts_deterministically():
    from sdtp_core.train.data import MAX_TOKENS, MIN_TOKENS, training_mix

    tok = char_tokenizer()
    records = [
        {"instruction": f"Question {i}?", "context": f"passage number {i}. " * 40, "response": f"answer {i}"}
        for i in range(30)
    ] + [{"instruction": f"Name a colour {i}.", "context": "", "response": "blue"} for i in range(30)]
    mixed, counts = training_mix(records, tok, seed=3, min_tokens=2000, max_tokens=3000)
    assert (mixed, counts) == training_mix(records, tok, seed=3, min_tokens=2000, max_tokens=3000)
    assert mixed != training_mix(records, tok, seed=4, min_tokens=2000, max_tokens=3000)[0]
    assert sum(counts.values()) == len(mixed) == 60 and min(counts.values()) > 0
    own = {r["context"].strip() for r in records[:30]}
    kinds = {"passage_qa": 0, "retrieval": 0, "short": 0}
    for before, after in zip(records, mixed):
        if after is before:  # a short prompt: the record unchanged
            kinds["short"] += 1
            continue
        assert after["question_last"] and len(after["context"]) >= 2000
        passages = after["context"].split("\n\n")
        if "badge number" in after["instruction"] or "Answer with the value only" in after["instruction"]:
            kinds["retrieval"] += 1
            name, attribute = after["instruction"][len("What is ") :].split("'s ", 1)
            attribute = attribute.split("?")[0]
            facts = [p for p in passages if p not in own]
            assert 2 <= len(facts) <= 5 and f"{name}'s {attribute} is {after['response']}." in facts
            assert sum(f.startswith(f"{name}'s {attribute} is ") for f in facts) == 1  # one answer, no ambiguity
        else:
            kinds["passage_qa"] += 1
            assert passages.count(before["context"].strip()) == 1 and set(passages) <= own
    assert kinds == counts
    assert 0 < MIN_TOKENS < MAX_TOKENS <= 4096
    with pytest.raises(TrainDataError, match="0 < min <= max"):
        training_mix(records, tok, min_tokens=10, max_tokens=5)
    with pytest.raises(TrainDataError, match="distractor_tokens"):
        load_examples("unused.jsonl", tok, mix=True, distractor_tokens=100)
