"""A user's own task: rows with `prompt`, `hint` (chunks) or `solution` (split into chunks), and `answer`, scored
by a verifier named as `module:function` (a plain `(row, text) -> reward`, run under a time limit by the
trainer through `uft_ray.tasks.verifier.VerifierProcess`).

Built-in names resolve to the tasks shipped here: `countdown`, `knights_knaves`, `math`.
"""

from __future__ import annotations

import importlib
from typing import Any

from uft_ray.tasks import countdown, knights_knaves, math_answers
from uft_ray.tasks.math_answers import split_solution
from uft_ray.tasks.rules import verifier_for
from uft_ray.tasks.verifier import Verifier

BUILTIN: dict[str, Verifier] = {
    countdown.NAME: countdown.verify,
    knights_knaves.NAME: knights_knaves.verify,
    math_answers.NAME: math_answers.verify,
}


def load_verifier(spec: str, rules: str = "strict") -> Verifier:
    """A built-in task's verifier under `rules` (uft_ray.tasks.rules; the trainer passes `rft.reward_rules`, whose
    default is `paper`), or `module:function` imported (a clear error naming what is wrong)."""
    if spec in BUILTIN:
        return verifier_for(spec, rules)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"verifier {spec!r}: use one of {', '.join(BUILTIN)} or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"verifier {spec!r} is not callable")
    return fn


def task_row(
    record: dict[str, Any], index: int, *, name: str = "task", max_chunks: int | None = None
) -> dict[str, Any]:
    """A generic record as a task row: `hint` as given (chunks revealed by plain concatenation, so each carries its
    own separator), or `solution` split into sentence chunks that keep theirs (`''.join(hint) == solution`)."""
    missing = [k for k in ("prompt", "answer") if not isinstance(record.get(k), str)]
    if missing or not isinstance(record.get("hint", record.get("solution")), (list, str)):
        raise ValueError(f"record {index}: needs string prompt and answer, and hint (list) or solution (string)")
    hint = record["hint"] if isinstance(record.get("hint"), list) else split_solution(record["solution"], max_chunks)
    return {
        **record,
        "row_id": str(record.get("row_id", f"{name}-{index}")),
        "task": name,
        "hint": [str(c) for c in hint],
    }
