"""The reward rules of the built-in tasks, by name (`rft.reward_rules`).

- `paper` (the default): the rules of the UFT authors' reward code (github liumy2010/UFT, verl/utils/reward_score/
  utils.py, countdown.py, kk_logic.py, math.py; their Countdown rule is TinyZero's), re-implemented without `eval`.
  Scores 1.0 correct, 0.1 an answer that is wrong or cannot be read, 0.0 no answer (their `correctness_score` and
  `format_score`, verl/trainer/config/ppo_trainer.yaml).
- `strict`: this project's own rules, each task module's `verify` (the last `<answer>` anywhere, exact arithmetic
  with no format credit for text that is not arithmetic, `\\boxed{}` unwrapped for MATH).

The authors score the decoded prompt + response, cut at its first "Assistant:" (else "<|im_start|>assistant");
a verifier here gets the row and `text`, what follows the prompt, so the same cut is made on `row["prompt"] + text`.
Where neither holds a marker the authors score 0; here the whole text is searched (a user's prompt need not end
in "Assistant:").

- Countdown and MATH read the last `<answer>...</answer>` on the last line of that part: a response that goes on
  to a new line after its answer, or ends with a line break, has none.
- Countdown: the digit runs of the answer must be the given numbers (a multiset), the answer must hold only digits,
  `+ - * / ( ) .` and spaces, and its value must be within 1e-5 of the target; any failure scores 0.1. Python's
  `eval` reads `**` and `//` too, so they count here (uft_ray.tasks.arith, `python_ops`); an answer `eval` would
  choke on (`9**9**9**9`, `1/0`) scores 0.1 at once.
- Knights and Knaves: the last `<answer>` anywhere after the cut; an empty one scores 0; the words "knight" and
  "knave" (as substrings, any case) must occur once per person and every name must be followed by "is a
  knight|knave" (any case, the first such phrase counts), else 0.1.
- MATH: the raw answer against `row["truth"]` after Hendrycks' `strip_string` as the authors have it (no
  `\\boxed{}` unwrapping, only `\\%` removed, and where it raises the raw strings are compared).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from uft_ray.tasks import countdown, knights_knaves, math_answers
from uft_ray.tasks.arith import GENEROUS, ArithError, evaluate
from uft_ray.tasks.verifier import CORRECT, FORMATTED, NO_ANSWER, Verifier

MARKERS = ("Assistant:", "<|im_start|>assistant")  # the authors' cut, in their order
OPEN, CLOSE = "<answer>", "</answer>"
TOLERANCE = Fraction(1, 100_000)
_EQUATION = re.compile(r"[\d+\-*/().\s]+")  # the authors' allowed characters (Unicode \d and \s, as theirs)


# --- extraction ---------------------------------------------------------------------------------------------


def response_part(row: dict[str, Any], text: str) -> str:
    """What the authors search: prompt + text after the first marker; the whole text when there is none."""
    prompt = row.get("prompt") if isinstance(row, dict) else None
    full = (prompt if isinstance(prompt, str) else "") + text
    for marker in MARKERS:
        at = full.find(marker)
        if at >= 0:
            return full[at + len(marker) :]
    return text


def last_tagged(text: str) -> str | None:
    """The last match of `<answer>(.*?)</answer>` (non-greedy, left to right, as `re.finditer` finds them),
    stripped; None if there is none. Linear in the text, where the regex is quadratic on many open tags."""
    found, pos = None, 0
    while (start := text.find(OPEN, pos)) >= 0:
        end = text.find(CLOSE, start + len(OPEN))
        if end < 0:  # no later open tag has a close tag after it either
            break
        found, pos = text[start + len(OPEN) : end], end + len(CLOSE)
    return None if found is None else found.strip()


def last_line_answer(row: dict[str, Any], text: str) -> str | None:
    """Countdown's and MATH's answer: the last `<answer>` on the last line (lines split on "\\n" only)."""
    if not isinstance(text, str):
        return None
    part = response_part(row, text)
    return last_tagged(part[part.rfind("\n") + 1 :])


# --- Countdown ----------------------------------------------------------------------------------------------


def _uses_exactly(answer: str, nums: list[int]) -> bool:
    try:
        return sorted(int(d) for d in re.findall(r"\d+", answer)) == sorted(int(v) for v in nums)
    except ValueError:  # a digit run too long for int(): the authors' bare except says False
        return False


def score_countdown(row: dict[str, Any], text: str) -> float:
    """The authors' Countdown reward (module docstring)."""
    answer = last_line_answer(row, text)
    if answer is None:
        return NO_ANSWER
    if not _uses_exactly(answer, row["nums"]) or not _EQUATION.fullmatch(answer):
        return FORMATTED
    try:
        value, _ = evaluate(answer, python_ops=True, bounds=GENEROUS)
    except ArithError:  # where `eval` raises (or would run for hours), the authors give the format score
        return FORMATTED
    return CORRECT if abs(value - int(row["target"])) < TOLERANCE else FORMATTED


# --- Knights and Knaves -------------------------------------------------------------------------------------


def score_knights_knaves(row: dict[str, Any], text: str) -> float:
    """The authors' Knights and Knaves reward (module docstring)."""
    if not isinstance(text, str):
        return NO_ANSWER
    answer = last_tagged(response_part(row, text))
    if not answer:  # the authors test the answer's truth: an empty one is no answer
        return NO_ANSWER
    names, roles = row["names"], row["roles"]
    low = answer.lower()
    if low.count("knight") + low.count("knave") != len(names):
        return FORMATTED
    for name, role in zip(names, roles, strict=True):
        said = re.search(rf"\b{re.escape(name)}\b\s+is\s+a\s+\b(knight|knave)\b", answer, re.IGNORECASE)
        if said is None or said.group(1).lower() != role:
            return FORMATTED
    return CORRECT


# --- MATH ---------------------------------------------------------------------------------------------------


class _Unparsed(Exception):
    """Where the authors' `strip_string` raises; `hendrycks_equal` then compares the raw strings."""


def _right_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unparsed("units twice")
    return parts[0]


def _sqrt_braces(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    for part in rest:
        if not part:
            raise _Unparsed("\\sqrt at the end")
        head += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return head


def _frac_braces(s: str) -> str:
    head, *rest = s.split("\\frac")
    for part in rest:
        if not part:
            raise _Unparsed("\\frac at the end")
        if part[0] == "{":
            head += "\\frac" + part
        elif len(part) < 2:
            return s  # theirs gives up on the whole string here, keeping what came in
        elif part[1] == "{":
            head += "\\frac{" + part[0] + "}" + part[1:]
        else:
            head += "\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return head


def _slash_fraction(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:  # theirs catches only the assertion below: anything else ends the normalization
        raise _Unparsed("not integers around /") from None
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def hendrycks_strip(s: str) -> str:
    """The authors' `strip_string` (Hendrycks' MATH normalization), step for step; raises `_Unparsed` where it
    raises."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):  # fmt: skip
        s = s.replace(old, new)
    s = _right_units(s).replace("\\%", "")  # a bare % stays: theirs removes only \%
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5" (the left side is not stripped first)
        s = sides[1]
    s = _sqrt_braces(s).replace(" ", "")
    s = _frac_braces(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_fraction(s)


def hendrycks_equal(answer: str, truth: str) -> bool:
    """The authors' `is_equiv`: equal after normalization, or equal as given where normalization fails."""
    try:
        return hendrycks_strip(answer) == hendrycks_strip(truth)
    except _Unparsed:
        return answer == truth


def score_math(row: dict[str, Any], text: str) -> float:
    """The authors' MATH reward (module docstring)."""
    answer = last_line_answer(row, text)
    if answer is None:
        return NO_ANSWER
    return CORRECT if hendrycks_equal(answer, str(row["truth"])) else FORMATTED


# --- by name ------------------------------------------------------------------------------------------------

VERIFIERS: dict[str, dict[str, Verifier]] = {
    "paper": {
        countdown.NAME: score_countdown,
        knights_knaves.NAME: score_knights_knaves,
        math_answers.NAME: score_math,
    },
    "strict": {
        countdown.NAME: countdown.verify,
        knights_knaves.NAME: knights_knaves.verify,
        math_answers.NAME: math_answers.verify,
    },
}


def verifier_for(task: str, rules: str) -> Verifier:
    """A built-in task's verifier under the named rules (KeyError-free: a ValueError names what is wrong)."""
    if rules not in VERIFIERS:
        raise ValueError(f"reward rules {rules!r}: use one of {', '.join(VERIFIERS)}")
    if task not in VERIFIERS[rules]:
        raise ValueError(f"task {task!r} has no built-in verifier; use one of {', '.join(VERIFIERS[rules])}")
    return VERIFIERS[rules][task]
