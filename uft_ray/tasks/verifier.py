"""What every verifier shares: the answer in the last `<answer>` tag, the reward levels, and a time limit.

`VerifierProcess` runs a verifier under that limit: a verifier named by a user (`module:function`) may loop on
hostile output, and a thread cannot be stopped, so it runs in one spawned child, reused for every rollout (a fork
per rollout from a worker holding a model costs milliseconds each and forks Ray's threads), with the time limit
per item. A child that overruns is killed, its item scores 0, and a fresh child takes the rest; an exception or
a reward that is not a finite number in [0, 1] also scores 0.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

CORRECT, FORMATTED, NO_ANSWER = 1.0, 0.1, 0.0
MAX_TEXT = 1 << 16  # a response of 1024 tokens is a few KB; longer text is not searched
DEFAULT_TIMEOUT_S = 2.0
STARTUP_S = 120.0

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


def _valid(reward: Any) -> float:
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        return NO_ANSWER
    return reward if math.isfinite(reward) and 0.0 <= reward <= 1.0 else NO_ANSWER


def _serve(conn: Any, spec: str) -> None:
    import importlib

    module, _, name = spec.partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            reward = _valid(fn(*item))
        except BaseException:  # hostile output must not reach the parent as anything but a 0
            reward = NO_ANSWER
        conn.send(reward)


class VerifierProcess:
    """A verifier in a child interpreter, reused across calls, each item under `timeout_s` (module doc).

    The child is a fresh `python -m uft_ray.tasks.verifier` (not a fork of a worker holding a model and Ray's
    threads, nor multiprocessing's spawn, which re-imports the parent's main module); it imports `fn` by name,
    so `fn` must be a module-level function (a built-in task's verifier, or a user's `module:function`).
    """

    def __init__(self, fn: Verifier, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.spec = f"{fn.__module__}:{fn.__qualname__}"
        self.timeout_s = timeout_s
        self.timeouts = 0  # items killed for running past the limit, since construction
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        import os
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "uft_ray.tasks.verifier", str(to_child_r), str(from_child_w), self.spec],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            # the child imports what this process can (a user's verifier module, a job's working dir)
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._conn = _Duplex(Connection(from_child_r, writable=False), Connection(to_child_w, readable=False))
        # Starting (a fresh interpreter importing the verifier's module) is not the verifier's time.
        ready = self._conn.poll(STARTUP_S) and self._conn.recv() == "ready"
        if not ready:
            self._kill()
            raise RuntimeError(f"the verifier {self.spec} did not start within {STARTUP_S:.0f} s")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._conn.close()
        self._proc = self._conn = None

    def score(self, rows: list[dict[str, Any]], texts: list[str]) -> list[float]:
        out = []
        for row, text in zip(rows, texts, strict=True):
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            reward = None
            try:
                self._conn.send((row, text))
                if self._conn.poll(self.timeout_s):
                    reward = self._conn.recv()
            except (EOFError, OSError):
                reward = None
            if reward is None:
                self.timeouts += 1
                self._kill()
            out.append(NO_ANSWER if reward is None else reward)
        return out

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._conn.send(None)
                self._proc.wait(5)
            except Exception:
                pass
        self._kill()


class _Duplex:
    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader, self.writer = reader, writer

    def send(self, obj: Any) -> None:
        self.writer.send(obj)

    def recv(self) -> Any:
        return self.reader.recv()

    def poll(self, timeout: float) -> bool:
        return self.reader.poll(timeout)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


if __name__ == "__main__":  # the child of VerifierProcess: python -m uft_ray.tasks.verifier READ_FD WRITE_FD SPEC
    from multiprocessing.connection import Connection

    _serve(
        _Duplex(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)),
        sys.argv[3],
    )
