"""Quiet runs: Ray Data's progress bars off in the driver and (through the runtime_env) in every worker, Ray Train at
WARNING; `--verbose` on train / demo / submit / jobs/train.py brings Ray's output back. The demo's job log itself is
bounded in tests/integration/test_launch.py."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest

from uft_ray import api, cli, ray_utils

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_context():
    """Ray Data's process-wide context and console level, restored after the test."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
    handlers = [(h, h.level) for h in logging.getLogger("ray.data").handlers]
    progress = logging.getLogger("ray.data._internal.progress")
    progress_level = progress.level
    yield ctx
    ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = saved
    for h, level in handlers:
        h.setLevel(level)
    progress.setLevel(progress_level)


def test_quiet_turns_ray_data_progress_and_banners_off(data_context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_utils.VERBOSE_ENV, raising=False)
    data_context.enable_progress_bars = data_context.print_on_execution_start = True
    ray_utils.quiet_ray_data()
    assert not data_context.enable_progress_bars and not data_context.enable_operator_progress_bars
    assert not data_context.print_on_execution_start
    # the console handlers as quiet_ray_data sees them: file handlers (Ray's, or pytest's log file on /dev/null
    # when an earlier test configured logging) keep every line
    handlers = logging.getLogger("ray.data").handlers
    console = [h for h in handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert console and all(h.level >= logging.WARNING for h in console)
    assert ray_utils.train_logging().log_level == "WARNING"


def test_verbose_keeps_rays_output(data_context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ray_utils.VERBOSE_ENV, "1")
    data_context.enable_progress_bars = True
    ray_utils.quiet_ray_data()
    assert data_context.enable_progress_bars
    assert ray_utils.train_logging().log_level == "INFO"


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("0", False), ("", False)])
def test_verbose_env(value: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ray_utils.VERBOSE_ENV, value)
    assert ray_utils.verbose() is on


def test_verbose_flag_on_train_demo_submit_sets_the_env_for_the_command_only(monkeypatch) -> None:
    monkeypatch.delenv(ray_utils.VERBOSE_ENV, raising=False)
    for argv in (["train", "x.yaml", "--verbose", "a=1"], ["demo", "-v"], ["submit", "x.yaml", "--verbose"]):
        assert cli.parse_args(argv).verbose, argv
    assert cli.parse_args(["train", "x.yaml", "--verbose", "a=1"]).overrides == ["a=1"]
    assert not cli.parse_args(["train", "x.yaml"]).verbose
    with cli._verbose(True):
        assert ray_utils.verbose()
    assert ray_utils.VERBOSE_ENV not in os.environ
    with cli._verbose(False):
        assert not ray_utils.verbose()


def test_jobs_train_passes_verbose_on() -> None:
    spec = importlib.util.spec_from_file_location("jobs_train", ROOT / "jobs/train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    args = job.parse(["--config", "c.yaml", "--verbose", "a=1"])
    assert args.verbose and args.overrides == ["a=1"]


def test_submit_verbose_reaches_the_jobs_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Client:  # Ray's JobSubmissionClient, as far as submit() uses it
        def submit_job(self, *, entrypoint, runtime_env, submission_id=None, metadata=None):
            self.runtime_env = runtime_env
            return "raysubmit_x"

    c = Client()
    monkeypatch.setattr(api, "client", lambda address=None, headers=None: c)
    (tmp_path / "wd").mkdir()
    api.submit(ROOT / "jobs/configs/demo_tiny.yaml", working_dir=tmp_path / "wd", overrides=["output.storage_path=/x"])
    assert ray_utils.VERBOSE_ENV not in c.runtime_env.get("env_vars", {})
    api.submit(ROOT / "jobs/configs/demo_tiny.yaml", working_dir=tmp_path / "wd", overrides=["output.storage_path=/x"],
               verbose=True)  # fmt: skip
    assert c.runtime_env["env_vars"][ray_utils.VERBOSE_ENV] == "1"


def test_step_lines_carry_an_eta_at_the_runs_pace(tmp_path: Path) -> None:
    progress = cli._Progress(str(tmp_path), [])
    progress.total = 10
    assert progress.eta(1, now=100.0) is None  # no pace yet
    assert progress.eta(3, now=110.0) == "eta 0m35s"  # 5 s a step, 7 steps left
    assert progress.eta(10, now=145.0) == "eta 0m00s"


def test_worker_output_keeps_only_marked_lines_on_the_console_and_every_line_in_the_file(
    tmp_path: Path, capsys
) -> None:
    log = tmp_path / "logs" / "ray.log"
    log.parent.mkdir()
    route = ray_utils.WorkerOutput(str(log))
    noise = "PlacementGroupCleaner: Failed to query Ray Train Controller actor state"
    route(
        {
            "lines": [noise, "[uft-ray] DeepSpeed ZeRO-0: fits"],
            "pid": 41,
            "ip": "127.0.0.1",
            "is_err": False,
            "actor_name": "PlacementGroupCleaner",
        }
    )
    route(
        {
            "lines": ["(raylet) WARNING core_worker.cc:1: stale", "x [uft-ray] WARNING uft_ray.a: act on this"],
            "pid": "raylet",
            "ip": "127.0.0.1",
            "is_err": True,
        }
    )
    out, errs = capsys.readouterr()
    assert out == "[uft-ray] DeepSpeed ZeRO-0: fits\n"
    assert errs == "[uft-ray] WARNING uft_ray.a: act on this\n"
    assert log.read_text().splitlines() == [
        f"(PlacementGroupCleaner pid=41, ip=127.0.0.1) {noise}",
        "(PlacementGroupCleaner pid=41, ip=127.0.0.1) [uft-ray] DeepSpeed ZeRO-0: fits",
        "(pid=raylet, ip=127.0.0.1) (raylet) WARNING core_worker.cc:1: stale",
        "(pid=raylet, ip=127.0.0.1) x [uft-ray] WARNING uft_ray.a: act on this",
    ]


def test_a_workers_uft_ray_warnings_carry_the_mark_once(capsys) -> None:
    log = logging.getLogger("uft_ray")
    saved = (list(log.handlers), log.propagate)
    try:
        ray_utils.mark_worker_logs()
        ray_utils.mark_worker_logs()  # a second call adds no second handler
        logging.getLogger("uft_ray.reference.scorer").warning("no CUDA device: scoring on CPU")
        logging.getLogger("uft_ray.reference.scorer").info("not shown")
        assert (
            capsys.readouterr().err == "[uft-ray] WARNING uft_ray.reference.scorer: no CUDA device: scoring on CPU\n"
        )
    finally:
        log.handlers[:], log.propagate = saved
