"""bench/gpu_check.py's own logic on the CPU: reading junit XML and child JSON, limits and kills, skips, the report.

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


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")

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
    tt = _load("train_throughput")
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
    tt = _load("train_throughput")
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
    assert lines[-1] == "1 passed, 0 failed, 1 timeout, 1 skipped"


def test_main_on_this_machine_writes_the_json_to_out(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--work", str(tmp_path / "work")],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert (tmp_path / "out" / "gpu_check.log").is_file()
    by = {c["name"]: c for c in report["checks"]}
    assert list(by) == ["env", "pytest_gpu", "train_0.5b", "train_7b", "reference_0.5b", "vllm_lora", "eval_vllm"]
    env_check = by["env"]
    assert env_check["status"] == "passed" and env_check["figures"]["packages"]["uft-ray"]
    assert "train_throughput.py --gpu --model 7b" in by["train_7b"]["command"]
    assert sum(report["counts"].values()) == 7 and report["peak_tflops"] == 790.0
    assert "check            status   seconds  figures" in p.stdout
    if not env_check["figures"]["cuda_available"]:  # this machine: every GPU check skipped with the reason
        assert p.returncode == 0, p.stdout + p.stderr
        for name in ("pytest_gpu", "train_0.5b", "train_7b", "reference_0.5b"):
            assert by[name]["status"] == "skipped" and by[name]["reason"].startswith("no CUDA device")
        for name in ("vllm_lora", "eval_vllm"):
            assert by[name]["status"] == "skipped" and by[name]["reason"]


# --- the window, the bundle's install, the import stage (issue 20, item 7) --------------------------------


def test_the_window_adds_up_within_the_budget_and_the_7b_check_runs_zero_auto(tmp_path: Path) -> None:
    """Every check's limit is its LIMITS entry, and the bundle's install plus all limits fit the default budget:
    no check is cut short by the budget (the old plan had 850 s of limits against 470 s)."""
    checks = gc.plan_checks(tmp_path)
    assert {c.name: c.timeout_s for c in checks} == gc.LIMITS
    w = gc.window()
    assert w["total_s"] == gc.BUNDLE_TIMEOUT_S + sum(c.timeout_s for c in checks) <= gc.BUDGET_S
    assert all(c.min_s <= c.timeout_s for c in checks)
    seven = next(c for c in checks if c.name == "train_7b").cmd
    assert seven[seven.index("--zero-stage") + 1] == "auto"
    smoke = next(c for c in gc.plan_checks(tmp_path, cpu_smoke=True) if c.name == "train_0.5b")
    assert "--gpu" not in smoke.cmd and not smoke.needs_cuda and smoke.cmd[smoke.cmd.index("--steps") + 1] == "2"


def test_the_import_stage_names_a_module_that_does_not_import() -> None:
    ok = {"packages": dict.fromkeys(gc.REQUIRED, "1"), "imports": dict.fromkeys(gc.IMPORTS, True),
          "uft_ray_path": str(gc.REPO / "uft_ray"), "cuda_available": True}  # fmt: skip
    assert gc.judge_env(ok, 0) == ("passed", None)
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
