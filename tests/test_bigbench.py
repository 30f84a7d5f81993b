"""BIG-bench tasks read from an sdist-shaped archive: fetching with pip, formatting, splits, scoring.

The archive here is built by the test in the real sdist's layout
(`bigbench-1.0.0/bigbench/benchmark_tasks/<task>/[<subtask>/]task.json`) with task.json files in
BIG-bench's schema; the real 358 MB sdist is read the same way (docs/data.md).
"""

import io
import json
import tarfile

import pytest

from elrea_ray import bigbench as bb

MC_TASK = {  # like navigate: options not in the input, BIG-bench scores their log-likelihood
    "name": "walk",
    "preferred_score": "multiple_choice_grade",
    "metrics": ["multiple_choice_grade"],
    "task_prefix": "Do you return to the start?",
    "append_choices_to_input": False,
    "examples": [
        {
            "input": f"Take {i} steps. Turn around. Take {i if i % 2 else i + 1} steps.",
            "target_scores": {"True": int(i % 2 == 1), "False": int(i % 2 == 0)},
        }
        for i in range(1, 31)
    ],
}
GEN_TASK = {  # like object_counting: several accepted targets
    "name": "count",
    "preferred_score": "exact_str_match",
    "metrics": ["exact_str_match"],
    "examples": [
        {"input": f"I have {i} apples. How many fruits do I have?", "target": [str(i), f"#{i}"]} for i in range(30)
    ],
}
SUB_TASK = {
    "name": "three",
    "preferred_score": "multiple_choice_grade",
    "example_input_prefix": "",
    "example_output_prefix": " ",
    "choice_prefix": "",  # joins options with nothing
    "examples": [{"input": f"Shelf {i}.", "target_scores": {"red": 1, "blue": 0, "green": 0}} for i in range(12)],
}
BLEU_TASK = {"name": "poem", "preferred_score": "bleu", "examples": [{"input": "x", "target": "y"}]}


def _archive(folder, tasks: dict[str, dict]):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / bb.ARCHIVE
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("bigbench-1.0.0/PKG-INFO", b"Metadata-Version: 2.1\nName: bigbench\nVersion: 1.0.0\n")
        add("bigbench-1.0.0/setup.py", b'from setuptools import setup\nsetup(name="bigbench", version="1.0.0")\n')
        for name, task in tasks.items():
            add(bb._TASKS + name.replace(":", "/") + "/task.json", json.dumps(task).encode())
    return path


@pytest.fixture()
def archive(tmp_path):
    return _archive(
        tmp_path / "links",
        {"walk": MC_TASK, "count": GEN_TASK, "shelf": {"name": "shelf"}, "shelf:three": SUB_TASK, "poem": BLEU_TASK},
    )


def test_fetch_runs_pip_download_into_the_cache_once(tmp_path, archive):
    cache = tmp_path / "cache"
    # a local find-links folder stands in for PyPI; pip itself does the download
    got = bb.fetch_archive(cache, pip_args=["--no-index", "--find-links", str(archive.parent), "--no-build-isolation"])
    assert got == cache / bb.ARCHIVE and got.read_bytes() == archive.read_bytes()
    # the second call does not run pip (an index that would fail proves it)
    assert bb.fetch_archive(cache, pip_args=["--no-index", "--find-links", str(tmp_path / "none")]) == got


def test_fetch_failure_names_the_package_and_the_way_out(tmp_path):
    with pytest.raises(bb.BigBenchError, match=r"could not fetch bigbench==1\.0\.0 .*data\.bigbench_archive"):
        bb.fetch_archive(tmp_path / "cache", pip_args=["--no-index", "--find-links", str(tmp_path)])
    with pytest.raises(bb.BigBenchError, match="data.bigbench_archive='nope.tar.gz' is not a file"):
        bb.fetch_archive(tmp_path / "cache", archive="nope.tar.gz")


def test_tasks_are_read_from_the_archive_and_cached(tmp_path, archive):
    cache = tmp_path / "cache"
    tasks = bb.load_tasks(["walk", "shelf:three"], archive, cache)
    assert tasks["walk"]["examples"] == MC_TASK["examples"]
    assert tasks["shelf:three"]["name"] == "three"
    # cached now: the same archive is not read again (a moved copy of it either)
    moved = archive.rename(tmp_path / "elsewhere.tar.gz")
    assert bb.load_tasks(["walk"], moved, cache)["walk"]["name"] == "walk"
    # another archive's tasks are its own
    other = _archive(tmp_path / "other", {"walk": {**MC_TASK, "name": "walk2"}})
    assert bb.load_tasks(["walk"], other, cache)["walk"]["name"] == "walk2"
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(bb.BigBenchError, match="not a readable BIG-bench archive"):
        bb.load_tasks(["count"], tmp_path / "bad.tar.gz", cache)


def test_unknown_tasks_parents_and_unscorable_metrics_are_named(tmp_path, archive):
    with pytest.raises(bb.BigBenchError, match=r"no task 'wlak'; did you mean walk\?"):
        bb.load_tasks(["wlak"], archive, tmp_path / "c1")
    with pytest.raises(bb.BigBenchError, match=r"'shelf' keeps its examples in subtasks; name them: shelf:three"):
        bb.load_tasks(["shelf"], archive, tmp_path / "c2")
    poem = bb.load_tasks(["poem"], archive, tmp_path / "c3")["poem"]
    with pytest.raises(bb.BigBenchError, match=r"'poem' is scored by 'bleu'"):
        bb.task_rows("poem", poem, 0, {"train": 1, "validation": 0, "test": 0})


def test_rows_follow_big_bench_formatting_and_always_list_the_options():
    rows = bb.task_rows("walk", MC_TASK, 0, {"train": 10, "validation": 5, "test": 10})
    assert {k: len(v) for k, v in rows.items()} == {"train": 10, "validation": 5, "test": 10}
    row = rows["test"][0]
    meta = json.loads(row["meta"])
    text = json.loads(row["prompt"])[-1]["content"]
    example = MC_TASK["examples"][meta["index"]]
    # task_prefix + "\nQ: " + input + options + "\nA: " (BIG-bench's default prefixes)
    assert text.startswith("Do you return to the start?\nQ: " + example["input"])
    assert sorted(text.split("\n  choice: ")[1:])[0].startswith("False")
    assert text.rstrip().endswith("A:")
    gold = max(example["target_scores"], key=example["target_scores"].get)
    assert row["response"] == row["answer"] == gold and meta["choices"] == ["True", "False"]
    # a task whose choice prefix does not start a line gets BIG-bench's default one
    three = bb.task_rows("shelf:three", SUB_TASK, 0, {"train": 4, "validation": 0, "test": 4})
    assert json.loads(three["test"][0]["prompt"])[-1]["content"].count("\n  choice: ") == 3
    assert three["test"][0]["source"] == "shelf_three"


def test_splits_are_disjoint_seeded_and_shots_come_from_train():
    sizes = {"train": 100, "validation": 4, "test": 6}
    a = bb.task_rows("count", GEN_TASK, 0, sizes, shots=2)
    b = bb.task_rows("count", GEN_TASK, 0, sizes, shots=2)
    c = bb.task_rows("count", GEN_TASK, 1, sizes, shots=2)
    index = {s: [json.loads(r["meta"])["index"] for r in a[s]] for s in a}
    assert a == b and index != {s: [json.loads(r["meta"])["index"] for r in c[s]] for s in c}
    assert len(index["train"]) == 20  # 30 examples - 6 test - 4 validation
    assert not set(index["test"]) & set(index["train"]) and not set(index["validation"]) & set(index["train"])
    train_inputs = {GEN_TASK["examples"][i]["input"] for i in index["train"]}
    test_inputs = {GEN_TASK["examples"][i]["input"] for i in index["test"] + index["validation"]}
    for row in a["test"]:
        text = json.loads(row["prompt"])[-1]["content"]
        queries = [q.split("\nA:")[0] for q in ("\n" + text).split("\nQ: ")[1:]]
        assert len(queries) == 3  # two shots, then the item itself
        assert all(q in train_inputs for q in queries[:2]) and queries[2] in test_inputs
    with pytest.raises(bb.BigBenchError, match="too few are left to train on"):
        bb.task_rows("count", GEN_TASK, 0, {"train": 10, "validation": 10, "test": 20})


@pytest.mark.parametrize(
    "prediction,score",
    [
        ("True", 1.0),
        ("true.", 1.0),
        ("The answer is True, since the steps cancel.", 1.0),
        ("False", 0.0),
        ("I cannot tell", 0.0),
        ("", 0.0),
    ],
)
def test_multiple_choice_answers_are_matched_to_the_options(prediction, score):
    assert bb.score(prediction, {"choices": ["True", "False"], "targets": ["True"]}) == score


def test_the_earliest_and_longest_option_named_wins():
    opts = ["The red book is the leftmost.", "The red book is the rightmost.", "red"]
    assert bb.chosen_option("The red book is the rightmost. Not the leftmost.", opts) == opts[1]
    assert bb.chosen_option("red, I think", opts) == "red"


def test_generative_answers_match_any_target_exactly():
    meta = {"choices": None, "targets": ["3", "three"]}
    assert bb.score("three", meta) == bb.score(" 3.\nbecause ...", meta) == 1.0
    assert bb.score("33", meta) == bb.score("it is three", meta) == 0.0


def test_a_bigbench_config_builds_scored_splits(tmp_path, archive):
    from elrea_ray.config import ConfigError, load_config
    from elrea_ray.data import build_splits
    from elrea_ray.scorers import score

    cfg = load_config(
        "jobs/configs/smoke.yaml",
        [
            "data.kind=bigbench",
            "data.tasks=[walk, count]",
            f"data.bigbench_archive={archive}",
            "data.train_per_source=8",
            "data.validation_per_source=2",
            "data.test_per_source=5",
            "data.shots=1",
        ],
    )
    splits = build_splits(cfg.data, seed=0)
    assert {s: len(r) for s, r in splits.items()} == {"train": 16, "validation": 4, "test": 10}
    assert {r["source"] for r in splits["test"]} == {"walk", "count"}
    row = next(r for r in splits["test"] if r["source"] == "walk")
    assert score(row, row["answer"]) == 1.0
    assert score(row, "True" if row["answer"] == "False" else "False") == 0.0
    for bad, field in (
        ("data.tasks=[]", "data.tasks"),
        ("data.tasks=[Navigate]", "data.tasks"),
        ("data.shots=9", "data.shots"),
    ):
        with pytest.raises(ConfigError, match=field):
            load_config("jobs/configs/smoke.yaml", ["data.kind=bigbench", "data.tasks=[walk]", bad])


def test_bigbench_settings_leave_other_runs_keys_alone():
    from elrea_ray.config import load_config
    from elrea_ray.pipeline import stage_keys

    plain = stage_keys(load_config("jobs/configs/smoke.yaml", []))
    moved = stage_keys(load_config("jobs/configs/smoke.yaml", ["data.bigbench_archive=elsewhere.tar.gz"]))
    assert plain == moved


def test_every_top_scoring_option_is_right():
    task = {
        "name": "tie",
        "preferred_score": "multiple_choice_grade",
        "examples": [{"input": f"q{i}", "target_scores": {"a": 1, "b": 1, "c": 0}} for i in range(10)],
    }
    row = bb.task_rows("tie", task, 0, {"train": 4, "validation": 1, "test": 2})["test"][0]
    meta = json.loads(row["meta"])
    assert row["response"] == "a" and meta["targets"] == ["a", "b"]
    assert bb.score("b", meta) == bb.score("a", meta) == 1.0 and bb.score("c", meta) == 0.0
