"""The accuracy-against-cost table (sdtp_eval.peers.tradeoff) against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtp_eval.peers.tradeoff import main
from sdtp_eval.retention import paired


def write_run(directory: Path, task: str, scores: dict[int, float], records: dict[int, list[dict]] | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"doc_id": d, "score": v, "doc_hash": f"h{task}{d}", **({"sdtp": records[d]} if records else {})}
        for d, v in scores.items()
    ]
    (directory / f"samples_{task}_2026-12-05T00-00-00.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def method(prefill, decode, e2e):
    return {"prefill_speedup": prefill, "decode_speedup": decode, "e2e_speedup": e2e, "nll": 0.0}


def speed_report(path: Path) -> Path:
    summary = {
        "1024": {"dense": method(1, 1, 1), "sdtp": method(9, 9, 9)},
        "2048": {"dense": method(1, 1, 1), "sdtp": method(1.6, 1.1, 1.4), "snapkv": method(1.0, 1.2, 1.05)},
    }
    path.write_text(json.dumps({"command": "python -m sdtp_eval.peers.long_text ...", "summary": summary}))
    return path


def test_scores_records_and_speed_join_by_label(tmp_path):
    for task, dense, sdtp in [("a", {0: 1.0, 1: 0.5}, {0: 0.5, 1: 0.5}), ("b", {0: 0.2}, {0: 0.4})]:
        write_run(tmp_path / "dense", task, dense)
        # two requests pruned at 1/τ 1.5 and 2.0: KV kept is 1/τ per request, averaged (2/3 + 1/2) / 2
        recs = {d: [{"prompt_tokens": 100, "compression": 1.5 if d == 0 else 2.0}] for d in sdtp}
        write_run(tmp_path / "sdtp", task, sdtp, recs)
        # a press alone: 1/τ 1, 60 of 100 entries per layer
        recs = {d: [{"prompt_tokens": 100, "compression": 1.0, "kv_entries_per_layer": 60}] for d in sdtp}
        write_run(tmp_path / "snapkv", task, sdtp, recs)
    # LLMLingua on fewer documents (paired on the ones it has): 200 -> 80 and 200 -> 100 tokens, prefilled
    # dense: 1/τ (2.5 + 2) / 2, KV kept (0.4 + 0.5) / 2, 3 and 5 compressor seconds
    lingua = {"compressor": "llmlingua", "compressor_tokens_before": 200}
    write_run(
        tmp_path / "lingua", "a", {1: 0.25}, {1: [lingua | {"compressor_seconds": 3.0, "compressor_tokens_after": 80}]}
    )
    write_run(
        tmp_path / "lingua", "b", {0: 0.1}, {0: [lingua | {"compressor_seconds": 5.0, "compressor_tokens_after": 100}]}
    )
    runs = [f"{n}={tmp_path / n}" for n in ("dense", "sdtp", "snapkv", "lingua")]
    paired.main(["--metric", "score", "--samples", *runs, "--out", str(tmp_path / "scores")])
    # a second speed report (its own dense): it adds lingua; sdtp's speed-ups stay those of the first report
    second = {"2048": {"dense": method(1, 1, 1), "sdtp": method(7, 7, 7), "lingua": method(0.7, 1.0, 0.8)}}
    (tmp_path / "speed2.json").write_text(
        json.dumps({"command": "python -m sdtp_eval.peers.long_text --llmlingua 0.65", "summary": second})
    )
    report = main(
        [
            "--scores", str(tmp_path / "scores.json"),
            "--speed", str(speed_report(tmp_path / "speed.json")), str(tmp_path / "speed2.json"),
            "--records", f"sdtp={tmp_path / 'sdtp'}", f"snapkv={tmp_path / 'snapkv'}", f"lingua={tmp_path / 'lingua'}",
            "--out", str(tmp_path / "t"),
        ]
    )  # fmt: skip
    dense, sdtp, snapkv, lingua = report["rows"]
    assert report["length"] == 2048  # the longest length by default
    # task means: dense (0.75 + 0.2) / 2 = 0.475, sdtp (0.5 + 0.4) / 2 = 0.45
    assert dense["score"] == pytest.approx(0.475) and dense["compression"] == 1.0 and dense["kv_kept"] == 1.0
    assert sdtp["score"] == pytest.approx(0.45) and sdtp["diff"] == pytest.approx(-0.025)
    assert sdtp["requests"] == 3 and sdtp["compression"] == pytest.approx((1.5 + 2.0 + 1.5) / 3)
    assert sdtp["kv_kept"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert sdtp["e2e_speedup"] == 1.4 and sdtp["prefill_speedup"] == 1.6
    assert snapkv["kv_kept"] == pytest.approx(0.6) and snapkv["compression"] == 1.0
    assert "compressor_seconds" not in snapkv and snapkv["decode_speedup"] == 1.2
    assert lingua["requests"] == 2 and lingua["compression"] == pytest.approx(2.25)
    assert lingua["kv_kept"] == pytest.approx(0.45) and lingua["compressor_seconds"] == pytest.approx(4.0)
    # lingua: docs a/1 and b/0 only; dense on them (0.5 + 0.2) / 2; speed from the second report only
    assert lingua["documents"] == 2 and lingua["score"] == pytest.approx(0.175)
    assert lingua["reference_score"] == pytest.approx(0.35) and lingua["e2e_speedup"] == 0.8
    assert dense["reference_score"] == pytest.approx(0.475)
    md = (tmp_path / "t.md").read_text()
    assert "| sdtp | 3 | 0.4500 | 0.4750 | -0.0250" in md and "| 1.40 |" in md
    assert md.count("python -m sdtp_eval.peers.long_text") == 2
    assert (tmp_path / "t.png").stat().st_size > 1000

    # the runs' outputs gone: their records come from the rows of the earlier report, unchanged
    again = main(
        ["--scores", str(tmp_path / "scores.json"), "--records", f"sdtp={tmp_path / 't.json'}:sdtp",
         f"lingua={tmp_path / 't.json'}:lingua", "--out", str(tmp_path / "v")]
    )  # fmt: skip
    keys = ("requests", "compression", "kv_kept", "compressor_seconds")
    assert {k: again["rows"][1][k] for k in keys[:3]} == {k: sdtp[k] for k in keys[:3]}
    assert {k: again["rows"][3][k] for k in keys} == {k: lingua[k] for k in keys}
    with pytest.raises(ValueError, match="has no method 'nope'"):
        main(["--scores", str(tmp_path / "scores.json"), "--records", f"sdtp={tmp_path / 't.json'}:nope",
              "--out", str(tmp_path / "w")])  # fmt: skip

    # no speed report: the speed cells stay empty rather than estimated
    report = main(["--scores", str(tmp_path / "scores.json"), "--out", str(tmp_path / "u")])
    assert "e2e_speedup" not in report["rows"][1] and "| — |" in (tmp_path / "u.md").read_text()


def test_bad_input_is_named(tmp_path):
    write_run(tmp_path / "dense", "a", {0: 1.0})
    write_run(tmp_path / "dense", "b", {0: 1.0})
    write_run(tmp_path / "x", "a", {0: 1.0})
    write_run(tmp_path / "x", "b", {0: 1.0})
    paired.main(["--metric", "score", "--samples", f"dense={tmp_path / 'dense'}", f"x={tmp_path / 'x'}",
                 "--out", str(tmp_path / "scores")])  # fmt: skip
    scores = str(tmp_path / "scores.json")
    with pytest.raises(SystemExit):  # a length the speed report does not have
        main(["--scores", scores, "--speed", str(speed_report(tmp_path / "s.json")), "--length", "4096",
              "--out", str(tmp_path / "o")])  # fmt: skip
    with pytest.raises(SystemExit):  # records for a run the scores do not have
        main(["--scores", scores, "--records", f"y={tmp_path / 'x'}", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no sample .* carries sdtp request records"):
        main(["--scores", scores, "--records", f"x={tmp_path / 'x'}", "--out", str(tmp_path / "o")])


def test_a_compressed_and_pruned_request_counts_from_the_uncompressed_prompt():
    from sdtp_eval.peers.tradeoff import _request

    lingua = {"compressor_seconds": 2.0, "compressor_tokens_before": 200, "compressor_tokens_after": 98}
    # LLMLingua 200 -> 98 tokens, the chat template makes it 100, pruning at 1/τ 2 processes 50 per layer
    row = _request({"prompt_tokens": 100, "compression": 2.0}, lingua)
    assert row == {"compression": 4.0, "kv_kept": 0.25, "compressor_seconds": 2.0}
    # a press after the pruned prefill: its cache, over the uncompressed prompt
    row = _request({"prompt_tokens": 100, "compression": 2.0, "kv_entries_per_layer": 25}, None)
    assert row == {"compression": 2.0, "kv_kept": 0.25}
