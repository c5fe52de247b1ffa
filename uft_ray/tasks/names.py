"""The built-in `rft.task` and `rft.reward_rules` values: plain names, no imports, so config validation can check
them without loading a task.

Each is its task module's `NAME` (countdown.py, knights_knaves.py, math_answers.py).
"""

from __future__ import annotations

GENERATED_TASKS = ("countdown", "knights_knaves")  # generated from a seed unless rft.path gives their rows
FILE_TASKS = ("math",)  # rows read from rft.path / rft.eval_path
REWARD_RULES = ("paper", "strict")  # uft_ray.tasks.rules.VERIFIERS: the authors' reward code; this project's own
