"""Scorers of the paper's benchmark formats, read from small fixture files written here."""

import json

import pytest

from elrea_ray.config import DataConfig
from elrea_ray.data import build_splits, read_rows
from elrea_ray.scorers import (
    gold_letter,
    last_boxed,
    math_equal,
    normalize_math,
    parse_mathqa_options,
    predicted_letter,
    score,
    score_answer,
)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "\\dfrac12"),
        ("1/2", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("\\tfrac{3}{4}", "3/4"),
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("5 \\text{ cm}", "5"),
        ("12 inches", "12"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("x = 7", "7"),
        ("12.0", "12"),
        ("1,000", "1000"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\$18.90", "18.90"),
        ("\\frac{6}{8}", "\\frac{3}{4}"),
        (".5", "\\frac12"),
        ("\\frac {2} {3}", "\\frac{2}{3}"),
    ],
)
def test_math_normalisation_accepts_equivalent_spellings(pred, gold):
    assert math_equal(pred, gold), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("13", "12"),
        ("(3,5)", "(3,4)"),
        ("", "0"),
        ("\\sqrt{2}", "2"),
    ],
)
def test_math_normalisation_keeps_different_answers_apart(pred, gold):
    assert not math_equal(pred, gold)


def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("so \\boxed 5.") == "5"
    assert last_boxed("no box") is None


def test_math_file_is_scored_on_the_boxed_answer(tmp_path):
    f = _jsonl(
        tmp_path / "math_test.jsonl",
        [
            {"problem": "What is 1/2 + 1/4?", "solution": "We add: $\\boxed{\\dfrac{3}{4}}$."},
            {"problem": "Half of 1?", "solution": "It is $\\boxed{0.5}$"},
        ],
    )
    rows, _ = read_rows(f, "test")
    assert rows[0]["answer"] == "\\dfrac{3}{4}" and json.loads(rows[0]["meta"])["benchmark"] == "math"
    assert score(rows[0], "Adding gives \\boxed{3/4}.") == 1.0
    assert score(rows[0], "Adding gives \\boxed{\\frac{3}{5}}.") == 0.0
    assert score(rows[0], "Adding gives 3/4.") == 0.0  # the MATH parser needs a \boxed{} answer
    assert score(rows[1], "\\boxed{\\frac{1}{2}}") == 1.0


def test_gsm8k_and_svamp_are_value_predictions(tmp_path):
    g = _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Clips?", "answer": "48 + 24 = 72\n#### 1,072"}])
    s = _jsonl(
        tmp_path / "svamp.jsonl", [{"Body": "Jack had 8 pens.", "Question": "He lost 3. How many?", "Answer": 5.0}]
    )
    grow, srow = read_rows(g, "test")[0][0], read_rows(s, "test")[0][0]
    assert json.loads(grow["meta"])["benchmark"] == "gsm8k" and grow["answer"] == "1,072"
    assert score(grow, "She sold 48 then 24, in all 1072 clips.") == 1.0  # the last number
    assert score(grow, "#### 1072\nwait, 5") == 1.0  # an explicit '####' wins
    assert score(grow, "The answer is $1,072.") == 1.0
    assert score(grow, "\\boxed{1072.00}") == 1.0
    assert score(grow, "1071") == 0.0
    assert json.loads(srow["meta"])["benchmark"] == "svamp" and "Jack had 8 pens. He lost 3" in srow["prompt"]
    assert score(srow, "8 - 3 = 5") == 1.0
    assert score(srow, "5 pens, since 8 - 3") == 0.0  # the last number is 3


def test_mathqa_value_or_letter(tmp_path):
    f = _jsonl(
        tmp_path / "mathqa.jsonl",
        [
            {
                "Problem": "a train runs 20 km in 0.5 h ; speed ?",
                "Rationale": "20 / 0.5 = 40",
                "options": "a ) 38 , b ) 40 km / h , c ) 30 , d ) 42.5 , e ) none",
                "correct": "b",
            }
        ],
    )
    row = read_rows(f, "test")[0][0]
    assert parse_mathqa_options("a ) 38 , b ) 27.675 , c ) 30") == ["38", "27.675", "30"]
    assert row["answer"] == "40 km / h" and json.loads(row["meta"])["choices"][3] == "42.5"
    assert score(row, "speed = 20 / 0.5 = \\boxed{40}") == 1.0  # value of the correct option
    assert score(row, "The answer is (b)") == 1.0  # or its letter
    assert score(row, "\\boxed{38}") == 0.0
    assert score(row, "answer: a") == 0.0
    assert score_answer("mathqa", "answer is 40.0", "40") == 1.0  # a bare value gold, no options


def test_mmlu_letter_or_choice_text(tmp_path):
    f = _jsonl(
        tmp_path / "mmlu.jsonl",
        [
            {"question": "Capital of France?", "choices": ["Berlin", "Paris", "Rome", "Madrid"], "answer": 1},
            {"question": "2 + 2?", "choices": ["3", "4", "5", "22"], "answer": "B"},
        ],
    )
    r0, r1 = read_rows(f, "test")[0]
    assert r0["answer"] == "B" and "B. Paris" in json.loads(r0["prompt"])[0]["content"]
    for reply in ("B", "(B)", "B. Paris", "The answer is b.", "Answer: B", "Paris", "paris."):
        assert score(r0, reply) == 1.0, reply
    for reply in ("A", "Berlin", "The answer is (C)", "I do not know", "The answer is a city"):
        assert score(r0, reply) == 0.0, reply
    assert score(r1, "4") == 1.0 and score(r1, "22") == 0.0  # a number that is one choice's text
    assert gold_letter("Rome", ["Berlin", "Paris", "Rome"]) == "C"
    assert predicted_letter("(C) z", ["x", "y", "z"]) == "C"
    assert predicted_letter("The answer is B because it is", ["x", "y", "z"]) == "B"
    assert predicted_letter("answer: c.", ["x", "y", "z"]) == "C"


def test_mmlu_row_with_a_bad_answer_is_named(tmp_path):
    from elrea_ray.data import DataError

    f = _jsonl(tmp_path / "mmlu.jsonl", [{"question": "q?", "choices": ["a", "b"], "answer": "F"}])
    with pytest.raises(DataError, match=r"line 1: field 'answer' must be a letter A-B"):
        read_rows(f, "test")


def test_bbh_exact_match(tmp_path):
    f = _jsonl(
        tmp_path / "bbh.jsonl",
        [
            {"input": "not ( True ) and ( True ) is", "target": "False"},
            {"input": "Which option? Options: (A) x (B) y", "target": "(B)"},
        ],
    )
    r0, r1 = read_rows(f, "test")[0]
    assert json.loads(r0["meta"])["benchmark"] == "bbh"
    assert score(r0, "False") == 1.0 and score(r0, "false.") == 1.0
    assert score(r0, "Let's think. not True is False. So the answer is False.") == 1.0
    assert score(r0, "True") == 0.0 and score(r0, "False or True") == 0.0
    assert score(r1, "So the answer is (B).") == 1.0 and score(r1, "B") == 1.0 and score(r1, "(A)") == 0.0


def test_less_messages_and_per_source_benchmark_from_config(tmp_path):
    train = _jsonl(
        tmp_path / "less_train.jsonl",
        [
            {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(12)
        ],
    )
    less = _jsonl(
        tmp_path / "less_test.jsonl",
        [{"messages": [{"role": "user", "content": "Say 3"}, {"role": "assistant", "content": "3"}], "source": "less"}],
    )
    other = _jsonl(
        tmp_path / "other_test.jsonl",
        [
            {"prompt": "Half?", "completion": "\\boxed{\\frac12}", "source": "mathy"},
            {"prompt": "Pick", "completion": "(A)", "source": "bb", "benchmark": "bbh"},
        ],
    )
    cfg = DataConfig(kind="files", train_files=(train,), test_files=(less, other), benchmarks={"mathy": "math"})
    rows = {r["source"]: r for r in build_splits(cfg, seed=0)["test"]}
    assert json.loads(rows["less"]["meta"])["benchmark"] == "less"
    assert score(rows["less"], "3") == 1.0 and score(rows["less"], "4") == 0.0
    assert json.loads(rows["mathy"]["meta"])["benchmark"] == "math"  # from data.benchmarks
    assert score(rows["mathy"], "\\boxed{0.5}") == 1.0
    assert score(rows["bb"], "the answer is (B)") == 0.0 and score(rows["bb"], "the answer is (A).") == 1.0


def test_unknown_benchmark_is_named(tmp_path):
    from elrea_ray.config import ConfigError, load_config
    from elrea_ray.data import DataError

    with pytest.raises(ConfigError, match=r"data.benchmarks\[x\] must be one of math"):
        load_config(None, ["data.benchmarks={x: mathh}"])
    f = _jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completion": "c", "benchmark": "nope"}])
    with pytest.raises(DataError, match="field 'benchmark' is 'nope'"):
        read_rows(f, "test")
