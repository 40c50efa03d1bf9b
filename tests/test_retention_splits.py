"""Dev and test splits: disjoint, the sizes the docs promise, and every test document present in the data."""

from __future__ import annotations

import json

import pytest

from sdtp_eval.retention.splits import SUITES, TABLE3_DOCS, main, overlap, split_samples


@pytest.mark.parametrize("suite", SUITES)
def test_dev_and_test_are_disjoint_and_nonempty(suite):
    dev, test = split_samples(suite, "dev"), split_samples(suite, "test")
    assert overlap(suite) == {}
    assert all(docs for docs in dev.values()) and all(docs for docs in test.values())
    for docs in (*dev.values(), *test.values()):
        assert docs == sorted(set(docs)) and docs[0] >= 0


def test_sizes_match_the_documented_splits():
    assert {t: len(d) for t, d in split_samples("ruler", "test").items()} == dict.fromkeys(
        split_samples("ruler", "dev"), 20
    )
    assert max(max(d) for d in split_samples("ruler", "test").values()) < 500  # upstream generates 500 a length
    assert len(split_samples("needle2k", "test")["sdtp_needle_depth_2k"]) == 55
    assert max(split_samples("needle2k", "test")["sdtp_needle_depth_2k"]) < 220  # 20 items x 11 depths
    assert len(split_samples("needle4k", "dev")["sdtp_needle_depth_4k"]) == 33
    assert sum(map(len, split_samples("lbgen", "dev").values())) == 158  # the dev runs' documents (--limit 30)
    test = split_samples("lbgen", "test")
    assert len(test) >= 6 and all(len(d) == 30 for d in test.values())
    assert sum(map(len, split_samples("nll", "dev").values())) == 87  # sets 1 and 2: 46 + 41 answers
    t3 = split_samples("table3", "test")
    assert set(t3) == set(TABLE3_DOCS) and all(max(d) < TABLE3_DOCS[t] and d[0] % 2 for t, d in t3.items())
    with pytest.raises(ValueError, match="unknown suite"):
        split_samples("squad", "dev")
    with pytest.raises(ValueError, match="dev or test"):
        split_samples("ruler", "train")


@pytest.mark.shared_data
def test_every_longbench_test_row_exists_in_the_local_release(data_dir):
    for suite in ("lbgen", "nll"):
        for task, docs in split_samples(suite, "test").items():
            name = task.removeprefix("longbench_nll_").removeprefix("longbench_")
            path = data_dir / ("longbench_e" if name.endswith("_e") else "longbench") / f"{name}.jsonl"
            rows = sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
            assert max(docs) < rows, (task, rows)


def test_command_writes_lm_eval_samples_json(tmp_path, capsys):
    out = tmp_path / "s" / "ruler.json"
    main(["ruler", "test", "--out", str(out), "--tasks"])
    assert json.loads(out.read_text()) == split_samples("ruler", "test")
    assert capsys.readouterr().out.strip() == ",".join(split_samples("ruler", "test"))
    main(["table3", "dev", "--out", str(out), "--first", "3"])
    assert json.loads(out.read_text())["cb"] == [0, 2, 4]  # the first three even documents
    with pytest.raises(SystemExit):
        main(["table3", "dev", "--out", str(out), "--first", "0"])
