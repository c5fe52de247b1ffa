"""Launch surfaces against a real local Ray head (`ray start --head` on 127.0.0.1, token authentication on):
the demo config submitted with `uft-ray submit` and with `uft_ray.submit` reaches SUCCEEDED and leaves an
adapter; `stop()` stops a running job; a bad config submitted as a job with plain `ray job submit` fails fast
with the validation message in its logs; and the demo runs to completion in process with every report plot.

The head gets its own temp dir and ports, so it never touches another Ray on the machine, and is stopped by
its process id. About 3 minutes on 2 CPU cores (four short training runs, one cut short).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fixtures.ray_head import RayHead, ray_cli

from uft_ray import api, cli
from uft_ray.report import PLOTS
from uft_ray.run_dir import RunDir

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEMO = "jobs/configs/demo_tiny.yaml"
JOB_TIMEOUT = 900


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    h = RayHead(tmp_path_factory.mktemp("head", numbered=True), num_cpus=4, dashboard=True, object_store_mb=500)
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


@pytest.fixture
def token_env(head: RayHead, monkeypatch: pytest.MonkeyPatch) -> RayHead:
    """This process authenticates the way a user's shell would: RAY_AUTH_TOKEN in the environment."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    return head


# The submitted demos stop after a few steps: what these tests check is the job surface (upload, auth, status,
# logs, adapter), and the full demo runs to completion in test_demo_in_process_writes_a_report_with_every_plot.
SHORT = ["train.max_steps=3", "train.checkpoint_every=3"]


def demo_overrides(assets: dict[str, str], out: Path, cache: Path | None = None) -> list[str]:
    return [
        f"model.path={assets['model']}",
        f"data.sources.0.path={assets['ultrachat_200k_train']}",
        f"data.sources.1.path={assets['helpsteer2_train']}",
        f"output.storage_path={out}",
        f"reference.cache_dir={cache or out / 'cache'}",
    ]


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reference cache for this module's demo runs: they score the same rows with the same model, so only
    the first one pays for the scorer (what they check is the launch surface; the prepare command test, which
    checks that the cache gets filled, keeps its own)."""
    return tmp_path_factory.mktemp("ref-cache")


def assert_adapter(run_dir: Path) -> None:
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file(), sorted(p.name for p in run_dir.iterdir())
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (run_dir / "metrics.jsonl").read_text().count("\n") >= 1


# ---------------------------------------------------------------------------------------------------------


def test_uft_ray_submit_cli_runs_the_demo(
    token_env: RayHead, tiny_assets: dict[str, str], tmp_path: Path, ref_cache: Path
) -> None:
    """...with a readable log (no Ray Data progress bars: the demo's log was 140k lines of them) and TensorBoard
    fed from the job's driver."""
    cmd = [sys.executable, "-m", "uft_ray", "submit", DEMO, "--address", token_env.address,
           *demo_overrides(tiny_assets, tmp_path, ref_cache), "output.run_name=cli-demo", *SHORT,
           "logging.trackers=[tensorboard]"]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=os.environ.copy())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    job_id = re.search(r"submitted job (\S+)", r.stdout).group(1)
    assert f"job {job_id}: SUCCEEDED" in r.stdout
    assert "[uft-ray] step 1/" in r.stdout  # the per-step progress line, streamed from the job
    assert_adapter(tmp_path / "cli-demo")
    assert api.job(job_id, token_env.address).status() == "SUCCEEDED"
    logs = api.job(job_id, token_env.address).logs()  # what `uft-ray logs JOB_ID` prints
    assert len(logs.encode()) < 100_000, f"{len(logs.encode())} bytes, {logs.count(chr(10))} lines: {logs[-3000:]}"
    assert all(f"[uft-ray] step {s}/3 " in logs for s in (1, 2, 3)), logs[-3000:]
    assert "Running Dataset" not in logs and "row/s]" not in logs  # Ray Data's bars, driver- or worker-side
    assert "[uft-ray] trackers: tensorboard" in logs
    # Ray's own worker output (Train's controller and placement-group cleaner, raylet warnings) is in ray.log
    ray_log = tmp_path / "cli-demo" / "ray.log"
    assert f"[uft-ray] Ray's own output: {ray_log}" in logs
    assert "PlacementGroupCleaner" not in logs and "TrainController" not in logs, logs[-3000:]
    assert "[uft-ray] DeepSpeed ZeRO-0" in logs  # a worker's own line stays
    assert "pid=" in ray_log.read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "cli-demo" / "tensorboard"))
    events.Reload()
    rows = RunDir(tmp_path / "cli-demo").read_metrics()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(m["step"], pytest.approx(m["loss"])) for m in rows]
    print(f"job log: {len(logs.encode())} bytes, {logs.count(chr(10))} lines")
    print(f"uft-ray submit demo: {time.monotonic() - t0:.0f} s")


def test_stop_stops_a_running_job(
    token_env: RayHead, tiny_assets: dict[str, str], tmp_path: Path, ref_cache: Path
) -> None:
    job = api.submit(
        ROOT / DEMO,
        address=token_env.address,
        working_dir=ROOT,
        overrides=[*demo_overrides(tiny_assets, tmp_path, ref_cache), "output.run_name=stopped", "train.epochs=50"],
    )
    deadline = time.monotonic() + 300
    while job.status() != "RUNNING" or "uft-ray train:" not in job.logs():  # the driver is up and working
        assert job.status() in ("PENDING", "RUNNING"), job.logs()[-4000:]
        assert time.monotonic() < deadline, "job never started"
        time.sleep(1)
    assert job.info().metadata["uft_ray_run_name"] == "stopped"  # the Python API's handle (the CLI's submit uses it)
    assert job.stop() is True
    assert job.wait(timeout=120) == "STOPPED"
    assert not (tmp_path / "stopped" / "adapter").exists()


def test_bad_config_job_fails_fast_with_the_message(token_env: RayHead, tmp_path: Path) -> None:
    """Plain `ray job submit` (no local validation in between): the job itself refuses the config."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": token_env.address}
    t0 = time.monotonic()
    r = subprocess.run(
        [*ray_cli(), "job", "submit", "--working-dir", ".", "--",
         "python", "jobs/train.py", "--config", DEMO, "train.num_workers=0", "loss.type=bogus"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0
    job_id = re.search(r"Job '(raysubmit_\w+)'", out).group(1)
    assert api.job(job_id, token_env.address).status() == "FAILED"
    logs = api.job(job_id, token_env.address).logs()
    assert "train.num_workers: must be > 0" in logs and "loss.type: 'bogus' is not allowed" in logs
    assert "Traceback" not in logs  # a clear message, not a crash
    assert elapsed < 120, f"took {elapsed:.0f} s to fail"


def test_uft_ray_submit_refuses_a_bad_config_before_the_cluster(token_env: RayHead, capsys) -> None:
    before = len(api.client(token_env.address).list_jobs())
    rc = cli.main(["submit", DEMO, "--address", token_env.address, "loss.type=bogus"])
    assert rc == 2
    assert "loss.type: 'bogus' is not allowed" in capsys.readouterr().err
    assert len(api.client(token_env.address).list_jobs()) == before


def test_demo_in_process_writes_a_report_with_every_plot(
    tiny_assets: dict[str, str], tmp_path: Path, ref_cache: Path, capsys
) -> None:
    """`uft-ray demo` itself: assets reused from the session's tiny_assets root, local Ray in this process."""
    t0 = time.monotonic()
    rc = cli.main(["demo", "--tiny", "--out", tiny_assets["root"], f"output.storage_path={tmp_path}",
                   f"reference.cache_dir={ref_cache}"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    run_dir = tmp_path / "demo"
    assert_adapter(run_dir)
    for label in ("adapter", "metrics", "report"):
        assert re.search(rf"^\s+{label}\s+\S", out, re.M), out[-2000:]
    html = (run_dir / "report.html").read_text()
    for name in PLOTS:
        assert f"<img alt='{name}' src='data:image/png;base64," in html
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 5000
    elapsed = time.monotonic() - t0
    print(f"demo in process: {elapsed:.0f} s")
    assert elapsed < 600


def test_prepare_command_writes_rows_and_fills_the_reference_cache(
    tiny_assets: dict[str, str], tmp_path: Path, capsys
) -> None:
    """`uft-ray prepare`: the data plane, then the reference precompute (loss uft, reference actor/precompute)."""
    out = tmp_path / "prep"
    rc = cli.main(["prepare", DEMO, "--out", str(out), *demo_overrides(tiny_assets, tmp_path)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_out"] == 128 and summary["reference"]["rows"] == 128
    assert list((out / "rows").glob("*.parquet"))
    names = pq.read_schema(next((out / "rows").glob("*.parquet"))).names
    assert "ref_logp" not in names  # the rows stay as prepared; the values are in the reference cache
    manifest = json.loads((Path(summary["reference"]["path"]) / "manifest.json").read_text())
    assert manifest["rows"] == 128 and manifest["fingerprint"] == summary["reference"]["fingerprint"]
    assert '"rows_out": 128' in capsys.readouterr().out
