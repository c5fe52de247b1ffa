"""MATH (Hendrycks et al.) in the MATH-lighteval layout: rows, hint chunks, and `\\boxed{}` answers compared after
Hendrycks-style normalization (`normalize`: the steps of the benchmark's own `strip_string`, re-implemented).

Files: parquet or jsonl with `problem`, `solution` (ending in a `\\boxed{...}` answer), `level` ("Level 3") and
`type` ("Algebra"), as `DigitalLearningGmbH/MATH-lighteval` ships them. `rows(records, levels=(3, 4, 5))` makes
task rows as the authors' data/math/test.parquet has them: the prompt (ending `<think> `), the solution split
into sentence chunks as the hint, each chunk keeping its separator (a split after every line break and after a
period followed by a space or tab), so `''.join(hint)` is the solution exactly, and the boxed answer as `truth`.
The prompt's example and the reference answer put the bare answer in the tag (`''.join(hint) + " </think>\\n
<answer> 12 </answer>"`), as the authors' data does, since their reward (uft_ray.tasks.rules,
`rft.reward_rules: paper`) does not unwrap `\\boxed{}`.
`verify(row, text)` (`rft.reward_rules: strict`): 1.0 when the last `<answer>` (its `\\boxed{}` if it has one)
normalizes to the truth, 0.1 for another answer, 0.0 for none. Nothing is evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from uft_ray.tasks.verifier import CORRECT, FORMATTED, NO_ANSWER, extract_answer

NAME = "math"
LEVELS = (3, 4, 5)
PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: {problem} Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
    "tags, for example <answer> 12 </answer>.\nAssistant: Let me solve this step by step.\n<think> "
)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed ") and "{" not in rest.split(" ", 2)[1][:1]:
        return rest.split(" ", 2)[1].split("$")[0]  # "\\boxed 5"
    open_at = rest.find("{")
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[open_at + 1 : i]
    return None


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
    out, parts = "", s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, tail = part[0], part[1], part[2:]
        out += f"{{{a}}}{{{b}}}{tail}" if b != "{" else f"{{{a}}}{b}{tail}"
    return out


def _fix_slash(s: str) -> str:
    # "3/4" -> \frac{3}{4} for plain integers only
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize(answer: str) -> str:
    """Hendrycks-style normalization of a final answer, so that `\\dfrac12`, `0.5`-free forms, `x = 5` and
    `5^\\circ` compare as the benchmark compares them."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    if "\\text{ " in s:  # trailing units: "5 \\text{ cm}"
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0].strip()) <= 2:  # "x = 5" -> "5"
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


_SENTENCE_END = re.compile(r"(?<=\.\s)|(?<=\n)")  # the authors' chunk ends: ". ", ".\t", every "\n"


def split_solution(solution: str, max_chunks: int | None = None) -> list[str]:
    """A solution as hint chunks, as the authors cut theirs: after every line break and every period followed by
    a space or tab, each chunk keeping its separator (`''.join(chunks) == solution`); with `max_chunks`, the rest
    is joined into the last one (no cap by default: the authors' hints run to 128 chunks)."""
    parts = [p for p in _SENTENCE_END.split(solution) if p]
    if max_chunks is not None and len(parts) > max_chunks:
        parts = parts[: max_chunks - 1] + ["".join(parts[max_chunks - 1 :])]
    return parts


def rows(
    records: Iterable[dict[str, Any]], levels: tuple[int, ...] = LEVELS, *, split: str = ""
) -> list[dict[str, Any]]:
    """Task rows from MATH-lighteval records of the given levels (the paper trains on 3-5); `split` goes into
    the row ids, so the train and test files of one layout never share one."""
    out = []
    for i, rec in enumerate(records):
        m = re.search(r"(\d+)", str(rec.get("level", "")))
        truth = last_boxed(rec.get("solution", ""))
        if m is None or int(m.group(1)) not in levels or truth is None:
            continue
        hint = split_solution(rec["solution"])
        out.append(
            {
                "row_id": f"{NAME}-{split}-{i}" if split else f"{NAME}-{i}",
                "task": NAME,
                "prompt": PROMPT.format(problem=rec["problem"]),
                "hint": hint,
                "answer": "".join(hint) + f" </think>\n<answer> {truth} </answer>",
                "truth": truth,
                "level": int(m.group(1)),
                "type": rec.get("type"),
            }
        )
    return out


def verify(row: dict[str, Any], text: str) -> float:
    """1.0 / 0.1 / 0.0; see the module docstring."""
    answer = extract_answer(text)
    if answer is None:
        return NO_ANSWER
    if not answer:
        return NO_ANSWER
    boxed = last_boxed(answer)
    given = boxed if boxed is not None else answer
    return CORRECT if normalize(given) == normalize(row["truth"]) else FORMATTED
