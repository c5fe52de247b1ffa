"""Add three one-digit numbers, steps shown, the sum in answer tags: the real-model hint_rft demo's task.

    prompt  ChatML: "Add 4, 7 and 2. Show each step on its own line, then give the sum as <answer>sum</answer>."
    hint    ["4 + 7 = 11\\n", "11 + 2 = 13\\n", "<answer>13</answer>"]   the solution's lines, revealed on the schedule
    answer  the hint joined

SmolLM2-135M-Instruct does the additions but does not close the answer tag on its own, so plain RL sees almost
no reward; hints show it the format. The answer line is the hint's last chunk (the authors keep it outside the
hint: their models already write the format, and the hint NLL is what teaches it here). The prompt is written in
the ChatML turns SmolLM2's chat template makes (hint_rft tokenizes a prompt as given, no template applied). Rows
are a generic task's (`prompt`, `hint`, `answer`; uft_ray.tasks.generic) scored by `verify`, named in configs as
`uft_ray.tasks.sum3:verify`, with the authors' rule: 1.0 for the right sum in the last `<answer>` tag, 0.1 for
another number there, 0.0 otherwise. Held-out rows are triples no training row has.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

from uft_ray.tasks.verifier import CORRECT, FORMATTED, NO_ANSWER, extract_answer

NAME = "sum3"
VERIFIER = "uft_ray.tasks.sum3:verify"
QUESTION = "Add {a}, {b} and {c}. Show each step on its own line, then give the sum as <answer>sum</answer>."
CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)
_NUMBER = re.compile(r"[+-]?\d+")


def row(a: int, b: int, c: int) -> dict[str, Any]:
    hint = [f"{a} + {b} = {a + b}\n", f"{a + b} + {c} = {a + b + c}\n", f"<answer>{a + b + c}</answer>"]
    return {
        "row_id": f"{NAME}-{a}{b}{c}",  # by content: the same triple is the same row whatever file it is in
        "prompt": CHATML.format(question=QUESTION.format(a=a, b=b, c=c)),
        "hint": hint,
        "answer": "".join(hint),
        "total": a + b + c,
    }


def generate(n_train: int, n_eval: int, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows over disjoint ordered triples of 1-9 (729 in all), drawn with `seed`."""
    pool = list(itertools.product(range(1, 10), repeat=3))
    if n_train + n_eval > len(pool):
        raise ValueError(f"{n_train} + {n_eval} rows need more than the {len(pool)} triples")
    random.Random(f"{NAME}:{seed}").shuffle(pool)
    train = [row(*t) for t in pool[:n_train]]
    held = [row(*t) for t in pool[n_train : n_train + n_eval]]
    return train, held


def write(rows: list[dict[str, Any]], path: str | Path) -> str:
    """The rows as JSON lines (a generic task's file, read by uft_ray.tasks.files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def verify(row: dict[str, Any], text: str) -> float:
    """1.0 when the last `<answer>` holds exactly the sum, 0.1 when it holds another integer, 0.0 otherwise."""
    answer = extract_answer(text)
    if answer is None or _NUMBER.fullmatch(answer) is None or len(answer) > 8:
        return NO_ANSWER
    return CORRECT if int(answer) == int(row["total"]) else FORMATTED
