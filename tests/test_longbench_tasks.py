"""LongBench lm-eval tasks: names, official prompts and lengths, groups, data loading, LongBench-E buckets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sdtp_eval import tasks_dir
from sdtp_eval.longbench import DATASETS, E_DATASETS, PAPER14, length_bucket, uses_chat_template
from sdtp_eval.longbench.generate_tasks import write_all
from sdtp_eval.longbench.tasks import load_dataset, percent_mean, process_results, read_jsonl

TASK_DIR = tasks_dir() / "longbench"

# Official lists, typed from THUDM/LongBench pred.py and eval.py (v1), independently of spec.py.
OFFICIAL_E = [
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]  # fmt: skip
OFFICIAL_NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
OFFICIAL_METRIC = {
    "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score", "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score", "dureader": "rouge_zh_score", "gov_report": "rouge_score", "qmsum": "rouge_score",
    "multi_news": "rouge_score", "vcsum": "rouge_zh_score", "trec": "classification_score",
    "triviaqa": "qa_f1_score", "samsum": "rouge_score", "lsht": "classification_score",
    "passage_retrieval_en": "retrieval_score", "passage_count": "count_score",
    "passage_retrieval_zh": "retrieval_zh_score", "lcc": "code_sim_score", "repobench-p": "code_sim_score",
}  # fmt: skip
CATEGORY_MEMBERS = {
    "longbench_single": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "longbench_multi": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "longbench_summarization": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "longbench_fewshot": ["trec", "triviaqa", "samsum", "lsht"],
    "longbench_synthetic": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "longbench_code": ["lcc", "repobench-p"],
}
ALL_TASKS = [f"longbench_{d}" for d in DATASETS] + [f"longbench_{d}_e" for d in OFFICIAL_E]


@pytest.fixture(scope="module")
def task_manager():
    """One lm-eval TaskManager for the module (indexing every built-in task takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_config(name: str) -> dict:
    """A task YAML merged with its include, loaded by lm-eval's own loader (functions resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(TASK_DIR / (name.removeprefix("longbench_") + ".yaml"))


def group_config(name: str) -> dict:
    return yaml.safe_load((TASK_DIR / f"_{name}.yaml").read_text(encoding="utf-8"))


def fake_doc(dataset: str) -> dict:
    """A row with markup-like text that a wrong template engine would mangle."""
    return {
        "input": "Q: {input} {{x}} {% raw %} 问题？\n",
        "context": "ctx {context} }} {# not a comment #}\n\n\tend ",
        "answers": ["a"],
        "length": 10,
        "dataset": dataset,
        "language": "en",
        "all_classes": None,
        "_id": "0",
    }


# ------------------------------------------------------------------------------------------ names and flags


def test_dataset_lists_match_official():
    assert set(DATASETS) == set(OFFICIAL_METRIC)
    assert list(E_DATASETS) == OFFICIAL_E
    assert {d: s.metric for d, s in DATASETS.items()} == OFFICIAL_METRIC
    assert len(PAPER14) == 14 and "passage_count" not in PAPER14 and "passage_retrieval_en" not in PAPER14
    assert all(DATASETS[d].language == "en" for d in PAPER14)


def test_uses_chat_template_follows_pred_py():
    for name in ALL_TASKS:
        dataset = name.removeprefix("longbench_")
        dataset = dataset.removesuffix("_e") if name.endswith("_e") else dataset
        assert uses_chat_template(name) is (dataset not in OFFICIAL_NO_CHAT), name
    assert uses_chat_template("longbench_passage_retrieval_en") is True  # '_en' is not the '_e' suffix
    with pytest.raises(ValueError):
        uses_chat_template("copa")
    with pytest.raises(ValueError):
        uses_chat_template("longbench_narrativeqa_e")  # narrativeqa has no LongBench-E variant
    assert uses_chat_template("piqa", default=True) is True


def test_every_task_has_a_yaml_with_official_flags():
    stems = {p.stem for p in TASK_DIR.glob("*.yaml") if not p.name.startswith("_")}
    assert stems == {name.removeprefix("longbench_") for name in ALL_TASKS}
    for name in ALL_TASKS:
        cfg = task_config(name)
        assert cfg["task"] == name
        assert cfg["metadata"]["longbench_chat_template"] is uses_chat_template(name)
        gen = cfg["generation_kwargs"]
        assert gen["do_sample"] is False and gen["temperature"] == 0
        dataset = cfg["dataset_kwargs"]["longbench_dataset"].removesuffix("_e")
        assert gen["until"] == (["\n"] if dataset == "samsum" else [])
        assert callable(cfg["process_results"]) and callable(cfg["custom_dataset"])


# ------------------------------------------------------------------------------------------ official config


@pytest.fixture
def official_config(data_dir: Path) -> Path:
    return data_dir / "longbench" / "official_config"


def test_prompts_and_lengths_match_official_json(official_config: Path):
    from lm_eval.utils import apply_template

    prompts = json.loads((official_config / "dataset2prompt.json").read_text(encoding="utf-8"))
    maxlens = json.loads((official_config / "dataset2maxlen.json").read_text(encoding="utf-8"))
    assert set(prompts) == set(DATASETS) == set(maxlens)
    for name in ALL_TASKS:
        cfg = task_config(name)
        dataset = cfg["dataset_kwargs"]["longbench_dataset"]
        base = dataset.removesuffix("_e") if name.endswith("_e") else dataset
        doc = fake_doc(dataset)
        assert apply_template(cfg["doc_to_text"], doc) == prompts[base].format(**doc), name
        assert cfg["generation_kwargs"]["max_gen_toks"] == maxlens[base], name


def test_committed_yamls_are_generated_from_official_config(official_config: Path, tmp_path: Path):
    written = write_all(official_config, tmp_path)
    assert len(written) == 1 + 34 + 17  # template, tasks, groups
    for path in written:
        committed = TASK_DIR / path.name
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), path.name


# ------------------------------------------------------------------------------------------ groups


def test_groups_have_official_members_and_task_weighting():
    for group, members in CATEGORY_MEMBERS.items():
        assert group_config(group)["task"] == [f"longbench_{d}" for d in members]
        e_members = [f"longbench_{d}_e" for d in members if d in OFFICIAL_E]
        assert group_config(f"{group}_e")["task"] == e_members
    assert sorted(group_config("longbench")["task"]) == sorted(f"longbench_{d}" for d in DATASETS)
    assert len(group_config("longbench_en")["task"]) == 16
    assert group_config("longbench_zh")["task"] == [
        f"longbench_{d}" for d in ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
    ]
    assert group_config("longbench_paper14")["task"] == [f"longbench_{d}" for d in PAPER14]
    assert group_config("longbench_e")["task"] == [f"longbench_{d}_e" for d in OFFICIAL_E]
    for path in TASK_DIR.glob("_*.yaml"):
        for agg in yaml.safe_load(path.read_text(encoding="utf-8"))["aggregate_metric_list"]:
            assert agg["weight_by_size"] is False, path.name


def _stub_task(name: str):
    """An lm-eval Task that only carries a name (enough for Group.aggregate)."""
    from lm_eval.api.task import Task

    stub = type("StubTask", (Task,), {"task_name": name})
    stub.__abstractmethods__ = frozenset()
    return object.__new__(stub)


def test_group_aggregation_is_the_unweighted_mean_of_task_scores():
    from lm_eval.api.group import Group

    cfg = group_config("longbench_code")
    group = Group.from_config(cfg)
    for name in cfg["task"]:
        group.add(_stub_task(name))
    table = {
        "longbench_lcc": {"score,none": 60.0, "score_stderr,none": "N/A", "sample_len": 500},
        "longbench_repobench-p": {"score,none": 50.0, "score_stderr,none": "N/A", "sample_len": 100},
    }
    # task-weighted: (60 + 50) / 2 = 55 (size-weighted would be (60*500 + 50*100) / 600 = 58.33)
    assert group.aggregate(table)["score,none"] == pytest.approx(55.0)

    cfg = group_config("longbench_zh")
    group = Group.from_config(cfg)
    for name in cfg["task"]:
        group.add(_stub_task(name))
    scores = [10.0, 20.5, 30.0, 40.25, 99.0]
    table = {
        name: {"score,none": s, "sample_len": 200 + 37 * i} for i, (name, s) in enumerate(zip(cfg["task"], scores))
    }
    assert group.aggregate(table)["score,none"] == pytest.approx(199.75 / 5)  # 39.95


def test_percent_mean_rounds_like_eval_py():
    assert percent_mean([1.0, 0.0, 0.5]) == 50.0
    assert percent_mean([1 / 3]) == 33.33
    assert percent_mean([0.123456]) == 12.35


# ------------------------------------------------------------------------------------------ data loading


@pytest.fixture
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    (home / "longbench").mkdir(parents=True)
    (home / "longbench_e").mkdir()
    monkeypatch.setenv("SDTP_DATA_HOME", str(home))
    return home


def test_read_jsonl_accepts_crlf(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": "x\\ny"}\r\n\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [{"a": "x\ny"}, {"a": 2}]


def test_offline_without_local_file_names_the_file_and_the_setting(data_home: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("gov_report")
    message = str(err.value)
    assert str(data_home / "longbench" / "gov_report.jsonl") in message
    assert "HF_HUB_OFFLINE" in message and "sdtp_eval.data install" in message and "SDTP_DATA_HOME" in message


def test_hub_fallback_loads_the_lm_eval_repository(data_home: Path, monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return [{"question": "q", "context": "c", "answers": ["a"], "length": 5, "all_classes": None}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_dataset("trec_e")["test"]
    assert calls == [("Xnhyacinth/LongBench", "trec_e", "test")]
    assert rows[0]["input"] == "q" and rows[0]["dataset"] == "trec_e"


@pytest.mark.shared_data
@pytest.mark.parametrize("dataset, rows", [("multi_news", 200), ("qasper", 13)])
def test_loads_real_local_jsonl(data_dir: Path, data_home: Path, monkeypatch, dataset: str, rows: int):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = data_dir / "longbench" / f"{dataset}.jsonl"
    shutil.copy(source, data_home / "longbench" / source.name)
    test = load_dataset(dataset, pretrained="ignored", version=1.0)["test"]
    assert len(test) == rows
    first = json.loads(source.read_text(encoding="utf-8").splitlines()[0])
    assert test[0]["input"] == first["input"] and test[0]["context"] == first["context"]
    assert test[0]["answers"] == first["answers"] and test[0]["dataset"] == dataset
    result = process_results(test[0], [first["answers"][0]])
    assert result == {"score": pytest.approx(1.0)}


@pytest.mark.shared_data
def test_task_builds_official_prompt_from_real_data(data_dir: Path, data_home: Path, monkeypatch, task_manager):
    """The full lm-eval path: TaskManager resolves our YAML, loads the local file, renders the prompt."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for sub, name in [("longbench", "qasper.jsonl"), ("longbench_e", "trec_e.jsonl")]:
        shutil.copy(data_dir / sub / name, data_home / sub / name)
    prompts = json.loads((data_dir / "longbench/official_config/dataset2prompt.json").read_text(encoding="utf-8"))
    tasks = task_manager.load(["longbench_qasper", "longbench_trec_e"])["tasks"]
    for name, base, rows in [("longbench_qasper", "qasper", 13), ("longbench_trec_e", "trec", 104)]:
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == rows
        for doc in docs[:3]:
            assert task.fewshot_context(doc, num_fewshot=0) == prompts[base].format(**doc)


def test_task_manager_resolves_longbench_names_to_this_package(task_manager):
    index = task_manager._index
    for name in [*ALL_TASKS, "longbench", "longbench_e", "longbench_single", "longbench_paper14"]:
        assert Path(index[name].yaml_path).parent == TASK_DIR, name


# ------------------------------------------------------------------------------------------ LongBench-E


def test_length_buckets_follow_scorer_e():
    assert [length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == [
        "0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+",
    ]  # fmt: skip


def test_e_results_report_the_bucket_of_each_example():
    doc = fake_doc("passage_count_e") | {"answers": ["3"]}
    assert process_results(doc | {"length": 4500}, ["3"]) == {"score": 1.0, "score_4-8k": 1.0}
    assert process_results(doc | {"length": 9000}, ["3 or 4"]) == {"score": 0.5, "score_8k+": 0.5}
    assert process_results(fake_doc("passage_count") | {"answers": ["3"]}, ["3"]) == {"score": 1.0}


@pytest.mark.shared_data
def test_real_e_rows_get_buckets(data_dir: Path):
    rows = read_jsonl(data_dir / "longbench_e" / "qasper_e.jsonl")
    buckets = {length_bucket(r["length"]) for r in rows}
    assert buckets <= {"0-4k", "4-8k", "8k+"} and "0-4k" in buckets
    for row in rows[:5]:
        result = process_results(row, [row["answers"][0]])
        assert set(result) == {"score", f"score_{length_bucket(row['length'])}"}
