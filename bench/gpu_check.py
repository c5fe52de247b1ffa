"""The whole GPU tier in one short window: one command, each part under its own time limit, one JSON of figures.

On the device machine (one H200, 15 minutes a lease with the machine's start; no network), from the repository root:

    python bench/gpu_bundle.py --out .gpu-bundle                      # here, once: what the image lacks (< 60 MiB)
    OUT=/some/dir python bench/gpu_check.py --bundle .gpu-bundle      # there: `$OUT/gpu_check.json` + `gpu_check.log`
    python bench/gpu_check.py --install                               # a networked machine: pip install -e .[test]
    python bench/gpu_check.py --only env,train_7b --budget 300        # a subset; names below
    python bench/gpu_check.py --dry-run                               # print the plan, the limits and their sum

Here (no GPU) `python bench/gpu_check.py` runs the environment probe and records every GPU check as skipped;
`--cpu-smoke` adds two CPU steps of the 0.5B-shape train check (how `make gpu-bundle-proof` proves a bundle).

Checks, in order, each a subprocess with its own limit (a hang costs only its share; on a timeout the child's
whole process tree is killed, Ray's daemons included), all inside `--budget` seconds (default 600: the lease's
15 minutes less the machine's start and a margin). The limits add up to the budget (`--dry-run` prints the sum;
a test holds it), so every check gets its whole limit; a check that would get less than its minimum is skipped.

    install         (--bundle DIR) the bundle's wheels into a private folder (`pip install --no-index --no-deps
                    --target`), on every child's PYTHONPATH after the checkout; (--install) torch's CUDA build
                    when torch sees no GPU, then `pip install -e .[test]`
    env             torch, CUDA, the device, NCCL, package versions, and every module the checks import
                    (a child probe: `--probe PATH`)
    pytest_gpu      `pytest tests/gpu -v` (bf16 chunked log-probs vs fp32 and their memory; bf16 scorer vs fp32),
                    read back through `--junitxml`
    train_0.5b      bench/train_throughput.py on the Qwen2-0.5B shape: Ray Train, NCCL, ZeRO-3, bf16, LoRA;
                    loss falls, reward 0 at step 1, adapter reloaded by peft, tokens/s, MFU, peak GPU memory
    train_7b        the same step on Mistral-7B's shape (real MistralConfig, random init, bf16, gradient
                    checkpointing) under ZeRO stage `auto`, as production picks it (ZeRO-0 on one GPU where the
                    model fits): tokens/s, MFU (goal >= 45%), peak GPU memory
    reference_0.5b  bench/reference.py: the reference actor's tokens/s in bf16 on the 0.5B shape, cache miss vs hit
    vllm_lora       vLLM generation with a LoRA adapter, and
    eval_vllm       `uft-ray eval` with model=vllm: run as `pytest` of their GPU test files once vllm, the
                    module and the test file exist; until then skipped with a line naming what is missing

MFU counts 4 x params x tokens per second (a forward, 2, plus a backward through frozen weights, 2: LoRA needs
no weight gradients of the base) against `--peak-tflops` (790: the bf16 matrix rate measured on this H200).
Peak GPU memory of a training run is nvidia-smi's memory.used sampled by the bench (the worker is a Ray
process): CUDA contexts and the caching allocator's reserve are in it.

Installing with --install (a machine with a network, or `--wheels DIR`): torch's CUDA build comes from
`--wheels DIR` if it holds one, else from https://download.pytorch.org/whl/cuXYZ, the newest CUDA tag that the
driver's CUDA version (nvidia-smi's header) supports; when neither works the torch already there is kept and
the table says so. A torch that already sees the GPU is never replaced. The package goes in with
`pip install -e .[test]`, skipped when every needed distribution is already there.
Children run with PYTHONPATH at the repository, so the checkout itself is what they test.
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
BUDGET_S = 600.0  # the lease's 15 minutes less the machine's start (~3 min) and a margin for one rerun of a part
INSTALL_TIMEOUT_S = 240.0  # --install: pip from a network
BUNDLE_TIMEOUT_S = 45.0  # --bundle: ~40 MiB of wheels unpacked from local files
MFU_GOAL_7B = 0.45
STATUSES = ("passed", "failed", "timeout", "skipped")
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


def kill_tree(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM the child's group and every descendant (Ray's driver then stops its cluster), SIGKILL after grace."""
    pids = descendants(proc.pid)  # before the parent dies and they are re-parented out of reach
    _signal(proc.pid, pids, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    left = [p for p in {*pids, *descendants(proc.pid)} if alive(p)]
    _signal(proc.pid, left, signal.SIGKILL)
    proc.wait()


def run_process(
    cmd: list[str], timeout_s: float, log_path: Path, env: dict[str, str] | None = None
) -> tuple[int | None, float]:
    """Run `cmd` in the repo root with stdout + stderr to `log_path`; (exit code or None on timeout, seconds)."""
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
    if not figures.get("cuda_available"):
        return "passed", f"no CUDA device (torch {figures.get('torch')}): the GPU checks are skipped"
    return "passed", None


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
        result.status, result.reason = "timeout", f"killed after {limit:.0f} s"
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
    "0.5b": ["--steps", "12", "--rows", "128", "--micro-batch", "8", "--max-len", "512", "--check-adapter"],
    # ZeRO stage auto, as a production run picks it (one GPU that holds the bf16 model: ZeRO-0, no partitioning)
    "7b": ["--steps", "6", "--rows", "256", "--micro-batch", "16", "--grad-accum", "2", "--max-len", "1024",
           "--no-plain", "--zero-stage", "auto"],
}  # fmt: skip
# The CPU smoke of the 0.5B-shape step (--cpu-smoke): two steps of tiny lengths, fp32, ZeRO-3 on gloo.
CPU_SMOKE_ARGS = ["--steps", "2", "--rows", "8", "--micro-batch", "2", "--max-len", "128", "--no-plain"]
CPU_SMOKE_LIMIT_S = 600.0  # 2 CPU cores: writing the 0.5B model, Ray, a DeepSpeed op's first build, two fp32 steps
TRAIN_SHOW = (("tokens_per_s", "{:.0f} tok/s"), ("mfu", "MFU {:.1%}"), ("gpu_mem_peak_gib", "peak {:.1f} GiB"))
# Each check's limit (s): with the bundle's install they add up to BUDGET_S, so none is cut short by the budget.
LIMITS = {"env": 45, "pytest_gpu": 75, "train_0.5b": 120, "train_7b": 180, "reference_0.5b": 60, "vllm_lora": 40,
          "eval_vllm": 35}  # fmt: skip


def window(limits: dict[str, float] | None = None, install_s: float = BUNDLE_TIMEOUT_S) -> dict[str, float]:
    """The GPU window's arithmetic: the bundle's install plus every check's limit, against the budget."""
    limits = LIMITS if limits is None else limits
    total = install_s + sum(limits.values())
    return {"install_s": install_s, "checks_s": float(sum(limits.values())), "total_s": total, "budget_s": BUDGET_S,
            "spare_s": BUDGET_S - total}  # fmt: skip


def plan_checks(
    work: Path, peak_tflops: float = PEAK_TFLOPS, python: str = sys.executable, cpu_smoke: bool = False
) -> list[Check]:
    py = [python]
    features = [(REPO / test) for *_, test in FEATURES]
    checks = [
        Check("env", "torch, CUDA, device, NCCL, packages, imports", py + [str(Path(__file__).resolve()), "--probe",
              str(work / "env.json")], timeout_s=LIMITS["env"], min_s=10, json_path=work / "env.json",
              needs_cuda=False, judge=judge_env,
              show=(("device", "{}"), ("torch", "torch {}"), ("nccl", "NCCL {}"))),
        Check("pytest_gpu", "pytest tests/gpu -v", py + ["-m", "pytest", "tests/gpu", "-v", "--timeout", "60",
              "--junitxml", str(work / "pytest_gpu.xml"), *[f"--ignore={f}" for f in features]],
              timeout_s=LIMITS["pytest_gpu"], min_s=30, junit_path=work / "pytest_gpu.xml", judge=judge_pytest,
              show=(("passed", "{} passed"), ("failed", "{} failed"), ("skipped", "{} skipped"))),
    ]  # fmt: skip
    for shape, min_s, goal in (("0.5b", 60, None), ("7b", 90, MFU_GOAL_7B)):
        name, out = f"train_{shape}", work / f"train_{shape}.json"
        title = "Ray Train, NCCL, ZeRO-3, bf16, LoRA on the " + (
            "Qwen2-0.5B shape" if shape == "0.5b" else "Mistral-7B shape, ZeRO auto, gradient checkpointing"
        )
        args = ["--gpu", "--model", shape, "--runs", "grouped", *TRAIN_ARGS[shape], "--peak-tflops", str(peak_tflops)]
        needs_cuda, limit = True, LIMITS[name]
        if cpu_smoke and shape == "0.5b":
            title, args, needs_cuda = "CPU smoke: two steps of the Qwen2-0.5B shape", ["--model", shape, "--runs",
                                      "grouped", *CPU_SMOKE_ARGS], False  # fmt: skip
            limit = CPU_SMOKE_LIMIT_S
        checks.append(
            Check(name, title, py + ["bench/train_throughput.py", *args, "--root", str(work / f"train-{shape}"),
                  "--json", str(out)], timeout_s=limit, min_s=min_s, json_path=out, needs_cuda=needs_cuda,
                  derive=derive_train(peak_tflops, goal),
                  judge=lambda f, rc: judge_json(f, rc, ("tokens_per_s", "n_params")), show=TRAIN_SHOW)
        )  # fmt: skip
    checks.append(
        Check("reference_0.5b", "reference actor in bf16, Qwen2-0.5B shape, cache miss vs hit", py + [
              "bench/reference.py", "--models", "0.5b", "--actors", "1", "--rows", "256", "--min-len", "128",
              "--max-len", "512", "--batch-size", "16", "--root", str(work / "reference"), "--json",
              str(work / "reference.json")], timeout_s=LIMITS["reference_0.5b"], min_s=40,
              json_path=work / "reference.json", derive=derive_reference,
              judge=lambda f, rc: judge_json(f, rc, ("steady_tokens_per_s",)),
              show=(("steady_tokens_per_s", "steady {:.0f} tok/s"), ("e2e_tokens_per_s", "e2e {:.0f} tok/s"),
                    ("miss_over_hit", "miss/hit {:.0f}x")))
    )  # fmt: skip
    for name, title, modules, test in FEATURES:
        xml = work / f"{name}.xml"
        checks.append(
            Check(name, title, py + ["-m", "pytest", test, "-v", "--junitxml", str(xml)], timeout_s=LIMITS[name],
                  min_s=30, junit_path=xml, skip_reason=feature_skip_reason(modules, test), judge=judge_pytest,
                  show=(("passed", "{} passed"), ("failed", "{} failed")))
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
    return checks


# ---------------------------------------------------------------------------------------------------------
# The environment probe and the install step.


def probe() -> dict[str, Any]:
    """What this interpreter has: distributions, torch and its CUDA, the device, NCCL (run as a child)."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
    for dist in PROBED:
        try:
            out["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out["packages"][dist] = None
    spec = importlib.util.find_spec("uft_ray")
    out["uft_ray_path"] = str(Path(spec.origin).parent) if spec and spec.origin else None
    out["imports"] = {}
    for module in IMPORTS:
        try:
            importlib.import_module(module)
            out["imports"][module] = True
        except Exception as e:  # a missing or broken dependency is a finding: name it
            out["imports"][module] = f"{type(e).__name__}: {e}"[:300]
    try:
        import torch

        out |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": False}
        out["cuda_available"] = torch.cuda.is_available()
        if out["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            out |= {"device": props.name, "gpu_mem_gib": props.total_memory / 2**30, "gpus": torch.cuda.device_count(),
                    "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
            nccl = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    except Exception as e:  # a broken torch is a finding, not a crash of the probe
        out |= {"torch_error": f"{type(e).__name__}: {e}", "cuda_available": False}
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
    rc, _ = run_process([sys.executable, str(Path(__file__).resolve()), "--probe", str(path)],
                        timeout_s, work / f"{path.stem}.log", env)  # fmt: skip
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
    """Every wheel of `bundle` (bench/gpu_bundle.py) into a private folder, from those files only: no index, no
    dependency resolution, nothing outside the folder touched (the image stays as it is)."""
    t0 = time.monotonic()
    site = bundle_site(work)
    wheels = sorted(bundle.glob("*.whl")) if bundle.is_dir() else []
    figures: dict[str, Any] = {"bundle": str(bundle), "site": str(site), "wheels": len(wheels),
                               "bytes": sum(w.stat().st_size for w in wheels)}  # fmt: skip
    r = Result("install", f"the bundle's wheels into {site}", "passed", timeout_s=timeout_s, figures=figures)
    if not wheels:
        r.status, r.reason = "failed", f"{bundle} holds no wheels: build it with bench/gpu_bundle.py --out {bundle}"
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


def write_report(results: list[Result], out_dir: Path, meta: dict[str, Any]) -> Path:
    """`gpu_check.json` (every figure, command, status, the output tail of each check not passed) and a log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = meta | {
        "counts": {s: sum(r.status == s for r in results) for s in STATUSES},
        "checks": [asdict(r) for r in results],
    }
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    with open(out_dir / "gpu_check.log", "w") as f:  # each check's log end, one file (few files come back)
        for r in results:
            f.write(f"===== {r.name}: {r.status} ({r.seconds:.0f} s) {r.command or ''}\n")
            if r.log:
                f.write(tail(Path(r.log), 20_000) + "\n")
    return path


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
        help="install only DIR's wheels (bench/gpu_bundle.py) into a private folder, run from the checkout",
    )
    p.add_argument("--cpu-smoke", action="store_true", help="train_0.5b as two CPU steps of tiny lengths")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything, install included")
    p.add_argument("--install-timeout", type=float, default=INSTALL_TIMEOUT_S)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="bf16 dense peak for MFU")
    p.add_argument("--only", default=None, help="comma list of check names to run")
    p.add_argument("--skip", default=None, help="comma list of check names to leave out")
    p.add_argument("--work", default="/tmp/uft-gpu-check", help="models, logs and child outputs")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--probe", default=None, metavar="PATH", help=argparse.SUPPRESS)  # the env child
    args = p.parse_args(argv)
    if args.probe:
        Path(args.probe).write_text(json.dumps(probe(), indent=1))
        return 0

    t_start, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    deadline = t_start + args.budget
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.bundle and args.install:
        p.error("--bundle and --install: choose one")

    def plan() -> list[Check]:
        return select(plan_checks(work, args.peak_tflops, cpu_smoke=args.cpu_smoke), args.only, args.skip)

    checks = plan()  # bad names fail before any install
    if args.dry_run:
        for c in checks:
            state = f"skip: {c.skip_reason}" if c.skip_reason else f"limit {c.timeout_s:.0f} s, min {c.min_s:.0f} s"
            print(f"{c.name:<16} {state}\n{'':<16} {shlex.join(c.cmd) if c.cmd else '-'}")
        w = window()
        print(f"window: bundle install {w['install_s']:.0f} s + checks {w['checks_s']:.0f} s = {w['total_s']:.0f} s "
              f"of a {w['budget_s']:.0f} s budget")  # fmt: skip
        return 0

    results: list[Result] = []
    site = None
    if args.bundle:
        results.append(install_bundle(Path(args.bundle).resolve(), work, deadline))
        site = bundle_site(work)
    env = child_env(site)
    if args.install:
        results.append(install(work, deadline, env, args.wheels, args.install_timeout))
        checks = plan()  # what the install brought
    cuda = False
    for check in checks:
        if check.needs_cuda and not cuda and not check.skip_reason:
            check.skip_reason = "no CUDA device: torch.cuda.is_available() is False (see env)"
        result = run_check(check, deadline, work, env)
        if check.name == "env":
            cuda = bool(result.figures.get("cuda_available"))
        results.append(result)

    print("\n" + format_table(results, checks))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else work
    meta = {
        "script": "bench/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv, "started": started,
        "elapsed_s": round(time.monotonic() - t_start, 1), "budget_s": args.budget, "peak_tflops": args.peak_tflops,
        "work_dir": str(work), "host": platform.node(), "python": sys.version.split()[0],
    }  # fmt: skip
    print(f"figures: {write_report(results, out_dir, meta)}")
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
