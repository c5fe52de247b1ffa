"""Knights and Knaves: knights always tell the truth, knaves always lie; from what each says, tell who is who.

`generate(n, seed)` draws how many people (3-7, evenly, as the authors' data/kk_logic/train.parquet has 900 of
each), then random roles, and adds statements (each true exactly when its speaker is a knight) until the puzzle
has one solution, checked by trying every assignment (at most 2^7); a draw that needs too many statements is
redrawn with the same count. The hint reasons by assumption and contradiction, one person at a time, one sentence
a chunk with its own separator (`Assume Zoey is a knave. `, `Then ...: a contradiction. `, `So Zoey is a
knight.\n`), and ends as the authors' hints end: `Therefore, (1) Zoey is a knight\n`, `(2) Oliver is a knave\n`,
..., the last line without its break. The answer is `''.join(hint) + " </think>\n<answer> {lines} </answer>"`
with `lines` the authors' `solution_text_format` (`(1) Zoey is a knight\n(2) Oliver is a knave`), and the prompt
ends `<think> `. `verify(row, text)` (`rft.reward_rules: strict`; the default `paper` rule is in
uft_ray.tasks.rules) gives 1.0 when the last `<answer>` names the right role for every person, 0.1 when it names
roles but not all right, 0.0 when it names none.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

from uft_ray.tasks.verifier import CORRECT, FORMATTED, NO_ANSWER, extract_answer

NAME = "knights_knaves"
PEOPLE = (3, 7)
NAMES = (
    "Zoey", "Oliver", "Ava", "Liam", "Mia", "Noah", "Emma", "Lucas", "Aria", "Ethan", "Luna", "Mason", "Chloe",
    "Logan", "Ella", "Jacob", "Nora", "Owen", "Lily", "Henry",
)  # fmt: skip
MAX_STATEMENTS = 12

PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer.\n"
    "User: A very special island is inhabited only by knights and knaves. Knights always tell the truth, and "
    "knaves always lie. You meet {n} inhabitants: {names}. {statements} So who is a knight and who is a knave? "
    "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1) Zoey is a knight\n(2) Oliver is a knight\n(3)... </answer>.\n"
    "Assistant: Let me solve this step by step.\n<think> "
)

# A statement: (kind, a, b); its truth under an assignment (True = knight) is `_holds`.
KINDS = ("is", "isnt", "both", "either", "same", "different", "if")


def _holds(kind: str, a: int, b: int, roles: tuple[bool, ...]) -> bool:
    x, y = roles[a], roles[b]
    return {
        "is": x,
        "isnt": not x,
        "both": x and y,
        "either": x or y,
        "same": x == y,
        "different": x != y,
        "if": (not x) or y,
    }[kind]


def _say(kind: str, a: str, b: str) -> str:
    return {
        "is": f"{a} is a knight.",
        "isnt": f"{a} is a knave.",
        "both": f"{a} and {b} are both knights.",
        "either": f"{a} is a knight or {b} is a knight.",
        "same": f"{a} and {b} are the same kind.",
        "different": f"{a} and {b} are different kinds.",
        "if": f"If {a} is a knight then {b} is a knight.",
    }[kind]


def _consistent(statements: list[tuple[int, str, int, int]], roles: tuple[bool, ...]) -> bool:
    return all(_holds(k, a, b, roles) == roles[s] for s, k, a, b in statements)


def _solutions(statements: list[tuple[int, str, int, int]], n: int) -> list[tuple[bool, ...]]:
    return [r for r in itertools.product((True, False), repeat=n) if _consistent(statements, r)]


def _role(knight: bool) -> str:
    return "knight" if knight else "knave"


def _hint(names: list[str], roles: tuple[bool, ...], statements: list[tuple[int, str, int, int]]) -> list[str]:
    """Per person, three sentences: assume the other role, name a statement that then breaks, conclude; then the
    answer's lines after "Therefore, " (module docstring). Each chunk carries its separator."""
    chunks = []
    for i, name in enumerate(names):
        flipped = tuple(not r if k == i else r for k, r in enumerate(roles))
        s, kind, a, b = next(st for st in statements if _holds(st[1], st[2], st[3], flipped) != flipped[st[0]])
        said = _say(kind, names[a], names[b]).rstrip(".")
        lies = "tells the truth" if flipped[s] else "lies"
        chunks += [
            f"Assume {name} is a {_role(not roles[i])}. ",
            f'Then {names[s]}, who {lies}, could not say "{said}" with the others as they are: a contradiction. ',
            f"So {name} is a {_role(roles[i])}.\n",
        ]
    tail = f"Therefore, {answer_text(names, roles)}".split("\n")
    return chunks + [f"{line}\n" for line in tail[:-1]] + tail[-1:]


def answer_text(names: list[str], roles: tuple[bool, ...]) -> str:
    """The authors' `solution_text_format`: `(1) Zoey is a knight\\n(2) Oliver is a knave`."""
    return "\n".join(f"({i + 1}) {name} is a {_role(r)}" for i, (name, r) in enumerate(zip(names, roles, strict=True)))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f", and {names[-1]}"  # "Zoey, Oliver, and Ava", as the authors' prompts


def _instance(rng: random.Random, n: int) -> dict[str, Any] | None:
    names = rng.sample(NAMES, n)
    roles = tuple(rng.random() < 0.5 for _ in range(n))
    statements: list[tuple[int, str, int, int]] = []
    for speaker in itertools.cycle(rng.sample(range(n), n)):
        if len(statements) >= MAX_STATEMENTS:
            return None
        a, b = rng.sample([k for k in range(n) if k != speaker] or [speaker], 1)[0], rng.randrange(n)
        candidates = [k for k in KINDS if _holds(k, a, b, roles) == roles[speaker] and (k in ("is", "isnt") or a != b)]
        statements.append((speaker, rng.choice(candidates), a, b))
        if len(_solutions(statements, n)) == 1:
            break
    return {"names": names, "roles": roles, "statements": statements}


def generate(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` puzzles with exactly one solution: `row_id`, `prompt`, `hint`, `answer`, `names`, `roles`, `statements`."""
    rng = random.Random(f"knights_knaves:{seed}")
    rows = []
    while len(rows) < n:
        people = rng.randint(*PEOPLE)  # the count first: a rejected draw is redrawn with the same count
        while (inst := _instance(rng, people)) is None:
            pass
        names, roles, statements = inst["names"], inst["roles"], inst["statements"]
        said = " ".join(f'{names[s]} says: "{_say(k, names[a], names[b])}"' for s, k, a, b in statements)
        hint = _hint(names, roles, statements)
        rows.append(
            {
                "row_id": f"{NAME}-{seed}-{len(rows)}",
                "task": NAME,
                "prompt": PROMPT.format(n=len(names), names=_listed(names), statements=said),
                "hint": hint,
                "answer": "".join(hint) + f" </think>\n<answer> {answer_text(names, roles)} </answer>",
                "names": names,
                "roles": [_role(r) for r in roles],
                "statements": [list(st) for st in statements],
            }
        )
    return rows


def verify(row: dict[str, Any], text: str) -> float:
    """1.0 when the last `<answer>` gives every person's role right, 0.1 for another answer, 0.0 for none."""
    answer = extract_answer(text)
    if answer is None:
        return NO_ANSWER
    said: dict[str, str] = {}
    for name in row["names"]:
        found = re.findall(rf"\b{re.escape(name)} is an? (knight|knave)\b", answer)
        if len(set(found)) == 1:  # named once, or consistently; both roles for one person is no answer for them
            said[name] = found[0]
    if not said:
        return NO_ANSWER
    ok = len(said) == len(row["names"]) and all(said[n] == r for n, r in zip(row["names"], row["roles"], strict=True))
    return CORRECT if ok else FORMATTED
