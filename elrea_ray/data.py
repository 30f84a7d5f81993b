"""Example rows and their tokenisation with instruction/response marks (scoring: elrea_ray/scorers.py).

Every split is a list of canonical rows (plain dicts, written as Parquet by the pipeline):

    example_id  str  unique and stable: "{split}-{source}-{i:06d}" (reasoning-gym) or
                     "{split}-{file_stem}-{row:06d}" (files; row = 1-based line or row number)
    source      str  the task family, or the file's `source` column, else the file stem
    prompt      str  JSON list of chat messages before the final assistant response
    response    str  the final assistant response (the SFT target); "" for unlabelled test rows
    answer      str  the gold answer used for scoring ("" if unknown)
    meta        str  JSON; reasoning-gym: {"family", "entry", "dataset_config"}; files: {"benchmark"
                     (which scorer, see elrea_ray.scorers), "choices" (multiple choice)} or {}

"Instruction" (DESIGN §3) is every token of the chat-formatted prompt before the final assistant
response, generation prompt and the template's default system prompt included, the same at train
and test time. `encode` tokenises it and the response separately and concatenates the ids, so the
boundary `instruction_len` is exact (re-tokenising the joined string could merge across it).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import random
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from elrea_ray.config import DATA_FORMATS, DataConfig
from elrea_ray.scorers import BENCHMARKS, LETTERS, boxed_content, gold_letter, last_boxed, parse_mathqa_options

SPLITS = ("train", "validation", "test")
FORMATS = DATA_FORMATS
# The scorer a file format implies (elrea_ray.scorers); a row's `benchmark` field or the config's
# data.benchmarks (per source) override it. Formats absent here are scored by `scorers.score`'s generic rule.
FORMAT_BENCHMARK = {
    "question_answer": "gsm8k",
    "math": "math",
    "multiple_choice": "mmlu",
    "bbh": "bbh",
    "svamp": "svamp",
    "mathqa": "mathqa",
    "messages": "less",
}

# Small settings for a 135M model on CPU: short prompts (about 40-75 tokens with SmolLM2's chat
# template), answers of a few tokens, and item spaces large enough that 500 train items leave
# plenty of unseen ones for validation/test (which drop any question seen in train).
# Measured with 3000 draws: chain_sum with 2 one-digit terms has only 200 distinct questions and
# products with 2 one-digit factors only 100, so a 500-item train split holds ~all of them and
# a deduplicated test split would be empty; hence 3 terms below (about 4,000 and 1,000 items).
# basic_arithmetic keeps allow_parentheses=True: its "simple" mode evaluates left to right
# ("4 - 5 * 3" -> -3), while the parenthesised mode uses Python's precedence.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "products": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 3,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+", "-", "*"],
        "allow_parentheses": True,
        "allow_negation": False,
    },
    "spell_backward": {"min_word_len": 3, "max_word_len": 5},
    "letter_counting": {"min_words": 3, "max_words": 5},
    "lcm": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 40},
    "gcd": {"min_numbers": 2, "max_numbers": 2, "min_value": 2, "max_value": 100},
    "leg_counting": {"min_animals": 1, "max_animals": 3, "min_instances": 1, "max_instances": 6},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 10},
    "word_sequence_reversal": {"min_words": 2, "max_words": 3},
    "count_bits": {"min_n": 1, "max_n": 1023},
}


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, the row and the problem."""


# -- reasoning-gym --------------------------------------------------------------------------------


def _split_seed(seed: int, split: str, family: str) -> int:
    """A seed per (seed, split, family). reasoning-gym items are Random(seed + idx), so seeds must
    be far apart: a 31-bit hash makes two splits' index windows overlap with odds ~ n / 2^31."""
    digest = hashlib.sha256(f"elrea-ray/{seed}/{split}/{family}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def _jsonable(x: Any) -> Any:
    """reasoning-gym entries hold tuples, sets, Fractions...; make them plain JSON values."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        items = [_jsonable(v) for v in x]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (Fraction, Decimal)):
        return str(x)
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return _jsonable(x.tolist())
    return str(x)


def _family_config(family: str, family_config: dict | None) -> dict:
    cfg = dict(FAMILY_CONFIGS.get(family, {}) if family_config is None else family_config)
    for reserved in ("seed", "size"):
        if reserved in cfg:
            raise DataError(
                f"the config of reasoning-gym family {family!r} must not set {reserved!r}; "
                "elrea-ray derives it from the run seed and the split size"
            )
    return _jsonable(cfg)


def _create_dataset(family: str, cfg: dict, size: int, seed: int):
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if family not in DATASETS:
        raise DataError(
            f"unknown reasoning-gym task family {family!r}; known families include "
            f"{', '.join(sorted(FAMILY_CONFIGS))} (all: reasoning_gym.factory.DATASETS)"
        )
    try:
        return reasoning_gym.create_dataset(family, size=size, seed=seed, **cfg)
    except (TypeError, AssertionError, ValueError) as e:
        raise DataError(f"reasoning-gym family {family!r} rejects the config {cfg}: {e}") from e


def reasoning_gym_rows(
    family: str,
    split: str,
    n: int,
    seed: int,
    family_config: dict | None = None,
    *,
    system_prompt: str | None = None,
    exclude_questions: set[str] | None = None,
) -> list[dict]:
    """`n` rows of one reasoning-gym family for one split (the split and family pick the seed).

    family_config: the family's generator settings; None means FAMILY_CONFIGS[family] (or the
    generator's own defaults for a family not listed), {} always means the generator's defaults.
    exclude_questions: questions to skip (and, once taken, not to repeat); the generator is read
    on past n until n rows are found or 20n + 1000 items were tried, so a family whose item space
    is nearly used up by train yields fewer rows.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = _family_config(family, family_config)
    tries = n if exclude_questions is None else 20 * n + 1000
    ds = _create_dataset(family, cfg, size=max(tries, 1), seed=_split_seed(seed, split, family))
    seen = None if exclude_questions is None else set(exclude_questions)
    rows: list[dict] = []
    for idx in range(tries):
        if len(rows) >= n:
            break
        entry = _jsonable(ds[idx])
        question = entry["question"]
        if seen is not None:
            if question in seen:
                continue
            seen.add(question)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        answer = str(entry["answer"])
        rows.append(
            {
                "example_id": f"{split}-{family}-{len(rows):06d}",
                "source": family,
                "prompt": json.dumps(messages, ensure_ascii=False),
                "response": answer,
                "answer": answer,
                "meta": json.dumps({"family": family, "entry": entry, "dataset_config": cfg}, ensure_ascii=False),
            }
        )
    return rows


# -- files ----------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")
_EXPECTED = {
    "instruction": "columns instruction, response (optional: system, source, answer)",
    "alpaca": "columns instruction, input, output (optional: system, source, answer)",
    "messages": "a column messages, a list of {role, content} ending with the assistant's reply "
    "(optional: source, answer)",
    "prompt_completion": "columns prompt, completion (optional: system, source, answer)",
    "question_answer": "columns question, answer (GSM8K style, final answer after '####')",
    "math": "columns problem, solution (MATH style, final answer in \\boxed{})",
    "multiple_choice": "columns question, choices (a list of strings), answer (a letter or a 0-based "
    "index; MMLU style)",
    "bbh": "columns input, target (BIG-Bench Hard style)",
    "svamp": "columns Body, Question, Answer (SVAMP style, the answer a number)",
    "mathqa": "columns Problem, options ('a ) 38 , b ) 27 , ...'), correct (a letter; MathQA style)",
}


class _BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _check_utf8(path: Path) -> None:
    """Decode the whole file incrementally, so a bad byte is reported with its line number."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                with open(path, "rb") as g:
                    line = g.read(max(bad, 0)).count(b"\n") + 1
                raise DataError(
                    f"{path} is not UTF-8 text (undecodable byte at line {line}); re-save it as UTF-8"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"{path} is not UTF-8 text (it ends inside a multi-byte character); re-save it as UTF-8"
            ) from None


def _raw_records(path: Path) -> tuple[list[tuple[str, Any]], list[str]]:
    """[(where, record or _BadRow)], columns. JSON/JSONL are parsed with the json module rather than
    `datasets`, whose JSON loader fails on a malformed line or on a column mixing types with
    unreadable pyarrow errors and a 0-based row; Parquet is read with pyarrow."""
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".csv":
        return _dataset_records(_load_dataset(str(path), "csv", data_files=str(path), split="train"), str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path} is not a readable Parquet file: {e}") from e
        if table.num_rows == 0:
            raise DataError(f"{path} is empty (a Parquet file with no rows)")
        return [(f"row {i + 1}", r) for i, r in enumerate(table.to_pylist())], table.column_names
    if suffix not in (".jsonl", ".ndjson", ".json"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")
    _check_utf8(path)
    text = path.read_text(encoding="utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{path} is empty")
    records: list[tuple[str, Any]] = []
    doc = None
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # maybe JSON lines in a .json file
        if isinstance(doc, dict):  # {"data": [...]} and the like: the one list of records inside
            lists = [v for v in doc.values() if isinstance(v, list)]
            doc = lists[0] if len(lists) == 1 else None
            if doc is None:
                raise DataError(f"{path}: a JSON object must hold exactly one list of records")
    if isinstance(doc, list):
        records = [(f"row {i + 1}", r) for i, r in enumerate(doc)]
    else:
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append((f"line {i + 1}", json.loads(line)))
            except json.JSONDecodeError as e:  # reported in file order with the other bad rows
                bad = _BadRow("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})")
                records.append((f"line {i + 1}", bad))
    if not records:
        raise DataError(f"{path} is empty (no records)")
    columns: dict[str, None] = {}
    for _, r in records:
        if isinstance(r, dict):
            columns.update(dict.fromkeys(r))
    return records, list(columns)


def _load_dataset(label: str, path: str, **kwargs):
    """`datasets.load_dataset`, its failures turned into one DataError naming what was asked for."""
    import os

    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # datasets raises many types (missing cache, bad split, parse errors)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = (
            (
                " (HF_HUB_OFFLINE is set: the dataset must already be in the local Hugging Face "
                "cache or be a local folder)"
            )
            if offline
            else ""
        )
        raise DataError(f"{label}: could not load with datasets: {type(e).__name__}: {e}{hint}") from e


def _dataset_records(ds, label: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """[(where, record)], columns of a `datasets.Dataset`; rows are numbered from 1."""
    if len(ds) == 0:
        raise DataError(f"{label} is empty (no rows)")
    return [(f"row {i + 1}", r) for i, r in enumerate(ds)], list(ds.column_names)


def hub_rows(
    entry: dict, fmt: str = "auto", bad_rows: str = "error", system_prompt: str | None = None
) -> tuple[list[dict], dict]:
    """Canonical rows of one `data.hub` entry ({path, name, split, source, use_for}) and the
    same counts as read_rows; a bad row is named by dataset, split and 1-based row."""
    path, hf_split = entry["path"], entry["split"]
    label = f"{path}" + (f" ({entry['name']})" if entry.get("name") else "") + f" split {hf_split}"
    ds = _load_dataset(label, path, name=entry.get("name") or None, split=hf_split)
    records, columns = _dataset_records(ds, label)
    stem = entry.get("source") or path.rstrip("/").rsplit("/", 1)[-1]
    return _canonical_rows(
        records,
        columns,
        label,
        stem,
        entry.get("use_for", "train"),
        fmt,
        bad_rows,
        system_prompt,
        default_source=entry.get("source"),
    )


def _detect_format(path: Path, columns: list[str]) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "instruction" in cols and "output" in cols:
        return "alpaca"
    if "instruction" in cols:
        return "instruction"
    if "prompt" in cols and "completion" in cols:
        return "prompt_completion"
    if "problem" in cols and "solution" in cols:
        return "math"
    if "question" in cols and "choices" in cols:
        return "multiple_choice"
    if "input" in cols and "target" in cols:
        return "bbh"
    if {"Body", "Question", "Answer"} <= cols:
        return "svamp"
    if {"Problem", "options", "correct"} <= cols:
        return "mathqa"
    if "question" in cols and "answer" in cols:
        return "question_answer"
    raise DataError(
        f"{path}: cannot tell the format from the columns {sorted(cols)}; expected "
        + "; or ".join(f"{k}: {v}" for k, v in _EXPECTED.items())
    )


def _text(rec: dict, field: str, *, required: bool, nonempty: bool = False) -> str:
    if field not in rec or rec[field] is None:
        if required:
            raise _BadRow("missing_field", f"missing field {field!r}")
        return ""
    value = rec[field]
    if not isinstance(value, str):
        raise _BadRow("wrong_type", f"field {field!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise _BadRow("empty_text", f"field {field!r} is empty")
    return value


def _gold_from_response(response: str) -> str:
    """When a file has no `answer` column: a \\boxed{} answer, a GSM8K '#### N' tail, or the
    response itself when it is one short line."""
    boxed = boxed_content(response)
    if boxed is not None:
        return boxed.strip()
    if "####" in response:
        return response.rsplit("####", 1)[1].strip()
    r = response.strip()
    return r if r and "\n" not in r and len(r) <= 100 else ""


def _parse_messages(value: Any, split: str) -> tuple[list[dict], str]:
    if not isinstance(value, list) or not value:
        raise _BadRow("bad_messages", "field 'messages' must be a non-empty list of {role, content}")
    msgs = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _BadRow("bad_messages", f"message {k + 1} must be an object with role and content")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise _BadRow("bad_messages", f"message {k + 1} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise _BadRow("wrong_type", f"message {k + 1} content must be a string, got {type(content).__name__}")
        msgs.append({"role": role, "content": content})
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body:
        raise _BadRow("bad_messages", "the messages hold only a system message")
    for k, m in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _BadRow(
                "bad_messages",
                f"messages must alternate user/assistant after an optional "
                f"leading system message; found {m['role']!r} where {want!r} belongs",
            )
        if want == "user" and not m["content"].strip():
            raise _BadRow("empty_text", "a user message is empty")
    if body[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    if split == "test":
        return msgs, ""
    raise _BadRow("bad_messages", "the last message must be the assistant's reply (the training target)")


# formats that are one user turn and one response, by (instruction field, response field)
_SIMPLE_FIELDS = {
    "instruction": ("instruction", "response"),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
}


def _scalar(rec: dict, field: str) -> str:
    """A required string-or-number field as text (SVAMP answers are numbers)."""
    v = rec.get(field)
    if v is None:
        raise _BadRow("missing_field", f"missing field {field!r}")
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _BadRow("wrong_type", f"field {field!r} must be a string or a number, got {type(v).__name__}")
    text = str(v).strip()
    if not text:
        raise _BadRow("empty_text", f"field {field!r} is empty")
    return text


def multiple_choice_prompt(question: str, choices: list[str]) -> str:
    """The MMLU-style zero-shot prompt: the question, lettered choices, and what to answer."""
    lines = [question.strip(), ""] + [f"{LETTERS[k]}. {c}" for k, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer with the letter of the correct choice."


def _benchmark_record(rec: dict, fmt: str, need_response: bool) -> tuple[str, str, str, dict]:
    """(user text, response, gold, extra meta) of the paper's benchmark formats."""
    if fmt == "math":
        user = _text(rec, "problem", required=True, nonempty=True)
        response = _text(rec, "solution", required=need_response, nonempty=need_response)
        boxed = last_boxed(response)
        if need_response and boxed is None and rec.get("answer") is None:
            raise _BadRow("no_answer", "the solution has no \\boxed{} final answer (and no 'answer' field)")
        return user, response, (boxed or "").strip(), {}
    if fmt == "multiple_choice":
        question = _text(rec, "question", required=True, nonempty=True)
        choices = rec.get("choices")
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices)
        ):
            raise _BadRow("bad_choices", f"field 'choices' must be a list of 2 to {len(LETTERS)} strings")
        choices = [str(c) for c in choices]
        letter = gold_letter(_scalar(rec, "answer"), choices)
        if letter is None:
            raise _BadRow(
                "bad_answer",
                f"field 'answer' must be a letter A-{LETTERS[len(choices) - 1]}, "
                "a 0-based index or the text of a choice",
            )
        return multiple_choice_prompt(question, choices), letter, letter, {"choices": choices}
    if fmt == "bbh":
        user = _text(rec, "input", required=True, nonempty=True)
        target = _scalar(rec, "target")
        return user, target, target, {}
    if fmt == "svamp":
        body = _text(rec, "Body", required=True, nonempty=True)
        question = _text(rec, "Question", required=True, nonempty=True)
        value = _scalar(rec, "Answer")
        return f"{body.strip()} {question.strip()}", value, value, {}
    if fmt == "mathqa":  # value prediction (paper: only the correct option's value is kept)
        problem = _text(rec, "Problem", required=True, nonempty=True)
        choices = parse_mathqa_options(_text(rec, "options", required=True, nonempty=True))
        correct = _scalar(rec, "correct").lower().strip("() ")
        if len(choices) < 2 or correct not in "abcde"[: len(choices)]:
            raise _BadRow(
                "bad_answer",
                "field 'correct' must name one of the options a-e, and 'options' "
                "must read like 'a ) 38 , b ) 27 , ...'",
            )
        value = choices["abcde".index(correct)]
        rationale = _text(rec, "Rationale", required=False)
        return problem, rationale or value, value, {"choices": choices}
    raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


def _row_from_record(rec: Any, fmt: str, split: str) -> tuple[list[dict], str, str | None, str | None, dict]:
    """(prompt messages, response, system or None, gold answer or None, extra meta) of one record."""
    if not isinstance(rec, dict):
        raise _BadRow("wrong_type", f"a record must be a JSON object, got {type(rec).__name__}")
    need_response = split != "test"  # test rows may come without a reference response
    system = _text(rec, "system", required=False) or None
    gold = None
    meta: dict = {}
    if fmt in ("math", "multiple_choice", "bbh", "svamp", "mathqa"):
        user, response, gold, meta = _benchmark_record(rec, fmt, need_response)
        messages = [{"role": "user", "content": user}]
    elif fmt in _SIMPLE_FIELDS:
        user_field, response_field = _SIMPLE_FIELDS[fmt]
        user = _text(rec, user_field, required=True, nonempty=True)
        response = _text(rec, response_field, required=need_response, nonempty=need_response)
        messages = [{"role": "user", "content": user}]
        if fmt == "question_answer":  # GSM8K style: the gold answer follows "####"
            gold = response.rsplit("####", 1)[1].strip() if "####" in response else response.strip()
    elif fmt == "alpaca":
        instruction = _text(rec, "instruction", required=True, nonempty=True)
        extra = _text(rec, "input", required=False)
        response = _text(rec, "output", required=need_response, nonempty=need_response)
        user = instruction + "\n\n" + extra if extra.strip() else instruction
        messages = [{"role": "user", "content": user}]
    elif fmt == "messages":
        if "messages" not in rec or rec["messages"] is None:
            raise _BadRow("missing_field", "missing field 'messages'")
        messages, response = _parse_messages(rec["messages"], split)
        if need_response and not response.strip():
            raise _BadRow("empty_text", "the assistant's reply is empty")
        system = None  # a system message, if any, is already in the list
    else:
        raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt not in ("question_answer", "multiple_choice") and rec.get("answer") is not None:
        a = rec["answer"]  # (in those two formats "answer" is the response / the gold letter)
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise _BadRow("wrong_type", f"field 'answer' must be a string or a number, got {type(a).__name__}")
        gold = str(a)
    benchmark = rec.get("benchmark")
    if benchmark is not None:
        if benchmark not in BENCHMARKS:
            raise _BadRow(
                "bad_benchmark", f"field 'benchmark' is {benchmark!r}; expected one of {', '.join(BENCHMARKS)}"
            )
        meta["benchmark"] = benchmark
    elif fmt in FORMAT_BENCHMARK:
        meta["benchmark"] = FORMAT_BENCHMARK[fmt]
    return messages, response, system, gold, meta


def read_rows(
    path: str, split: str, fmt: str = "auto", bad_rows: str = "error", system_prompt: str | None = None
) -> tuple[list[dict], dict]:
    """Canonical rows of one JSONL / JSON / Parquet file, and {"read": n, "skipped": {reason: n}}.

    fmt: auto (from the columns) | one of FORMATS (the paper's benchmark files: question_answer =
    GSM8K, math, multiple_choice = MMLU, bbh, svamp, mathqa). A `benchmark` column picks the
    scorer per row (else FORMAT_BENCHMARK of the format). bad_rows: "error" raises a DataError naming the file, the
    row (1-based line for JSONL) and the problem; "skip" drops the row and counts it by reason.
    system_prompt: added as a system message to rows that carry none of their own.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if bad_rows not in ("error", "skip"):
        raise DataError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {path} does not exist")
    if p.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    records, columns = _raw_records(p)
    return _canonical_rows(records, columns, path, p.name.split(".")[0], split, fmt, bad_rows, system_prompt)


def _canonical_rows(
    records,
    columns,
    path: str,
    stem: str,
    split: str,
    fmt: str,
    bad_rows: str,
    system_prompt: str | None,
    default_source: str | None = None,
):
    """read_rows' body for records from any reader: `path` names the origin in errors, `stem`
    builds example ids and is the source of rows without one (unless `default_source`)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = _detect_format(Path(path), columns)
    rows, skipped = [], {}
    for where, rec in records:
        try:
            if isinstance(rec, _BadRow):
                raise rec
            messages, response, system, gold, meta = _row_from_record(rec, fmt, split)
            source = rec.get("source")
            if source is not None and not isinstance(source, str):
                raise _BadRow("wrong_type", f"field 'source' must be a string, got {type(source).__name__}")
        except _BadRow as bad:
            if bad_rows == "error":
                hint = "" if bad.reason == "invalid_json" else f" (format {fmt} expects {_EXPECTED[fmt]})"
                raise DataError(f"{path}, {where}: {bad.message}{hint}") from None
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            continue
        system = system or system_prompt
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        source = source or default_source
        number = int(where.split()[1])
        rows.append(
            {
                "example_id": f"{split}-{stem}-{number:06d}",
                "source": source.strip() if source and source.strip() else stem,
                "prompt": json.dumps(messages, ensure_ascii=False),
                "response": response,
                "answer": gold if gold is not None else _gold_from_response(response),
                # file and row for errors found later (too long for the tokenizer), plus the benchmark
                "meta": json.dumps({**meta, "file": str(path), "row": where}, ensure_ascii=False),
            }
        )
    return rows, {"read": len(records), "skipped": skipped}


# -- splits ---------------------------------------------------------------------------------------


def build_splits_with_report(cfg: DataConfig, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """The three splits and what was read: per split, rows per source and, for files, the
    read/skipped counts per file (for the manifest)."""
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    report: dict[str, Any] = {"kind": cfg.kind, "files": {}}
    if cfg.kind == "reasoning_gym":
        sizes = {"train": cfg.train_per_source, "validation": cfg.validation_per_source, "test": cfg.test_per_source}
        for family in cfg.sources:
            seen: set[str] = set()
            for split in SPLITS:
                # validation/test skip any question already in an earlier split (and repeats)
                rows = reasoning_gym_rows(
                    family,
                    split,
                    sizes[split],
                    seed,
                    None,
                    system_prompt=cfg.system_prompt,
                    exclude_questions=None if split == "train" else seen,
                )
                seen.update(json.loads(r["meta"])["entry"]["question"] for r in rows)
                splits[split].extend(rows)
    elif cfg.kind == "files":
        files = {"train": cfg.train_files, "validation": cfg.validation_files, "test": cfg.test_files}
        for split in SPLITS:
            stems: dict[str, str] = {}
            for f in files[split]:
                stem = Path(f).name.split(".")[0]
                if stem in stems:
                    raise DataError(
                        f"{f} and {stems[stem]} share the name {stem!r}, which example ids "
                        "are built from; rename one of them"
                    )
                stems[stem] = f
                rows, counts = read_rows(f, split, cfg.format, cfg.bad_rows, cfg.system_prompt)
                if cfg.benchmarks:
                    rows = [_with_benchmark(r, cfg.benchmarks) for r in rows]
                report["files"][f] = {"split": split, **counts, "kept": len(rows)}
                splits[split].extend(rows)
            for h in cfg.hub:
                if h.get("use_for", "train") != split:
                    continue
                rows, counts = hub_rows(h, cfg.format, cfg.bad_rows, cfg.system_prompt)
                if cfg.benchmarks:
                    rows = [_with_benchmark(r, cfg.benchmarks) for r in rows]
                key = f"{h['path']}:{h.get('name') or ''}:{h['split']}"
                report["files"][key] = {"split": split, **counts, "kept": len(rows)}
                splits[split].extend(rows)
        if not cfg.validation_files:
            splits["train"], splits["validation"] = _hold_out(splits["train"], cfg.validation_per_source, seed)
    elif cfg.kind == "bigbench":
        from elrea_ray import bigbench

        sizes = {"train": cfg.train_per_source, "validation": cfg.validation_per_source, "test": cfg.test_per_source}
        try:
            archive = bigbench.fetch_archive(archive=cfg.bigbench_archive or None)
            tasks = bigbench.load_tasks(list(cfg.tasks), archive)
            for name in cfg.tasks:
                rows = bigbench.task_rows(name, tasks[name], seed, sizes, cfg.shots, cfg.system_prompt)
                for split in SPLITS:
                    splits[split].extend(rows[split])
        except bigbench.BigBenchError as e:
            raise DataError(str(e)) from None
        report["bigbench"] = {"archive": archive.name, "tasks": list(cfg.tasks), "shots": cfg.shots}
    else:
        raise DataError(f"unknown data kind {cfg.kind!r}; use reasoning_gym, files or bigbench")
    if not splits["train"]:
        raise DataError("the training split is empty (every row was skipped or no file had rows)")
    if cfg.eval_shots:
        # shot_files first; a source they do not cover draws from its training rows
        pool = [r for f in cfg.shot_files for r in read_rows(f, "train", cfg.format, "error", None)[0]]
        covered = {r["source"] for r in pool}
        pool += [r for r in splits["train"] if r["source"] not in covered]
        splits = with_eval_shots(splits, cfg.eval_shots, pool, seed)
        report["eval_shots"] = dict(cfg.eval_shots)
    ids = [r["example_id"] for s in SPLITS for r in splits[s]]
    if len(set(ids)) != len(ids):
        raise DataError("example ids are not unique across the splits; give the files distinct names")
    report["rows"] = {s: _count_by_source(splits[s]) for s in SPLITS}
    return splits, report


def _shots_for(row: dict, eval_shots: dict[str, int]) -> int:
    """How many solved examples precede `row`: by its source, else its benchmark, else "*"."""
    if row["source"] in eval_shots:
        return eval_shots[row["source"]]
    benchmark = json.loads(row["meta"] or "{}").get("benchmark")
    return eval_shots.get(benchmark, eval_shots.get("*", 0))


def with_eval_shots(
    splits: dict[str, list[dict]], eval_shots: dict[str, int], pool: list[dict], seed: int
) -> dict[str, list[dict]]:
    """The splits with few-shot validation and test prompts: each row gets `_shots_for` solved
    examples of its own source from `pool` (never one asking its own question) as earlier
    (user, assistant) turns after any system message, as a chat model is few-shot prompted. A
    row's examples are drawn by a generator seeded with the run seed and its id, so they do not
    depend on the other rows; their ids go to its meta ("shots"). Training rows are unchanged."""
    by_source: dict[str, list[tuple[str, dict]]] = {}  # source -> [(its question, row)]
    for r in pool:
        by_source.setdefault(r["source"], []).append((json.loads(r["prompt"])[-1]["content"], r))
    out = {"train": splits["train"]}
    for split in ("validation", "test"):
        out[split] = []
        for row in splits[split]:
            k = _shots_for(row, eval_shots)
            if not k:
                out[split].append(row)
                continue
            messages = json.loads(row["prompt"])
            candidates = [r for q, r in by_source.get(row["source"], []) if q != messages[-1]["content"]]
            if len(candidates) < k:
                raise DataError(
                    f"data.eval_shots: {split} row {row['example_id']} (source {row['source']!r}) wants {k} "
                    f"solved examples of its source, but only {len(candidates)} are there to draw from "
                    "(the rows of data.shot_files for that source, else its training rows)"
                )
            picks = random.Random(f"{seed}:{row['example_id']}").sample(candidates, k)
            system = messages[:1] if messages[0]["role"] == "system" else []
            turns = []
            for s in picks:
                turns += [m for m in json.loads(s["prompt"]) if m["role"] != "system"]
                turns.append({"role": "assistant", "content": s["response"]})
            meta = {**json.loads(row["meta"] or "{}"), "shots": [s["example_id"] for s in picks]}
            prompt = json.dumps(system + turns + messages[len(system) :], ensure_ascii=False)
            out[split].append({**row, "prompt": prompt, "meta": json.dumps(meta, ensure_ascii=False)})
    return out


def _with_benchmark(row: dict, benchmarks: dict[str, str]) -> dict:
    """The config's per-source benchmark (data.benchmarks) overrides the one the file implies."""
    if row["source"] not in benchmarks:
        return row
    meta = json.loads(row["meta"] or "{}")
    meta["benchmark"] = benchmarks[row["source"]]
    return {**row, "meta": json.dumps(meta, ensure_ascii=False)}


def build_splits(cfg: DataConfig, seed: int) -> dict[str, list[dict]]:
    """{"train": [...], "validation": [...], "test": [...]} of canonical rows, deterministic in seed."""
    return build_splits_with_report(cfg, seed)[0]


def _hold_out(train: list[dict], per_source: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Validation from train when no validation file is given: per source, a seeded sample of
    min(per_source, 10%) rows."""
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(train):
        by_source.setdefault(r["source"], []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for src in sorted(by_source):
        idx = by_source[src]
        held.update(rng.sample(idx, min(per_source, len(idx) // 10)))
    return ([r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held])


def _count_by_source(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["source"]] = out.get(r["source"], 0) + 1
    return out


# -- tokenisation ---------------------------------------------------------------------------------


def _prompt_text(tokenizer, prompt_messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)


def render_prompt(tokenizer, prompt_messages: list[dict]) -> list[int]:
    """The instruction tokens: the chat template's rendering of the prompt messages with the
    generation prompt (assistant header). Training masks, gradient features, evaluation and
    serving all start from exactly these ids."""
    return list(tokenizer(_prompt_text(tokenizer, prompt_messages), add_special_tokens=False)["input_ids"])


def _template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _special_strings(tokenizer) -> list[str]:
    specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    specials.update(tokenizer.all_special_tokens)
    return sorted(specials, key=len, reverse=True)


def _end_of_turn_cut(tokenizer, turn_text: str, content: str) -> int:
    """Character offset just past the end-of-turn token in turn_text (the rendering of one
    assistant turn): the first special token the template writes after the content. Template
    filler after it (a newline, the next turn's header) is not part of the response."""
    at = turn_text.rfind(content.strip()) if content.strip() else 0
    if at < 0:
        raise ValueError(
            f"the chat template of {_template_name(tokenizer)} does not write the assistant "
            "content verbatim, so the response tokens cannot be located"
        )
    after = at + len(content.strip())
    best = None
    for sp in _special_strings(tokenizer):
        i = turn_text.find(sp, after)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(sp))
    if best is None:
        raise ValueError(
            f"the chat template of {_template_name(tokenizer)} writes no special end-of-turn "
            "token after the assistant content; decoding would never learn to stop"
        )
    return best[1]


def render_conversation(tokenizer, prompt_messages: list[dict], response: str) -> tuple[list[int], int]:
    """(ids, instruction_len): the template's rendering of the whole conversation, cut just after
    the assistant turn's end-of-turn token; ids[:instruction_len] == render_prompt(...)."""
    prompt_text = _prompt_text(tokenizer, prompt_messages)
    full = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            f"the chat template of {_template_name(tokenizer)} renders a conversation that does "
            "not start with its generation-prompt rendering; the instruction and response "
            "tokens cannot be separated"
        )
    cut = len(prompt_text) + _end_of_turn_cut(tokenizer, full[len(prompt_text) :], response)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(full[:cut], add_special_tokens=False)["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"the chat template of {_template_name(tokenizer)}: the conversation's tokens do not "
            "start with the generation prompt's tokens (the tokenizer merges across the "
            "assistant header)"
        )
    return ids, len(prompt_ids)


def instruction_ids(tokenizer, prompt_json: str, max_length: int) -> list[int]:
    """The chat-formatted instruction of a row's `prompt` column (generation prompt included), at
    most max_length tokens: a longer one loses its first tokens, so the assistant header that
    decoding continues stays. Gradient features and evaluation both read prompts through this."""
    return render_prompt(tokenizer, json.loads(prompt_json))[-max_length:]


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: eos and the end-of-turn token the chat template writes
    after an assistant turn (Gemma <end_of_turn>, Llama 3 <|eot_id|>, Qwen <|im_end|>); every
    decoder stops on any of them, as GenerationConfig does with a list of eos ids."""
    probe = "ok"
    msgs = [{"role": "user", "content": "hi"}]
    ids, _ = render_conversation(tokenizer, msgs, probe)
    out = [ids[-1]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(int(tokenizer.eos_token_id))
    return out


def encode(tokenizer, prompt_messages: list[dict], response: str | None, max_length: int) -> dict | None:
    """{"input_ids": instruction ids + response ids, "instruction_len": int}, or None when longer
    than max_length (the paper drops such examples; too_long_rows counts them). The instruction is
    render_prompt; the response is the assistant turn of the full rendering up to and including
    its end-of-turn token. response None gives the instruction alone (gradient features, decoding)."""
    if response is None:
        ids = render_prompt(tokenizer, prompt_messages)
        instruction_len = len(ids)
    else:
        ids, instruction_len = render_conversation(tokenizer, prompt_messages, response)
    if len(ids) > max_length:
        return None
    return {"input_ids": ids, "instruction_len": instruction_len}


def too_long_rows(tokenizer, splits: dict[str, list[dict]], max_length: int, bad_rows: str) -> dict:
    """Rows longer than max_length tokens: per split, how many (train and validation count the
    whole example, test its instruction, which decoding starts from). bad_rows "error" raises a
    DataError naming the file and row (or the example id); "skip" only counts them: training
    drops them (as the paper does) and feature/decoding prompts keep their last max_length
    tokens (the instruction is cut from the left, so the assistant header stays)."""
    counts = {}
    for split, rows in splits.items():
        n = 0
        for r in rows:
            response = None if split == "test" else r["response"]
            if encode(tokenizer, json.loads(r["prompt"]), response, max_length) is not None:
                continue
            if bad_rows == "error":
                meta = json.loads(r.get("meta") or "{}")
                where = f"{meta['file']}, {meta['row']}" if "file" in meta else f"{split} example {r['example_id']}"
                raise DataError(
                    f"{where}: longer than model.max_length={max_length} tokens "
                    f"({'instruction' if response is None else 'instruction + response'}); "
                    "raise model.max_length or set data.bad_rows=skip to drop such rows"
                )
            n += 1
        counts[split] = n
    return counts


def sft_labels(input_ids: list[int], instruction_len: int) -> list[int]:
    """SFT targets: loss on the response tokens only (-100 on the instruction)."""
    return [-100] * instruction_len + list(input_ids[instruction_len:])


def instruction_labels(input_ids: list[int], instruction_len: int) -> list[int]:
    """ELREA gradient-feature targets: the instruction tokens only (-100 on the response)."""
    return list(input_ids[:instruction_len]) + [-100] * (len(input_ids) - instruction_len)


def collate(
    batch_input_ids: list[list[int]], batch_labels: list[list[int]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad to the longest member: input_ids, attention_mask [B, T] long; labels -100 on pads."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(batch_input_ids) != len(batch_labels) or not batch_input_ids:
        raise ValueError("collate needs a non-empty batch with one label list per input")
    width = max(len(x) for x in batch_input_ids)
    ids = torch.full((len(batch_input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_input_ids), width), dtype=torch.long)
    labels = torch.full((len(batch_input_ids), width), -100, dtype=torch.long)
    for b, (x, y) in enumerate(zip(batch_input_ids, batch_labels)):
        if len(x) != len(y):
            raise ValueError(f"example {b}: {len(x)} input ids but {len(y)} labels")
        sl = slice(0, len(x)) if side == "right" else slice(width - len(x), width)
        ids[b, sl] = torch.as_tensor(x, dtype=torch.long)
        labels[b, sl] = torch.as_tensor(y, dtype=torch.long)
        mask[b, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_bucketed_batches(
    lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, chunk_batches: int = 50
) -> list[list[int]]:
    """Batches of indices with similar lengths, every index exactly once.

    Indices are shuffled, cut into chunks of chunk_batches x batch_size, sorted by length inside
    each chunk and sliced into batches, whose order is then shuffled. A batch costs its longest
    member times its size: on CPU one 217-token example made a batch of ~50-token ones 5x slower.
    shuffle=False keeps the index order (chunks in order, batches in order).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * max(1, chunk_batches)
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    if shuffle:
        rng.shuffle(batches)
    return batches
