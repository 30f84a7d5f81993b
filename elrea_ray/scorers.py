"""Answer scorers for the paper's benchmark formats (ELREA §5.3 / Appendix D: MATH-Combined scored
with the Hendrycks MATH answer parsing of `\\boxed{}`; MMLU and BBH by exact match).

`score(row, prediction)` scores a data row (elrea_ray/data.py) by the benchmark its meta names,
its reasoning-gym family's own scorer, or the generic rule; `score_answer(benchmark, prediction,
gold, choices)` returns 1.0 or 0.0 under one benchmark's rules. Benchmarks:

    math      final answer in the last \\boxed{} (or \\fbox{}); both sides normalised the way the
              MATH code does (units, \\left/\\right, spaces, \\dfrac, a/b vs \\frac{a}{b}, 0.5 vs
              \\frac12, "x = 3", degrees, percent, trailing .0) and compared as strings, then
              numerically when both are numbers
    gsm8k     value prediction: gold after "####"; the prediction's \\boxed{}, "#### N",
              "answer is N", else its last number; compared numerically
    svamp     value prediction as gsm8k (the gold is a number such as 27.0)
    mathqa    value prediction against the correct option's value; a chosen letter ("(b)", "b )",
              "answer: b") also counts when `choices` are known
    mmlu      multiple choice: the letter A-D; a reply giving the text of a choice counts as
              that choice's letter
    bbh       exact match after normalisation (case, spaces, trailing period, "(A)" vs "A"),
              reading "the answer is X" when present
    less      the LESS training format (chat messages): normalised exact match of the extracted
              final line / number against the gold reply
    exact     normalised exact match of the whole reply

Pure functions, no Ray, no model (reasoning-gym rows use that package's scorers).
"""

from __future__ import annotations

import functools
import json
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

BENCHMARKS = ("math", "gsm8k", "svamp", "mathqa", "mmlu", "bbh", "less", "exact")
LETTERS = "ABCDEFGHIJ"


# -- \boxed{} ------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces), or of "\\boxed 5"."""
    text = text or ""
    best = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if best < 0:
        return None
    rest = text[best:]
    head = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    rest = rest[len(head) :]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):  # "\boxed 5" (no braces)
        token = rest.strip().split()
        return token[0].rstrip(".$") if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for j, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:j]
    return None


# -- MATH normalisation ----------------------------------------------------------------------------

_UNIT_WORDS = (
    "units",
    "unit",
    "inches",
    "inch",
    "feet",
    "foot",
    "cm",
    "meters",
    "meter",
    "degrees",
    "degree",
    "dollars",
    "dollar",
    "cents",
    "hours",
    "hour",
    "minutes",
    "minute",
    "seconds",
    "second",
    "mph",
    "sq",
    "square",
)


def _closing_brace(s: str, i: int) -> int | None:
    """Index of the "}" that closes the "{" at s[i] (nested braces balanced), or None."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _brace_group(s: str, i: int) -> tuple[str, int]:
    """(content, index after) of the group starting at s[i]: "{...}" (to the end if unclosed) or
    a single character."""
    if i >= len(s):
        return "", i
    if s[i] != "{":
        return s[i], i + 1
    j = _closing_brace(s, i)
    return (s[i + 1 :], len(s)) if j is None else (s[i + 1 : j], j + 1)


def _brace_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}: every \\frac gets two braced groups."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j] + "\\frac")
        k = j + len("\\frac")
        num, k = _brace_group(s, k)
        den, k = _brace_group(s, k)
        out.append("{" + _brace_fracs(num) + "}{" + _brace_fracs(den) + "}")
        i = k


def _brace_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}."""
    return re.sub(r"\\sqrt(?!\{)(\w)", r"\\sqrt{\1}", s)


def _drop_text_units(s: str) -> str:
    """ "5 \\text{ cm}" -> "5", "\\mbox{ inches}" too; a bare "\\text{(A)}" keeps its content."""
    s = re.sub(
        r"\\(?:text|mbox|textbf|mathrm)\{\s*([A-Za-z .^0-9]*)\}",
        lambda m: (
            ""
            if m.group(1).strip().split(" ")[0].rstrip("s^0123456789.") in _UNIT_WORDS
            or (m.start() > 0 and m.group(1).startswith(" "))
            else m.group(1)
        ),
        s,
    )
    return s


def normalize_math(answer: str) -> str:
    """A MATH final answer in canonical form (own implementation of the rules of the Hendrycks
    MATH answer check): strings equal after this are the same answer."""
    s = (answer or "").strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°", "", s)  # degrees
    s = s.replace("\\$", "").replace("$", "")
    s = _drop_text_units(s)
    s = re.sub(r"\s+(?:" + "|".join(_UNIT_WORDS) + r")\b\.?$", "", s)  # "12 inches"
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" / "k=3": the answer is the right-hand side when the left is a short variable
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1]
    s = _brace_sqrt(s)
    s = s.replace(" ", "")
    s = _brace_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)  # 3/4 -> \frac{3}{4}
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)  # 12.0 -> 12
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s) if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    s = s.rstrip(".")
    return s


def _frac_value(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if m:
        if int(m.group(3)) == 0:
            return None
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return -v if m.group(1) else v
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(prediction: str, gold: str) -> bool:
    """MATH answer equivalence: equal normalised strings, or equal exact numbers."""
    p, g = normalize_math(prediction), normalize_math(gold)
    if not p:
        return False
    if p == g:
        return True
    pv, gv = _frac_value(p), _frac_value(g)
    return pv is not None and gv is not None and pv == gv


# -- numbers ---------------------------------------------------------------------------------------

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER = re.compile(r"(?<![\w.])(" + _NUM + r")(?![\d])")


def to_number(s: str) -> Decimal | None:
    """A plain number ("1,234", "-0.5", "$12", "12.", "45%") as a Decimal, else None."""
    t = (s or "").strip().replace(",", "").replace("$", "").replace("\\$", "").rstrip(".").rstrip("%")
    t = t.replace("\\%", "").strip()
    try:
        d = Decimal(t)
    except InvalidOperation:
        f = _frac_value(normalize_math(s or ""))
        return None if f is None else Decimal(f.numerator) / Decimal(f.denominator)
    return d if d.is_finite() else None


def numbers_equal(a: Decimal | None, b: Decimal | None, rel: float = 1e-4) -> bool:
    if a is None or b is None:
        return False
    return abs(a - b) <= Decimal(str(rel)) * max(Decimal(1), abs(b))


_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*[:\s]*(.+)", re.IGNORECASE)


def predicted_value(text: str) -> Decimal | None:
    """The number a value-prediction reply commits to: \\boxed{}, then "#### N", then
    "answer is N", then the last number in the reply."""
    text = text or ""
    boxed = last_boxed(text)
    if boxed is not None:
        v = to_number(boxed)
        if v is not None:
            return v
        m = _NUMBER.findall(boxed.replace("{", " ").replace("}", " "))
        return to_number(m[-1]) if m else None
    for pattern in (re.compile(r"####\s*(.+)"), _ANSWER_IS):
        m = pattern.search(text)
        if m:
            nums = _NUMBER.findall(m.group(1))
            if nums:
                return to_number(nums[0])
    nums = _NUMBER.findall(text)
    return to_number(nums[-1]) if nums else None


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution ("... #### 72" -> "72")."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


# -- choices ---------------------------------------------------------------------------------------


def parse_mathqa_options(options: str) -> list[str]:
    """MathQA's option string "a ) 38 , b ) 27.675 , c ) 30 , ..." -> ["38", "27.675", "30", ...]."""
    parts = re.split(r"(?:^|,)\s*([a-e])\s*\)\s*", options.strip())
    # re.split keeps the letters: ["", "a", "38 ", "b", "27.675 ", ...]
    out = {}
    for k in range(1, len(parts) - 1, 2):
        out[parts[k]] = parts[k + 1].strip().rstrip(",").strip()
    return [out[c] for c in "abcde" if c in out]


# A capital letter may be followed by more words ("the answer is B because ..."); a lower-case one
# only by a bracket, punctuation or the end, so "the answer is a number" picks nothing.
_LETTER_PATTERNS = (
    re.compile(
        r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\s]*\(?\s*([A-J](?![A-Za-z0-9])|[a-j](?=\s*(?:[).,:;!?]|$)))"
    ),
    re.compile(r"^\s*\(?\s*([A-Ja-j])\s*(?:\)|\.|:|$)"),
    re.compile(r"\(([A-Ja-j])\)"),
)


def _norm_text(s: str) -> str:
    s = (s or "").strip().lower()
    s = re.sub(r"\s+", " ", s)
    return s.strip(" .\"'`*")


def predicted_letter(text: str, choices: list[str] | None = None, num_choices: int = 4) -> str | None:
    """The option letter a reply picks: "B", "(B)", "B.", "Answer: B", "the answer is (b)"; or,
    when the reply is (or ends with) the text of exactly one choice, that choice's letter."""
    text = text or ""
    valid = LETTERS[: len(choices) if choices else num_choices]
    boxed = last_boxed(text)
    for candidate in ([boxed] if boxed is not None else []) + [text]:
        for pattern in _LETTER_PATTERNS:
            m = pattern.search(candidate)
            if m and m.group(1).upper() in valid:
                return m.group(1).upper()
    if choices:
        t = _norm_text(boxed if boxed is not None else text)
        first = _norm_text(text.strip().splitlines()[0]) if text.strip() else ""
        hits = [k for k, c in enumerate(choices) if _norm_text(c) and _norm_text(c) in (t, first)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
        v = predicted_value(text)  # a numeric reply matching one numeric choice
        if v is not None:
            hits = [k for k, c in enumerate(choices) if numbers_equal(v, to_number(c))]
            if len(hits) == 1:
                return LETTERS[hits[0]]
    return None


def gold_letter(gold: str, choices: list[str] | None) -> str | None:
    """A gold multiple-choice answer as a letter: "B", "(b)", "1" (0-based index) or the text."""
    g = (gold or "").strip()
    if re.fullmatch(r"\(?[A-Ja-j]\)?", g):
        letter = g.strip("()").upper()
        return letter if not choices or LETTERS.index(letter) < len(choices) else None
    if re.fullmatch(r"\d+", g) and choices and int(g) < len(choices):
        return LETTERS[int(g)]
    if choices:
        hits = [k for k, c in enumerate(choices) if _norm_text(c) == _norm_text(g)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


# -- exact match (BBH, LESS) -----------------------------------------------------------------------


def normalize_exact(s: str) -> str:
    """Case, spaces, quotes, a trailing period and "(A)" -> "a" removed."""
    s = _norm_text(s)
    m = re.fullmatch(r"\(([a-z])\)", s)
    return m.group(1) if m else s


def bbh_answer(text: str) -> str:
    """BBH replies end with "So the answer is X." (chain-of-thought prompts); else the whole reply's
    first line."""
    text = text or ""
    m = list(re.finditer(r"answer is\s*:?\s*(.+?)(?:\.\s*$|\.\s*\n|\n|$)", text, re.IGNORECASE))
    if m:
        return m[-1].group(1).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


# -- dispatch --------------------------------------------------------------------------------------


def score_answer(benchmark: str, prediction: str, gold: str, choices: list[str] | None = None) -> float:
    """1.0 when `prediction` answers correctly under `benchmark`'s rules, else 0.0."""
    prediction, gold = prediction or "", str(gold or "")
    if benchmark == "math":
        g = last_boxed(gold)
        g = g if g is not None else gold
        p = last_boxed(prediction)
        if p is None:  # no \boxed{}: the paper's parser finds no answer; accept "answer is X" too
            m = _ANSWER_IS.search(prediction)
            p = m.group(1).strip().rstrip(".") if m else ""
        return 1.0 if math_equal(p, g) else 0.0
    if benchmark in ("gsm8k", "svamp"):
        return 1.0 if numbers_equal(predicted_value(prediction), to_number(gsm8k_gold(gold))) else 0.0
    if benchmark == "mathqa":
        g = gold.strip()
        letter = gold_letter(g, choices) if choices else None
        is_letter = re.fullmatch(r"\(?[A-Ja-j]\)?", g) is not None
        value = choices[LETTERS.index(letter)] if letter and is_letter else g
        if letter and predicted_letter(prediction, choices) == letter:
            return 1.0
        v = to_number(value)
        if v is None:  # an option with units ("rs . 400", "38 %"): its first number
            nums = _NUMBER.findall(value)
            v = to_number(nums[0]) if nums else None
        return 1.0 if numbers_equal(predicted_value(prediction), v) else 0.0
    if benchmark == "mmlu":
        g = gold_letter(gold, choices)
        return 1.0 if g is not None and predicted_letter(prediction, choices) == g else 0.0
    if benchmark == "bbh":
        return 1.0 if normalize_exact(bbh_answer(prediction)) == normalize_exact(gold) and gold.strip() else 0.0
    if benchmark == "exact":
        return 1.0 if normalize_exact(prediction) == normalize_exact(gold) and gold.strip() else 0.0
    if benchmark == "less":
        return score({"answer": gold, "meta": "{}"}, prediction)
    raise ValueError(f"unknown benchmark {benchmark!r}; use one of {', '.join(BENCHMARKS)}")


# -- data rows: benchmark, reasoning-gym family or the generic rule -----------------------------

_ANY_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"  # -4, 1,234, 0.5, .5, 1e3
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _ANY_NUM)  # a number not glued to a word ("x2") or a decimal point
_WHOLE_NUMBER = re.compile(r"\s*" + _ANY_NUM + r"\.?\s*")  # a whole string that is a number ("12." too)
_ANSWER_PREFIX = re.compile(
    r"^(?:(?:so|thus|therefore|hence)[, ]+)?(?:the\s+)?(?:final\s+)?"
    r"(?:answer|result|output|solution)(?:\s+is)?\s*[:=\-]?\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`*“”‘’"


def boxed_content(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    brace = start + len("\\boxed")
    j = _closing_brace(text, brace)
    return None if j is None else text[brace + 1 : j]


def _decimal(s: str) -> Decimal | None:
    try:
        d = Decimal(s.strip().replace(",", ""))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _clean_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        for _ in range(2):  # "Answer: 'olleh'." -> olleh
            line = _ANSWER_PREFIX.sub("", line).strip()
            line = line.rstrip(".").strip().strip(_QUOTES).strip()
        return line
    return ""


def extract_answer(text: str, gold: str) -> str:
    """The answer a reader would take from generated text: the content of a \\boxed{}; else, when
    the gold answer is a number, the first number in the text (-, decimals, 1,234 commas; returned
    as the gold's spelling when numerically equal, so exact-match scorers accept "12.0" for "12");
    else the first non-empty line without quotes, a trailing period or an "Answer:" prefix."""
    text = (text or "").strip()
    gold_num = _decimal(gold) if _WHOLE_NUMBER.fullmatch(gold or "") else None
    boxed = boxed_content(text)
    if boxed is not None:
        candidate = boxed.strip()
    elif gold_num is not None:
        m = _ANY_NUMBER.search(text)
        if m is None:
            return _clean_line(text)
        candidate = m.group(0)
    else:
        return _clean_line(text)
    value = _decimal(candidate) if _WHOLE_NUMBER.fullmatch(candidate) else None
    if value is None:
        return candidate
    if gold_num is not None and value == gold_num:
        return gold.strip()
    return candidate.replace(",", "").lstrip("+")


@functools.lru_cache(maxsize=64)
def _family_scorer(family: str, config_json: str):
    """One reasoning-gym dataset object per (family, config), for its `score_answer`: some
    constructors read word lists. The config is the one the row was built with."""
    import reasoning_gym

    return reasoning_gym.create_dataset(family, size=1, seed=0, **json.loads(config_json))


def _normalise(s: str) -> str:
    return " ".join(s.strip().strip(_QUOTES).rstrip(".").split()).lower()


def score(row: dict, prediction: str) -> float:
    """1.0 if the prediction answers the row correctly, else 0.0.

    Rows whose meta names a benchmark (math, gsm8k, svamp, mathqa, mmlu, bbh, exact) use that
    benchmark's scorer (`score_answer`); reasoning-gym rows are judged by the family's own
    scorer on the extracted answer (its partial credit, e.g. 0.01 for a wrong number, counts as
    wrong below 0.99); other rows (LESS-style chat files included) by comparing the extracted
    answer with the gold one, numerically when both are numbers.
    """
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        meta = json.loads(meta) if meta.strip() else {}
    gold = str(row.get("answer") or "")
    if meta.get("benchmark") == "bigbench":  # the task's options or targets travel in the row
        from elrea_ray.bigbench import score as bigbench_score

        return bigbench_score(prediction, meta)
    if meta.get("benchmark") and meta["benchmark"] != "less":
        return score_answer(meta["benchmark"], prediction, gold, meta.get("choices"))
    if meta.get("family"):
        entry = meta["entry"]
        ds = _family_scorer(meta["family"], json.dumps(meta.get("dataset_config") or {}, sort_keys=True))
        try:
            s = ds.score_answer(answer=extract_answer(prediction, str(entry["answer"])), entry=entry)
        except Exception:  # a scorer that chokes on free text has judged it wrong
            return 0.0
        return 1.0 if s is not None and s >= 0.99 else 0.0
    boxed = boxed_content(gold)
    gold = boxed if boxed is not None else gold.rsplit("####", 1)[-1]
    gold = gold.strip()
    if not gold:
        return 0.0
    pred = extract_answer(prediction, gold)
    g, p = _decimal(gold), _decimal(pred)
    if g is not None and p is not None and _WHOLE_NUMBER.fullmatch(gold) and _WHOLE_NUMBER.fullmatch(pred):
        return 1.0 if abs(g - p) <= Decimal("1e-6") * max(Decimal(1), abs(g)) else 0.0
    return 1.0 if _normalise(pred) == _normalise(gold) else 0.0
