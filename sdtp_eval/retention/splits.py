"""Dev and test splits of the retention suites: every choice is made on ``dev``, every reported figure on ``test``.

The ``dev`` documents are the ones this project's scorers, spans and defaults were chosen on (the first rows of
each suite, as ``--limit`` took them until 2026-12-07). The ``test`` documents are disjoint from them, and from
every training source (training reads no LongBench or RULER data: ``sdtp_core.train.data``):

* RULER (``sdtp_ruler_offline``, one length per run): dev = samples 0-19 of each task, test = samples 100-119
  (upstream generates 500 a length, each with its own needles and haystack draw).
* needle depth sweep (11 depths an item): dev = items 0-4 (2K) / 0-2 (4K), test = items 10-14 / 10-12.
* LongBench generation: dev = the first 30 rows of qasper_e, 2wikimqa_e, multi_news_e, triviaqa_e,
  passage_count_e, lcc_e (158 rows: qasper_e and lcc_e have fewer); test = rows 30-59 of 2wikimqa_e, multi_news_e,
  triviaqa_e, passage_count_e, samsum_e, trec_e (180 rows; code has no rows left: lcc_e has 13, all dev).
* Table 3 (copa, cb, wsc, wic, winogrande, piqa, boolq, mathqa; short prompts, the paper's accuracy table): dev =
  even document indices, test = the first 150 odd ones of each task (all of them where a task has fewer).
* answer NLL: dev = set 1 (narrativeqa, qasper, hotpotqa_e: every row there is) and set 2 (2wikimqa_e rows
  0-29, multifieldqa_en_e); test = 2wikimqa_e rows 30-59 and multi_news_e rows 30-49.

Each split is written as lm_eval ``--samples`` JSON (``{task: [doc indices]}``)::

    python -m sdtp_eval.retention.splits ruler test --out runs/splits/ruler_test.json
    lm_eval --model sdtp --tasks sdtp_ruler_offline --metadata '{"max_seq_lengths":[2048]}' \\
        --samples runs/splits/ruler_test.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
NEEDLE_DEPTHS = 11
LONGBENCH_DEV = ("qasper_e", "2wikimqa_e", "multi_news_e", "triviaqa_e", "passage_count_e", "lcc_e")
LONGBENCH_TEST = ("2wikimqa_e", "multi_news_e", "triviaqa_e", "passage_count_e", "samsum_e", "trec_e")
# Dev tasks whose LongBench-E file holds fewer than 30 rows (../shared/data/longbench_e; the Hub's files hold more).
LONGBENCH_ROWS = {"qasper_e": 25, "lcc_e": 13}
NLL_DEV = {"narrativeqa": range(20), "qasper": range(13), "hotpotqa_e": range(13), "2wikimqa_e": range(30),
           "multifieldqa_en_e": range(11)}  # fmt: skip
NLL_TEST = {"2wikimqa_e": range(30, 60), "multi_news_e": range(30, 50)}
TABLE3_DOCS = {"copa": 100, "cb": 56, "wsc": 104, "wic": 638, "winogrande": 1267, "piqa": 1838, "boolq": 3270,
               "mathqa": 2985}  # fmt: skip
"""Documents lm-eval scores of each Table 3 task (validation sets; MathQA's test split)."""
TABLE3_TEST_PER_TASK = 150
SPLITS = ("dev", "test")
SUITES = ("ruler", "needle2k", "needle4k", "lbgen", "nll", "table3")


def _needle(items: range) -> list[int]:
    return [item * NEEDLE_DEPTHS + depth for item in items for depth in range(NEEDLE_DEPTHS)]


def split_samples(suite: str, split: str) -> dict[str, list[int]]:
    """``{lm-eval task name: [document indices]}`` of ``suite``'s ``split`` (see the module docstring)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {SUITES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose dev or test")
    dev = split == "dev"
    if suite == "ruler":
        return {task: list(range(0, 20) if dev else range(100, 120)) for task in RULER_TASKS}
    if suite == "needle2k":
        return {"sdtp_needle_depth_2k": _needle(range(0, 5) if dev else range(10, 15))}
    if suite == "needle4k":
        return {"sdtp_needle_depth_4k": _needle(range(0, 3) if dev else range(10, 13))}
    if suite == "lbgen":
        if dev:
            return {f"longbench_{t}": list(range(min(30, LONGBENCH_ROWS.get(t, 30)))) for t in LONGBENCH_DEV}
        return {f"longbench_{t}": list(range(30, 60)) for t in LONGBENCH_TEST}
    if suite == "table3":
        if dev:
            return {task: list(range(0, n, 2)) for task, n in TABLE3_DOCS.items()}
        return {task: list(range(1, n, 2))[:TABLE3_TEST_PER_TASK] for task, n in TABLE3_DOCS.items()}
    rows = NLL_DEV if dev else NLL_TEST
    return {f"longbench_nll_{t}": list(r) for t, r in rows.items()}


def overlap(suite: str) -> dict[str, list[int]]:
    """Documents that are in both splits of ``suite`` (empty: the splits are disjoint)."""
    dev, test = split_samples(suite, "dev"), split_samples(suite, "test")
    both = {task: sorted(set(dev[task]) & set(test[task])) for task in dev.keys() & test.keys()}
    return {task: docs for task, docs in both.items() if docs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdtp_eval.retention.splits", description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=SUITES)
    p.add_argument("split", choices=SPLITS)
    p.add_argument("--out", required=True, help="where to write the lm_eval --samples JSON")
    p.add_argument("--tasks", action="store_true", help="also print the comma-separated task list for --tasks")
    p.add_argument("--first", type=int, help="only the first FIRST documents of each task (a cheaper subset)")
    args = p.parse_args(argv)
    if args.first is not None and args.first < 1:
        p.error(f"--first must be >= 1, got {args.first}")
    samples = {task: docs[: args.first] for task, docs in split_samples(args.suite, args.split).items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(samples) + "\n")
    if args.tasks:
        print(",".join(samples))


if __name__ == "__main__":
    main()
