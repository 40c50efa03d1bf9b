"""Needle depth sweep: a passkey hidden at depth 0, 10, ..., 100% of a filler haystack, at a fixed token length.

Every document is generated here, deterministically, from a seed: no data set is read. Item ``i`` of length ``L``
has one filler haystack and one 7-digit number, and appears once per depth with only the needle moved, so the
depth cells of a length differ by the needle position alone. The filler is made of sentences drawn from fixed
word lists (meaningless but varied text, unlike RULER's repeated sentence). The prompt, question included, is at
most ``L`` tokens of the model's tokenizer and at least ``L`` minus one filler sentence.

Depth ``d`` puts the needle after ``round(d / 100 * n)`` of the ``n`` filler sentences: 0 is the start of the
haystack, 100 its end (just before the question).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from sdtp_eval.retention import load_tokenizer, tokenizer_name

DEPTHS: tuple[int, ...] = tuple(range(0, 101, 10))
"""Needle depths in percent of the haystack."""

LENGTHS: tuple[int, ...] = (1024, 2048, 4096)
"""Prompt lengths (tokens) of the ``sdtp_needle_depth_{1k,2k,4k}`` tasks."""

ITEMS_PER_CELL = 20
SEED = 1234

PROMPT = (
    "A special magic number is hidden somewhere in the following text. Find it and memorize it. "
    "I will ask you for the number at the end.\n\n{haystack}\n\n"
    "What is the special magic number mentioned in the text above?\n"
    "Answer: The special magic number is"
)
NEEDLE = "The special magic number is {number}."

_ADJECTIVES = (
    "quiet old small bright heavy narrow warm distant green wooden broken tall gentle yellow empty "
    "silver careful busy rough soft hidden plain early late famous crowded cold simple curious"
).split()
_NOUNS = (
    "farmer teacher river window garden lantern bridge merchant painter kettle ladder village harbor "
    "basket carpet candle letter market orchard sailor shepherd tower wagon blanket mirror pocket "
    "stable theater violin meadow"
).split()
_VERBS = (
    "watched carried painted repaired followed visited opened cleaned described noticed measured "
    "borrowed remembered counted moved passed crossed found"
).split()
_PLACES = tuple(
    f"the {place}"
    for place in (
        "station square hill kitchen library shore forest workshop bakery valley courtyard attic pier mill school"
    ).split()
)
_TEMPLATES = (
    "The {a} {n} {v} the {a2} {n2} near {p}.",
    "A {a} {n} was seen at {p} in the morning.",
    "Every day the {n} {v} a {a} {n2}.",
    "Nobody knew why the {n} at {p} was so {a}.",
    "After lunch the {a} {n} {v} the {n2} again.",
    "The {n2} by {p} looked {a} and {a2}.",
)


@dataclass(frozen=True)
class NeedleDoc:
    """One document: the prompt, the answer and where the needle is."""

    length: int
    depth: int
    item: int
    answer: str
    input: str
    prompt_tokens: int
    filler_sentences: int
    needle_index: int
    needle_char_fraction: float

    def as_dict(self) -> dict[str, Any]:
        """The document as lm-eval sees it (one row of the data set)."""
        return {
            "id": f"L{self.length}-d{self.depth:03d}-i{self.item:03d}",
            "length": self.length,
            "depth": self.depth,
            "item": self.item,
            "answer": self.answer,
            "input": self.input,
            "prompt_tokens": self.prompt_tokens,
            "filler_sentences": self.filler_sentences,
            "needle_index": self.needle_index,
            "needle_char_fraction": self.needle_char_fraction,
        }


def filler_sentence(rng: random.Random) -> str:
    """One filler sentence from the fixed word lists."""
    template = rng.choice(_TEMPLATES)
    a, a2 = rng.sample(_ADJECTIVES, 2)
    n, n2 = rng.sample(_NOUNS, 2)
    return template.format(a=a, a2=a2, n=n, n2=n2, v=rng.choice(_VERBS), p=rng.choice(_PLACES))


def needle_index(depth: int, sentences: int) -> int:
    """Number of filler sentences before the needle at ``depth`` percent."""
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be in [0, 100], got {depth}")
    return round(depth / 100 * sentences)


def render(filler: list[str], needle: str, depth: int) -> tuple[str, int, float]:
    """Prompt with the needle inserted at ``depth``; also its sentence index and its character fraction.

    The character fraction is the needle's start offset within the haystack divided by the haystack length
    without the needle (0.0 = first sentence, 1.0 = after the last filler sentence).
    """
    k = needle_index(depth, len(filler))
    before, after = " ".join(filler[:k]), " ".join(filler[k:])
    haystack = " ".join(part for part in (before, needle, after) if part)
    filler_chars = len(" ".join(filler))
    fraction = (len(before) + (1 if before else 0)) / filler_chars if filler_chars else 0.0
    return PROMPT.format(haystack=haystack), k, min(fraction, 1.0)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` without special tokens (what lm-eval's HF models feed as the context)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def item_documents(tokenizer: Any, length: int, item: int, seed: int = SEED) -> list[NeedleDoc]:
    """The documents of item ``item`` at ``length`` tokens, one per depth of :data:`DEPTHS`."""
    rng = random.Random(f"sdtp-needle:{seed}:{length}:{item}")
    answer = str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE.format(number=answer)
    budget = length - count_tokens(tokenizer, PROMPT.format(haystack=needle))
    if budget <= 0:
        raise ValueError(f"length {length} leaves no room for filler after the prompt and the needle")
    filler: list[str] = []
    used = 0
    while used < budget:  # per-sentence counts: an estimate, checked exactly below
        sentence = filler_sentence(rng)
        filler.append(sentence)
        used += count_tokens(tokenizer, " " + sentence)
    while True:  # the same filler for every depth, the longest that fits at every depth
        rendered = [render(filler, needle, depth) for depth in DEPTHS]
        tokens = [count_tokens(tokenizer, text) for text, _, _ in rendered]
        if max(tokens) <= length or not filler:
            break
        filler.pop()
    return [
        NeedleDoc(length, depth, item, answer, text, n, len(filler), k, fraction)
        for depth, (text, k, fraction), n in zip(DEPTHS, rendered, tokens)
    ]


def documents(tokenizer: Any, length: int, items: int = ITEMS_PER_CELL, seed: int = SEED) -> list[dict[str, Any]]:
    """All documents of one length, ordered item by item (each item at every depth), so ``--limit 11``
    covers every depth once."""
    return [doc.as_dict() for item in range(items) for doc in item_documents(tokenizer, length, item, seed)]


def load_dataset(needle_length: int, needle_items: int = ITEMS_PER_CELL, needle_seed: int = SEED, **metadata: Any):
    """lm-eval ``custom_dataset`` hook: ``DatasetDict({"test": ...})`` of one length.

    ``needle_length`` comes from the task's ``dataset_kwargs``; ``needle_items`` and ``needle_seed`` from its
    metadata (``--metadata`` overrides them); the tokenizer from ``tokenizer``/``pretrained`` of the metadata
    (lm-eval merges ``--model_args`` into it), else the embedded model.
    """
    import datasets

    tokenizer = load_tokenizer(tokenizer_name(metadata))
    rows = documents(tokenizer, int(needle_length), int(needle_items), int(needle_seed))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


_NUMBER = re.compile(r"\d+")


def first_number(prediction: str) -> str | None:
    """The first run of digits in a prediction (``None`` if there is none)."""
    match = _NUMBER.search(prediction)
    return match.group() if match else None


def depth_metric(depth: int) -> str:
    """Name of the per-depth metric: ``exact_match_d000`` ... ``exact_match_d100``."""
    return f"exact_match_d{depth:03d}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``exact_match``: the first number of the generation equals the needle's; also reported under the
    document's own depth (:func:`depth_metric`), so each depth's mean runs over its own documents."""
    score = 1.0 if first_number(results[0]) == doc["answer"] else 0.0
    return {"exact_match": score, depth_metric(int(doc["depth"])): score}
