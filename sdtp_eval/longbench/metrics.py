"""The official LongBench v1 metrics (THUDM/LongBench ``metrics.py`` and ``eval.py``), re-implemented.

Every ``*_score(prediction, ground_truth, **kwargs)`` function scores one prediction against one answer, with
the official definition (quirks included, see ``docs/longbench.md``); :func:`score_example` applies the
official per-example rule (first-line cut for some datasets, maximum over the answers).

ROUGE-L is the summary-level ROUGE-L F of the ``rouge`` package (pltrdy, 1.0.1) that official ``eval.py``
calls, written out here because the ``rouge-score`` package computes a different quantity (it lower-cases,
drops non-alphanumerics, and uses sentence-level LCS over all tokens instead of unique-word union LCS).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from sdtp_eval.longbench.spec import DATASETS, FIRST_LINE_ONLY

_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣"  # official Chinese punctuation set
    + "､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _jieba_cut(text: str) -> list[str]:
    """jieba's accurate-mode segmentation (``cut_all=False``), as official uses."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


# ----------------------------------------------------------------------------------------------- QA F1


def normalize_answer(text: str) -> str:
    """English answer normalisation: lower-case, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ALL_PUNCT)
    return "".join(text.split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when nothing overlaps."""
    overlap = sum((Counter(prediction) & Counter(ground_truth)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction)
    recall = overlap / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """English QA F1 over whitespace tokens of the normalised strings."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Chinese QA F1 over jieba tokens, each normalised, empty tokens dropped."""

    def tokens(text: str) -> list[str]:
        return [tok for tok in (normalize_zh_answer(t) for t in _jieba_cut(text)) if tok]

    return token_f1(tokens(prediction), tokens(ground_truth))


# ----------------------------------------------------------------------------------------------- ROUGE-L


def _sentences(text: str) -> list[list[str]]:
    """The ``rouge`` package's preprocessing: split at '.', keep non-empty pieces, split each on whitespace.

    A whitespace-only piece becomes the single empty token ``[""]``, exactly as in the package.
    """
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """Words of the LCS of ``ref`` and ``hyp`` reconstructed with the package's tie-break (up before left)."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if ref[i - 1] == hyp[j - 1] else max(prev[j], row[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_f(prediction: str, ground_truth: str) -> float:
    """Summary-level ROUGE-L F of the ``rouge`` package (``Rouge().get_scores(...)["rouge-l"]["f"]``).

    With the package's default ``exclusive=True``: the hit count is the number of distinct words in the union
    of the LCSs of every (reference sentence, prediction sentence) pair; precision and recall divide it by
    the number of distinct words of prediction and reference. Raises ``ValueError`` (as the package does)
    when either side has no sentence.
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        raise ValueError("ROUGE needs at least one sentence on each side")
    union: set[str] = set()
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_sentence, hyp_sentence)
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Official English ROUGE-L F (0.0 where the ``rouge`` package raises, e.g. an empty prediction)."""
    try:
        return rouge_l_f(prediction, ground_truth)
    except ValueError:
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Official Chinese ROUGE-L F: jieba tokens joined by spaces, then :func:`rouge_score`."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


# ----------------------------------------------------------------------------------------------- others


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Official few-shot classification score (trec, lsht); needs ``all_classes=[...]``.

    Collects every class name contained in the prediction, drops matched names that are substrings of (but
    not equal to) the ground truth, and scores ``1 / #matches`` if the ground truth is among them. The
    dropping reproduces official code, which removes items from the list it is iterating over, so the item
    right after a removed one is never examined.
    """
    matches = [name for name in kwargs["all_classes"] if name in prediction]
    index = 0
    while index < len(matches):
        term = matches[index]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        index += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_equal(numbers: list[str], target: str) -> float:
    return 0.0 if not numbers else sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the integers in the prediction that equal the ground-truth count (passage_count)."""
    return _share_equal(re.findall(r"\d+", prediction), str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    target = re.findall(pattern, ground_truth)[0]
    return _share_equal(re.findall(r"\d+", prediction), target)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the integers in the prediction equal to N of the answer ``Paragraph N``."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of the integers in the prediction equal to N of the answer ``段落N``."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def first_code_line(prediction: str) -> str:
    """First line (after leading newlines) containing none of '`', '#', '//'; ``""`` if there is none.

    Blank lines are *not* skipped (official behaviour; lm-eval's built-in v6 skips them).
    """
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """``fuzz.ratio`` (fuzzywuzzy, 0-100 integer) / 100 between :func:`first_code_line` and the answer."""
    from fuzzywuzzy import fuzz

    return fuzz.ratio(first_code_line(prediction), ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1_score": qa_f1_score,
    "qa_f1_zh_score": qa_f1_zh_score,
    "rouge_score": rouge_score,
    "rouge_zh_score": rouge_zh_score,
    "classification_score": classification_score,
    "retrieval_score": retrieval_score,
    "retrieval_zh_score": retrieval_zh_score,
    "count_score": count_score,
    "code_sim_score": code_sim_score,
}
"""Official metric name -> function (official ``eval.py`` ``dataset2metric`` goes through ``spec.DATASETS``)."""


def postprocess(dataset: str, prediction: str) -> str:
    """Official pre-scoring cut: for trec, triviaqa, samsum, lsht keep the first line after leading newlines."""
    if dataset in FIRST_LINE_ONLY:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_example(
    dataset: str, prediction: str, answers: Iterable[str], all_classes: Sequence[str] | None = None
) -> float:
    """Official per-example score in [0, 1]: post-process, then the maximum of the metric over the answers."""
    metric = METRICS[DATASETS[dataset].metric]
    prediction = postprocess(dataset, prediction)
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return best
