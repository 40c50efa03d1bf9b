"""A pass-key retrieval probe shared by the peer measurements: does a compressed prompt keep the needle?"""

from __future__ import annotations

PASSKEY = 68142
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HEAD = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, n_tokens: int, depth: float = 0.5, passkey: int = PASSKEY) -> tuple[str, str]:
    """``(context, question)``: about ``n_tokens`` tokens of filler with the key at ``depth`` (0 = start).

    The answer is ``str(passkey)``; the question is meant to follow the context directly.
    """
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    unit = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    budget = n_tokens - len(tokenizer(HEAD + needle, add_special_tokens=False).input_ids)
    reps = max(1, budget // unit)
    before = round(reps * depth)
    return HEAD + FILLER * before + needle + FILLER * (reps - before), QUESTION
