"""What every verifier shares: the answer in the last `<answer>` tag, the reward levels, and a time limit.

`run_with_timeout(fn, row, text, timeout_s)` runs a verifier in a forked child process and kills it when the
time is up: a verifier named by a user (`module:function`) may loop on hostile output, and a thread cannot be
stopped. A timeout, an exception or a reward outside [0, 1] scores 0.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from typing import Any

CORRECT, FORMATTED, NO_ANSWER = 1.0, 0.1, 0.0
MAX_TEXT = 1 << 16  # a response of 1024 tokens is a few KB; longer text is not searched
DEFAULT_TIMEOUT_S = 2.0

Verifier = Callable[[dict[str, Any], str], float]


def extract_answer(text: str) -> str | None:
    """The content of the last `<answer> ... </answer>` in `text` (stripped), or None (the paper's rule)."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_TEXT:]  # the answer closes the response: keep its end
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def _child(conn: Any, fn: Verifier, row: dict[str, Any], text: str) -> None:
    try:
        conn.send(float(fn(row, text)))
    except BaseException:  # hostile output must not reach the parent as anything but a 0
        conn.send(NO_ANSWER)


def run_with_timeout(fn: Verifier, row: dict[str, Any], text: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """`fn(row, text)` in a child process; 0.0 on a timeout (the child is killed), an error, or a reward that is
    not a finite number in [0, 1]."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, row, text), daemon=True)
    proc.start()
    child.close()
    try:
        reward = parent.recv() if parent.poll(timeout_s) else None
    except EOFError:  # the child died without an answer
        reward = None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(1)
        parent.close()
    if reward is None or not math.isfinite(reward) or not 0.0 <= reward <= 1.0:
        return NO_ANSWER
    return reward
