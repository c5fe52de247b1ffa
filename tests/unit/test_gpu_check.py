"""gpu/check.py's own logic on the CPU: reading junit XML and child JSON, limits and kills, skips, the report.

The GPU itself is not exercised here (the checks it runs are); every child below is a real process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check", "gpu/check.py")

TESTS = """
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_fails():
    assert 1 + 1 == 3

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass
"""
ALL_SKIPPED = """
import pytest

pytestmark = pytest.mark.skipif(True, reason="needs CUDA")

def test_a():
    pass

def test_b():
    pass
"""


def _pytest_check(tmp_path: Path, name: str, source: str) -> object:
    test_file = tmp_path / f"test_{name}.py"
    test_file.write_text(textwrap.dedent(source))
    xml = tmp_path / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider", "--rootdir",
           str(tmp_path), "--junitxml", str(xml)]  # fmt: skip
    return gc.Check(name, name, cmd, timeout_s=60, junit_path=xml, judge=gc.judge_pytest, needs_cuda=False)


def _python_check(tmp_path: Path, name: str, code: str, timeout_s: float = 30, **kw: object) -> object:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-c", textwrap.dedent(code), str(out)]
    return gc.Check(name, name, cmd, timeout_s=timeout_s, json_path=out, needs_cuda=False, **kw)


def _alive(pid: int) -> bool:
    return gc.alive(pid)


# --- MFU -------------------------------------------------------------------------------------------------


def test_mfu_worked_by_hand() -> None:
    # 7B: 4 x 7.24e9 x 10,000 tok/s = 2.896e14 FLOP/s; / 790e12 = 0.36658...
    assert gc.mfu(7.24e9, 10_000, 790) == pytest.approx(2.896e14 / 7.9e14)
    assert gc.mfu(7.24e9, 10_000, 790) == pytest.approx(0.366582, abs=1e-6)
    # 0.5B: 4 x 494e6 x 50,000 = 9.88e13; / 790e12 = 0.12506...
    assert gc.mfu(494e6, 50_000, 790) == pytest.approx(0.125063, abs=1e-6)
    # the bench's own figure uses the same formula
    tt = _load("train_throughput", "bench/train_throughput.py")
    assert tt.mfu(7.24e9, 10_000, 790) == gc.mfu(7.24e9, 10_000, 790)
    f = gc.derive_train(790.0, goal=0.45)({"n_params": 7.24e9, "tokens_per_s": 10_000})
    assert f["mfu"] == pytest.approx(0.366582, abs=1e-6) and f["mfu_meets_goal"] is False
    assert "mfu" not in gc.derive_train(790.0)({"tokens_per_s": 10.0})  # no params: nothing made up


# --- pytest through junit XML ----------------------------------------------------------------------------


def test_junit_xml_of_a_real_pytest_run(tmp_path: Path) -> None:
    r = gc.run_check(_pytest_check(tmp_path, "mixed", TESTS), time.monotonic() + 60, tmp_path)
    f = r.figures
    assert (f["tests"], f["passed"], f["failed"], f["skipped"], f["errors"]) == (3, 1, 1, 1, 0)
    cases = {c["name"].rsplit("::", 1)[-1]: c for c in f["cases"]}
    assert cases["test_passes"]["status"] == "passed" and cases["test_passes"]["message"] is None
    assert cases["test_fails"]["status"] == "failed" and "assert" in cases["test_fails"]["message"]
    assert cases["test_skipped"]["status"] == "skipped" and "not today" in cases["test_skipped"]["message"]
    assert r.status == "failed" and r.reason == "1 failed: test_fails" and r.returncode == 1
    assert "test_fails" in r.output_tail  # the end of pytest's output travels with a failed check


def test_pytest_all_skipped_is_a_skip_and_all_passed_a_pass(tmp_path: Path) -> None:
    r = gc.run_check(_pytest_check(tmp_path, "skipped", ALL_SKIPPED), time.monotonic() + 60, tmp_path)
    assert r.status == "skipped" and r.reason == "all 2 skipped: needs CUDA"
    ok = gc.run_check(_pytest_check(tmp_path, "ok", "def test_ok():\n    pass\n"), time.monotonic() + 60, tmp_path)
    assert ok.status == "passed" and ok.reason is None and ok.output_tail is None and ok.figures["passed"] == 1


def test_pytest_without_a_report_fails() -> None:
    status, reason = gc.judge_pytest({}, 4)
    assert status == "failed" and reason.startswith("exit 4, no junit report")
    assert gc.judge_pytest({"tests": 0, "skipped": 0, "cases": []}, 5) == ("failed", "exit 5, no tests collected")


# --- child JSON ------------------------------------------------------------------------------------------

WRITE = """
import json, sys
json.dump({figures}, open(sys.argv[1], "w"))
print("boom" if {fail} else "fine")
sys.exit({rc})
"""


def _train_like(checks: dict[str, bool], rc: int = 0) -> str:
    figures = {"n_params": 7.24e9, "tokens_per_s": 10_000.0, "gpu_mem_peak_gib": 61.5, "checks": checks}
    return WRITE.format(figures=repr(figures), fail=rc != 0, rc=rc)


def test_child_json_is_read_and_judged(tmp_path: Path) -> None:
    deadline = time.monotonic() + 60
    judge = lambda f, rc: gc.judge_json(f, rc, ("tokens_per_s", "n_params"))  # noqa: E731
    ok = gc.run_check(
        _python_check(tmp_path, "good", _train_like({"loss_falls": True}), derive=gc.derive_train(790.0),
                      judge=judge),
        deadline, tmp_path,
    )  # fmt: skip
    assert ok.status == "passed" and ok.figures["gpu_mem_peak_gib"] == 61.5
    assert ok.figures["mfu"] == pytest.approx(0.366582, abs=1e-6)

    bad = gc.run_check(
        _python_check(tmp_path, "bad", _train_like({"loss_falls": True, "reward_zero_at_step1": False}),
                      judge=judge), deadline, tmp_path,
    )  # fmt: skip
    assert bad.status == "failed" and bad.reason == "checks failed: reward_zero_at_step1"

    crashed = gc.run_check(_python_check(tmp_path, "crashed", _train_like({}, rc=3), judge=judge), deadline, tmp_path)
    assert crashed.status == "failed" and crashed.reason == "exit 3" and crashed.returncode == 3
    assert crashed.figures["tokens_per_s"] == 10_000.0  # what it wrote before failing is kept
    assert "boom" in crashed.output_tail

    garbage = "import sys; open(sys.argv[1], 'w').write('{not json')"
    g = gc.run_check(_python_check(tmp_path, "garbage", garbage), deadline, tmp_path)
    assert g.status == "failed" and "unreadable garbage.json" in g.reason

    missing = gc.run_check(_python_check(tmp_path, "missing", "pass", judge=judge), deadline, tmp_path)
    assert missing.status == "failed" and missing.reason == "missing figures: tokens_per_s, n_params"


def test_reference_figures_are_flattened() -> None:
    f = gc.derive_reference(
        {"device": "x", "results": [{"dtype": "bfloat16", "e2e_tokens_per_s": 1e4, "steady_tokens_per_s": 5e4,
                                     "miss_s": 20.0, "hit_s": 0.5, "tokens": 1000, "forwards": 32}]}
    )  # fmt: skip
    assert f["steady_tokens_per_s"] == 5e4 and f["miss_over_hit"] == 40.0 and f["checks"] == {"bf16": True}
    assert gc.judge_json(f, 0, ("steady_tokens_per_s",)) == ("passed", None)
    fp32 = gc.derive_reference({"results": [{"dtype": "float32", "miss_s": 1.0, "hit_s": 0.5}]})
    assert gc.judge_json(fp32, 0) == ("failed", "checks failed: bf16")


def test_train_bench_step_checks() -> None:
    """The bench's own verdicts from metrics rows: the loss falls, step 1's per-token log-ratio ~ 0."""
    tt = _load("train_throughput", "bench/train_throughput.py")
    rows = [{"loss": 0.25, "reward/uc": 0.004, "kl/uc": 1e-4, "reward/hs": -0.002, "kl/hs": -5e-5}]
    rows += [{"loss": v} for v in (0.24, 0.2, 0.15, 0.12, 0.1)]
    checks, figures = tt.step_checks(rows)
    assert checks == {"loss_falls": True, "reward_zero_at_step1": True}
    assert figures["loss_head_mean"] == pytest.approx(0.245) and figures["loss_tail_mean"] == pytest.approx(0.11)
    assert figures["step1_reward_abs_max"] == 0.004
    drifted = [dict(rows[0], **{"kl/hs": 0.05}), *rows[1:]]
    assert tt.step_checks(drifted)[0]["reward_zero_at_step1"] is False
    rising = [dict(r, loss=0.1 * i) for i, r in enumerate(rows)]
    assert tt.step_checks(rising)[0]["loss_falls"] is False
    assert tt.step_checks([{"loss": 0.2}])[0] == {"loss_falls": False, "reward_zero_at_step1": False}


# --- limits ----------------------------------------------------------------------------------------------

SLEEPER = """
import subprocess, sys, time
# a grandchild in a session of its own: out of the child's process group, as Ray's daemons may be
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
open(sys.argv[1] + ".pid", "w").write(str(g.pid))
time.sleep(60)
"""


def test_a_hung_check_is_killed_with_its_tree_within_its_limit(tmp_path: Path) -> None:
    check = _python_check(tmp_path, "hang", SLEEPER, timeout_s=1.5)
    check.json_path.write_text('{"tokens_per_s": 1}')  # a stale figure from an earlier run
    t0 = time.monotonic()
    r = gc.run_check(check, time.monotonic() + 60, tmp_path)
    assert time.monotonic() - t0 < 1.5 + 3  # SIGTERM ends a sleeping python at once; 5 s grace at most
    assert r.status == "timeout" and r.reason == "killed after 2 s" and r.returncode is None
    assert 1.4 <= r.seconds < 4.5
    assert "tokens_per_s" not in r.figures  # the stale file was removed before the run
    grandchild = int(Path(str(check.json_path) + ".pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_the_budget_clips_a_limit_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    never = _python_check(tmp_path, "late", f"open({str(marker)!r}, 'w')", min_s=30)
    r = gc.run_check(never, time.monotonic() + 5, tmp_path)
    assert r.status == "skipped" and r.reason.startswith("over budget: needs at least 30 s,")
    assert not marker.exists() and r.log is None

    clipped = _python_check(tmp_path, "clipped", "import time; time.sleep(60)", timeout_s=60, min_s=1)
    t0 = time.monotonic()
    r = gc.run_check(clipped, time.monotonic() + 2, tmp_path)
    assert r.status == "timeout" and time.monotonic() - t0 < 2 + 3


# --- skips -----------------------------------------------------------------------------------------------


def test_vllm_and_eval_skip_lines(tmp_path: Path) -> None:
    absent = ("surely_no_such_module_here",)
    reason = gc.feature_skip_reason(("eval",), "tests/gpu/test_eval_vllm.py", repo=tmp_path, runtime=absent)
    assert reason == (
        "surely_no_such_module_here is not installed; uft_ray has no uft_ray.eval module yet; "
        "tests/gpu/test_eval_vllm.py does not exist"
    )
    (tmp_path / "uft_ray" / "rft").mkdir(parents=True)
    (tmp_path / "uft_ray" / "rft" / "__init__.py").write_text("")
    reason = gc.feature_skip_reason(("rollout", "rft"), "tests/gpu/t.py", repo=tmp_path, runtime=("json",))
    assert reason == "tests/gpu/t.py does not exist"  # the module is there (either name), the test file is not
    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    (tmp_path / "tests" / "gpu" / "t.py").write_text("")
    assert gc.feature_skip_reason(("rollout", "rft"), "tests/gpu/t.py", repo=tmp_path, runtime=("json",)) is None


def test_only_and_skip_select_checks(tmp_path: Path) -> None:
    checks = gc.select(gc.plan_checks(tmp_path), "train_7b", None)
    chosen = {c.name for c in checks if c.skip_reason is None}
    assert chosen == {"env", "train_7b"}  # env always runs: the GPU checks hang on what it finds
    assert next(c for c in checks if c.name == "pytest_gpu").skip_reason == "not selected (--only / --skip)"
    checks = gc.select(gc.plan_checks(tmp_path), None, "train_7b,reference_0.5b")
    assert {"train_7b", "reference_0.5b"}.isdisjoint(c.name for c in checks if c.skip_reason is None)
    with pytest.raises(SystemExit, match="unknown check names: nope"):
        gc.select(gc.plan_checks(tmp_path), "nope", None)


# --- install decisions -----------------------------------------------------------------------------------

SMI = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.03             Driver Version: 580.159.03     CUDA Version: 13.0     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_driver_cuda_version_picks_the_torch_index() -> None:
    assert gc.cuda_version_from_smi(SMI) == (13, 0)
    assert gc.cuda_version_from_smi("command not found") is None
    assert gc.torch_index_url((13, 0)) == "https://download.pytorch.org/whl/cu130"
    assert gc.torch_index_url((12, 5)) == "https://download.pytorch.org/whl/cu124"  # the newest it supports
    assert gc.torch_index_url((12, 8)) == "https://download.pytorch.org/whl/cu128"
    assert gc.torch_index_url((11, 4)) is None and gc.torch_index_url(None) is None


def test_install_plan() -> None:
    every = dict.fromkeys(gc.REQUIRED, "1.0") | {"torch": "2.13.0+cpu"}
    assert gc.install_plan({"cuda_available": True, "packages": every}, (13, 0), None, "py") == []
    assert gc.install_plan({"cuda_available": False, "packages": every}, None, None, "py") == []  # no driver

    steps = gc.install_plan({"cuda_available": False, "packages": every}, (12, 6), None, "py")
    assert [s for s, _ in steps] == ["torch"]
    first, second = steps[0][1]
    assert first[-3:] == ["--index-url", "https://download.pytorch.org/whl/cu126", "torch==2.13.0"]
    assert "--force-reinstall" in first and second[-1] == "torch"  # then any release of that build

    steps = gc.install_plan({"cuda_available": False, "packages": every | {"ray": None}}, (13, 0), "/w", "py")
    assert [s for s, _ in steps] == ["torch", "package"]
    assert steps[0][1][0][-5:] == ["--no-index", "--find-links", "/w", "--force-reinstall", "torch==2.13.0"]
    assert len(steps[0][1]) == 4  # wheels (pinned, any), then the index (pinned, any)
    package = steps[1][1][0]
    assert package[-2:] == ["-e", f"{gc.REPO}[test]"] and "--no-build-isolation" in package
    assert package[package.index("--find-links") + 1] == "/w"


# --- the report ------------------------------------------------------------------------------------------


def test_table_is_fixed_width_with_reasons() -> None:
    results = [
        gc.Result("train_7b", "t", "timeout", 210.4, reason="killed after 210 s",
                  figures={"tokens_per_s": 9000.0, "mfu": 0.33, "mfu_goal": 0.45}),
        gc.Result("pytest_gpu", "p", "passed", 31.0, figures={"passed": 2, "failed": 0, "skipped": 0}),
        gc.Result("eval_vllm", "e", "skipped", reason="vllm is not installed"),
    ]  # fmt: skip
    table = gc.format_table(results, gc.plan_checks(Path("/tmp/unused")))
    lines = table.splitlines()
    assert lines[0].split() == ["check", "status", "seconds", "figures"]
    assert lines[2] == "train_7b         timeout      210  9000 tok/s, MFU 33.0%, (goal 45%)"
    assert lines[3] == " " * 16 + " -> killed after 210 s"
    assert lines[4] == "pytest_gpu       passed        31  2 passed"
    assert lines[-1] == "1 passed, 0 failed, 1 timeout, 0 interrupted, 1 skipped"


def test_main_on_this_machine_writes_the_json_to_out(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    # every env stage but ray.init (seconds when idle, 20 s on a busy machine): make gpu-bundle-proof runs it
    p = subprocess.run([sys.executable, str(REPO / "gpu" / "check.py"), "--work", str(tmp_path / "work"),
                        "--env-stages", "packages,torch,collective,imports"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert {f.name for f in out.iterdir()} == {"gpu_check.json", "gpu_check.txt", "gpu_check.log", "gpu_check.tar.gz"}
    assert report["finished"] is True and report["running"] is None
    by = {c["name"]: c for c in report["checks"]}
    assert list(by) == ["env", "step_7b", "rollout_0.5b", "train_0.5b", "pytest_gpu", "reference_0.5b", "train_7b",
                        "vllm_lora", "eval_vllm"]  # fmt: skip
    env_check = by["env"]
    assert env_check["status"] == "passed" and env_check["figures"]["packages"]["uft-ray"]
    assert env_check["figures"]["collective"] == {"backend": "gloo", "ok": True, "seconds": pytest.approx(0, abs=30)}
    assert "train_throughput.py --gpu --model 7b" in by["train_7b"]["command"]
    assert by["train_7b"]["reason"] == gc.LATER
    assert "--no-plain" in by["train_0.5b"]["command"].split()
    assert sum(report["counts"].values()) == 9 and report["peak_tflops"] == 790.0
    assert "check            status   seconds  figures" in p.stdout
    assert (out / "gpu_check.txt").read_text().startswith("check            status   seconds  figures")
    if report["gpu_decision"]["gpus"] == 0:  # this machine: every GPU check skipped, named
        assert p.returncode == 0, p.stdout + p.stderr
        for name in ("step_7b", "rollout_0.5b", "pytest_gpu", "train_0.5b", "reference_0.5b"):
            assert by[name]["status"] == "skipped" and by[name]["reason"].startswith("no GPU: nvidia-smi -L")
        for name in ("vllm_lora", "eval_vllm"):
            assert by[name]["status"] == "skipped" and by[name]["reason"]


# --- the window, the bundle's install, the import stage ---------------------------------------------------


def test_the_window_ends_within_500_s_of_a_540_s_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Window one's limits, the bundle's install, the GPU decision, env.txt and the last report end by 500 s, under
    the 540 s hard stop: a short second call still fits the lease. The later windows' checks are not in it."""
    checks = gc.plan_checks(tmp_path)
    assert {c.name: c.timeout_s for c in checks} == gc.LIMITS
    assert [c.name for c in checks if c.name in gc.WINDOW_ONE] == list(gc.WINDOW_ONE)
    assert all(c.skip_reason is None for c in checks if c.name in gc.WINDOW_ONE)
    later = [c for c in checks if c.name not in gc.WINDOW_ONE]
    assert [c.name for c in later] == ["train_7b", "vllm_lora", "eval_vllm"] and all(c.skip_reason for c in later)
    total = gc.BUNDLE_TIMEOUT_S + gc.GPU_PROBE_S + gc.ENV_TXT_S + gc.FINISH_S
    total += sum(c.timeout_s for c in checks if c.name in gc.WINDOW_ONE)
    assert gc.window()["total_s"] == total <= 500 < gc.BUDGET_S == 540
    assert all(c.min_s <= c.timeout_s for c in checks)
    seven = next(c for c in checks if c.name == "train_7b").cmd
    assert seven[seven.index("--zero-stage") + 1] == "auto"
    smoke = {c.name: c for c in gc.plan_checks(tmp_path, cpu_smoke=True)}
    train = smoke["train_0.5b"].cmd
    assert "--gpu" not in train and train[train.index("--steps") + 1] == "2"
    for name in ("step_7b", "rollout_0.5b"):
        assert not smoke[name].needs_cuda and smoke[name].cmd[smoke[name].cmd.index("--device") + 1] == "cpu"
    assert not smoke["reference_0.5b"].needs_cuda and "tiny" in smoke["reference_0.5b"].cmd
    assert gc.main(["--dry-run", "--work", str(tmp_path)]) == 0
    assert f"= {total:.0f} s (ends by 500 s; hard stop --budget 540 s)" in capsys.readouterr().out


def test_the_import_stage_names_a_module_that_does_not_import() -> None:
    ok = {"packages": dict.fromkeys(gc.REQUIRED, "1"), "imports": dict.fromkeys(gc.IMPORTS, True),
          "uft_ray_path": str(gc.REPO / "uft_ray"), "cuda_available": True,
          "collective": {"backend": "nccl", "ok": True}, "ray": {"ok": True, "gpus": 1.0, "task_cuda": True}}  # fmt: skip
    assert gc.judge_env(ok, 0) == ("passed", None)
    nccl = ok | {"collective": {"backend": "nccl", "ok": False, "error": "DistBackendError: NCCL error: unhandled"}}
    assert gc.judge_env(nccl, 0) == ("failed", "nccl all_reduce (one rank): DistBackendError: NCCL error: unhandled")
    blind = ok | {"ray": {"ok": True, "gpus": 0.0, "resources": {"CPU": 2.0}}}
    assert gc.judge_env(blind, 0) == ("failed", "Ray sees no GPU though torch does: cluster resources {'CPU': 2.0}")
    pending = ok | {"ray": {"ok": True, "gpus": 1.0, "task_cuda": "GetTimeoutError: timed out"}}
    assert gc.judge_env(pending, 0) == ("failed", "a Ray task holding a GPU: GetTimeoutError: timed out")
    cpu = ok | {"cuda_available": False, "collective": {"backend": "gloo", "ok": True}, "ray": {"ok": True, "gpus": 0}}
    assert gc.judge_env(cpu, 0)[0] == "passed"
    broken = ok | {"imports": ok["imports"] | {"deepspeed": "ModuleNotFoundError: No module named 'hjson'"}}
    assert gc.judge_env(broken, 0) == (
        "failed",
        "cannot import: deepspeed (ModuleNotFoundError: No module named 'hjson')",
    )
    elsewhere = ok | {"uft_ray_path": "/usr/lib/python3/site-packages/uft_ray"}
    status, reason = gc.judge_env(elsewhere, 0)
    assert status == "failed" and "not from this checkout" in reason


def _wheel(folder: Path, name: str, body: str) -> Path:
    """A minimal real wheel: one module, its dist-info."""
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_the_bundle_installs_from_its_files_only_into_a_private_folder_on_the_childrens_path(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _wheel(bundle, "uft_bundle_probe", "VALUE = 41 + 1\n")
    work = tmp_path / "work"
    work.mkdir()
    r = gc.install_bundle(bundle, work, time.monotonic() + 60)
    assert r.status == "passed", r.output_tail
    assert "--no-index" in r.command and "--no-deps" in r.command and "--target" in r.command
    site = gc.bundle_site(work)
    assert (site / "uft_bundle_probe.py").is_file()
    env = gc.child_env(site)
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(gc.REPO), str(site)]
    out = subprocess.run([sys.executable, "-c", "import uft_bundle_probe; print(uft_bundle_probe.VALUE)"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "42", out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = gc.install_bundle(empty, work, time.monotonic() + 60)
    assert r.status == "failed" and "holds no wheels" in r.reason


# --- a GPU decided on its own; a hung env; a window killed midway -------------------------------------------


def _fake_smi(folder: Path, body: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_the_gpu_is_decided_by_nvidia_smi_within_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1e)"
    monkeypatch.setenv("PATH", _fake_smi(tmp_path / "one", f"echo '{listing}'"))
    found = gc.gpu_present()
    assert found["gpus"] == 1 and found["names"] == [listing] and "error" not in found
    monkeypatch.setenv("PATH", _fake_smi(tmp_path / "hung", "sleep 30; echo 'GPU 0: late'"))  # a child that hangs
    t0 = time.monotonic()
    found = gc.gpu_present(timeout_s=0.5)
    assert time.monotonic() - t0 < 2.5 and found["error"].startswith("TimeoutExpired")
    if not Path("/proc/driver/nvidia/gpus").is_dir():  # no driver here: nothing else says there is one
        assert found["gpus"] == 0


def _json_check(tmp_path: Path, name: str, needs_cuda: bool, timeout_s: float = 30, code: str = "") -> object:
    """A child that writes its figures; with `code`, that code runs first (a hang, a run directory)."""
    body = code + "\nimport json, sys\njson.dump({'tokens_per_s': 7.0}, open(sys.argv[1], 'w'))\n"
    return gc.Check(name, name, [sys.executable, "-c", body, str(tmp_path / f"{name}.json")], timeout_s=timeout_s,
                    json_path=tmp_path / f"{name}.json", needs_cuda=needs_cuda,
                    judge=gc.judge_figures("tokens_per_s"))  # fmt: skip


def test_a_hung_env_probe_still_leaves_the_gpu_checks_attempted(tmp_path: Path) -> None:
    """env hangs in its ray stage: it times out naming the stage, and the GPU checks still run (the GPU was decided
    apart from it); without a GPU they are skipped, named."""
    hang = "import json, sys, time\njson.dump({'stage': 'ray', 'cuda_available': False}, open(sys.argv[1], 'w'))\n"
    hang += "time.sleep(60)"
    env = gc.Check("env", "env", [sys.executable, "-c", hang, str(tmp_path / "env.json")], timeout_s=1.0,
                   json_path=tmp_path / "env.json", needs_cuda=False, judge=gc.judge_env)  # fmt: skip
    checks = [env, _json_check(tmp_path, "step_7b", True), _json_check(tmp_path, "rollout_0.5b", True)]
    report = gc.Report(tmp_path / "out", tmp_path, {}, checks, ray_dirs=())
    results = gc.run_window(checks, tmp_path, report, time.monotonic() + 60, None, gpu=True)
    by = {r.name: r for r in results}
    assert by["env"].status == "timeout" and by["env"].reason == "killed after 1 s (during ray)"
    assert by["step_7b"].status == "passed" and by["rollout_0.5b"].status == "passed"
    assert by["step_7b"].figures["tokens_per_s"] == 7.0

    checks = [_json_check(tmp_path, "step_7b", True)]
    results = gc.run_window(checks, tmp_path, gc.Report(tmp_path / "o2", tmp_path, {}, checks, ray_dirs=()),
                            time.monotonic() + 60, None, gpu=False)  # fmt: skip
    assert results[0].status == "skipped" and results[0].reason.startswith("no GPU: nvidia-smi -L lists none")


WINDOW = """
import importlib.util, json, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("gpu_check", {check!r})
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc
spec.loader.exec_module(gc)
work, out = Path({work!r}), Path({out!r})
run = "import os, sys; os.makedirs(sys.argv[2], exist_ok=True)\\n"
run += "open(sys.argv[2] + '/ray.log', 'w').write('raylet started\\\\n')\\n"
run += "open(sys.argv[2] + '/metrics.jsonl', 'w').write('{{\\"step\\": 1, \\"loss\\": 0.5}}\\\\n')\\n"
run += "import json; json.dump({{'tokens_per_s': 3.0}}, open(sys.argv[1], 'w')); print('a done')"
slow = "import os, subprocess, sys, time\\n"
slow += "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\n"
slow += "open(sys.argv[1] + '.pid', 'w').write(f'{{os.getpid()}} {{g.pid}}'); print('b started', flush=True)\\n"
slow += "time.sleep(60)"
checks = [
    gc.Check("a", "a", [sys.executable, "-c", run, str(work / "a.json"), str(work / "runs" / "r1")], timeout_s=30,
             json_path=work / "a.json", needs_cuda=False, files=("runs/*/ray.log", "runs/*/metrics.jsonl"),
             judge=gc.judge_figures("tokens_per_s")),
    gc.Check("b", "b", [sys.executable, "-c", slow, str(work / "b.json")], timeout_s=60, json_path=work / "b.json",
             needs_cuda=False),
    gc.Check("c", "c", [sys.executable, "-c", "pass"], timeout_s=30, needs_cuda=False),
]
(work / "env.txt").write_text("$ nproc\\n2\\n")
report = gc.Report(out, work, {{"script": "test"}}, checks, ray_dirs=())
gc.run_window(checks, work, report, time.monotonic() + 120, None, gpu=False)
"""


def _start_window(tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path, Path]:
    work, out = tmp_path / f"work-{tag}", tmp_path / f"out-{tag}"
    work.mkdir()
    code = WINDOW.format(check=str(REPO / "gpu" / "check.py"), work=str(work), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until check b is under way
        try:
            running = json.loads((out / "gpu_check.json").read_text())["running"]
        except (OSError, ValueError):
            running = None
        if running and running["name"] == "b" and (work / "b.json.pid").is_file():
            return proc, work, out
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("check b never started")


def _archive(out: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_window_killed_mid_check_leaves_the_report_and_archive_of_the_checks_that_finished(tmp_path: Path) -> None:
    """SIGKILL (nothing of the window runs after it) during check b: the report and the archive written after
    check a are there, whole. SIGTERM: b's tree is killed, b is recorded as interrupted, c never starts."""
    proc, work, out = _start_window(tmp_path, "kill")
    proc.kill()
    proc.wait(timeout=10)
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("a", "passed")]
    assert report["checks"][0]["figures"]["tokens_per_s"] == 3.0
    assert report["running"]["name"] == "b" and report["finished"] is False
    files = _archive(out)
    assert set(files) == {"env.txt", "logs/a.log", "figures/a.json", "runs/a/runs_r1_ray.log",
                          "runs/a/runs_r1_metrics.jsonl"}  # fmt: skip
    assert b"a done" in files["logs/a.log"] and files["runs/a/runs_r1_ray.log"] == b"raylet started\n"
    assert json.loads(files["runs/a/runs_r1_metrics.jsonl"]) == {"step": 1, "loss": 0.5}
    assert "running: b" in (out / "gpu_check.txt").read_text()
    for pid in map(int, (work / "b.json.pid").read_text().split()):  # SIGKILL left b and its child behind
        os.kill(pid, 9)

    proc, work, out = _start_window(tmp_path, "term")
    pids = [int(x) for x in (work / "b.json.pid").read_text().split()]
    proc.terminate()
    assert proc.wait(timeout=20) != 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("a", "passed"), ("b", "interrupted")]
    assert report["checks"][1]["reason"] == "the window was stopped (SIGTERM) during this check"
    assert "b started" in report["checks"][1]["output_tail"] and report["finished"] is True
    assert "logs/b.log" in _archive(out)
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, pids))  # b and its child: killed with b's tree


def test_the_archive_stays_under_its_limit_dropping_ray_logs_first(tmp_path: Path, monkeypatch) -> None:
    ray_logs = tmp_path / "ray" / "session_1" / "logs"
    ray_logs.mkdir(parents=True)
    (ray_logs / "raylet.out").write_bytes(os.urandom(300_000))  # incompressible
    (ray_logs / "gcs_server.out").write_bytes(b"gcs up\n")
    (tmp_path / "env.txt").write_text("nproc 2\n")
    report = gc.Report(tmp_path / "out", tmp_path, {}, [], ray_dirs=(tmp_path / "ray",), since=0.0)
    report.archive()
    assert set(_archive(tmp_path / "out")) == {"env.txt", "ray/session_1/raylet.out", "ray/session_1/gcs_server.out"}
    monkeypatch.setattr(gc, "ARCHIVE_MAX_BYTES", 100_000)
    report.archive()
    assert set(_archive(tmp_path / "out")) == {"env.txt"}


# --- gpu/step.py: the step benchmark's arithmetic ----------------------------------------------------------

step = _load("gpu_step", "gpu/step.py")


def test_step_flops_worked_by_hand() -> None:
    """Rows of 3 and 5 tokens, responses from 1 and 2: 8 tokens, 5 scored. body 100, head 10, 2 layers, hidden 4:
    forward 2*100*8 + 2*10*5 = 1700, model (4N) 3400, causal attention 2*2*4*(9+25) = 544 a forward;
    hardware 3400 + 3*544 (+ a recomputed forward 1700 + 544 with checkpointing)."""
    batch = {"input_ids": [[1, 2, 3], [1, 2, 3, 4, 5]], "response_start": [1, 2]}
    f = step.step_flops(batch, 100, 10, 2, 4, checkpointing=True)
    assert f == {"tokens": 8.0, "scored": 5.0, "model": 3400.0, "hardware": 3400.0 + 1632.0 + 2244.0}
    assert step.step_flops(batch, 100, 10, 2, 4, checkpointing=False)["hardware"] == 3400.0 + 1632.0


def test_step_counts_matmul_parameters_and_cuts_token_micro_batches() -> None:
    import torch

    model = step.build_model(step.TINY, torch.device("cpu"), torch.float32, seed=0)
    body, head = step.matmul_params(model)
    # per layer q 64x64, k and v 64x32 (2 of 4 heads' width), o 64x64, gate / up / down 64x128: 36,864; 2 layers
    assert (body, head) == (2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192), 4096 * 64)
    lens = [50, 700, 30, 400, 400, 90, 1000]
    cuts = step.token_micro_batches(lens, 800, seed=0)
    assert sorted(map(sorted, cuts)) == [[0, 2, 3, 4, 5], [1, 6]]  # by length: 30+50+90+400+400, 700+1000
    assert all(sum(lens[i] for i in c) >= 800 for c in cuts)
