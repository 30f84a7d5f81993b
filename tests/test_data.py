"""Data rows, tokenisation marks and scoring (fast: a tiny tokenizer, small files)."""

import json
import os
import random

import pytest

from elrea_ray.config import DataConfig, ModelConfig
from elrea_ray.data import (
    FAMILY_CONFIGS,
    DataError,
    build_splits,
    build_splits_with_report,
    collate,
    encode,
    instruction_labels,
    length_bucketed_batches,
    read_rows,
    reasoning_gym_rows,
    sft_labels,
)
from elrea_ray.scorers import extract_answer, score


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The tiny tokenizer (ChatML template with a default system prompt), built in a temp cache.
    ELREA_CACHE is restored at once, so later test modules still find the shared model cache."""
    from elrea_ray.model import load_tokenizer

    old = os.environ.get("ELREA_CACHE")
    os.environ["ELREA_CACHE"] = str(tmp_path_factory.mktemp("elrea-cache"))
    try:
        return load_tokenizer(ModelConfig(name_or_path="tiny-random-llama"))
    finally:
        if old is None:
            os.environ.pop("ELREA_CACHE", None)
        else:
            os.environ["ELREA_CACHE"] = old


SMALL = DataConfig(
    sources=("chain_sum", "products", "spell_backward", "letter_counting"),
    train_per_source=40,
    validation_per_source=8,
    test_per_source=10,
)


# -- splits ---------------------------------------------------------------------------------------


def _questions(rows):
    return {json.loads(r["prompt"])[-1]["content"] for r in rows}


def test_build_splits_deterministic_disjoint_and_sourced():
    a, b = build_splits(SMALL, seed=0), build_splits(SMALL, seed=0)
    assert a == b
    c = build_splits(SMALL, seed=1)
    assert [r["prompt"] for r in a["train"]] != [r["prompt"] for r in c["train"]]
    for split, n in (("train", 40), ("validation", 8), ("test", 10)):
        assert {r["source"] for r in a[split]} == set(SMALL.sources)
        assert len(a[split]) == n * len(SMALL.sources)
    tr, va, te = (_questions(a[s]) for s in ("train", "validation", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    ids = [r["example_id"] for s in a.values() for r in s]
    assert len(ids) == len(set(ids))
    row = a["train"][0]
    assert set(row) == {"example_id", "source", "prompt", "response", "answer", "meta"}
    assert all(isinstance(v, str) for v in row.values())
    meta = json.loads(row["meta"])
    assert meta["family"] == row["source"] and meta["entry"]["answer"] == row["answer"] == row["response"]
    assert meta["dataset_config"] == FAMILY_CONFIGS[row["source"]]
    assert json.loads(row["prompt"]) == [{"role": "user", "content": meta["entry"]["question"]}]


def test_dedupe_fills_a_small_item_space():
    # products with 2 one-digit factors has 100 distinct questions: train takes most of them, and
    # validation/test may only hold what is left, never a train question
    cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    train = reasoning_gym_rows("products", "train", 300, 0, cfg)
    test = reasoning_gym_rows("products", "test", 50, 0, cfg, exclude_questions=_questions(train))
    assert len(_questions(test)) == len(test) and not (_questions(train) & _questions(test))
    assert len(test) <= 100 - len(_questions(train))


def test_system_prompt_and_bad_family():
    rows = reasoning_gym_rows("gcd", "train", 2, 0, system_prompt="Be brief.")
    assert json.loads(rows[0]["prompt"])[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(DataError, match="unknown reasoning-gym task family"):
        reasoning_gym_rows("no_such_family", "train", 2, 0)
    with pytest.raises(DataError, match="rejects the config"):
        reasoning_gym_rows("gcd", "train", 2, 0, {"max_digits": 3})


# -- scoring --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_gold_scores_one_and_wrong_scores_zero(family):
    rows = reasoning_gym_rows(family, "test", 20, 3)
    assert len(rows) == 20
    for r in rows:
        r = json.loads(json.dumps(r))  # as read back from Parquet
        assert score(r, r["answer"]) == 1.0, (family, r["answer"])
        assert score(r, f"The answer is {r['answer']}.") == 1.0, (family, r["answer"])
        assert score(r, "zzz 98765") == 0.0


def test_extract_answer_on_chatty_text():
    assert extract_answer("The answer is 12.", "12") == "12"
    assert extract_answer("\\boxed{7}", "7") == "7"
    assert extract_answer("so we get \\boxed{\\frac{1}{2}} in the end", "1/2") == "\\frac{1}{2}"
    assert extract_answer("  olleh\nmore text", "olleh") == "olleh"
    assert extract_answer('Answer: "olleh".', "olleh") == "olleh"
    assert extract_answer("It is -4, I think", "-4") == "-4"
    assert extract_answer("total 1,234 legs", "1234") == "1234"
    assert extract_answer("12.0", "12") == "12"
    assert extract_answer("3.5 apples", "2") == "3.5"
    assert extract_answer("no digits here", "5") == "no digits here"


def test_score_file_rows():
    row = {"answer": "1,234", "meta": "{}"}
    assert score(row, "It is 1234.") == 1.0 and score(row, "1235") == 0.0
    assert score({"answer": "Paris", "meta": "{}"}, "paris.\nThe capital.") == 1.0
    assert score({"answer": "\\boxed{42}", "meta": "{}"}, "so \\boxed{42}") == 1.0
    assert score({"answer": "#### 72", "meta": "{}"}, "72 clips") == 1.0
    assert score({"answer": "", "meta": "{}"}, "anything") == 0.0


# -- tokenisation ---------------------------------------------------------------------------------


def test_encode_marks_instruction_and_response(tok):
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    enc = encode(tok, prompt, "7", 256)
    ids, n = enc["input_ids"], enc["instruction_len"]
    templated = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[:n]) == templated
    assert tok.decode(ids[n:]) == "7" + tok.eos_token and ids[-1] == tok.eos_token_id
    sft, ins = sft_labels(ids, n), instruction_labels(ids, n)
    assert sft == [-100] * n + ids[n:]
    assert ins == ids[:n] + [-100] * (len(ids) - n)
    other = encode(tok, prompt, "a much longer answer", 256)
    assert other["input_ids"][: other["instruction_len"]] == ids[:n] and other["instruction_len"] == n
    only = encode(tok, prompt, None, 256)
    assert only == {"input_ids": ids[:n], "instruction_len": n}
    assert encode(tok, prompt, "7", n) is None
    assert encode(tok, prompt, "7", len(ids)) == enc


def test_collate_pads_both_sides():
    ids, labels = [[5, 6, 7], [8]], [[-100, 6, 7], [8]]
    right = collate(ids, labels, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(ids, labels, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_length_bucketed_batches_cover_once_and_are_homogeneous():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(40, 60), rng.randint(200, 230)]) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 16, seed=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000)) and all(len(b) <= 16 for b in batches)
    mixed = [b for b in batches if min(lengths[i] for i in b) < 100 < max(lengths[i] for i in b)]
    assert len(mixed) <= 2  # at most one straddling batch per chunk of 50 batches (800 items)
    assert batches == length_bucketed_batches(lengths, 16, seed=0)
    assert batches != length_bucketed_batches(lengths, 16, seed=1)
    unshuffled = length_bucketed_batches(lengths, 16, seed=0, shuffle=False)
    assert sorted(i for b in unshuffled for i in b) == list(range(1000))


def test_examples_seen_counts_the_rows_of_the_steps_taken_epochs_repeating():
    from elrea_ray.train import examples_seen

    lengths = [random.Random(i).randint(5, 50) for i in range(120)]  # 8 batches of 16 a epoch, the last of 8
    assert examples_seen(lengths, 16, seed=3, total=16) == 240  # two whole epochs
    third = length_bucketed_batches(lengths, 16, seed=3 + 2)[:4]  # then 4 batches of the third epoch's order
    assert examples_seen(lengths, 16, seed=3, total=20) == 240 + sum(len(b) for b in third)
    short = [len(b) for b in length_bucketed_batches(lengths, 16, seed=3)].index(8)
    assert examples_seen(lengths, 16, seed=3, total=short + 1) == 16 * short + 8  # the short batch counts 8


# -- files ----------------------------------------------------------------------------------------


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_read_instruction_jsonl(tmp_path):
    f = _jsonl(
        tmp_path / "mix.jsonl",
        [
            {"instruction": "Add 2 and 3.", "response": "5", "source": "math"},
            {"instruction": "Say hi.", "response": "Hi!\nHow are you?", "system": "Be kind."},
        ],
    )
    rows, counts = read_rows(f, "train", system_prompt="Default system.")
    assert counts == {"read": 2, "skipped": {}}
    assert [r["example_id"] for r in rows] == ["train-mix-000001", "train-mix-000002"]
    assert [r["source"] for r in rows] == ["math", "mix"]
    assert json.loads(rows[0]["prompt"]) == [
        {"role": "system", "content": "Default system."},
        {"role": "user", "content": "Add 2 and 3."},
    ]
    assert json.loads(rows[1]["prompt"])[0] == {"role": "system", "content": "Be kind."}
    assert rows[0]["response"] == "5" and rows[0]["answer"] == "5" and rows[1]["answer"] == ""


def test_read_alpaca_messages_and_parquet(tmp_path):
    f = _jsonl(
        tmp_path / "alp.jsonl",
        [
            {"instruction": "Translate.", "input": "chat", "output": "cat"},
            {"instruction": "Count to 3.", "input": "", "output": "1 2 3"},
        ],
    )
    rows, _ = read_rows(f, "train")
    assert json.loads(rows[0]["prompt"]) == [{"role": "user", "content": "Translate.\n\nchat"}]
    assert json.loads(rows[1]["prompt"]) == [{"role": "user", "content": "Count to 3."}]
    assert rows[0]["response"] == "cat"

    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    f = _jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    rows, _ = read_rows(f, "train")
    assert json.loads(rows[0]["prompt"]) == conv[:-1] and rows[0]["response"] == "A2"
    f = _jsonl(tmp_path / "chat_test.jsonl", [{"messages": conv[:-1], "answer": 9}])
    rows, _ = read_rows(f, "test")
    assert json.loads(rows[0]["prompt"]) == conv[:-1]
    assert rows[0]["response"] == "" and rows[0]["answer"] == "9"
    with pytest.raises(DataError, match=r"chat_test\.jsonl, line 1: .*last message"):
        read_rows(f, "train")

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["2+2=", "Capital of France?"], "completion": ["4", "Paris"]}), path)
    rows, counts = read_rows(str(path), "validation")
    assert counts["read"] == 2 and rows[1]["example_id"] == "validation-pc-000002"
    assert json.loads(rows[1]["prompt"]) == [{"role": "user", "content": "Capital of France?"}]
    assert rows[1]["response"] == "Paris" and rows[1]["answer"] == "Paris"


def test_bad_rows_error_or_skip(tmp_path):
    records = [
        {"instruction": "ok", "response": "fine"},
        {"response": "no instruction"},
        {"instruction": "  ", "response": "x"},
        {"instruction": 5, "response": "x"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(records[0]) + "\n\n" + "\n".join(json.dumps(r) for r in records[1:]) + "\n{not json\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: missing field 'instruction'"):
        read_rows(str(path), "train")
    rows, counts = read_rows(str(path), "train", bad_rows="skip")
    assert len(rows) == 1 and counts == {
        "read": 5,
        "skipped": {"missing_field": 1, "empty_text": 1, "wrong_type": 1, "invalid_json": 1},
    }
    msgs = tmp_path / "turns.jsonl"
    _jsonl(msgs, [{"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}])
    with pytest.raises(DataError, match=r"turns\.jsonl, line 1: messages must alternate"):
        read_rows(str(msgs), "train")


def test_unreadable_files(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        b'{"instruction": "ok", "response": "x"}\n{"instruction": "caf\xe9", "response": "x"}\n'
    )  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"latin\.jsonl is not UTF-8 text \(undecodable byte at line 2\)"):
        read_rows(str(latin), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        read_rows(str(empty), "train")
    blank = tmp_path / "blank.json"
    blank.write_text("  \n")
    with pytest.raises(DataError, match=r"blank\.json is empty"):
        read_rows(str(blank), "train")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        read_rows(str(latin), "train", fmt="csv")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="cannot tell the format"):
        read_rows(odd, "train")


def test_json_array_and_file_splits(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(
        json.dumps([{"instruction": f"q{i}", "response": f"a{i}", "source": "s" + str(i % 2)} for i in range(40)]),
        encoding="utf-8",
    )
    test = _jsonl(tmp_path / "test.jsonl", [{"instruction": "q", "response": ""}])
    cfg = DataConfig(kind="files", train_files=(str(train),), test_files=(test,), validation_per_source=2)
    splits, report = build_splits_with_report(cfg, seed=0)
    assert len(splits["train"]) == 36 and len(splits["validation"]) == 4 and len(splits["test"]) == 1
    assert report["files"][str(train)]["read"] == 40
    assert {r["source"] for r in splits["validation"]} == {"s0", "s1"}
    assert splits == build_splits(cfg, seed=0)


def test_gsm8k_style_rows_take_the_gold_after_hashes(tmp_path):
    import json as _json

    from elrea_ray.data import read_rows

    f = tmp_path / "gsm.jsonl"
    f.write_text(_json.dumps({"question": "How many clips?", "answer": "48 + 24 = 72\n#### 72"}) + "\n")
    rows, _ = read_rows(str(f), "train")
    assert rows[0]["answer"] == "72" and rows[0]["response"].endswith("#### 72")
    assert _json.loads(rows[0]["prompt"])[-1]["content"] == "How many clips?"


def test_csv_reads_through_datasets_and_names_a_bad_row(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,source\n"What is 2+2?","2+2=4\n#### 4",gsm\n"",x,gsm\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"qa\.csv, row 2: "):
        read_rows(str(path), "train")
    rows, counts = read_rows(str(path), "train", bad_rows="skip")
    assert counts["read"] == 2 and sum(counts["skipped"].values()) == 1
    assert rows[0]["example_id"] == "train-qa-000001" and rows[0]["source"] == "gsm"
    assert json.loads(rows[0]["prompt"]) == [{"role": "user", "content": "What is 2+2?"}]
    assert rows[0]["answer"] == "4"


def _local_hub_dataset(tmp_path):
    """A local dataset repository folder: load_dataset(<folder>) takes the same path as a Hub id
    (builder from the data files, splits from their names), with no network."""
    repo = tmp_path / "user" / "mini-mix"
    (repo / "data").mkdir(parents=True)
    _jsonl(repo / "data" / "train.jsonl", [{"instruction": f"Echo {i}.", "response": str(i)} for i in range(3)])
    _jsonl(
        repo / "data" / "test.jsonl",
        [{"instruction": "Echo 9.", "response": "9"}, {"instruction": "", "response": "empty"}],
    )
    return str(repo)


def test_hub_entries_load_with_datasets_and_name_split_and_row(tmp_path):
    from elrea_ray.data import hub_rows

    repo = _local_hub_dataset(tmp_path)
    rows, counts = hub_rows({"path": repo, "split": "train", "source": "echo"})
    assert counts == {"read": 3, "skipped": {}}
    assert [r["example_id"] for r in rows] == [f"train-echo-{i:06d}" for i in (1, 2, 3)]
    assert {r["source"] for r in rows} == {"echo"} and rows[2]["response"] == "2"
    with pytest.raises(DataError, match=r"mini-mix split test, row 2: "):
        hub_rows({"path": repo, "split": "test", "use_for": "test"})
    rows, counts = hub_rows({"path": repo, "split": "test", "use_for": "test"}, bad_rows="skip")
    assert len(rows) == 1 and rows[0]["example_id"] == "test-mini-mix-000001"
    with pytest.raises(DataError, match=r"mini-mix split nosuch: could not load"):
        hub_rows({"path": repo, "split": "nosuch"})

    cfg = DataConfig(
        kind="files",
        hub=({"path": repo, "split": "train", "source": "echo"}, {"path": repo, "split": "test", "use_for": "test"}),
        validation_per_source=1,
        bad_rows="skip",
    )
    cfg.validate("data")
    splits, report = build_splits_with_report(cfg, seed=0)
    assert len(splits["train"]) + len(splits["validation"]) == 3 and len(splits["test"]) == 1
    assert report["files"][f"{repo}::test"]["kept"] == 1


def test_uncached_hub_dataset_offline_is_a_clear_error(monkeypatch, tmp_path):
    from elrea_ray.data import hub_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(DataError, match=r"nobody/no-such-dataset split train: could not load.*HF_HUB_OFFLINE"):
        hub_rows({"path": "nobody/no-such-dataset", "split": "train"})


@pytest.mark.parametrize(
    "entry,needle",
    [
        ({"split": "train"}, r"data\.hub\[0\]\.path"),
        ({"path": "a/b"}, r"data\.hub\[0\]\.split"),
        ({"path": "a/b", "split": "train", "use_for": "eval"}, r"data\.hub\[0\]\.use_for"),
        ({"path": "a/b", "split": "train", "revison": "x"}, r"data\.hub\[0\] must be a mapping with keys"),
    ],
)
def test_bad_hub_entries_name_the_field(entry, needle):
    from elrea_ray.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        DataConfig(kind="files", hub=(entry,), test_files=("t.jsonl",)).validate("data")


def test_eval_shots_prefix_solved_examples_of_the_same_source(tmp_path):
    """data.eval_shots: validation and test prompts get k solved training examples of their own
    source as earlier chat turns (after the system message); training rows stay as they were;
    the draw is per row and seeded, so a row's shots do not depend on the rest of the split."""
    rows = [{"instruction": f"q{i}", "response": f"a{i}", "source": "s" + str(i % 2)} for i in range(40)]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    test = _jsonl(tmp_path / "test.jsonl", [{"instruction": f"t{i}", "response": "", "source": "s1"} for i in range(3)])
    plain_cfg = DataConfig(kind="files", train_files=(train,), test_files=(test,), system_prompt="Be brief.")
    cfg = DataConfig(**{**plain_cfg.__dict__, "eval_shots": {"*": 2}})
    zero, shot = build_splits(plain_cfg, seed=0), build_splits(cfg, seed=0)
    assert shot["train"] == zero["train"]
    by_prompt = {json.loads(r["prompt"])[-1]["content"]: r for r in shot["train"]}
    for z, r in zip(zero["test"] + zero["validation"], shot["test"] + shot["validation"]):
        m = json.loads(r["prompt"])
        assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert m[0] == {"role": "system", "content": "Be brief."} and m[-1] == json.loads(z["prompt"])[-1]
        ids = json.loads(r["meta"])["shots"]
        for j, sid in enumerate(ids):
            example = by_prompt[m[1 + 2 * j]["content"]]
            assert example["example_id"] == sid and example["source"] == r["source"]
            assert m[2 + 2 * j]["content"] == example["response"]
        assert {k: v for k, v in r.items() if k not in ("prompt", "meta")} == {
            k: v for k, v in z.items() if k not in ("prompt", "meta")
        }
    (tmp_path / "alone").mkdir()
    lone = [{"instruction": "x", "response": "", "source": "s1"}, {"instruction": "y", "response": "", "source": "s1"}]
    lone.append({"instruction": "t2", "response": "", "source": "s1"})
    alone = _jsonl(tmp_path / "alone" / "test.jsonl", lone)
    last = build_splits(DataConfig(**{**cfg.__dict__, "test_files": (alone,)}), seed=0)["test"][2]
    assert last["prompt"] == shot["test"][2]["prompt"]  # the same row draws the same shots beside other rows
    assert [json.loads(r["meta"])["shots"] for r in build_splits(cfg, seed=0)["test"]] == [
        json.loads(r["meta"])["shots"] for r in shot["test"]
    ]
    assert [json.loads(r["meta"])["shots"] for r in build_splits(cfg, seed=1)["test"]] != [
        json.loads(r["meta"])["shots"] for r in shot["test"]
    ]


def test_eval_shots_by_benchmark_from_shot_files_and_too_few_named(tmp_path):
    """Keys name a source or a benchmark (an MMLU-format file is 5-shot, the rest 0-shot); the
    shots come from data.shot_files when given; a source with too few examples is named."""
    train = _jsonl(tmp_path / "mix.jsonl", [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(20)])
    mmlu = [{"question": f"m{i}?", "choices": ["x", "y"], "answer": "A", "source": "algebra"} for i in range(3)]
    dev = [{"question": f"d{i}?", "choices": ["x", "y"], "answer": "B", "source": "algebra"} for i in range(6)]
    test = _jsonl(tmp_path / "mmlu_test.jsonl", mmlu)
    shots = _jsonl(tmp_path / "mmlu_dev.jsonl", dev)
    other = _jsonl(tmp_path / "plain_test.jsonl", [{"instruction": "p", "response": "r", "source": "mix"}])
    cfg = DataConfig(
        kind="files", train_files=(train,), test_files=(test, other), eval_shots={"mmlu": 5}, shot_files=(shots,)
    )
    split = build_splits(cfg, seed=0)["test"]
    mm = [r for r in split if r["source"] == "algebra"]
    assert len(mm) == 3 and all(len(json.loads(r["meta"])["shots"]) == 5 for r in mm)
    assert all(s.startswith("train-mmlu_dev-") for r in mm for s in json.loads(r["meta"])["shots"])
    assert all("B" in t["content"] for t in json.loads(mm[0]["prompt"]) if t["role"] == "assistant")
    (plain,) = [r for r in split if r["source"] == "mix"]
    assert "shots" not in json.loads(plain["meta"]) and len(json.loads(plain["prompt"])) <= 2
    same = [{"instruction": f"q{i}", "response": f"a{i}", "source": "s"} for i in range(3)]
    same = _jsonl(tmp_path / "same.jsonl", same)
    asked = build_splits(DataConfig(kind="files", train_files=(same,), test_files=(same,), eval_shots={"*": 2}), 0)
    for r in asked["test"]:  # the test rows ask the training questions: never their own as a shot
        m = json.loads(r["prompt"])
        assert m[-1]["content"] not in [t["content"] for t in m[:-1]]
    with pytest.raises(DataError, match=r"source 'algebra'\) wants 7 solved examples of its source, but only 6"):
        build_splits(DataConfig(**{**cfg.__dict__, "eval_shots": {"algebra": 7}}), seed=0)
    with pytest.raises(Exception, match=r"data.eval_shots\[mmlu\]"):
        DataConfig(kind="files", test_files=(test,), eval_shots={"mmlu": 11}).validate("data")
    with pytest.raises(Exception, match="data.eval_shots"):
        DataConfig(kind="bigbench", tasks=("navigate",), shots=2, eval_shots={"*": 1}).validate("data")
    with pytest.raises(Exception, match="data.shot_files"):
        DataConfig(shot_files=(shots,), eval_shots={"*": 1}).validate("data")
