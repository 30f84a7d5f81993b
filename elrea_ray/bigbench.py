"""BIG-bench tasks as instruction rows, read from the `bigbench==1.0.0` source distribution.

The sdist on PyPI (Apache-2.0) carries every `task.json` under
`bigbench/benchmark_tasks/<task>/[<subtask>/]task.json`. Installing it is not needed (its
dependencies are heavy): `fetch_archive` runs `pip download --no-deps` once into the cache, and
`load_tasks` reads the chosen tasks straight from the archive (one pass, then cached as JSON).

A task's examples become rows the way BIG-bench formats them (`bigbench/api/json_task.py`):
`task_prefix` + few-shot context + `example_input_prefix` + input + choices +
`example_output_prefix`, as one user turn. Two departures, both because we score generated text
where BIG-bench scores the options' log-likelihood:
- multiple-choice options are always listed in the prompt (many tasks set
  `append_choices_to_input: false`), in a seeded order, each after BIG-bench's default choice
  prefix "\\n  choice: " unless the task's own prefix starts a new line;
- few-shot examples come from the training rows only, so no test item is shown in a prompt.
A multiple-choice answer is the option the generation names (`score`); a generative answer is
scored by exact match against any of the task's targets.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "bigbench==1.0.0"
ARCHIVE = "bigbench-1.0.0.tar.gz"
_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_DEFAULT_CHOICE_PREFIX = "\n  choice: "
# Metrics a generated answer can be scored with here; tasks preferring others (BLEU, ROUGE, ...)
# are refused by name rather than scored with the wrong measure.
METRICS = ("multiple_choice_grade", "exact_str_match")


class BigBenchError(ValueError):
    """The archive cannot be fetched or read, or a task cannot be used."""


def cache_dir() -> Path:
    """$ELREA_CACHE/bigbench (default ~/.cache/elrea-ray/bigbench)."""
    return Path(os.environ.get("ELREA_CACHE", Path.home() / ".cache" / "elrea-ray")) / "bigbench"


def fetch_archive(
    cache: Path | None = None, archive: str | Path | None = None, pip_args: list[str] | None = None
) -> Path:
    """The sdist's path: `archive` if given, else the cached copy, else `pip download --no-deps`
    into the cache, the one network access (pip's own settings apply: PIP_INDEX_URL, a proxy;
    `pip_args`: more arguments, e.g. ["--index-url", URL])."""
    if archive:
        path = Path(archive)
        if not path.is_file():
            raise BigBenchError(f"data.bigbench_archive={str(archive)!r} is not a file")
        return path
    cache = cache or cache_dir()
    path = cache / ARCHIVE
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            SDIST,
            "-d",
            tmp,
            *(pip_args or []),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / ARCHIVE
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise BigBenchError(
                f"could not fetch {SDIST} with pip ({' | '.join(tail) or 'no output'}); download it where "
                f"the package index is reachable (pip download --no-deps {SDIST}) and set "
                f"data.bigbench_archive to the .tar.gz, or copy it to {path}"
            )
        os.replace(got, path)  # atomic: a killed download never leaves a half archive in the cache
    return path


def _member(task: str) -> str:
    return _TASKS + task.replace(":", "/") + "/task.json"


def _archive_id(archive: Path) -> str:
    """Names the archive's tasks in the cache: its size and first MiB (another archive, another id)."""
    with open(archive, "rb") as f:
        head = f.read(1 << 20)
    return hashlib.sha1(str(archive.stat().st_size).encode() + head).hexdigest()[:12]


def _cached(folder: Path, task: str) -> Path:
    return folder / (task.replace(":", "__") + ".json")


def load_tasks(tasks: list[str], archive: Path, cache: Path | None = None) -> dict[str, dict]:
    """{task: its task.json} for `tasks` ("name" or "name:subtask"), one pass over the archive
    for those not cached yet. An unknown name, or a task whose examples live in its subtasks, is
    an error that lists the names to use instead."""
    folder = (cache or cache_dir()) / "tasks" / _archive_id(Path(archive))
    out = {t: json.loads(_cached(folder, t).read_text()) for t in tasks if _cached(folder, t).is_file()}
    missing = {_member(t): t for t in tasks if t not in out}
    if not missing:
        return out
    names, parents = [], []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if m.name.startswith(_TASKS) and m.name.endswith("/task.json"):
                    names.append(m.name[len(_TASKS) : -len("/task.json")].replace("/", ":"))
                if m.name in missing:
                    task = missing.pop(m.name)
                    try:
                        data = json.load(tar.extractfile(m))
                    except ValueError as e:
                        raise BigBenchError(f"{archive}: {m.name} is not valid JSON: {e}") from None
                    if "examples" not in data:
                        parents.append(task)  # read on: its subtasks' names follow
                        continue
                    out[task] = data
                    dest = _cached(folder, task)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(".tmp")
                    tmp.write_text(json.dumps(data))
                    os.replace(tmp, dest)
                    if not missing and not parents:
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BigBenchError(f"{archive} is not a readable BIG-bench archive: {e}") from None
    for task in parents:
        subs = [n for n in names if n.startswith(task + ":")]
        raise BigBenchError(f"data.tasks: {task!r} keeps its examples in subtasks; name them: {', '.join(subs)}")
    for task in missing.values():
        near = difflib.get_close_matches(task, names, n=5, cutoff=0.6)
        raise BigBenchError(
            f"data.tasks: BIG-bench has no task {task!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
        )
    return out


def _choice_prefix(task: dict) -> str:
    prefix = task.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    return prefix if prefix.startswith("\n") else _DEFAULT_CHOICE_PREFIX


def _examples(name: str, task: dict) -> list[dict]:
    """The task's examples as {input, targets, choices (or None)}; checks the metric."""
    if "examples" not in task:
        raise BigBenchError(f"data.tasks: {name!r} keeps its examples in subtasks; name one ({name}:<subtask>)")
    metric = task.get("preferred_score")
    if metric not in METRICS:
        raise BigBenchError(
            f"data.tasks: {name!r} is scored by {metric!r}; generated answers can be scored "
            f"only for tasks preferring {' or '.join(METRICS)}"
        )
    out = []
    for i, ex in enumerate(task["examples"]):
        scores = ex.get("target_scores")
        if metric == "multiple_choice_grade":
            if not isinstance(scores, dict) or len(scores) < 2:
                raise BigBenchError(f"{name} example {i}: a multiple-choice example needs target_scores")
            best = max(scores.values())
            # every option with the top score is right (BIG-bench's multiple_choice_grade); the
            # first one is the training response, as BIG-bench picks its target
            golds = [k for k, v in scores.items() if v == best]
            out.append({"input": ex["input"], "targets": golds, "choices": list(scores)})
        else:
            target = ex.get("target")
            targets = target if isinstance(target, list) else [target]
            if not targets or not all(isinstance(t, str) for t in targets):
                raise BigBenchError(f"{name} example {i}: 'target' must be a string or a list of strings")
            out.append({"input": ex["input"], "targets": targets, "choices": None})
    return out


def _format(task: dict, ex: dict, rng: random.Random) -> str:
    """One example's query as BIG-bench's default_format_fn builds it (choices always listed)."""
    text = ex["input"]
    if ex["choices"]:
        options = sorted(ex["choices"])
        rng.shuffle(options)
        prefix = _choice_prefix(task)
        text += prefix + prefix.join(options)
    return task.get("example_input_prefix", "\nQ: ") + text + task.get("example_output_prefix", "\nA: ")


def task_rows(
    name: str, task: dict, seed: int, sizes: dict[str, int], shots: int = 0, system_prompt: str | None = None
) -> dict[str, list[dict]]:
    """{split: rows} of one task: a seeded shuffle gives test, then validation, then train (the
    rest, capped at sizes["train"]); `shots` few-shot examples, drawn from train, before each query."""
    examples = _examples(name, task)
    order = list(range(len(examples)))
    random.Random(f"{seed}:{name}").shuffle(order)
    n_test, n_val = sizes["test"], sizes["validation"]
    picks = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :][: sizes["train"]],
    }
    if len(picks["train"]) < max(1, shots):
        raise BigBenchError(
            f"data.tasks: {name!r} has {len(examples)} examples; after {n_test} test and "
            f"{n_val} validation items too few are left to train on (and for shots={shots})"
        )
    rng = random.Random(f"{seed}:{name}:format")
    formatted = {i: _format(task, examples[i], rng) for i in order}
    sep = task.get("few_shot_example_separator", "\n")
    source = name.replace(":", "_")
    rows: dict[str, list[dict]] = {}
    for split, idx in picks.items():
        rows[split] = []
        for k, i in enumerate(idx):
            ex = examples[i]
            context = ""
            if shots:
                pool = [j for j in picks["train"] if j != i]
                context = (
                    sep.join(formatted[j] + examples[j]["targets"][0] for j in rng.sample(pool, min(shots, len(pool))))
                    + sep
                )
            prompt = str(task.get("task_prefix", "")) + context + formatted[i]
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": prompt.strip("\n")})
            rows[split].append(
                {
                    "example_id": f"{split}-{source}-{k:06d}",
                    "source": source,
                    "prompt": json.dumps(messages, ensure_ascii=False),
                    "response": ex["targets"][0],
                    "answer": ex["targets"][0],
                    "meta": json.dumps(
                        {
                            "benchmark": "bigbench",
                            "task": name,
                            "index": i,
                            "choices": ex["choices"],
                            "targets": ex["targets"],
                        },
                        ensure_ascii=False,
                    ),
                }
            )
    return rows


def _norm(s: str) -> str:
    s = re.sub(r"\s+", " ", s.strip().lower())
    return s.strip(" .!\"'`*")


def chosen_option(prediction: str, choices: list[str]) -> str | None:
    """The option a generation names: its first line equal to an option, else the option that
    appears earliest in the text (the longest one when several start at the same place)."""
    text = _norm(prediction)
    first = _norm(prediction.strip().splitlines()[0]) if prediction.strip() else ""
    by_norm = {_norm(c): c for c in choices}
    if first in by_norm:
        return by_norm[first]
    hits = [
        (m.start(), -len(n), c)
        for n, c in by_norm.items()
        if n
        for m in [re.search(r"(?<!\w)" + re.escape(n) + r"(?!\w)", text)]
        if m
    ]
    return min(hits)[2] if hits else None


def score(prediction: str, meta: dict) -> float:
    """1.0 if the generation names a gold option (multiple choice) or equals one of the targets
    (exact match after lower-casing and trimming spaces and end punctuation), else 0.0."""
    if meta.get("choices"):
        return float(chosen_option(prediction, meta["choices"]) in meta["targets"])
    answer = prediction.strip().splitlines()[0] if prediction.strip() else ""
    return float(_norm(answer) in {_norm(t) for t in meta["targets"]})
