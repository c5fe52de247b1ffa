"""The GPU window in one command: each check under its own limit, everything written as it goes, one archive back.

The device call (one H100 or H200 lent for 15 minutes in all, its 1-2 minute start included; one command of at most
10 minutes; at most 8 files back from `$OUT`; no network). Here first, once: `make gpu-bundle` (what the image
lacks, < 60 MiB, to `.gpu-bundle`). Then the `run` tool with

    command:   python3 gpu/check.py --bundle .gpu-bundle
    carry:     [".gpu-bundle"]
    timeout_s: 600

and `give_back` at once unless a short second call follows. The command ends within about 500 s (`--budget 540` is
its hard stop; `--dry-run` prints the plan and the sum), so a second call of a few minutes still fits the 15.
Never prefix it with `OUT=...`: the device sets `$OUT`, and only what lands there comes back. The image's
interpreter is `python3`; its torch, transformers and numpy run the checks, the bundle brings the rest (Ray,
DeepSpeed, pydantic, hjson, pytest-timeout; peft and typing_extensions at the versions the suite ran with).

What comes back (`$OUT`, or `--work` without one), rewritten after every check, so a command killed at any point
leaves the report and the logs of every check that finished:

    gpu_check.json     every figure, command, status, reason and output tail; `running` names a check under way
    gpu_check.txt      the table
    gpu_check.log      the end of each check's log
    gpu_check.tar.gz   each check's full log, its JSON / junit files, each run's ray.log and metrics.jsonl, Ray's
                       session logs, env.txt (nvidia-smi, free, df, nproc, pip list); at most 15 MiB

Whether there is a GPU is decided first, in 3 seconds and on its own (`nvidia-smi -L`, else the driver's
/proc entry; `--gpu yes|no` overrides): a hung or crashed env probe does not turn the GPU checks into skips.

Window one, in order, each a child process with its own limit (its whole process tree killed at the limit):

    install         (--bundle DIR) the bundle's wheels into a private folder (`pip install --no-index --no-deps
                    --target`), on every child's PYTHONPATH after the checkout
    env             packages, torch, CUDA, the device; a one-rank NCCL all_reduce; every module the checks import;
                    `ray.init` and the GPUs Ray sees (a task holding one); written stage by stage
    step_7b         gpu/step.py: the trainer's step on the Mistral-7B shape in this process (no Ray, no disk):
                    packed vs padded vs a packed 4D mask, checkpointing on (and off if it fits), ~16k-token
                    micro-batches of ~700-token rows; tokens/s, MFU (4N) against 989 and 790 TFLOP/s, HFU with
                    recompute and attention, peak memory
    rollout_0.5b    gpu/rollout.py: the hf rollout backend with the project's seeded sampler, Qwen2-0.5B shape,
                    batch 64, LoRA loaded: tokens/s (vLLM is not in the image; `rollout.backend: auto` falls back)
    train_0.5b      bench/train_throughput.py on the Qwen2-0.5B shape through Ray Train: NCCL, ZeRO-3, bf16,
                    LoRA; loss falls, reward 0 at step 1, adapter reloaded by peft, tokens/s, MFU, peak memory
    pytest_gpu      `pytest tests/gpu -v` (bf16 chunked log-probs vs fp32; bf16 scorer vs fp32), via --junitxml
    reference_0.5b  bench/reference.py: the reference actor's bf16 tokens/s, Qwen2-0.5B shape, cache miss vs hit

Later windows (`--only NAME`): train_7b (the 7B step through Ray Train and DeepSpeed, ZeRO auto: ~97% of its
time is saving and loading 14.5 GB, which step_7b skips), vllm_lora and eval_vllm (once vLLM is in the image).

    python3 gpu/check.py --dry-run                          # the plan, the limits and their sum
    python3 gpu/check.py                                    # here (no GPU): env, and every GPU check skipped
    python3 gpu/check.py --cpu-smoke --bundle DIR           # every check's CPU variant (make gpu-bundle-proof)
    python3 gpu/check.py --only env,step_7b --budget 300    # a subset
    python3 gpu/check.py --install                          # a networked machine: torch's CUDA build, -e .[test]

MFU of the Ray Train checks counts 4 x params x tokens/s against `--peak-tflops` (790: the bf16 matrix rate
measured on the device); step_7b reports both denominators and counts only matmul parameters (gpu/step.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 790.0  # H200 bf16, measured on the device machine (8192^3 matmul, random data)
# The hard stop: the device's 10-minute command less a margin; the plan itself ends by about 500 s (window()), so a
# short second call still fits the 15 minutes with the machine's start.
BUDGET_S = 540.0
INSTALL_TIMEOUT_S = 240.0  # --install: pip from a network
BUNDLE_TIMEOUT_S = 40.0  # --bundle: ~40 MiB of wheels unpacked from local files
GPU_PROBE_S = 3.0  # nvidia-smi -L: is there a GPU, decided on its own
ENV_TXT_S = 10.0  # env.txt: each of its commands gets at most 5 s
FINISH_S = 15.0  # kept back from the budget for the last report and archive
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL; then at most this long again for the child to be reaped
MFU_GOAL_7B = 0.45
STATUSES = ("passed", "failed", "timeout", "interrupted", "skipped")
ARCHIVE_MAX_BYTES = 15 * 2**20  # a file back from $OUT: 16 MiB at most
LOG_MAX_BYTES = 4 * 2**20  # of one log in the archive: its end
RAY_LOG_MAX_BYTES = 2**20  # of one Ray session log in the archive: its end
RAY_DIRS = (Path("/tmp/ray"),)  # Ray's default temp dir: session_*/logs
# torch's CUDA wheel tags (download.pytorch.org/whl/<tag>), oldest first; the newest the driver supports wins.
TORCH_CUDA_TAGS = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))
PROBED = ("torch", "ray", "deepspeed", "transformers", "peft", "pytest", "pytest-timeout", "uft-ray", "vllm")
REQUIRED = ("torch", "ray", "deepspeed", "transformers", "peft", "pytest", "pytest-timeout")
# Every module a check imports (the children's own imports, not only the distributions): a bundle that lacks one
# fails here, in seconds, instead of minutes into a training check.
IMPORTS = ("torch", "transformers", "peft", "safetensors", "pyarrow", "ray", "ray.data", "ray.train", "ray.train.torch",
           "deepspeed", "pydantic", "hjson", "pytest_timeout", "uft_ray.driver", "uft_ray.train.loop",
           "uft_ray.train.engine", "uft_ray.reference.scorer")  # fmt: skip
TAIL_CHARS = 4000
PROBE_STAGES = ("packages", "torch", "collective", "imports", "ray")  # the env probe's, in order


@dataclass
class Check:
    """One named child command, its limits and how to read and judge what it leaves."""

    name: str
    title: str
    cmd: list[str] | None
    timeout_s: float
    min_s: float = 0.0  # below this much budget left, the check is skipped rather than started
    json_path: Path | None = None  # the child writes its figures here
    junit_path: Path | None = None  # pytest's --junitxml
    needs_cuda: bool = True
    skip_reason: str | None = None
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # figures -> figures (flatten, MFU)
    judge: Callable[[dict[str, Any], int], tuple[str, str | None]] | None = None  # (figures, rc) -> status, note
    show: tuple[tuple[str, str], ...] = ()  # (figure, format) for the table
    files: tuple[str, ...] = ()  # globs under the work dir that go into the archive (a run's ray.log, metrics)


@dataclass
class Result:
    name: str
    title: str
    status: str
    seconds: float = 0.0
    timeout_s: float | None = None
    reason: str | None = None
    command: str | None = None
    returncode: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    log: str | None = None
    output_tail: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Running a child: its own process group, a limit, the whole tree killed at the limit.


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid, ...
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): Ray's raylet and workers may leave the child's process group."""
    if not os.path.isdir("/proc"):
        return []
    children, found, todo = _children_map(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _signal(pgid: int, pids: list[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill_tree(proc: subprocess.Popen[Any], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the child's group and every descendant (Ray's driver then stops its cluster), SIGKILL after grace;
    every wait bounded (a child stuck in the kernel is left, named in the log, rather than hanging the window)."""
    pids = descendants(proc.pid)  # before the parent dies and they are re-parented out of reach
    _signal(proc.pid, pids, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    left = [p for p in {*pids, *descendants(proc.pid)} if alive(p)]
    _signal(proc.pid, left, signal.SIGKILL)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"[gpu_check] pid {proc.pid} outlived SIGKILL by {grace_s:.0f} s: left behind", flush=True)


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) of the window: raised in the main thread so that every `finally` runs."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run_process(
    cmd: list[str], timeout_s: float, log_path: Path, env: dict[str, str] | None = None
) -> tuple[int | None, float]:
    """Run `cmd` in the repo root with stdout + stderr to `log_path`; (exit code or None on timeout, seconds).
    Whatever stops the wait (a timeout, a signal, an error here) kills the child's whole tree first."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: one killpg reaches everything it spawned in it
        )  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
        except BaseException:
            kill_tree(proc)
            raise
    return rc, time.monotonic() - t0


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars * 4))
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------
# Reading what the children leave.


def parse_junit(path: Path) -> dict[str, Any]:
    """pytest's junit XML: counts and every test case's status, seconds and message."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        status, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                status, message = name, (node.get("message") or (node.text or "").strip())[:300]
                break
        cases.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name', '')}",
                "status": status,
                "seconds": float(case.get("time") or 0.0),
                "message": message,
            }
        )
    count = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {
        "tests": len(cases),
        "passed": count["passed"],
        "failed": count["failed"],
        "errors": count["error"],
        "skipped": count["skipped"],
        "cases": cases,
    }


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def mfu(n_params: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilization: 4 x params x tokens/s (forward 2 + backward through frozen weights 2) / peak."""
    return 4.0 * n_params * tokens_per_s / (peak_tflops * 1e12)


def judge_pytest(figures: dict[str, Any], rc: int) -> tuple[str, str | None]:
    if "tests" not in figures:
        return "failed", f"exit {rc}, no junit report: {figures.get('read_error', 'pytest did not write one')}"
    bad = [c["name"].rsplit("::", 1)[-1] for c in figures["cases"] if c["status"] in ("failed", "error")]
    if bad:
        return "failed", f"{len(bad)} failed: {', '.join(bad[:5])}"
    if figures["tests"] == 0:
        return "failed", f"exit {rc}, no tests collected"
    if figures["skipped"] == figures["tests"]:
        first = next(c["message"] for c in figures["cases"])
        return "skipped", f"all {figures['tests']} skipped: {first}"
    if rc != 0:
        return "failed", f"exit {rc}"
    return "passed", None


def judge_json(figures: dict[str, Any], rc: int, required: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """Exit 0, the required figures present, and every `checks` entry of the child true."""
    if "read_error" in figures:
        return "failed", f"exit {rc}; {figures['read_error']}"
    if rc != 0:
        return "failed", f"exit {rc}"
    missing = [k for k in required if figures.get(k) is None]
    if missing:
        return "failed", f"missing figures: {', '.join(missing)}"
    bad = [k for k, ok in (figures.get("checks") or {}).items() if not ok]
    if bad:
        return "failed", f"checks failed: {', '.join(bad)}"
    return "passed", None


def derive_train(peak_tflops: float, goal: float | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def derive(f: dict[str, Any]) -> dict[str, Any]:
        if f.get("n_params") and f.get("tokens_per_s"):
            f["mfu"] = mfu(f["n_params"], f["tokens_per_s"], peak_tflops)
            f["peak_tflops"] = peak_tflops
            if goal is not None:
                f["mfu_goal"] = goal
                f["mfu_meets_goal"] = f["mfu"] >= goal  # a target to report, not a pass/fail check
        return f

    return derive


def derive_reference(f: dict[str, Any]) -> dict[str, Any]:
    rows = f.get("results") or []
    if rows:
        r = rows[0]
        f |= {k: r.get(k) for k in ("dtype", "e2e_tokens_per_s", "steady_tokens_per_s", "miss_s", "hit_s", "tokens")}
        if r.get("hit_s"):
            f["miss_over_hit"] = r["miss_s"] / r["hit_s"]
        f["checks"] = {"bf16": r.get("dtype") == "bfloat16"}  # the bench itself asserts the hit's 0 forwards
    return f


def judge_env(figures: dict[str, Any], rc: int) -> tuple[str, str | None]:
    if rc != 0 or "read_error" in figures:
        return "failed", f"exit {rc}; {figures.get('read_error', 'the probe failed')}"
    missing = [d for d in REQUIRED if not (figures.get("packages") or {}).get(d)]
    if missing:
        return "failed", f"not installed: {', '.join(missing)}"
    broken = [f"{m} ({e})" for m, e in (figures.get("imports") or {}).items() if e is not True]
    if broken:
        return "failed", f"cannot import: {'; '.join(broken)}"
    if figures.get("uft_ray_path") != str(REPO / "uft_ray"):
        return "failed", f"uft_ray comes from {figures.get('uft_ray_path')}, not from this checkout"
    cuda, asked = figures.get("cuda_available"), figures.get("stages") or PROBE_STAGES  # --env-stages may leave some
    coll = figures.get("collective") or {}
    if "collective" in asked and not coll.get("ok"):
        return "failed", f"{coll.get('backend', 'the')} all_reduce (one rank): {coll.get('error', 'not reached')}"
    if "ray" not in asked:
        return "passed", None if cuda else f"no CUDA device (torch {figures.get('torch')})"
    ray_ = figures.get("ray") or {}
    if not ray_.get("ok"):
        return "failed", f"ray.init: {ray_.get('error', 'not reached')}"
    if cuda and not ray_.get("gpus"):
        return "failed", f"Ray sees no GPU though torch does: cluster resources {ray_.get('resources')}"
    if cuda and ray_.get("task_cuda") is not True:
        return "failed", f"a Ray task holding a GPU: {ray_.get('task_cuda')}"
    if not cuda:
        return "passed", f"no CUDA device (torch {figures.get('torch')})"
    return "passed", None


def judge_cpu_reference(figures: dict[str, Any], rc: int) -> tuple[str, str | None]:
    """The reference check's CPU variant: its figures, without the bf16 verdict (the CPU scores in fp32)."""
    return judge_json({k: v for k, v in figures.items() if k != "checks"}, rc, ("steady_tokens_per_s",))


def judge_figures(*required: str) -> Callable[[dict[str, Any], int], tuple[str, str | None]]:
    return lambda f, rc: judge_json(f, rc, required)


# ---------------------------------------------------------------------------------------------------------
# One check.


def run_check(check: Check, deadline: float, work: Path, env: dict[str, str] | None = None) -> Result:
    """Run `check` within its timeout and what is left of the budget; never raises for a child's failure."""
    result = Result(check.name, check.title, "skipped", timeout_s=check.timeout_s,
                    command=shlex.join(check.cmd) if check.cmd else None)  # fmt: skip
    if check.skip_reason:
        result.reason = check.skip_reason
        return _announce(result)
    left = deadline - time.monotonic()
    if check.cmd is None:
        result.reason = "no command"
        return _announce(result)
    if left < max(check.min_s, 1.0):
        result.reason = f"over budget: needs at least {check.min_s:.0f} s, {max(left, 0):.0f} s left"
        return _announce(result)
    limit = min(check.timeout_s, left)
    for stale in (check.json_path, check.junit_path):
        if stale is not None:
            stale.unlink(missing_ok=True)  # a figure from an earlier run must not pass for this one's
    log = work / f"{check.name}.log"
    print(f"[gpu_check] {check.name}: {check.title} (limit {limit:.0f} s, log {log})", flush=True)
    rc, seconds = run_process(check.cmd, limit, log, env)
    result.seconds, result.returncode, result.log = round(seconds, 1), rc, str(log)

    figures: dict[str, Any] = {}
    for path, reader in ((check.junit_path, parse_junit), (check.json_path, read_json)):
        if path is not None and path.is_file():
            try:
                figures |= reader(path)
            except (ValueError, ET.ParseError, OSError) as e:
                figures["read_error"] = f"unreadable {path.name}: {e}"
    if check.derive is not None:
        try:
            figures = check.derive(figures)
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:  # odd figures: report, don't crash
            figures["read_error"] = f"figures not understood: {type(e).__name__}: {e}"
    result.figures = figures
    if rc is None:
        stage = f" (during {figures['stage']})" if figures.get("stage") else ""  # a child that says where it is
        result.status, result.reason = "timeout", f"killed after {limit:.0f} s{stage}"
    else:
        result.status, result.reason = (check.judge or judge_json)(figures, rc)
    if result.status != "passed":
        result.output_tail = tail(log)
    return _announce(result)


def _announce(r: Result) -> Result:
    note = f": {r.reason}" if r.reason else ""
    print(f"[gpu_check] {r.name}: {r.status} ({r.seconds:.0f} s){note}", flush=True)
    return r


# ---------------------------------------------------------------------------------------------------------
# vLLM / eval: run only where the code exists.

FEATURES = (
    # name, title, uft_ray modules (any one), GPU test file
    ("vllm_lora", "vLLM generation with a LoRA adapter (hint-guided RFT)", ("rollout", "rft"),
     "tests/gpu/test_vllm_rollout.py"),
    ("eval_vllm", "uft-ray eval with model=vllm", ("evaluation",), "tests/gpu/test_eval_vllm.py"),
)  # fmt: skip


def module_exists(repo: Path, name: str) -> bool:
    """uft_ray.<name> in the checkout, found on disk (importing uft_ray to ask would import torch)."""
    return (repo / "uft_ray" / f"{name}.py").is_file() or (repo / "uft_ray" / name / "__init__.py").is_file()


def feature_skip_reason(
    modules: tuple[str, ...], test_file: str, repo: Path = REPO, runtime: tuple[str, ...] = ("vllm",)
) -> str | None:
    """None when the check can run, else one line naming everything missing."""
    importlib.invalidate_caches()  # an --install a moment ago may have added it
    missing = [f"{m} is not installed" for m in runtime if importlib.util.find_spec(m) is None]
    if not any(module_exists(repo, m) for m in modules):
        missing.append(f"uft_ray has no {' / '.join(f'uft_ray.{m}' for m in modules)} module yet")
    if not (repo / test_file).is_file():
        missing.append(f"{test_file} does not exist")
    return "; ".join(missing) or None


# ---------------------------------------------------------------------------------------------------------
# The plan.

TRAIN_ARGS = {  # sized to fit their limits with a machine's cold caches
    # no plain loop: the 0.5B check is for Ray Train, NCCL, ZeRO-3 and the adapter, not for a ratio
    "0.5b": ["--steps", "12", "--rows", "128", "--micro-batch", "8", "--max-len", "512", "--check-adapter",
             "--no-plain"],
    # ZeRO stage auto, as a production run picks it (one GPU that holds the bf16 model: ZeRO-0, no partitioning)
    "7b": ["--steps", "6", "--rows", "256", "--micro-batch", "16", "--grad-accum", "2", "--max-len", "1024",
           "--no-plain", "--zero-stage", "auto"],
}  # fmt: skip
# --cpu-smoke: each check's CPU variant, tiny shapes and few steps (2 CPU cores; the proof's venv, the bundle)
CPU_SMOKE = {
    "train_0.5b": ["--model", "0.5b", "--runs", "grouped", "--steps", "2", "--rows", "8", "--micro-batch", "2",
                   "--max-len", "128", "--no-plain"],
    "step_7b": ["--model", "tiny", "--device", "cpu", "--median-len", "100", "--max-len", "256", "--micro-tokens",
                "1024", "--steps", "1"],
    "rollout_0.5b": ["--model", "tiny", "--device", "cpu", "--batch", "8", "--new-tokens", "16", "--repeats", "1"],
    "reference_0.5b": ["--models", "tiny", "--actors", "1", "--rows", "32", "--min-len", "16", "--max-len", "64",
                       "--batch-size", "8"],
}  # fmt: skip
CPU_SMOKE_LIMIT_S = 600.0  # 2 CPU cores: writing the 0.5B model, Ray, a DeepSpeed op's first build, two fp32 steps
TRAIN_SHOW = (("tokens_per_s", "{:.0f} tok/s"), ("mfu", "MFU {:.1%}"), ("gpu_mem_peak_gib", "peak {:.1f} GiB"))
# Each check's limit (s). Window one's, with the bundle's install, the GPU decision, env.txt and the last report,
# end within about 500 s (window()); the checks of later windows run only when --only names them.
LIMITS = {"env": 45, "step_7b": 135, "rollout_0.5b": 50, "train_0.5b": 120, "pytest_gpu": 40, "reference_0.5b": 40,
          "train_7b": 240, "vllm_lora": 40, "eval_vllm": 35}  # fmt: skip
WINDOW_ONE = ("env", "step_7b", "rollout_0.5b", "train_0.5b", "pytest_gpu", "reference_0.5b")
LATER = "not in window one: --only NAME runs it"
WINDOW_END_S = 500.0


def window(limits: dict[str, float] | None = None, install_s: float = BUNDLE_TIMEOUT_S) -> dict[str, float]:
    """The GPU window's arithmetic: the bundle's install, the GPU decision, env.txt, window one's limits and the
    last report, against the budget (the hard stop) and the 500 s it should end by."""
    limits = LIMITS if limits is None else limits
    checks = float(sum(v for k, v in limits.items() if k in WINDOW_ONE))
    total = install_s + GPU_PROBE_S + ENV_TXT_S + checks + FINISH_S
    return {"install_s": install_s, "gpu_probe_s": GPU_PROBE_S, "env_txt_s": ENV_TXT_S, "checks_s": checks,
            "finish_s": FINISH_S, "total_s": total, "end_by_s": WINDOW_END_S, "budget_s": BUDGET_S,
            "spare_s": BUDGET_S - total}  # fmt: skip


def plan_checks(
    work: Path,
    peak_tflops: float = PEAK_TFLOPS,
    python: str = sys.executable,
    cpu_smoke: bool = False,
    env_stages: tuple[str, ...] = PROBE_STAGES,
) -> list[Check]:
    """Window one in order, then the later windows' checks (skipped unless --only names them). `cpu_smoke`: each
    check's CPU variant instead (no GPU needed), with CPU_SMOKE_LIMIT_S."""
    py, here = [python], Path(__file__).resolve().parent
    features = [(REPO / test) for *_, test in FEATURES]
    smoke = CPU_SMOKE if cpu_smoke else {}

    def limit(name: str) -> float:
        return CPU_SMOKE_LIMIT_S if cpu_smoke else LIMITS[name]

    checks = [
        Check("env", "torch, CUDA, device, NCCL, imports, Ray's GPUs", py + [str(Path(__file__).resolve()),
              "--probe", str(work / "env.json"), "--probe-stages", ",".join(env_stages)], timeout_s=limit("env"), min_s=10, json_path=work / "env.json",
              needs_cuda=False, judge=judge_env,
              show=(("device", "{}"), ("torch", "torch {}"), ("nccl", "NCCL {}"))),
        Check("step_7b", "the trainer's step, Mistral-7B shape, bf16, LoRA r16, in-process: packed vs padded",
              py + [str(here / "step.py"), *smoke.get("step_7b", []), "--json", str(work / "step_7b.json")],
              timeout_s=limit("step_7b"), min_s=60, json_path=work / "step_7b.json", needs_cuda="step_7b" not in smoke,
              judge=judge_figures("tokens_per_s"),
              show=(("tokens_per_s", "{:.0f} tok/s"), ("mfu_989", "MFU {:.1%} of 989"), ("mfu_790", "{:.1%} of 790"),
                    ("hfu_790", "HFU {:.1%}"), ("packed_over_padded_tokens_per_s", "packed/padded {:.2f}x"),
                    ("peak_allocated_gib", "peak {:.1f} GiB"))),
        Check("rollout_0.5b", "hf rollout backend, seeded sampler, Qwen2-0.5B shape, batch 64, LoRA",
              py + [str(here / "rollout.py"), *smoke.get("rollout_0.5b", []), "--root", str(work / "rollout"),
              "--json", str(work / "rollout_0.5b.json")], timeout_s=limit("rollout_0.5b"), min_s=30,
              json_path=work / "rollout_0.5b.json", needs_cuda="rollout_0.5b" not in smoke,
              judge=judge_figures("tokens_per_s"),
              show=(("tokens_per_s", "{:.0f} tok/s"), ("step_ms", "{:.1f} ms/step"),
                    ("peak_allocated_gib", "peak {:.1f} GiB"))),
    ]  # fmt: skip
    for shape, min_s, goal in (("0.5b", 60, None), ("7b", 90, MFU_GOAL_7B)):
        name, out = f"train_{shape}", work / f"train_{shape}.json"
        title = "Ray Train, NCCL, ZeRO-3, bf16, LoRA on the " + (
            "Qwen2-0.5B shape" if shape == "0.5b" else "Mistral-7B shape, ZeRO auto, gradient checkpointing"
        )
        args = ["--gpu", "--model", shape, "--runs", "grouped", *TRAIN_ARGS[shape], "--peak-tflops", str(peak_tflops)]
        if name in smoke:
            title, args = "CPU smoke: two steps of the Qwen2-0.5B shape through Ray Train", smoke[name]
        check = Check(name, title, py + ["bench/train_throughput.py", *args, "--root", str(work / f"train-{shape}"),
                      "--json", str(out)], timeout_s=limit(name), min_s=min_s, json_path=out,
                      needs_cuda=name not in smoke, derive=derive_train(peak_tflops, goal),
                      judge=judge_figures("tokens_per_s", "n_params"), show=TRAIN_SHOW,
                      files=(f"train-{shape}/runs/*/ray.log", f"train-{shape}/runs/*/metrics.jsonl"))  # fmt: skip
        if shape == "7b":
            check.skip_reason = LATER
        checks.append(check)
    checks.insert(4, Check("pytest_gpu", "pytest tests/gpu -v", py + ["-m", "pytest", "tests/gpu", "-v", "--timeout",
              "60", "--junitxml", str(work / "pytest_gpu.xml"), *[f"--ignore={f}" for f in features]],
              timeout_s=limit("pytest_gpu"), min_s=20, junit_path=work / "pytest_gpu.xml", judge=judge_pytest,
              needs_cuda=not cpu_smoke,  # on CPU: collected, every test skipped (the venv runs pytest)
              show=(("passed", "{} passed"), ("failed", "{} failed"), ("skipped", "{} skipped"))))  # fmt: skip
    checks.insert(5, Check("reference_0.5b", "reference actor in bf16, Qwen2-0.5B shape, cache miss vs hit", py + [
              "bench/reference.py", *(smoke.get("reference_0.5b") or ["--models", "0.5b", "--actors", "1", "--rows",
              "256", "--min-len", "128", "--max-len", "512", "--batch-size", "16"]), "--root", str(work / "reference"),
              "--json", str(work / "reference.json")], timeout_s=limit("reference_0.5b"), min_s=30,
              json_path=work / "reference.json", derive=derive_reference, needs_cuda="reference_0.5b" not in smoke,
              judge=judge_cpu_reference if smoke else judge_figures("steady_tokens_per_s"),
              show=(("steady_tokens_per_s", "steady {:.0f} tok/s"), ("e2e_tokens_per_s", "e2e {:.0f} tok/s"),
                    ("miss_over_hit", "miss/hit {:.0f}x"))))  # fmt: skip
    for name, title, modules, test in FEATURES:
        xml = work / f"{name}.xml"
        checks.append(
            Check(name, title, py + ["-m", "pytest", test, "-v", "--junitxml", str(xml)], timeout_s=LIMITS[name],
                  min_s=30, junit_path=xml, skip_reason=feature_skip_reason(modules, test) or LATER,
                  judge=judge_pytest, show=(("passed", "{} passed"), ("failed", "{} failed")))
        )  # fmt: skip
    return checks


def select(checks: list[Check], only: str | None, skip: str | None) -> list[Check]:
    """Mark the checks left out by --only / --skip as skipped (they stay in the report); env always runs."""
    names = {c.name for c in checks}
    wanted = {n.strip() for n in only.split(",") if n.strip()} if only else None
    unwanted = {n.strip() for n in skip.split(",") if n.strip()} if skip else set()
    unknown = ((wanted or set()) | unwanted) - names
    if unknown:
        raise SystemExit(f"unknown check names: {', '.join(sorted(unknown))}; choose from {', '.join(sorted(names))}")
    for c in checks:
        if c.name != "env" and ((wanted is not None and c.name not in wanted) or c.name in unwanted):
            c.skip_reason = "not selected (--only / --skip)"
        elif wanted is not None and c.name in wanted and c.skip_reason == LATER:
            c.skip_reason = None  # a later window's check, asked for by name
    return checks


# ---------------------------------------------------------------------------------------------------------
# The environment probe and the install step.


COLLECTIVE_TIMEOUT_S = 20.0
RAY_TASK_TIMEOUT_S = 20.0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _collective(cuda: bool) -> dict[str, Any]:
    """A one-rank all_reduce on NCCL (gloo without CUDA): NCCL that cannot start in a VM fails here, in seconds."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "nccl" if cuda else "gloo"
    out: dict[str, Any] = {"backend": backend, "ok": False}
    t0 = time.monotonic()
    try:
        os.environ.setdefault("NCCL_DEBUG", "INFO")  # NCCL's own account of its transports, into env's log
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
        x = torch.full((4,), 3.0, device="cuda" if cuda else "cpu")
        dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        out["ok"] = x.tolist() == [3.0] * 4  # one rank: the sum is itself
        if not out["ok"]:
            out["error"] = f"all_reduce of 3.0 on one rank gave {x.tolist()}"
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _ray_gpus(cuda: bool) -> dict[str, Any]:
    """ray.init, the GPUs in its cluster resources and, where torch sees one, a task holding a GPU asked whether
    it sees CUDA (a Ray that sees no GPU would leave that task pending: bounded by a timeout)."""
    out: dict[str, Any] = {"ok": False}
    t0 = time.monotonic()
    import ray

    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        out |= {"ok": True, "resources": {k: v for k, v in resources.items() if not k.startswith("node:")},
                "gpus": resources.get("GPU", 0.0), "init_s": round(time.monotonic() - t0, 2)}  # fmt: skip
        if cuda and out["gpus"]:

            @ray.remote(num_gpus=1)
            def sees_cuda() -> str | bool:
                import torch

                return torch.cuda.is_available() or f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}"

            try:
                out["task_cuda"] = ray.get(sees_cuda.remote(), timeout=RAY_TASK_TIMEOUT_S)
            except Exception as e:
                out["task_cuda"] = f"{type(e).__name__}: {e}"[:300]
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        ray.shutdown()
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def probe(path: Path | None = None, stages: tuple[str, ...] = PROBE_STAGES) -> dict[str, Any]:
    """What this interpreter has, stage by stage (run as a child): distributions, torch and the device, a one-rank
    all_reduce, every module the checks import, ray.init and its GPUs. `path` is rewritten after every stage with
    `stage` naming the one under way, so a probe killed in one still reports the others."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {},
                           "cuda_available": False, "stages": list(stages)}  # fmt: skip

    def save(stage: str | None) -> None:
        out["stage"] = stage
        if path is not None:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(out, indent=1, default=str))
            os.replace(tmp, path)

    for stage in stages:
        save(stage)
        t0 = time.monotonic()
        if stage == "packages":
            for dist in PROBED:
                try:
                    out["packages"][dist] = metadata.version(dist)
                except metadata.PackageNotFoundError:
                    out["packages"][dist] = None
            spec = importlib.util.find_spec("uft_ray")
            out["uft_ray_path"] = str(Path(spec.origin).parent) if spec and spec.origin else None
        elif stage == "torch":
            try:
                import torch

                out |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
                out["cuda_available"] = torch.cuda.is_available()
                if out["cuda_available"]:
                    props = torch.cuda.get_device_properties(0)
                    out |= {"device": props.name, "gpu_mem_gib": props.total_memory / 2**30,
                            "gpus": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
                    nccl = torch.cuda.nccl.version()
                    out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
            except Exception as e:  # a broken torch is a finding, not a crash of the probe
                out |= {"torch_error": f"{type(e).__name__}: {e}", "cuda_available": False}
        elif stage == "collective":
            out["collective"] = _collective(bool(out["cuda_available"]))
        elif stage == "imports":
            out["imports"] = {}
            for module in IMPORTS:
                try:
                    importlib.import_module(module)
                    out["imports"][module] = True
                except Exception as e:  # a missing or broken dependency is a finding: name it
                    out["imports"][module] = f"{type(e).__name__}: {e}"[:300]
        elif stage == "ray":
            try:
                out["ray"] = _ray_gpus(bool(out["cuda_available"]))
            except Exception as e:  # ray itself does not import: the imports stage names why
                out["ray"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        else:
            raise ValueError(f"unknown probe stage {stage!r}; choose from {', '.join(PROBE_STAGES)}")
        out.setdefault("stage_s", {})[stage] = round(time.monotonic() - t0, 2)
    save(None)
    return out


def cuda_version_from_smi(text: str) -> tuple[int, int] | None:
    """The driver's CUDA version from nvidia-smi's header ("CUDA Version: 13.0")."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_index_url(cuda: tuple[int, int] | None) -> str | None:
    """torch's wheel index for the newest CUDA runtime the driver supports; None if it supports none we know."""
    if cuda is None:
        return None
    fitting = [t for t in TORCH_CUDA_TAGS if t <= cuda]
    return f"https://download.pytorch.org/whl/cu{fitting[-1][0]}{fitting[-1][1]}" if fitting else None


def install_plan(
    found: dict[str, Any], cuda: tuple[int, int] | None, wheels: str | None, python: str = sys.executable
) -> list[tuple[str, list[list[str]]]]:
    """The install steps: (what, alternative commands, tried in order until one succeeds)."""
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--retries", "1", "--timeout", "20"]
    local = ["--no-index", "--find-links", wheels] if wheels else []
    steps: list[tuple[str, list[list[str]]]] = []
    if not found.get("cuda_available") and cuda is not None:
        version = (found.get("packages") or {}).get("torch")
        pins = [f"torch=={version.split('+')[0]}", "torch"] if version else ["torch"]  # same release first
        alternatives = [pip + local + ["--force-reinstall", pin] for pin in pins] if wheels else []
        url = torch_index_url(cuda)
        if url:  # a CPU build already there would satisfy plain `torch`: force the CUDA one in
            alternatives += [pip + ["--force-reinstall", "--index-url", url, pin] for pin in pins]
        if alternatives:
            steps.append(("torch", alternatives))
    if any(not (found.get("packages") or {}).get(d) for d in REQUIRED):
        # no build isolation: offline, pip could not fetch setuptools into an isolated build env
        steps.append(("package", [pip + local + ["--no-build-isolation", "-e", f"{REPO}[test]"]]))
    return steps


def _probe_child(path: Path, timeout_s: float, work: Path, env: dict[str, str]) -> dict[str, Any]:
    path.unlink(missing_ok=True)
    rc, _ = run_process([sys.executable, str(Path(__file__).resolve()), "--probe", str(path), "--probe-stages",
                         "packages,torch"], timeout_s, work / f"{path.stem}.log", env)  # fmt: skip
    try:
        return read_json(path) if rc == 0 else {"probe_error": f"exit {rc}"}
    except (OSError, ValueError) as e:
        return {"probe_error": str(e)}


def install(work: Path, deadline: float, env: dict[str, str], wheels: str | None, timeout_s: float) -> Result:
    """torch's CUDA build where torch sees no GPU, then the package; every command logged under `work`."""
    t0 = time.monotonic()
    end = min(deadline, t0 + timeout_s)
    print(f"[gpu_check] install: probing (limit {end - t0:.0f} s)", flush=True)
    before = _probe_child(work / "install-before.json", min(60.0, end - t0), work, env)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        smi = ""
    cuda = cuda_version_from_smi(smi)
    figures: dict[str, Any] = {
        "torch_before": (before.get("packages") or {}).get("torch"),
        "cuda_available_before": before.get("cuda_available"),
        "driver_cuda": ".".join(map(str, cuda)) if cuda else None,
        "index_url": torch_index_url(cuda),
        "wheels": wheels,
        "steps": [],
    }
    log = work / "install.log"
    for label, alternatives in install_plan(before, cuda, wheels):
        for cmd in alternatives:
            left = end - time.monotonic()
            if left < 5:
                figures["steps"].append({"step": label, "cmd": shlex.join(cmd), "rc": None, "note": "no time left"})
                break
            step_log = work / f"install-{label}-{len(figures['steps'])}.log"
            rc, seconds = run_process(cmd, left, step_log, env)
            figures["steps"].append({"step": label, "cmd": shlex.join(cmd), "rc": rc, "seconds": round(seconds, 1)})
            log = step_log
            if rc == 0:
                break
    after = _probe_child(work / "install-after.json", max(5.0, min(60.0, end - time.monotonic())), work, env)
    figures |= {
        "torch": (after.get("packages") or {}).get("torch"),
        "cuda_available": after.get("cuda_available"),
        "missing": [d for d in REQUIRED if not (after.get("packages") or {}).get(d)],
    }
    if not figures["steps"]:
        figures["note"] = "nothing to install: torch sees the GPU (or there is none) and every package is there"
    r = Result("install", "torch CUDA build + pip install -e .[test]", "passed", round(time.monotonic() - t0, 1),
               timeout_s=timeout_s, figures=figures, log=str(log))  # fmt: skip
    if figures["missing"]:
        r.status, r.reason = "failed", f"still missing: {', '.join(figures['missing'])}"
    elif cuda is not None and not figures["cuda_available"]:
        r.status = "failed"
        r.reason = f"torch {figures['torch']} sees no GPU (driver CUDA {figures['driver_cuda']}): kept what was there"
    if r.status != "passed":
        r.output_tail = tail(log)
    return _announce(r)


def bundle_site(work: Path) -> Path:
    return work / "bundle-site"


def install_bundle(bundle: Path, work: Path, deadline: float, timeout_s: float = BUNDLE_TIMEOUT_S) -> Result:
    """Every wheel of `bundle` (gpu/bundle.py) into a private folder, from those files only: no index, no
    dependency resolution, nothing outside the folder touched (the image stays as it is)."""
    t0 = time.monotonic()
    site = bundle_site(work)
    wheels = sorted(bundle.glob("*.whl")) if bundle.is_dir() else []
    figures: dict[str, Any] = {"bundle": str(bundle), "site": str(site), "wheels": len(wheels),
                               "bytes": sum(w.stat().st_size for w in wheels)}  # fmt: skip
    r = Result("install", f"the bundle's wheels into {site}", "passed", timeout_s=timeout_s, figures=figures)
    if not wheels:
        r.status, r.reason = "failed", f"{bundle} holds no wheels: build it with gpu/bundle.py --out {bundle}"
        return _announce(r)
    if site.exists():
        shutil.rmtree(site)  # what a bundle of another day left must not mix with this one
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-compile", "--target", str(site), *map(str, wheels)]  # fmt: skip
    log = work / "install-bundle.log"
    rc, seconds = run_process(cmd, max(1.0, min(timeout_s, deadline - time.monotonic())), log)
    r.seconds, r.returncode, r.log, r.command = round(time.monotonic() - t0, 1), rc, str(log), shlex.join(cmd)
    if rc != 0:
        r.status = "timeout" if rc is None else "failed"
        r.reason, r.output_tail = f"pip install of the bundle: exit {rc}", tail(log)
    return _announce(r)


# ---------------------------------------------------------------------------------------------------------
# Report.


def _figures_line(check: Check | None, r: Result) -> str:
    if r.name == "install" and "wheels" in r.figures:  # --bundle
        return f"{r.figures['wheels']} wheels, {r.figures['bytes'] / 2**20:.1f} MiB"
    if r.name == "install":
        f = r.figures
        return f"torch {f.get('torch')}, CUDA {f.get('cuda_available')}, {len(f.get('steps', []))} pip steps"
    parts = []
    for key, fmt in check.show if check else ():
        value = r.figures.get(key)
        if value is not None and not (isinstance(value, int | float) and value == 0 and key in ("failed", "skipped")):
            parts.append(fmt.format(value))
    if r.figures.get("mfu_goal") is not None:
        parts.append(f"(goal {r.figures['mfu_goal']:.0%})")
    return ", ".join(parts)


def format_table(results: list[Result], checks: list[Check] | None = None) -> str:
    """A fixed-width table: check, status, seconds, key figures; a reason line under each one not passed."""
    by_name = {c.name: c for c in checks or []}
    lines = [f"{'check':<16} {'status':<8} {'seconds':>7}  figures", "-" * 100]
    for r in results:
        lines.append(f"{r.name:<16} {r.status:<8} {r.seconds:>7.0f}  {_figures_line(by_name.get(r.name), r)}".rstrip())
        if r.reason:
            reason = r.reason if len(r.reason) <= 160 else r.reason[:157] + "..."
            lines.append(f"{'':<16} -> {reason}")
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines.append("-" * 100)
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)  # a kill between two writes leaves the last whole file, never half of one


def _tail_bytes(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        data = f.read()
    return (f"[... first {size - limit} bytes cut ...]\n".encode() + data) if size > limit else data


class Report:
    """What comes back, rewritten whole after every step: gpu_check.json, .txt, .log and .tar.gz in `out_dir`."""

    def __init__(
        self, out_dir: Path, work: Path, meta: dict[str, Any], checks: list[Check] | None = None,
        ray_dirs: tuple[Path, ...] = RAY_DIRS, since: float | None = None,
    ) -> None:  # fmt: skip
        self.out_dir, self.work, self.meta, self.checks = out_dir, work, meta, checks or []
        self.ray_dirs, self.since = ray_dirs, time.time() if since is None else since
        self.results: list[Result] = []
        self.running: dict[str, Any] | None = None
        self.t0 = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)

    def start(self, check: Check, limit: float) -> None:
        self.running = {"name": check.name, "title": check.title, "limit_s": round(limit),
                        "log": str(self.work / f"{check.name}.log"), "started": time.strftime("%H:%M:%S")}  # fmt: skip
        self.save()

    def add(self, result: Result) -> None:
        self.running = None
        self.results.append(result)
        self.save()

    def save(self, final: bool = False) -> Path:
        """The JSON first (the smallest, the most needed), then the table, the logs' ends and the archive."""
        report = self.meta | {
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "finished": final,
            "running": self.running,
            "counts": {s: sum(r.status == s for r in self.results) for s in STATUSES},
            "checks": [asdict(r) for r in self.results],
        }
        path = self.out_dir / "gpu_check.json"
        _atomic_write(path, json.dumps(report, indent=1, default=str) + "\n")
        table = format_table(self.results, self.checks)
        if self.running:
            table += f"\nrunning: {self.running['name']} (limit {self.running['limit_s']} s)"
        _atomic_write(self.out_dir / "gpu_check.txt", table + "\n")
        logs = []
        for r in self.results:  # each check's log end in one file (few files come back)
            logs.append(f"===== {r.name}: {r.status} ({r.seconds:.0f} s) {r.command or ''}\n")
            if r.log:
                logs.append(tail(Path(r.log), 20_000) + "\n")
        _atomic_write(self.out_dir / "gpu_check.log", "".join(logs))
        self.archive()
        return path

    def members(self, ray_logs: bool = True) -> list[tuple[str, Path, int]]:
        """(name in the archive, file, bytes kept from its end): env.txt, every finished check's log, its JSON or
        junit, its runs' ray.log and metrics.jsonl; then Ray's session logs written during this window."""
        out: list[tuple[str, Path, int]] = []
        seen: set[Path] = set()

        def add(name: str, path: Path, limit: int = LOG_MAX_BYTES) -> None:
            try:
                wanted = path not in seen and path.is_file() and path.stat().st_size > 0
            except OSError:  # a Ray log rotated away meanwhile
                wanted = False
            if wanted:
                seen.add(path)
                out.append((name, path, limit))

        add("env.txt", self.work / "env.txt")
        add("install-bundle.log", self.work / "install-bundle.log")
        by_name = {c.name: c for c in self.checks}
        for r in self.results:
            if r.log:
                add(f"logs/{Path(r.log).name}", Path(r.log))
            check = by_name.get(r.name)
            if check is None:
                continue
            for p in (check.json_path, check.junit_path):
                if p is not None:
                    add(f"figures/{p.name}", p)
            for pattern in check.files:
                for p in sorted(self.work.glob(pattern)):
                    add(f"runs/{r.name}/{p.relative_to(self.work).as_posix().replace('/', '_')}", p)
        if ray_logs:
            for root in self.ray_dirs:
                for p in sorted(root.glob("session_*/logs/*")):
                    try:
                        fresh = p.stat().st_mtime >= self.since
                    except OSError:
                        continue
                    if fresh:
                        add(f"ray/{p.parent.parent.name}/{p.name}", p, RAY_LOG_MAX_BYTES)
        return out

    def archive(self) -> Path:
        """gpu_check.tar.gz, under ARCHIVE_MAX_BYTES: Ray's session logs are the first to go, then big logs' heads."""
        import io
        import tarfile

        path = self.out_dir / "gpu_check.tar.gz"
        for ray_logs, scale in ((True, 1), (False, 1), (False, 8)):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
                for name, p, limit in self.members(ray_logs):
                    try:
                        data = _tail_bytes(p, limit // scale)
                    except OSError:
                        continue
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                    tar.addfile(info, io.BytesIO(data))
            if buf.tell() <= ARCHIVE_MAX_BYTES:
                break
        _atomic_write(path, buf.getvalue())
        return path


def write_report(results: list[Result], out_dir: Path, meta: dict[str, Any]) -> Path:
    """A report of finished results in one go (the report's JSON, table, logs' ends, archive)."""
    report = Report(out_dir, out_dir, meta, ray_dirs=())
    report.results = list(results)
    return report.save(final=True)


def gpu_present(timeout_s: float = GPU_PROBE_S) -> dict[str, Any]:
    """Is there a GPU, decided in `timeout_s` without Python's CUDA stack: `nvidia-smi -L`, else the driver's
    /proc entries. {"gpus": n, "source": ..., "names": [...]} (and "error" where nvidia-smi failed)."""
    t0 = time.monotonic()
    out: dict[str, Any] = {"gpus": 0, "names": [], "source": "nvidia-smi -L"}
    try:
        proc = subprocess.Popen(["nvidia-smi", "-L"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc, grace_s=0.2)
            raise
        out["names"] = [line.strip() for line in stdout.splitlines() if line.startswith("GPU ")]
        out["gpus"] = len(out["names"])
        if proc.returncode != 0:
            out["error"] = f"exit {proc.returncode}: {stdout.strip()[:200]}"
    except (OSError, subprocess.SubprocessError) as e:
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    if not out["gpus"]:
        entries = sorted(Path("/proc/driver/nvidia/gpus").glob("*"))
        if entries:
            out |= {"gpus": len(entries), "source": "/proc/driver/nvidia/gpus", "names": [e.name for e in entries]}
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


ENV_COMMANDS = (["nvidia-smi"], ["free", "-g"], ["df", "-h"], ["nproc"], [sys.executable, "-m", "pip", "list"])


def write_env_txt(path: Path, env: dict[str, str] | None = None, timeout_s: float = 5.0) -> Path:
    """nvidia-smi, free, df, nproc and pip list (with the children's PYTHONPATH: the bundle's folder too)."""
    parts = []
    for cmd in ENV_COMMANDS:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            text = done.stdout + (f"[stderr] {done.stderr}" if done.stderr.strip() else "")
        except (OSError, subprocess.SubprocessError) as e:
            text = f"{type(e).__name__}: {e}\n"
        parts.append(f"$ {shlex.join(cmd)}\n{text}\n")
    _atomic_write(path, "".join(parts))
    return path


def run_window(
    checks: list[Check], work: Path, report: Report, deadline: float, env: dict[str, str] | None, gpu: bool,
) -> list[Result]:  # fmt: skip
    """Every check in turn, the report rewritten before and after each; on SIGTERM / SIGINT the check under way is
    killed with its tree and recorded as interrupted, and the report written once more."""
    handlers = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, _interrupt)
    except ValueError:  # not the main thread: no handlers, the report is still written as it goes
        pass
    current: Check | None = None
    t_check = time.monotonic()
    try:
        for check in checks:
            if check.needs_cuda and not gpu and not check.skip_reason:
                check.skip_reason = "no GPU: nvidia-smi -L lists none (--gpu yes to try anyway)"
            if not check.skip_reason and check.cmd is not None:
                current, t_check = check, time.monotonic()
                report.start(check, min(check.timeout_s, max(0.0, deadline - time.monotonic())))
            result = run_check(check, deadline, work, env)
            current = None
            report.add(result)
    except Interrupted as e:
        if current is not None:
            log = work / f"{current.name}.log"
            report.add(Result(current.name, current.title, "interrupted", round(time.monotonic() - t_check, 1),
                              timeout_s=current.timeout_s, reason=f"the window was stopped ({e}) during this check",
                              command=shlex.join(current.cmd or []), log=str(log), output_tail=tail(log)))  # fmt: skip
        raise
    finally:
        report.running = None
        report.save(final=True)
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return report.results


def child_env(site: Path | None = None) -> dict[str, str]:
    """The children's environment: the checkout first on PYTHONPATH, then the bundle's folder (`site`)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # a killed child's log still holds what it printed
    paths = [str(REPO), *([str(site)] if site else []), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if site:  # the bundle's console scripts (ray's), for any child that starts one
        env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be fetched: never wait on a hub timeout
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help="install torch's CUDA build and the package first")
    p.add_argument("--wheels", default=None, help="a folder of wheels to install from, offline (--no-index)")
    p.add_argument(
        "--bundle",
        default=None,
        metavar="DIR",
        help="install only DIR's wheels (gpu/bundle.py) into a private folder, run from the checkout",
    )
    p.add_argument("--cpu-smoke", action="store_true", help="each check's CPU variant (tiny shapes, few steps)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="is there a GPU: auto asks nvidia-smi -L (3 s); the env probe does not decide it")  # fmt: skip
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything, install included")
    p.add_argument("--install-timeout", type=float, default=INSTALL_TIMEOUT_S)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="bf16 dense peak for MFU")
    p.add_argument("--only", default=None, help="comma list of check names to run")
    p.add_argument("--skip", default=None, help="comma list of check names to leave out")
    p.add_argument("--work", default="/tmp/uft-gpu-check", help="models, logs and child outputs")
    p.add_argument("--out", default=None, help="where the report goes (default: $OUT, else --work)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--probe", default=None, metavar="PATH", help=argparse.SUPPRESS)  # the env child
    p.add_argument("--env-stages", default=",".join(PROBE_STAGES), help="the env probe's stages, in order")
    p.add_argument("--probe-stages", default=",".join(PROBE_STAGES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        probe(Path(args.probe), tuple(x for x in args.probe_stages.split(",") if x))
        return 0

    t_start, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    deadline = t_start + args.budget
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.bundle and args.install:
        p.error("--bundle and --install: choose one")

    def plan() -> list[Check]:
        stages = tuple(x for x in args.env_stages.split(",") if x)
        if set(stages) - set(PROBE_STAGES):
            p.error(f"--env-stages: choose from {','.join(PROBE_STAGES)}")
        checks = plan_checks(work, args.peak_tflops, cpu_smoke=args.cpu_smoke, env_stages=stages)
        return select(checks, args.only, args.skip)

    checks = plan()  # bad names fail before any install
    if args.dry_run:
        for c in checks:
            state = f"skip: {c.skip_reason}" if c.skip_reason else f"limit {c.timeout_s:.0f} s, min {c.min_s:.0f} s"
            print(f"{c.name:<16} {state}\n{'':<16} {shlex.join(c.cmd) if c.cmd else '-'}")
        w = window()
        print(f"window one: bundle install {w['install_s']:.0f} s + GPU decision {w['gpu_probe_s']:.0f} s + env.txt "
              f"{w['env_txt_s']:.0f} s + checks {w['checks_s']:.0f} s + last report {w['finish_s']:.0f} s = "
              f"{w['total_s']:.0f} s (ends by {w['end_by_s']:.0f} s; hard stop --budget {w['budget_s']:.0f} s)")  # fmt: skip
        return 0

    out_dir = Path(args.out or os.environ.get("OUT") or work).resolve()
    meta = {
        "script": "gpu/check.py", "argv": sys.argv[1:] if argv is None else argv, "started": started,
        "budget_s": args.budget, "peak_tflops": args.peak_tflops, "work_dir": str(work), "out_dir": str(out_dir),
        "host": platform.node(), "python": sys.version.split()[0], "cpu_smoke": args.cpu_smoke,
    }  # fmt: skip
    report = Report(out_dir, work, meta, checks)
    gpu = gpu_present() if args.gpu == "auto" else {"gpus": int(args.gpu == "yes"), "source": f"--gpu {args.gpu}"}
    meta["gpu_decision"] = gpu
    print(f"[gpu_check] GPU: {gpu['gpus']} ({gpu['source']}{'; ' + gpu['error'] if gpu.get('error') else ''})",
          flush=True)  # fmt: skip
    report.save()
    site = None
    try:
        if args.bundle:
            report.add(install_bundle(Path(args.bundle).resolve(), work, deadline))
            site = bundle_site(work)
        env = child_env(site)
        if args.install:
            report.add(install(work, deadline, env, args.wheels, args.install_timeout))
            checks = report.checks = plan()  # what the install brought
        write_env_txt(work / "env.txt", env)
    except Interrupted:
        report.save(final=True)
        raise
    results = run_window(checks, work, report, deadline - FINISH_S, env, gpu["gpus"] > 0)
    print("\n" + format_table(results, checks))
    print(f"figures: {out_dir / 'gpu_check.json'} (and .txt, .log, .tar.gz)")
    return 1 if any(r.status in ("failed", "timeout", "interrupted") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
