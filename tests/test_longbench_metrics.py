"""Official LongBench metrics on hand-worked cases (each number below is worked out in the comment)."""

from __future__ import annotations

import pytest

from sdtp_eval.longbench import metrics as M


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-6)


# ------------------------------------------------------------------------------------------ English QA F1


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert M.normalize_answer("  The Cat,  sat on A mat!  ") == "cat sat on mat"
    assert M.normalize_answer("an apple-pie") == "applepie"  # '-' is punctuation: removed, not a space


def test_qa_f1_partial_overlap():
    # pred tokens [cat, sat, on, mat] (article 'a' and '.' dropped), gold [cat, sat]: P=2/4, R=2/2 -> F1=2/3
    assert M.qa_f1_score("The cat sat on a mat.", "cat sat") == approx(2 / 3)


def test_qa_f1_counts_repeated_tokens_as_a_multiset():
    # pred [paris, paris], gold [paris]: overlap 1, P=1/2, R=1 -> 2/3
    assert M.qa_f1_score("Paris Paris", "Paris") == approx(2 / 3)


def test_qa_f1_empty_and_disjoint():
    assert M.qa_f1_score("", "cat") == 0.0
    assert M.qa_f1_score("The", "the") == 0.0  # both normalise to nothing
    assert M.qa_f1_score("dog", "cat") == 0.0


def test_score_example_takes_the_max_over_answers():
    assert M.score_example("narrativeqa", "cat sat", ["dog", "the cat sat down", "Cat sat."]) == 1.0
    # best is 'cat sat down': pred [cat, sat], gold [cat, sat, down] -> P=1, R=2/3 -> 0.8
    assert M.score_example("hotpotqa", "cat sat", ["dog", "cat sat down"]) == approx(0.8)
    assert M.score_example("qasper", "", ["yes", "no"]) == 0.0


# ------------------------------------------------------------------------------------------ Chinese QA F1


def test_qa_f1_zh_uses_jieba_tokens_and_chinese_punctuation():
    # jieba: 北京。 -> [北京, 。]; '。' normalises to '' and is dropped -> identical token lists
    assert M.qa_f1_zh_score("北京。", "北京") == 1.0
    # [我, 爱, 北京] vs [北京, 天安门]: overlap 1, P=1/3, R=1/2 -> F1 = 2*(1/6)/(5/6) = 0.4
    assert M.qa_f1_zh_score("我爱北京", "北京天安门") == approx(0.4)
    # [上海, 是, 一座, 城市] vs [上海, 城市] ('。' dropped): P=2/4, R=1 -> 2/3
    assert M.qa_f1_zh_score("上海是一座城市。", "上海城市") == approx(2 / 3)
    assert M.qa_f1_zh_score("", "北京") == 0.0


# ------------------------------------------------------------------------------------------ ROUGE-L


def test_rouge_l_single_sentence():
    # unique ref words {the, cat, sat, on, mat} m=5, hyp {the, cat, sat} n=3, LCS words 3:
    # P=1, R=3/5 -> F = 2*0.6/1.6 = 0.75 (rouge-score's rougeL would give 2/3: it counts 6 reference tokens)
    assert M.rouge_score("the cat sat", "the cat sat on the mat") == approx(0.75)


def test_rouge_l_is_case_sensitive_and_keeps_punctuation_other_than_periods():
    # {The, cat} vs {the, cat}: only 'cat' in common -> P=R=1/2 -> F=1/2
    assert M.rouge_score("The cat", "the cat") == approx(0.5)
    # 'cat,' is not 'cat'
    assert M.rouge_score("cat, dog", "cat dog") == approx(0.5)


def test_rouge_l_is_summary_level_over_sentences_split_at_periods():
    # sentences hyp [a b], [c d]; ref [c d], [a b]: union LCS {c, d} + {a, b} = 4 = m = n -> F = 1
    # (sentence-unaware LCS of 'a b c d' vs 'c d a b' would be 2 -> F = 0.5)
    assert M.rouge_score("a b. c d", "c d. a b") == approx(1.0)


def test_rouge_l_counts_distinct_words():
    # hyp {a} n=1, ref {a} m=1, LCS {a} -> F = 1 despite the repetition
    assert M.rouge_score("a a a", "a") == approx(1.0)


def test_rouge_l_empty_prediction_scores_zero():
    assert M.rouge_score("", "the cat") == 0.0
    assert M.rouge_score("...", "the cat") == 0.0  # only periods: no sentence at all
    with pytest.raises(ValueError):
        M.rouge_l_f("", "the cat")


def test_rouge_zh_joins_jieba_tokens_with_spaces():
    # [我, 爱, 北京] vs [我, 爱, 北京, 天安门]: P=1, R=3/4 -> F = 1.5/1.75
    assert M.rouge_zh_score("我爱北京", "我爱北京天安门") == approx(1.5 / 1.75)
    assert M.rouge_zh_score("", "北京") == 0.0


def test_rouge_matches_the_rouge_package_when_installed():
    rouge = pytest.importorskip("rouge")
    cases = [
        ("the cat sat", "the cat sat on the mat"),
        ("a b. c d", "c d. a b"),
        ("Hello there.  General Kenobi. ", "hello there. general kenobi"),
        ("x y z x y", "y x z. z y x. q"),
    ]
    for prediction, reference in cases:
        expected = rouge.Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
        assert M.rouge_score(prediction, reference) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------ classification


CLASSES = ["City", "Country", "Food"]


def test_classification_single_and_multiple_matches():
    assert M.classification_score("Country", "Country", all_classes=CLASSES) == 1.0
    # two classes mentioned, one correct -> 1/2
    assert M.classification_score("City or Country", "Country", all_classes=CLASSES) == 0.5
    assert M.classification_score("Food", "Country", all_classes=CLASSES) == 0.0
    assert M.classification_score("", "Country", all_classes=CLASSES) == 0.0


def test_classification_drops_matches_that_are_substrings_of_the_answer():
    # 'Sport' is inside 'Sports team' (the answer) and is dropped; 'City' stays -> 1/2
    classes = ["Sport", "Sports team", "City"]
    assert M.classification_score("Sports team, City", "Sports team", all_classes=classes) == 0.5


def test_classification_reproduces_official_remove_while_iterating():
    # matches [ab, abc, abcd]; 'ab' is removed, so the loop skips 'abc' (it moved into the visited slot):
    # 2 matches remain -> 1/2 (official result; a clean filter would give 1.0)
    assert M.classification_score("abcd", "abcd", all_classes=["ab", "abc", "abcd"]) == 0.5


# ------------------------------------------------------------------------------------------ synthetic


def test_retrieval_score():
    assert M.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval_score("I don't know", "Paragraph 3") == 0.0
    assert M.retrieval_score("Paragraph 30", "Paragraph 3") == 0.0  # whole numbers are compared


def test_retrieval_zh_score():
    assert M.retrieval_zh_score("段落5", "段落5") == 1.0
    assert M.retrieval_zh_score("答案是段落5，不是段落15", "段落5") == 0.5


def test_count_score():
    assert M.count_score("There are 12 unique paragraphs.", "12") == 1.0
    assert M.count_score("12 or 13", "12") == 0.5
    assert M.count_score("twelve", "12") == 0.0
    assert M.count_score("1, 2, 3", 3) == approx(1 / 3)  # integer ground truth compared as text


# ------------------------------------------------------------------------------------------ code


def test_first_code_line_skips_comment_lines_but_not_blank_ones():
    assert M.first_code_line("\n# comment\n// another\n```python\nx = foo(1)\ny = 2") == "x = foo(1)"
    assert M.first_code_line("\n\n  \nx = 1") == "  "  # only leading '\n' are stripped
    assert M.first_code_line("y = 1  # trailing comment\nz = 2") == "z = 2"  # any '#' disqualifies a line
    assert M.first_code_line("# only comments") == ""


def test_code_sim_score():
    assert M.code_sim_score("# comment\nx = foo(1)\n", "x = foo(1)") == 1.0
    # ratio('abcd', 'abce') = 2*3/8 = 0.75
    assert M.code_sim_score("abcd", "abce") == approx(0.75)
    assert M.code_sim_score("# nothing but a comment", "x = 1") == 0.0
    assert M.code_sim_score("", "x = 1") == 0.0


# ------------------------------------------------------------------------------------------ per example


def test_first_line_cut_for_fewshot_tasks_only():
    assert M.postprocess("trec", "\n\nLocation\nCity") == "Location"
    assert M.postprocess("narrativeqa", "\nLocation\nCity") == "\nLocation\nCity"
    # triviaqa: second line would otherwise lower F1
    assert M.score_example("triviaqa", "\nParis\nAnswer: London", ["Paris"]) == 1.0
    assert M.score_example("narrativeqa", "Paris\nLondon", ["Paris"]) == approx(2 / 3)
    classes = ["City", "Country"]
    assert M.score_example("lsht", "Country\nCity", ["Country"], classes) == 1.0


def test_every_dataset_has_a_metric():
    from sdtp_eval.longbench.spec import DATASETS

    assert len(DATASETS) == 21
    for spec in DATASETS.values():
        assert spec.metric in M.METRICS
