"""Helpers shared by the training tests: a tiny model directory with a character tokenizer, toy data.

(Named ``test_train_*`` so it sits with the training tests; it defines no tests itself.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import tiny_model
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 123)]  # 3 + 92 = 95 ids < the tiny vocab of 96


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model_dir(path: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """Save a tiny model (6 layers, hidden 64) and the character tokenizer into ``path``."""
    model = tiny_model(arch, seed=seed)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


WORDS = "the cat sat on a mat while dogs ran far away from big red cars near old green trees".split()


def toy_dolly(path: Path, n: int = 12, seed: int = 0) -> Path:
    """A Dolly-shaped JSONL file (instruction, context, response, category) of ``n`` random records."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            record = {
                "instruction": "what did the " + " ".join(rng.choices(WORDS, k=4)) + "?",
                "context": " ".join(rng.choices(WORDS, k=rng.randint(5, 12))),
                "response": " ".join(rng.choices(WORDS, k=3)) + ".",
                "category": "open_qa",
            }
            f.write(json.dumps(record) + "\n")
    return path
