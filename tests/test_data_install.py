"""``python -m sdtp_eval.data install``: the real release files become what lm-eval's upstream tasks load offline.

The real data come from the ``data_dir`` fixture (``$SDTP_DATA_DIR``). Everything is installed once per module
into temporary caches; one subprocess then loads the datasets and the upstream lm-eval tasks with
``HF_HUB_OFFLINE=1`` so the checks prove that ``datasets``/lm-eval themselves read the materialised data.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sdtp_eval import data as cli
from sdtp_eval.datasets.longbench import plan as longbench_plan

# (repo, config) -> {split: official row count}; "train" of boolq/piqa/mathqa is the validation stand-in.
OFFICIAL = {
    ("aps/super_glue", "copa"): {"train": 400, "validation": 100},
    ("aps/super_glue", "boolq"): {"validation": 3270, "train": 3270},
    ("aps/super_glue", "cb"): {"train": 250, "validation": 56},
    ("aps/super_glue", "wic"): {"train": 5428, "validation": 638},
    ("aps/super_glue", "wsc.fixed"): {"train": 554, "validation": 104},
    ("baber/piqa", None): {"validation": 1838, "train": 1838},
    ("allenai/winogrande", "winogrande_xl"): {"train": 40398, "validation": 1267},
    ("regisss/math_qa", None): {"validation": 4475, "test": 2985, "train": 4475},
}
TASKS = ["copa", "piqa", "winogrande", "boolq", "cb", "wic", "wsc", "mathqa"]

PROBE = r"""
import json, sys
import datasets
from lm_eval.tasks import TaskManager

out = {"datasets": {}, "tasks": {}}
for repo, config in json.loads(sys.argv[1]):
    ds = datasets.load_dataset(repo, config)
    out["datasets"][f"{repo}|{config}"] = {
        "counts": {split: ds[split].num_rows for split in ds},
        "features": {split: ds[split].features.to_dict() for split in ds},
        "rows": {split: ds[split].select(range(6)).to_list() for split in ds},
    }
tasks = TaskManager().load(json.loads(sys.argv[2]))["tasks"]
for name, task in tasks.items():
    docs = list(task.eval_docs)
    probe = []
    for doc in docs[:2]:
        shots = task.fewshot_context(doc, 5)
        probe.append({"text": task.doc_to_text(doc), "target": task.doc_to_target(doc),
                      "choices": task.doc_to_choice(doc), "five_shot_chars": len(shots) if isinstance(shots, str)
                      else len(shots[0])})
    out["tasks"][name] = {"n_eval": len(docs), "docs": probe}
print("PROBE-JSON " + json.dumps(out, default=str))
"""


@dataclass
class Installed:
    """The outcome of installing the real data once into temporary locations."""

    source: Path
    cache: Path
    home: Path
    report: cli.Report
    log: str
    probe: dict[str, Any]

    def dataset(self, repo: str, config: str | None) -> dict[str, Any]:
        return self.probe["datasets"][f"{repo}|{config}"]

    def task(self, name: str) -> dict[str, Any]:
        return self.probe["tasks"][name]


@pytest.fixture(scope="module")
def _memo() -> dict[str, Installed]:
    return {}


@pytest.fixture
def installed(data_dir: Path, _memo: dict[str, Installed], tmp_path_factory, monkeypatch) -> Installed:
    """Install the real data (once per module) into temp caches and probe them through datasets and lm-eval."""
    if "real" not in _memo:
        base = tmp_path_factory.mktemp("installed")
        cache, home = base / "hf_datasets", base / "sdtp_home"
        monkeypatch.setenv("SDTP_DATA_HOME", str(home))
        out = io.StringIO()
        report = cli.run_install(data_dir, cache=cache, out=out)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(base / "hf_home"),
            "HF_DATASETS_CACHE": str(cache),
        }
        pairs = json.dumps([list(key) for key in OFFICIAL])
        result = subprocess.run(
            [sys.executable, "-c", PROBE, pairs, json.dumps(TASKS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE-JSON ")]
        assert result.returncode == 0 and lines, result.stderr[-3000:]
        probe = json.loads(lines[-1].removeprefix("PROBE-JSON "))
        _memo["real"] = Installed(data_dir, cache, home, report, out.getvalue(), probe)
    monkeypatch.setenv("SDTP_DATA_HOME", str(_memo["real"].home))
    return _memo["real"]


# --- counts, fields and label encodings -------------------------------------------------------------------


def test_install_reports_everything_installed(installed: Installed) -> None:
    assert installed.report.errors == []
    assert len([line for line in installed.report.installed if "longbench" not in line]) == len(OFFICIAL)
    assert "train: STAND-IN, a copy of validation" in installed.log  # boolq/piqa/mathqa say so clearly
    for name in ("boolq", "piqa", "mathqa"):
        assert f"the {'BoolQ' if name == 'boolq' else 'PIQA' if name == 'piqa' else 'MathQA'} training split" in (
            installed.log
        )


@pytest.mark.parametrize(("repo", "config"), list(OFFICIAL))
def test_official_split_sizes(installed: Installed, repo: str, config: str | None) -> None:
    assert installed.dataset(repo, config)["counts"] == OFFICIAL[(repo, config)]


def test_standin_train_is_the_validation_split(installed: Installed) -> None:
    piqa = installed.dataset("baber/piqa", None)["rows"]
    assert piqa["train"] == piqa["validation"]
    mathqa = installed.dataset("regisss/math_qa", None)["rows"]
    assert mathqa["train"] == mathqa["validation"] != mathqa["test"]


def test_superglue_fields_and_labels(installed: Installed) -> None:
    copa = installed.dataset("aps/super_glue", "copa")
    assert list(copa["features"]["validation"]) == ["premise", "choice1", "choice2", "question", "idx", "label"]
    assert copa["features"]["validation"]["label"]["names"] == ["choice1", "choice2"]
    assert copa["features"]["validation"]["idx"]["dtype"] == "int32"
    first = copa["rows"]["validation"][0]
    assert first["premise"] == "The man turned on the faucet." and first["label"] == 1 and first["idx"] == 0

    cb = installed.dataset("aps/super_glue", "cb")
    assert cb["features"]["validation"]["label"]["names"] == ["entailment", "contradiction", "neutral"]
    assert [row["label"] for row in cb["rows"]["validation"][:2]] == [1, 2]  # contradiction, neutral
    assert cb["rows"]["train"][0]["label"] == 0  # entailment

    boolq = installed.dataset("aps/super_glue", "boolq")["rows"]["validation"]
    assert list(boolq[0]) == ["question", "passage", "idx", "label"]
    assert [row["label"] for row in boolq[:3]] == [0, 1, 1]  # false, true, true in the release

    wic = installed.dataset("aps/super_glue", "wic")
    assert list(wic["features"]["validation"]) == [
        "word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx", "label",
    ]  # fmt: skip
    row = wic["rows"]["validation"][0]
    assert row["label"] == 0 and row["sentence1"][row["start1"] : row["end1"]] == "class" and "version" not in row

    wsc = installed.dataset("aps/super_glue", "wsc.fixed")
    assert list(wsc["features"]["validation"]) == [
        "text", "span1_index", "span2_index", "span1_text", "span2_text", "idx", "label",
    ]  # fmt: skip
    fixed = wsc["rows"]["validation"][5]  # the release says "The table"; wsc.fixed makes it a substring
    assert fixed["span1_text"] == "the table" and fixed["span1_text"] in fixed["text"] and fixed["label"] == 1


def test_piqa_winogrande_mathqa_fields(installed: Installed) -> None:
    piqa = installed.dataset("baber/piqa", None)
    assert piqa["features"]["validation"]["label"]["names"] == ["0", "1"]
    assert [row["label"] for row in piqa["rows"]["validation"][:3]] == [0, 1, 1]  # valid-labels.lst
    assert list(piqa["rows"]["validation"][0]) == ["goal", "sol1", "sol2", "label"]

    wino = installed.dataset("allenai/winogrande", "winogrande_xl")
    first = wino["rows"]["validation"][0]
    assert first == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    assert {row["answer"] for row in wino["rows"]["train"]} <= {"1", "2"}

    mathqa = installed.dataset("regisss/math_qa", None)
    assert list(mathqa["features"]["test"]) == [
        "Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category",
    ]  # fmt: skip
    assert mathqa["rows"]["test"][0]["correct"] == "a" and mathqa["rows"]["test"][0]["category"] == "gain"


# --- through the upstream lm-eval tasks (HF_HUB_OFFLINE=1) -------------------------------------------------


def test_lm_eval_tasks_read_the_installed_data(installed: Installed) -> None:
    expected_eval = {
        "copa": 100, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
        "cb": 56, "wic": 638, "wsc": 104, "mathqa": 2985,
    }  # fmt: skip
    assert {name: installed.task(name)["n_eval"] for name in TASKS} == expected_eval
    for name in TASKS:  # 5-shot contexts build for every task, including those with a stand-in train split
        assert all(doc["five_shot_chars"] > len(str(doc["text"])) for doc in installed.task(name)["docs"]), name


def test_lm_eval_documents_by_hand(installed: Installed) -> None:
    copa = installed.task("copa")["docs"][0]
    assert copa["text"] == "The man turned on the faucet therefore"
    assert copa["target"] == " water flowed from the spout."

    cb = installed.task("cb")["docs"][0]
    assert cb["choices"][cb["target"]] == "False"  # the release label is "contradiction"

    wino = installed.task("winogrande")["docs"][0]  # answer "2": Maria
    assert wino["choices"][wino["text"]].endswith("so Maria") and wino["target"] == "always got the easier cases."

    mathqa = installed.task("mathqa")["docs"][0]
    assert mathqa["target"] == 0 and mathqa["choices"] == ["38", "27.675", "30", "data inadequate", "none of these"]

    piqa = installed.task("piqa")["docs"]
    assert [doc["target"] for doc in piqa] == [0, 1]
    assert piqa[0]["text"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"

    boolq = installed.task("boolq")["docs"]
    assert [doc["choices"][doc["target"]] for doc in boolq] == ["no", "yes"]
    assert boolq[0]["text"].endswith("Question: does ethanol take more energy make that produces?\nAnswer:")

    wic = installed.task("wic")["docs"][0]
    assert "Is the word 'class' used" in wic["text"] and wic["target"] == 0

    wsc = installed.task("wsc")["docs"][0]
    assert "*him*" in wsc["text"] and wsc["target"] == 0


# --- idempotence, LongBench, errors ------------------------------------------------------------------------


def test_second_install_skips_everything(installed: Installed) -> None:
    before = sorted(path.stat().st_mtime_ns for path in installed.cache.rglob("*.arrow"))
    out = io.StringIO()
    report = cli.run_install(installed.source, cache=installed.cache, out=out)
    assert report.installed == [] and report.errors == []
    assert len(report.skipped) == len(OFFICIAL) + len(longbench_plan(installed.source))
    assert all(line.endswith("already installed and unchanged") for line in report.skipped)
    assert sorted(path.stat().st_mtime_ns for path in installed.cache.rglob("*.arrow")) == before


def test_longbench_copies_are_byte_identical(installed: Installed) -> None:
    copies = longbench_plan(installed.source)
    assert {copy.dataset for copy in copies} >= {"multi_news", "qasper", "narrativeqa", "trec_e", "repobench-p_e"}
    for copy in copies:
        assert copy.destination.is_relative_to(installed.home)
        assert copy.destination.read_bytes() == copy.source.read_bytes(), copy.dataset
    assert b"\r\n" in (installed.home / "longbench" / "multi_news.jsonl").read_bytes()  # CRLF kept


def _copy_release(data_dir: Path, tmp_path: Path, *names: str) -> Path:
    source = tmp_path / "release"
    for name in names:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / name, target)
    return source


def test_corrupt_json_line_is_a_clear_error(data_dir: Path, tmp_path: Path, capsys) -> None:
    source = _copy_release(data_dir, tmp_path, "copa/train.jsonl", "copa/val.jsonl")
    lines = (source / "copa/val.jsonl").read_text().splitlines(keepends=True)
    lines[41] = lines[41][:30] + "\n"
    (source / "copa/val.jsonl").write_text("".join(lines))
    cache = tmp_path / "cache"
    code = cli.main(["install", "--from", str(source), "--cache-dir", str(cache), "--only", "copa"])
    output = capsys.readouterr().out
    assert code == 1
    assert f"{source / 'copa/val.jsonl'}: line 42 is not valid JSON" in output
    assert not list(cache.rglob("*.arrow")) and not list(cache.rglob(".sdtp-tmp-*"))  # nothing half-written


def test_unknown_label_and_short_file_are_errors(data_dir: Path, tmp_path: Path) -> None:
    source = _copy_release(data_dir, tmp_path, "superglue/cb/train.jsonl", "superglue/cb/val.jsonl")
    val = source / "superglue/cb/val.jsonl"
    val.write_text(val.read_text().replace('"label": "neutral"', '"label": "maybe"', 1))
    report = cli.run_install(source, cache=tmp_path / "cache", only=["cb"], out=io.StringIO())
    assert len(report.errors) == 1 and f"{val}: record 2 has label 'maybe'" in report.errors[0]

    val.write_text("".join((data_dir / "superglue/cb/val.jsonl").read_text().splitlines(keepends=True)[:50]))
    report = cli.run_install(source, cache=tmp_path / "cache", only=["cb"], out=io.StringIO())
    assert len(report.errors) == 1 and "50 rows, the official validation split has 56" in report.errors[0]


def test_missing_directory_is_a_clear_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-release"
    assert cli.main(["install", "--from", str(missing), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"source directory {missing} does not exist" in capsys.readouterr().err


def test_missing_files_are_skipped_with_reasons(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SDTP_DATA_HOME", str(tmp_path / "home"))
    source = _copy_release(data_dir, tmp_path, "copa/val.jsonl", "superglue/cb/train.jsonl")
    out = io.StringIO()
    report = cli.run_install(source, cache=tmp_path / "cache", only=["copa", "cb", "longbench"], out=out)
    assert report.errors == []
    assert report.installed == ["copa (aps/super_glue, copa): train 100, validation 100"]  # train stands in
    assert f"cb (aps/super_glue, cb): missing source file {source / 'superglue/cb/val.jsonl'}" in report.skipped
    assert any(line.startswith("longbench: missing source files") for line in report.skipped)
    assert f"source file {source / 'copa/train.jsonl'} is missing" in out.getvalue()


def test_dry_run_writes_nothing(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SDTP_DATA_HOME", str(tmp_path / "home"))
    report = cli.run_install(
        data_dir, cache=tmp_path / "cache", only=["cb", "longbench"], dry_run=True, out=io.StringIO()
    )
    assert report.errors == [] and report.installed[0].startswith("cb (aps/super_glue, cb): would install train 250")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.arrow"))
    assert not (tmp_path / "home").exists()


def test_a_hub_download_is_not_overwritten_without_force(data_dir: Path, tmp_path: Path) -> None:
    source = _copy_release(data_dir, tmp_path, "superglue/cb/train.jsonl", "superglue/cb/val.jsonl")
    hub_copy = tmp_path / "cache" / "aps___super_glue" / "cb" / "0.0.0" / "0123abcd"
    hub_copy.mkdir(parents=True)
    (hub_copy / "dataset_info.json").write_text(json.dumps({"config_name": "cb", "splits": {}}))
    report = cli.run_install(source, cache=tmp_path / "cache", only=["cb"], out=io.StringIO())
    assert report.installed == [] and "a copy downloaded from the Hub is already cached" in report.skipped[0]
    report = cli.run_install(source, cache=tmp_path / "cache", only=["cb"], force=True, out=io.StringIO())
    assert len(report.installed) == 1 and hub_copy.is_dir()  # installed next to it, the Hub copy is kept


def test_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["install", "--help"])
    text = capsys.readouterr().out
    for option in ("--from", "--cache-dir", "--data-home", "--only", "--dry-run", "--force"):
        assert option in text


def test_changed_source_replaces_the_previous_install(data_dir: Path, tmp_path: Path) -> None:
    source = _copy_release(data_dir, tmp_path, "superglue/cb/train.jsonl", "superglue/cb/val.jsonl")
    versions = tmp_path / "cache" / "aps___super_glue" / "cb" / "0.0.0"
    cli.run_install(source, cache=tmp_path / "cache", only=["cb"], out=io.StringIO())
    first = [path.name for path in versions.iterdir()]
    with (source / "superglue/cb/val.jsonl").open("a") as handle:
        handle.write("\n")  # same rows, different bytes: rebuilt, and the old copy removed
    report = cli.run_install(source, cache=tmp_path / "cache", only=["cb"], out=io.StringIO())
    second = [path.name for path in versions.iterdir()]
    assert len(report.installed) == 1 and len(first) == len(second) == 1 and first != second
