"""Countdown: reach a target from 3-4 numbers with + - * /, each number used exactly once (TinyZero's task, as the
UFT paper uses it).

`generate(n, seed)` builds solvable instances as the authors' data has them (github liumy2010/UFT,
data/countdown/train.parquet: 10,240 rows, 3 and 4 numbers about half and half, numbers 1-99, targets 10-100).
Each instance first draws how many numbers it has (3 or 4, evenly), then plays the game forward: it combines two
of the numbers with an operation that keeps every intermediate value a positive integer, until one value is
left, and keeps the instance when that value is a target in 10-100 (else it draws again with the same count, so
the mix stays even). The hint chunks are the steps, each with its line break (`76 - 47 = 29\n`), and then
`Therefore, the final equation is {expr}`: K = 3 chunks for 3 numbers, 4 for 4. The prompt ends `<think> ` and
the answer is `''.join(hint) + " </think>\n<answer> {expr} </answer>"`, byte for byte the authors' format.
`verify(row, text)` (`rft.reward_rules: strict`; the default `paper` rule is in uft_ray.tasks.rules) scores what
follows the prompt: 1.0 when the last `<answer>` holds an expression that uses the given numbers exactly once
each and equals the target, 0.1 when it holds an arithmetic expression that does not, 0.0 when there is no answer
or it is not arithmetic within the parser's bounds (names, `**`, deep nesting, huge text, division by zero:
hostile output earns nothing). Expressions go through `uft_ray.tasks.arith`, never `eval`.
"""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction
from typing import Any

from uft_ray.tasks.arith import ArithError, evaluate
from uft_ray.tasks.verifier import CORRECT, FORMATTED, NO_ANSWER, extract_answer

NAME = "countdown"
NUMBERS = (3, 4)  # how many numbers an instance has
VALUE_RANGE = (1, 99)
TARGET_RANGE = (10, 100)
MAX_INTERMEDIATE = 10_000

PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think> "
)
EQUATION = "Therefore, the final equation is {expression}"


def closing(expression: str) -> str:
    """What follows the whole hint in a full solution: the end of the reasoning and the answer tag."""
    return f" </think>\n<answer> {expression} </answer>"


def _combine(a: int, b: int, op: str) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if b > 1 and a % b == 0 else None  # "/": exact, and not a no-op division by 1


def _instance(rng: random.Random, count: int) -> dict[str, Any] | None:
    nums = [rng.randint(*VALUE_RANGE) for _ in range(count)]
    items = [(v, str(v)) for v in nums]  # (value, expression)
    steps = []
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        for op in rng.sample("+-*/", 4):
            value = _combine(a, b, op)
            if value is not None and 0 < value <= MAX_INTERMEDIATE:
                break
        else:
            return None
        steps.append(f"{a} {op} {b} = {value}\n")
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
    target, expression = items[0]
    if not TARGET_RANGE[0] <= target <= TARGET_RANGE[1]:
        return None
    expression = expression[1:-1]  # the outer parentheses go, as in the authors' answers
    return {
        "nums": nums,
        "target": target,
        "hint": [*steps, EQUATION.format(expression=expression)],
        "expression": expression,
    }


def generate(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` solvable instances, the same for the same seed: `row_id`, `prompt`, `hint`, `answer`, `nums`, `target`."""
    rng = random.Random(f"countdown:{seed}")
    rows = []
    while len(rows) < n:
        count = rng.choice(NUMBERS)  # the count first: a rejected draw is redrawn with the same count
        while (inst := _instance(rng, count)) is None:
            pass
        rows.append(
            {
                "row_id": f"{NAME}-{seed}-{len(rows)}",
                "task": NAME,
                "prompt": PROMPT.format(nums=inst["nums"], target=inst["target"]),
                "hint": inst["hint"],
                "answer": "".join(inst["hint"]) + closing(inst["expression"]),
                "nums": inst["nums"],
                "target": inst["target"],
            }
        )
    return rows


def verify(row: dict[str, Any], text: str) -> float:
    """1.0 / 0.1 / 0.0 for the text after the prompt (hint + response); see the module docstring."""
    answer = extract_answer(text)
    if answer is None:
        return NO_ANSWER
    try:
        value, used = evaluate(answer)
    except ArithError:
        return NO_ANSWER
    if Counter(used) != Counter(Fraction(v) for v in row["nums"]):
        return FORMATTED
    return CORRECT if value == row["target"] else FORMATTED
