"""Training data: load instruction or plain-text records, format them, tokenize, truncate, batch.

Every sample becomes a *prompt* (the tokens the pruner may drop, as in a pruned prefill) followed by a
*target* (the tokens whose next-token loss is scored; never pruned, like generated tokens):

* instruction records (``instruction``, optional ``context``, ``response``; e.g. Dolly): the prompt is
  the instruction and context, formatted with the tokenizer's chat template (``format="chat"``) or
  as ``instruction\\n\\ncontext\\n\\n`` (``format="plain"``); the target is the response (plus the
  template's end-of-turn tokens, or EOS for plain).
* text records (``text``): the first ``text_prompt_fraction`` of the tokens are the prompt, the rest
  the target.

Long inputs (``distractor_tokens``, :func:`with_distractors`): each instruction record's context is
hidden among other records' contexts and the instruction moves after them, as in LongBench prompts
(the question after a long context).

The training mix (``mix``, :func:`training_mix`) shapes the records like the prompts pruning is used on, one
sample per record, the kind drawn per record from a seeded generator:

* **passage QA** (records with a context of their own, :data:`QA_SHARE` of them): the context hidden at a random
  place among other records' contexts until the passages total a length drawn from ``[MIN_TOKENS, MAX_TOKENS]``;
  the instruction after them.
* **key-value retrieval** (:data:`RETRIEVAL_SHARE` of the records without a context): the same kind of prose
  haystack with 2-5 invented facts ("Velsa Orrin's badge number is 40817.") spread through it, some sharing the
  asked name or attribute; the question asks for one and the response is its value. Names, attributes and
  sentence form differ from RULER's needles ("One of the special magic numbers for ... is: ...", UUID keys, a
  noise or essay haystack) and from the needle depth sweep's.
* **short prompts** (every other record): the record as it is, instruction first, so that short
  multiple-choice-like prompts (the paper's Table 3 tasks) stay in the training distribution.

No evaluation document is read: the haystack is the training records' own contexts.

Sources: a local ``.jsonl`` / ``.json`` file (records as above), a local ``.txt`` file (one sample per
blank-line separated block), or a Hugging Face Hub dataset id (its ``train`` split).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_DATA = "databricks/databricks-dolly-15k"
FORMATS = ("auto", "chat", "plain")
# Names of the evaluation sets this project reports on: refusing them keeps evaluation data out of training.
_EVAL_NAMES = ("longbench", "copa", "piqa", "winogrande", "boolq", "super_glue", "superglue", "mathqa", "math_qa")


class TrainDataError(ValueError):
    """The training data cannot be loaded or yields no usable sample."""


@dataclass
class Example:
    """One tokenized sample: ``ids`` = prompt tokens then target tokens; ``sample_id`` = record index."""

    sample_id: int
    ids: list[int]
    prompt_len: int

    @property
    def length(self) -> int:
        return len(self.ids)


def load_records(data: str) -> list[dict]:
    """Load the raw records of a local file or a Hub dataset id (its ``train`` split)."""
    lowered = data.lower()
    if any(name in lowered for name in _EVAL_NAMES):
        raise TrainDataError(f"refusing to train on {data!r}: it looks like one of the evaluation sets")
    path = Path(data).expanduser()
    if path.is_file():
        records = _read_local(path)
    elif path.suffix in (".jsonl", ".json", ".txt") or data.startswith((".", "/", "~")):
        raise TrainDataError(f"training data file {path} does not exist")
    else:
        try:
            import datasets

            records = list(datasets.load_dataset(data, split="train"))
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
            raise TrainDataError(f"could not load Hub dataset {data!r} (train split): {e}") from e
    if not records:
        raise TrainDataError(f"no records in {data}")
    return records


def _read_local(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"text": block.strip()} for block in re.split(r"\n\s*\n", text) if block.strip()]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainDataError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise TrainDataError(f"{path} must hold a JSON list of records")
        return data
    records = []
    # split("\n"), not splitlines(): U+2028, U+0085 and the like occur inside JSON strings
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TrainDataError(f"{path} line {n} is not valid JSON: {e}") from e
    return records


def resolve_format(fmt: str, tokenizer) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``plain``."""
    if fmt not in FORMATS:
        raise TrainDataError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TrainDataError("format 'chat' needs a tokenizer with a chat template; use --format plain")
    return fmt


def split_record(record: dict, tokenizer, fmt: str) -> tuple[str, str] | None:
    """``(prompt_text, target_text)`` of an instruction record, or None for a text record."""
    if "text" in record and "instruction" not in record:
        return None
    if "instruction" not in record or "response" not in record:
        raise TrainDataError(f"record has fields {sorted(record)}; expected instruction/context/response or text")
    instruction, context = str(record["instruction"]).strip(), str(record.get("context") or "").strip()
    if context and record.get("question_last"):
        user = f"{context}\n\n{instruction}"
    else:
        user = f"{instruction}\n\n{context}" if context else instruction
    response = str(record["response"]).strip()
    if fmt == "chat":
        messages = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise TrainDataError("the chat template does not extend the prompt with the answer; use --format plain")
        return prompt, full[len(prompt) :]
    return f"{user}\n\n", response + (tokenizer.eos_token or "")


def has_own_context(record) -> bool:
    """An instruction record with a non-empty ``context``."""
    return isinstance(record, dict) and "instruction" in record and bool(str(record.get("context") or "").strip())


def passage_pool(records: list, tokenizer) -> list[tuple[int, str, int]]:
    """``(record index, context, tokens)`` of every instruction record with a non-empty context: the passages
    that long training prompts hide a record's own context among."""
    pool = [(i, str(r.get("context") or "").strip()) for i, r in enumerate(records) if has_own_context(r)]
    if not pool:
        raise TrainDataError("distractor passages need instruction records with a non-empty context")
    return [(i, text, len(tokenizer(text, add_special_tokens=False)["input_ids"])) for i, text in pool]


def draw_passages(pool: list[tuple[int, str, int]], tokens: int, rng: random.Random, exclude: int = -1) -> list[str]:
    """Passages of ``pool`` in a random order (never record ``exclude``'s) until they total ``tokens`` or more."""
    passages, used = [], 0
    for j in rng.sample(range(len(pool)), len(pool)):
        if used >= tokens:
            break
        if pool[j][0] != exclude:
            passages.append(pool[j][1])
            used += pool[j][2]
    return passages


def hide_context(record: dict, index: int, pool: list[tuple[int, str, int]], tokens: int, rng: random.Random) -> dict:
    """``record`` (number ``index`` of the pool's records) with its own context put at a random place among
    other records' contexts until the passages total about ``tokens`` tokens, and the instruction last."""
    own = str(record.get("context") or "").strip()
    own_size = next((size for i, _, size in pool if i == index), 0) if own else 0
    passages = draw_passages(pool, tokens - own_size, rng, exclude=index)
    if own:
        passages.insert(rng.randint(0, len(passages)), own)
    return {**record, "context": "\n\n".join(passages), "question_last": True}


def with_distractors(records: list[dict], tokenizer, tokens: int, seed: int = 0) -> list[dict]:
    """Long-input versions of the instruction records (:func:`hide_context`): distractor passages are drawn
    from the same records. Text records pass unchanged. Deterministic for a given ``seed``."""
    pool = passage_pool(records, tokenizer)
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record:
            out.append(record)
            continue
        out.append(hide_context(record, i, pool, tokens, random.Random(f"sdtp-distractors:{seed}:{i}")))
    return out


QA_SHARE = 0.9
"""Share of the records with a context of their own that become long passage-QA prompts (the rest stay short)."""
RETRIEVAL_SHARE = 0.5
"""Share of the records without a context that become key-value retrieval prompts (the rest stay short)."""
MIN_TOKENS, MAX_TOKENS = 768, 3584
"""Range of the passages' length (tokens) of a long prompt, drawn uniformly per record."""

_SYLLABLES = ("vel", "sa", "or", "rin", "tam", "bo", "ke", "lu", "dra", "mi", "nor", "quen", "zar", "fe", "ith",
              "pal", "wen", "jo", "rux", "ta", "mel", "cor", "ani", "dev")  # fmt: skip
_ATTRIBUTES = ("badge number", "locker code", "parking space", "desk extension", "room number", "member id",
               "shipping reference", "account pin")  # fmt: skip


def _name(rng: random.Random) -> str:
    def word(parts: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()

    return f"{word(2)} {word(rng.randint(2, 3))}"


def _value(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return str(rng.randint(1000, 999999))
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    return f"{letters}-{rng.randint(10, 9999)}"


def retrieval_record(passages: list[str], rng: random.Random) -> dict:
    """A key-value retrieval record: ``passages`` (the haystack) with 2-5 invented facts spread through them,
    the question for one fact last, its value the response."""
    asked_name, asked_attr = _name(rng), rng.choice(_ATTRIBUTES)
    facts = [(asked_name, asked_attr, _value(rng))]
    for _ in range(rng.randint(1, 4)):  # distractors: the same name with another attribute, or another name
        other_attr = rng.choice([a for a in _ATTRIBUTES if a != asked_attr])
        if rng.random() < 0.5:
            facts.append((asked_name, other_attr, _value(rng)))
        else:
            facts.append((_name(rng), asked_attr, _value(rng)))
    text = list(passages)
    for name, attr, value in facts:
        text.insert(rng.randint(0, len(text)), f"{name}'s {attr} is {value}.")
    instruction = f"What is {asked_name}'s {asked_attr}? Answer with the value only."
    return {"instruction": instruction, "context": "\n\n".join(text), "response": facts[0][2], "question_last": True}


def training_mix(
    records: list[dict],
    tokenizer,
    seed: int = 0,
    min_tokens: int = MIN_TOKENS,
    max_tokens: int = MAX_TOKENS,
) -> tuple[list[dict], dict[str, int]]:
    """The mix built from instruction ``records`` (one sample per record, same order) and the count of each
    kind. Deterministic for a given ``seed``."""
    if not 0 < min_tokens <= max_tokens:
        raise TrainDataError(f"mix lengths must satisfy 0 < min <= max, got {min_tokens}, {max_tokens}")
    pool = passage_pool(records, tokenizer)
    out, counts = [], {"passage_qa": 0, "retrieval": 0, "short": 0}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record:
            raise TrainDataError(f"record {i}: the training mix takes instruction records only")
        rng = random.Random(f"sdtp-mix:{seed}:{i}")
        tokens = rng.randint(min_tokens, max_tokens)
        own = has_own_context(record)
        if own and rng.random() < QA_SHARE:
            out.append(hide_context(record, i, pool, tokens, rng))
            counts["passage_qa"] += 1
        elif not own and rng.random() < RETRIEVAL_SHARE:
            out.append(retrieval_record(draw_passages(pool, tokens, rng), rng))
            counts["retrieval"] += 1
        else:
            out.append(record)
            counts["short"] += 1
    return out, counts


def _middle_truncate(ids: list[int], budget: int) -> list[int]:
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def encode_record(
    record: dict, sample_id: int, tokenizer, fmt: str, max_length: int, text_prompt_fraction: float = 0.75
) -> Example | None:
    """Tokenize and truncate one record to at most ``max_length`` tokens; None if it has no target
    (an empty response, or a text too short to split).

    Instruction records keep as much of the prompt as fits while leaving the target at least
    ``max_length // 4`` tokens (or all of it, if shorter); an over-long prompt loses its middle (its
    start and its end, which holds the question and the template's assistant header, stay). Text
    records are cut to ``max_length`` tokens first and then split.
    """
    parts = split_record(record, tokenizer, fmt)
    if parts is None:
        ids = tokenizer(str(record["text"]), add_special_tokens=False)["input_ids"][:max_length]
        prompt_len = int(len(ids) * text_prompt_fraction)
        if prompt_len < 1 or prompt_len >= len(ids):
            return None
        return Example(sample_id, ids, prompt_len)
    if not str(record["response"]).strip():
        return None  # nothing to answer: no target to score
    prompt = tokenizer(parts[0], add_special_tokens=False)["input_ids"]
    target = tokenizer(parts[1], add_special_tokens=False)["input_ids"]
    if not prompt or not target:
        return None
    target_budget = max(min(len(target), max_length - len(prompt)), min(len(target), max_length // 4), 1)
    target = target[:target_budget]
    prompt = _middle_truncate(prompt, max_length - len(target))
    if not prompt:
        return None
    return Example(sample_id, prompt + target, len(prompt))


def load_examples(
    data: str,
    tokenizer,
    fmt: str = "auto",
    max_length: int = 512,
    max_samples: int | None = None,
    text_prompt_fraction: float = 0.75,
    skip: int = 0,
    distractor_tokens: int = 0,
    seed: int = 0,
    context_only: bool = False,
    mix: bool = False,
) -> list[Example]:
    """Load, format and tokenize a training set. Raises :class:`TrainDataError` if nothing usable remains.

    ``skip`` leaves out the first records (e.g. to evaluate on records a training run did not use);
    sample ids stay the records' indices in the full source. ``distractor_tokens`` > 0 turns instruction
    records into long inputs (:func:`with_distractors`, seeded by ``seed``). ``context_only`` keeps only
    the instruction records that have a context of their own (whose answer depends on a passage, as in
    long-context QA); ``skip`` and ``max_samples`` then count those records. ``mix`` builds the training mix
    (:func:`training_mix`, seeded by ``seed``) from the records instead.
    """
    if max_length < 8:
        raise TrainDataError(f"max_length {max_length} is too small (need at least 8 tokens)")
    if not 0.0 < text_prompt_fraction < 1.0:
        raise TrainDataError(f"text_prompt_fraction {text_prompt_fraction} is outside (0, 1)")
    fmt = resolve_format(fmt, tokenizer)
    if distractor_tokens < 0:
        raise TrainDataError(f"distractor_tokens must be >= 0, got {distractor_tokens}")
    if mix and (distractor_tokens or context_only):
        raise TrainDataError("the training mix sets the prompt lengths itself: drop distractor_tokens/context_only")
    # (index in the source, record) of the eligible records; skip and max_samples count those
    indexed = [(i, r) for i, r in enumerate(load_records(data)) if not context_only or has_own_context(r)]
    indexed = indexed[skip:][:max_samples]
    if not indexed:
        if context_only:
            raise TrainDataError(f"no instruction record of {data} with a context of its own after skipping {skip}")
        raise TrainDataError(f"no records in {data} after skipping {skip}")
    ids, records = [i for i, _ in indexed], [r for _, r in indexed]
    if mix:
        records = training_mix(records, tokenizer, seed)[0]
    if distractor_tokens:
        records = with_distractors(records, tokenizer, distractor_tokens, seed)
    examples = []
    for i, record in zip(ids, records):
        if not isinstance(record, dict):
            raise TrainDataError(f"record {i} of {data} is not an object")
        example = encode_record(record, i, tokenizer, fmt, max_length, text_prompt_fraction)
        if example is not None:
            examples.append(example)
    if not examples:
        raise TrainDataError(f"{data} gave no usable sample (every record lacked a prompt or a target)")
    return examples


@dataclass
class Batch:
    """A right-padded batch. ``labels[b, t]`` is the token position ``t`` predicts if it is a target
    token, else -100; ``prompt_mask`` marks the prunable prompt tokens."""

    sample_ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.sample_ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.prompt_mask.to(device),
            self.labels.to(device),
        )


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad ``examples`` into a :class:`Batch`."""
    n = max(e.length for e in examples)
    b = len(examples)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, n), dtype=torch.long)
    prompt_mask = torch.zeros((b, n), dtype=torch.bool)
    labels = torch.full((b, n), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        input_ids[row, : e.length] = ids
        attention_mask[row, : e.length] = 1
        prompt_mask[row, : e.prompt_len] = True
        # Position t predicts token t+1; count it when t+1 is a target token.
        labels[row, e.prompt_len - 1 : e.length - 1] = ids[e.prompt_len :]
    return Batch([e.sample_id for e in examples], input_ids, attention_mask, prompt_mask, labels)
