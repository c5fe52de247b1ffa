"""What every verifier shares: the answer in the last `<answer>` tag, the reward levels, and a sandboxed child.

`VerifierProcess` runs a verifier in a child interpreter: a verifier named by a user (`module:function`) may loop,
allocate without bound or misbehave on hostile output, and a thread can be neither stopped nor limited. One child
is reused for every rollout (a fork per rollout from a worker holding a model costs milliseconds each and forks
Ray's threads). Before it imports the verifier the child
- keeps only an allow-listed environment (`CHILD_ENV`: no HF_TOKEN, cloud keys, WANDB_API_KEY, RAY_* tokens);
- sets resource limits: address space (`memory_mb`), CPU seconds per item, no new processes (RLIMIT_NPROC 0;
  the kernel does not apply it to root, so Python's process APIs also refuse in the child), open files, no core;
- answers each item with a fixed 17-byte record (item number, reward, outcome code), never a pickle, so a
  compromised child cannot run code in the trainer.
An item that runs past its time limit, or the step's budget, has its child killed (with anything it started:
the child leads its own process group) and scores 0; a fresh child takes the rest. Every item that scores 0 for
a reason other than the verifier's own verdict is counted in `failures` under one of `FAILURES`.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
import sys
from collections import Counter
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


# why an item scored 0 without the verifier's own verdict (VerifierProcess.failures)
FAILURES = ("timeout", "step_budget", "error", "bad_reward", "memory", "cpu", "process", "crashed", "bad_reply")
_CODES = ("ok", "error", "bad_reward", "memory", "process")  # the outcomes the child itself reports
_REPLY = struct.Struct("<qdB")  # item number, reward, outcome code: all the child can ever say
# The child's environment: these names (and LC_*) only; the thread counts pinned to 1 (no new threads may be
# needed: RLIMIT_NPROC counts threads). UFT_TEST_* mark a test session's processes (tests/fixtures/procs.py).
CHILD_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8",
             "UFT_TEST_SESSION", "UFT_TEST_HEAD")  # fmt: skip
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
DEFAULT_MEMORY_MB = 4096
MAX_OPEN_FILES = 256


def _valid(reward: Any) -> float | None:
    """The reward as a float in [0, 1], or None (not a real number, a numpy scalar included; not finite; out of
    range)."""
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        return None
    try:
        reward = float(reward)
    except (OverflowError, ValueError):
        return None
    return reward if math.isfinite(reward) and 0.0 <= reward <= 1.0 else None


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The verifier child's environment: the allow-listed names of `environ`, this process's import path, one
    thread per math library."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k in CHILD_ENV or k.startswith("LC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what this process imports, the child can
    env.update(dict.fromkeys(_ONE_THREAD, "1"))
    return env


# --- the child ----------------------------------------------------------------------------------------------


class _Spawned:
    attempted = False


def _no_processes(*args: Any, **kwargs: Any) -> Any:
    _Spawned.attempted = True
    raise PermissionError("a verifier may not start processes")


def _sandbox(memory_mb: int) -> None:
    """Limits and guards set in the child before it imports or runs any verifier."""
    import resource

    mem = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(MAX_OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, cap))
    # root is exempt from RLIMIT_NPROC: Python's own ways of starting a process refuse too
    import _posixsubprocess
    import subprocess

    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp", "popen", "execv", "execve", "execl",
                 "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle"):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, _no_processes)
    _posixsubprocess.fork_exec = _no_processes
    subprocess._fork_exec = _no_processes  # type: ignore[attr-defined]
    subprocess._USE_POSIX_SPAWN = False  # type: ignore[attr-defined]


def _cpu_limit(seconds: float) -> None:
    """This item may use `seconds` more CPU seconds (SIGXCPU ends the child past them)."""
    import resource

    if not math.isfinite(seconds):
        return
    used = resource.getrusage(resource.RUSAGE_SELF)
    now = used.ru_utime + used.ru_stime
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = math.ceil(now + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _serve(read_fd: int, write_fd: int, spec: str, memory_mb: int, cpu_s: float) -> None:
    import importlib
    import pickle
    from multiprocessing.connection import Connection

    for fd in (read_fd, write_fd):  # a program the verifier might still start inherits neither
        os.set_inheritable(fd, False)
    reader, writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _sandbox(memory_mb)
    module, _, name = spec.partition(":")
    fn: Any = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    writer.send_bytes(_REPLY.pack(-1, 0.0, 0))  # ready
    while True:
        try:
            item = pickle.loads(reader.recv_bytes())  # from the trainer, which started this process
        except EOFError:
            return
        if item is None:
            return
        seq, row, text = item
        _Spawned.attempted = False
        code = "ok"
        _cpu_limit(cpu_s)
        try:
            reward = _valid(fn(row, text))
            if reward is None:
                code, reward = "bad_reward", NO_ANSWER
        except MemoryError:
            code, reward = "memory", NO_ANSWER
        except BaseException:  # hostile output must not reach the trainer as anything but a 0
            code, reward = "error", NO_ANSWER
        if _Spawned.attempted:
            code, reward = "process", NO_ANSWER
        writer.send_bytes(_REPLY.pack(seq, reward, _CODES.index(code)))


# --- the trainer's side -------------------------------------------------------------------------------------


class VerifierProcess:
    """A verifier in a sandboxed child interpreter, reused across calls, each item under `timeout_s` (module
    doc); `score(..., budget_s=)` bounds a whole call. `failures` counts the items that scored 0 by reason.

    The child is a fresh `python -m uft_ray.tasks.verifier` (not a fork of a worker holding a model and Ray's
    threads, nor multiprocessing's spawn, which re-imports the parent's main module); it imports `fn` by name,
    so `fn` must be a module-level function (a built-in task's verifier, or a user's `module:function`).
    """

    def __init__(
        self, fn: Verifier, timeout_s: float = DEFAULT_TIMEOUT_S, *, memory_mb: int = DEFAULT_MEMORY_MB
    ) -> None:
        self.spec = f"{fn.__module__}:{fn.__qualname__}"
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.failures: Counter[str] = Counter()
        self._proc: Any = None
        self._conn: Any = None
        self._seq = 0

    @property
    def timeouts(self) -> int:
        """Items killed for running past the time limit, since construction."""
        return self.failures["timeout"]

    def _start(self) -> None:
        import subprocess
        from multiprocessing.connection import Connection

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        cpu_s = self.timeout_s if math.isfinite(self.timeout_s) else math.inf
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uft_ray.tasks.verifier",
                str(to_child_r),
                str(from_child_w),
                self.spec,
                str(self.memory_mb),
                repr(float(cpu_s)),
            ],  # fmt: skip
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            env=child_env(),
            start_new_session=True,  # its own process group: a kill takes anything it started with it
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._conn = _Duplex(Connection(from_child_r, writable=False), Connection(to_child_w, readable=False))
        # Starting (a fresh interpreter importing the verifier's module) is not the verifier's time.
        reply = self._reply(STARTUP_S)
        if isinstance(reply, str) or reply[0] != -1:
            self._kill()
            raise RuntimeError(f"the verifier {self.spec} did not start within {STARTUP_S:.0f} s")

    def _reply(self, timeout_s: float) -> tuple[int, float, str] | str:
        """The child's next reply within `timeout_s` (inf: no limit), or why there is none: `timeout`, or the
        child's state (`crashed`, `cpu`) when the pipe closed, or `bad_reply` for bytes that are no reply record."""
        try:
            if not self._conn.reader.poll(None if not math.isfinite(timeout_s) else max(0.0, timeout_s)):
                return "timeout"
            data = self._conn.reader.recv_bytes(maxlength=_REPLY.size)
        except EOFError:
            return self._died()
        except OSError:  # a message longer than a reply record (a pickle, say): never read
            return "bad_reply"
        if len(data) != _REPLY.size:
            return "bad_reply"
        seq, reward, code = _REPLY.unpack(data)
        if code >= len(_CODES):
            return "bad_reply"
        return seq, reward, _CODES[code]

    def _kill(self) -> None:
        import signal

        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self._proc.kill()
            self._proc.wait(5)
            self._conn.close()
        self._proc = self._conn = None

    def _died(self) -> str:
        import signal

        try:
            rc = self._proc.wait(5)
        except Exception:  # the pipe closed but the child lingers: it is killed as any failed child is
            return "crashed"
        return "cpu" if rc == -signal.SIGXCPU else "crashed"

    def score(self, rows: list[dict[str, Any]], texts: list[str], *, budget_s: float | None = None) -> list[float]:
        """Each text's reward for its row; 0 for an item that fails (counted in `failures`). With `budget_s`,
        items still unscored when it runs out score 0 as `step_budget` without running."""
        import pickle
        import time

        deadline = time.monotonic() + budget_s if budget_s is not None and math.isfinite(budget_s) else math.inf
        out = []
        for row, text in zip(rows, texts, strict=True):
            left = deadline - time.monotonic()
            if left <= 0:
                self.failures["step_budget"] += 1
                out.append(NO_ANSWER)
                continue
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            self._seq += 1
            try:
                self._conn.writer.send_bytes(pickle.dumps((self._seq, row, text)))
                reply = self._reply(min(self.timeout_s, left))
            except OSError:  # the child closed its end
                reply = self._died()
            if reply == "timeout" and self.timeout_s > left:
                reply = "step_budget"
            if not isinstance(reply, str) and (reply[0] != self._seq or _valid(reply[1]) is None):
                reply = "bad_reply"
            if isinstance(reply, str):
                self.failures[reply] += 1
                self._kill()
                out.append(NO_ANSWER)
                continue
            _, reward, code = reply
            if code != "ok":
                self.failures[code] += 1
            out.append(reward if code == "ok" else NO_ANSWER)
        return out

    def close(self) -> None:
        import pickle

        if self._proc is not None and self._proc.poll() is None:
            try:
                self._conn.writer.send_bytes(pickle.dumps(None))
                self._proc.wait(5)
            except Exception:
                pass
        self._kill()


class _Duplex:
    """The trainer's ends of the two pipes: requests out (pickles the child reads), replies in (raw bytes)."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


if __name__ == "__main__":  # the child: python -m uft_ray.tasks.verifier READ_FD WRITE_FD SPEC MEMORY_MB CPU_S
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
