"""Tasks with exact verifiers for hint-guided RFT (docs/design.md "Hint-guided RFT"; Liu et al., arXiv 2505.16984).

A task row is a dict with `row_id`, `prompt` (the text the policy continues), `hint` (the reference solution
as a list of chunks), `answer` (the hint joined plus the closing `</think>\\n<answer> ... </answer>`) and the
task's own fields. A verifier is a plain function `(row, text) -> reward`, where `text` is what follows the
prompt (the revealed hint plus the generated response): 1.0 correct, 0.1 an answer in the right format but
wrong, 0.0 no answer. Model output is never passed to `eval`. Which verifier a built-in task uses is
`rft.reward_rules`: `paper` (the authors' reward code, the default) or `strict` (each task module's `verify`).

- `countdown`: generated, verified exactly (uft_ray.tasks.arith);
- `knights_knaves`: generated with a unique solution, verified exactly;
- `math_answers`: MATH-lighteval rows, `\\boxed{}` answers compared after Hendrycks-style normalization;
- `rules`: the built-in tasks' verifiers by rule set; the `paper` rules (extraction after "Assistant:", the last
  line for Countdown and MATH, the authors' number check and normalization);
- `generic`: a user's task (`prompt`, `hint` or `solution`, `answer`) and verifiers named `module:function`;
- `hints`: the hint schedule, a pure function of (seed, step, row_id);
- `verifier`: the answer extraction shared by the tasks and a verifier runner with a time limit;
- `files`: task files in every layout (veRL's, as the authors publish theirs; ours; MATH-lighteval; generic).

For users checking their own data: `read_rows(path, task)` and `verify(row, text, rules="paper")` (what follows
the prompt, scored by the row's task; `uft-ray tasks check` runs both over a file). They load on first use, so
importing `uft_ray.tasks.names` for config validation stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["read_rows", "verify"]


def read_rows(path: str, task: str, **options: Any) -> list[dict[str, Any]]:
    """The task rows of the file(s) at `path` in any supported layout; `options` as uft_ray.tasks.files.read_rows
    (`split`, `quarantined`, `levels`)."""
    from uft_ray.tasks.files import read_rows as read  # reads parquet: the config check imports this package

    return read(path, task, **options)


def verify(row: dict[str, Any], text: str, rules: str = "paper") -> float:
    """`text` (what follows the prompt) scored by the row's task under `rules` (uft_ray.tasks.files.verify)."""
    from uft_ray.tasks.files import verify as score  # as read_rows

    return score(row, text, rules)
