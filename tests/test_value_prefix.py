"""RULER value-prefix diagnostic: hand-computed prefixes on hand-made logged samples."""

from __future__ import annotations

import json

import pytest

from sdtp_eval.retention.value_prefix import main, matched_prefix


def test_matched_prefix_by_hand():
    assert matched_prefix("8812345", "The value is 8812345.") == 7
    assert matched_prefix("8812345", "The value is 8819999.") == 3
    assert matched_prefix("8812345", "no number") == 0
    assert matched_prefix("A1b2-C3", "a1B2-x") == 5  # case-insensitive, as RULER compares
    assert matched_prefix("", "anything") == 0


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def test_report_counts_complete_found_and_prefix(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"doc": {"outputs": ["1234567"]}, "filtered_resps": ["1234567"]},  # complete
        {"doc": {"outputs": ["1234567"]}, "filtered_resps": ["12999"]},  # right needle, tail lost: 2 chars
        {"doc": {"outputs": ["1234567"]}, "filtered_resps": ["7654320"]},  # wrong needle: no "1", 0 chars
        {"doc": {"outputs": ["abcdef"]}, "resps": [["ABCdxx"]]},  # 4 of 6, read from resps when unfiltered
    ]
    _write(run / "samples_niah_multikey_2_2026-01-01T00-00-00.jsonl", rows)
    _write(run / "samples_ruler_cwe_2026-01-01T00-00-00.jsonl", [{"doc": {"outputs": ["w"]}, "resps": [["w"]]}])
    report = main(["--samples", f"x={run}", "--out", str(tmp_path / "out")])
    s = report["runs"]["x"]["niah_multikey_2"]
    assert list(report["runs"]["x"]) == ["niah_multikey_2"]  # only needle tasks
    assert s["values"] == 4
    assert s["complete"] == pytest.approx(1 / 4)
    assert s["found"] == pytest.approx(3 / 4)
    assert s["mean_prefix_chars"] == pytest.approx((7 + 2 + 0 + 4) / 4)
    assert s["mean_prefix_fraction"] == pytest.approx((1 + 2 / 7 + 0 + 4 / 6) / 4)
    assert json.loads((tmp_path / "out.json").read_text())["runs"] == report["runs"]
    assert "| x | niah_multikey_2 | 4 | 0.25 | 0.75 | 3.2 of 6.8 |" in (tmp_path / "out.md").read_text()


def test_a_run_without_needle_samples_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples_niah_"):
        main(["--samples", f"x={tmp_path}", "--out", str(tmp_path / "out")])
    _write(
        tmp_path / "samples_niah_single_1_2026-01-01T00-00-00.jsonl", [{"doc": {"input": "no gold"}, "resps": [["a"]]}]
    )
    with pytest.raises(ValueError, match="no RULER needle samples"):
        main(["--samples", f"x={tmp_path}", "--out", str(tmp_path / "out")])
