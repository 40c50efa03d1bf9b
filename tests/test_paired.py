"""Paired comparison of lm-eval runs (sdtp_eval.retention.paired) against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sdtp_eval.retention.paired import POOLED, TASK_MEAN, main


def write_samples(
    directory: Path, task: str, values: dict[int, float], metric: str, hashes: dict[int, str] | None = None
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"doc_id": d, metric: v, "doc": {}, "doc_hash": (hashes or {}).get(d, f"h{d}")} for d, v in values.items()]
    (directory / f"samples_{task}_2026-12-02T00-00-00.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_paired_differences_retention_and_intervals_by_hand(tmp_path):
    ref = {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    run = {0: 1.0, 1: 0.0, 2: 0.0, 3: 1.0, 9: 1.0}  # doc 9 has no partner: ignored
    write_samples(tmp_path / "dense", "needle", ref, "exact_match")
    write_samples(tmp_path / "sdtp", "needle", run, "exact_match")
    report = main(
        [
            "--metric",
            "exact_match",
            "--samples",
            f"dense={tmp_path / 'dense'}",
            f"sdtp={tmp_path / 'sdtp'}",
            "--out",
            str(tmp_path / "out" / "r"),
        ]
    )
    s = report["tasks"]["needle"]["sdtp"]
    assert s["n"] == 4 and s["mean"] == 0.5 and s["reference_mean"] == 0.75
    assert s["diff"] == pytest.approx(-0.25) and s["retention"] == pytest.approx(0.5 / 0.75)
    assert s["diff_ci"][0] <= -0.25 <= s["diff_ci"][1] and s["diff_ci"][0] >= -1.0 and s["diff_ci"][1] <= 0.0
    assert report["tasks"]["needle"]["dense"]["diff"] == 0.0  # the reference against itself
    assert report["tasks"][POOLED]["sdtp"]["n"] == 4
    assert "| needle | sdtp | 4 | 0.5000 | -0.2500" in (tmp_path / "out" / "r.md").read_text()
    assert (tmp_path / "out" / "r.png").stat().st_size > 1000


def test_lower_is_better_retention_is_the_per_token_probability_kept(tmp_path):
    write_samples(tmp_path / "a", "nll", {0: 2.0, 1: 3.0}, "nll_per_token")
    write_samples(tmp_path / "b", "nll", {0: 2.5, 1: 3.1}, "nll_per_token")
    report = main(
        [
            "--metric",
            "nll_per_token",
            "--lower-is-better",
            "--samples",
            f"dense={tmp_path / 'a'}",
            f"sdtp={tmp_path / 'b'}",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    s = report["tasks"]["nll"]["sdtp"]
    assert s["diff"] == pytest.approx(0.3) and s["retention"] == pytest.approx(math.exp(-0.3))


def test_task_mean_is_the_unweighted_mean_of_task_means(tmp_path):
    """Two tasks of different sizes: the task mean weighs them equally, the pooled figure by documents."""
    write_samples(tmp_path / "dense", "big", {d: 1.0 for d in range(8)}, "acc")
    write_samples(tmp_path / "sdtp", "big", {d: 1.0 for d in range(8)}, "acc")  # Δ 0 on 8 documents
    write_samples(tmp_path / "dense", "small", {0: 1.0, 1: 1.0}, "acc")
    write_samples(tmp_path / "sdtp", "small", {0: 0.0, 1: 1.0}, "acc")  # Δ -0.5 on 2 documents
    args = ["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"sdtp={tmp_path / 'sdtp'}"]
    report = main([*args, "--out", str(tmp_path / "r")])
    mean = report["tasks"][TASK_MEAN]["sdtp"]
    assert mean["tasks"] == 2 and mean["n"] == 10
    assert mean["diff"] == pytest.approx(-0.25) and mean["mean"] == pytest.approx(0.75)
    assert report["tasks"][POOLED]["sdtp"]["diff"] == pytest.approx(-0.1)
    # resampling stays within each task: "big" always gives 0, "small" gives -1, -0.5 or 0 (halved)
    assert mean["diff_ci"][0] >= -0.5 and mean["diff_ci"][1] <= 0.0
    assert report["tasks"][TASK_MEAN]["dense"]["diff"] == 0.0


def test_samples_with_unicode_line_separators_inside_strings_are_read(tmp_path):
    """lm-eval writes samples with ensure_ascii=False: U+2028 / U+0085 inside a string are not line ends."""
    rows = [{"doc_id": d, "score": 0.5, "doc": {"context": "a\u2028b\x85c\x1cd"}} for d in range(3)]
    (tmp_path / "a").mkdir()
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (tmp_path / "a" / "samples_t_2026-12-02T00-00-00.jsonl").write_text(text, encoding="utf-8")
    report = main(["--metric", "score", "--samples", f"a={tmp_path / 'a'}", "--out", str(tmp_path / "r")])
    assert report["tasks"]["t"]["a"]["n"] == 3


def test_bad_input_is_named(tmp_path):
    write_samples(tmp_path / "a", "t", {0: 1.0}, "acc")
    with pytest.raises(ValueError, match="no sample .* has the metric 'f1'"):
        main(["--metric", "f1", "--samples", f"a={tmp_path / 'a'}", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit):
        main(
            ["--metric", "acc", "--samples", f"a={tmp_path / 'a'}", "--reference", "zzz", "--out", str(tmp_path / "r")]
        )


def test_a_committed_report_stands_in_for_its_runs(tmp_path):
    """OUT.json keeps each run's per-document values: pairing a new run against the report's reference gives
    the same statistics as pairing against the reference's lm-eval outputs."""
    write_samples(tmp_path / "dense", "t", {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}, "acc")
    write_samples(tmp_path / "old", "t", {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}, "acc")
    write_samples(tmp_path / "new", "t", {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}, "acc")
    first = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"old={tmp_path / 'old'}",
                  "--out", str(tmp_path / "first")])  # fmt: skip
    assert first["documents"]["old"]["t"]["0"] == [0.0, "h0"]
    direct = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"new={tmp_path / 'new'}",
                   "--out", str(tmp_path / "direct")])  # fmt: skip
    via_report = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'first.json'}",
                       f"before={tmp_path / 'first.json'}:old", f"new={tmp_path / 'new'}",
                       "--out", str(tmp_path / "via")])  # fmt: skip
    assert via_report["tasks"]["t"]["new"] == direct["tasks"]["t"]["new"]
    assert via_report["tasks"]["t"]["before"] == first["tasks"]["t"]["old"]
    with pytest.raises(ValueError, match="no run 'zzz'"):
        main(["--metric", "acc", "--samples", f"zzz={tmp_path / 'first.json'}", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="reports the metric 'acc', not 'f1'"):
        main(["--metric", "f1", "--samples", f"dense={tmp_path / 'first.json'}", "--out", str(tmp_path / "x")])


def test_documents_that_differ_under_the_same_doc_id_are_refused(tmp_path):
    """Generated data (RULER's haystacks) must be the same documents in both runs to be paired."""
    write_samples(tmp_path / "a", "t", {0: 1.0, 1: 1.0}, "acc")
    write_samples(tmp_path / "b", "t", {0: 1.0, 1: 0.0}, "acc", hashes={0: "h0", 1: "other"})
    with pytest.raises(ValueError, match=r"run 'b' task 't': documents \[1\] are not the documents of 'a'"):
        main(
            ["--metric", "acc", "--samples", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--out", str(tmp_path / "r")]
        )


def test_reports_written_one_task_at_a_time_merge_into_one_comparison(tmp_path):
    """Per-task reports (written over several sessions) read through a glob give the statistics of the
    runs read together; a document in two of the reports is refused."""
    for task, dense, pruned in [("t", {0: 1.0, 1: 0.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 1.0}), ("u", {0: 1.0}, {0: 1.0})]:
        write_samples(tmp_path / "dense", task, dense, "acc")
        write_samples(tmp_path / "pruned", task, pruned, "acc")
        write_samples(tmp_path / task / "dense", task, dense, "acc")
        write_samples(tmp_path / task / "pruned", task, pruned, "acc")
        (tmp_path / "per_task").mkdir(exist_ok=True)
        main(["--metric", "acc", "--samples", f"dense={tmp_path / task / 'dense'}",
              f"pruned={tmp_path / task / 'pruned'}", "--out", str(tmp_path / "per_task" / task)])  # fmt: skip
    together = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"pruned={tmp_path / 'pruned'}",
                     "--out", str(tmp_path / "together")])  # fmt: skip
    merged = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'per_task'}/*.json:dense",
                   f"pruned={tmp_path / 'per_task'}/*.json:pruned", "--out", str(tmp_path / "merged")])  # fmt: skip
    assert merged["tasks"] == together["tasks"] and merged["tasks"]["task mean"]["pruned"]["n"] == 4
    per_task = tmp_path / "per_task"
    main(["--metric", "acc", "--samples", f"dense={tmp_path / 't' / 'dense'}", "--out", str(per_task / "t2")])
    with pytest.raises(ValueError, match="repeats documents \\[0, 1, 2\\] of task 't'"):
        main(["--metric", "acc", "--samples", f"dense={per_task}/*.json:dense", "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="no report matches"):
        main(["--metric", "acc", "--samples", f"dense={tmp_path}/none/*.json:dense", "--out", str(tmp_path / "x")])


def test_reports_of_chunks_of_one_task_merge_by_document(tmp_path):
    """A long task run in chunks of documents (one report per chunk, over several sessions) gives the
    statistics of the whole run read at once."""
    dense = {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0}
    pruned = {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    write_samples(tmp_path / "dense", "t", dense, "acc")
    write_samples(tmp_path / "pruned", "t", pruned, "acc")
    for first, ids in [(0, [0, 1]), (2, [2, 3, 4])]:
        write_samples(tmp_path / f"d{first}", "t", {d: dense[d] for d in ids}, "acc")
        write_samples(tmp_path / f"p{first}", "t", {d: pruned[d] for d in ids}, "acc")
        main(["--metric", "acc", "--samples", f"dense={tmp_path / f'd{first}'}", f"pruned={tmp_path / f'p{first}'}",
              "--out", str(tmp_path / "chunks" / f"t_{first}")])  # fmt: skip
    whole = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"pruned={tmp_path / 'pruned'}",
                  "--out", str(tmp_path / "whole")])  # fmt: skip
    merged = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'chunks'}/*.json:dense",
                   f"pruned={tmp_path / 'chunks'}/*.json:pruned", "--out", str(tmp_path / "merged")])  # fmt: skip
    assert merged["tasks"] == whole["tasks"] and merged["tasks"]["t"]["pruned"]["n"] == 5


def test_fill_completes_a_policy_run_with_the_reference_values_and_counts_them(tmp_path):
    """--fill default=dense: a default-policy run of the one document it prunes, completed by dense's values
    elsewhere (a task it did not run included), gives the hand-computed Δ; the filled documents are counted."""
    write_samples(tmp_path / "dense", "t", {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}, "acc")
    write_samples(tmp_path / "dense", "u", {0: 1.0, 1: 1.0}, "acc")
    write_samples(tmp_path / "default", "t", {1: 1.0}, "acc")
    report = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"default={tmp_path / 'default'}",
                   "--fill", "default=dense", "--out", str(tmp_path / "r")])  # fmt: skip
    assert report["filled"] == {"default": {"from": "dense", "tasks": {"t": 3, "u": 2}}}
    assert report["tasks"]["t"]["default"]["diff"] == pytest.approx(0.25)  # doc 1: 0 -> 1, docs 0, 2, 3 as dense
    assert report["tasks"]["u"]["default"]["diff"] == 0.0 and report["tasks"]["u"]["default"]["n"] == 2
    assert report["tasks"][TASK_MEAN]["default"]["diff"] == pytest.approx(0.125)
    assert report["documents"]["default"]["t"]["0"] == [1.0, "h0"]
    assert "Filled: `default` takes `dense`'s value on the documents it did not run: t 3, u 2." in (
        (tmp_path / "r.md").read_text()
    )
    without = main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"default={tmp_path / 'default'}",
                    "--out", str(tmp_path / "w")])  # fmt: skip
    assert without["tasks"]["t"]["default"]["n"] == 1 and "default" not in without["tasks"].get("u", {})
    for bad in ("default=default", "default=nobody", "default"):
        with pytest.raises(SystemExit):
            main(["--metric", "acc", "--samples", f"dense={tmp_path / 'dense'}", f"default={tmp_path / 'default'}",
                  "--fill", bad, "--out", str(tmp_path / "x")])  # fmt: skip
