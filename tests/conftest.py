"""Shared fixtures: the project's sample data + tiny model, and one small local Ray cluster per session.

- `tiny_assets`: the demo's assets (`uft_ray.demo.ensure_demo_assets`: tiny model, sample shards) under the pytest
  cache (`.pytest_cache/d/uft-assets`), so later sessions reuse them (the stamps rebuild them when the generators
  change), plus the bad-row oracle (tests/fixtures/bad_samples.py) as `bad` / `bad_manifest`. Set
  UFT_TEST_ASSETS to put them elsewhere.
- `ray_local`: `ray.init(num_cpus=4)` once per session (reused if a test module started Ray already), shut down
  at the end. Integration tests use it and are marked `pytest.mark.integration`.
- `s3_server`: a real S3 API server on 127.0.0.1 (moto, tests/fixtures/s3_server.py) for the session, its
  endpoint and keys in the environment before Ray starts (so Ray's workers see them too); `s3_bucket`: a fresh
  bucket on it per test, as `s3://name`.
- `deepspeed_ops`: DeepSpeed's CPU communication op (`deepspeed_shm_comm`), JIT-built once per machine (~2 min on
  2 cores) before any timed run, so the first run of a fresh machine does not pay for it inside its budget.
- Nothing is left running: every process the session starts carries `UFT_TEST_SESSION` in its environment
  (tests/fixtures/procs.py); at the end of the session, what is still alive after a grace period is killed and
  the session fails naming it. Every fixture that starts a run has a time limit of its own, under pytest-timeout's
  900 s, that names the fixture it gave up on (tests/integration/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import procs

# Before anything starts: every process of this session inherits it (Ray's, moto's, the CLIs the tests run).
os.environ.setdefault(procs.SESSION, uuid.uuid4().hex)
# Ray Train's controller notices a finished (or reporting) worker group when it next polls, every 2 s by default:
# about 1 s lost at the end of each of the suite's ~40 fits. A missed poll is only retried (a worker counts as
# hung after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), so polling more often is safe on 2 busy cores.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The model cache (converted GGUF models, downloaded buckets' models) under the pytest cache, so later sessions
# reuse the real model's conversion and nothing is written to the user's own cache; set before Ray starts, so
# its workers look there too.
os.environ.setdefault("UFT_RAY_MODEL_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache/d/uft-models"))
STRAY_GRACE_S = 30  # processes still shutting down when the session ends (Ray's raylet after `ray.shutdown`)
DEEPSPEED_BUILD_S = 600


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes() -> Iterator[None]:
    """Set up first, torn down last: after every other fixture has stopped what it started, nothing of the
    session may be left (a head, fake node, raylet, job driver or server that outlives its test would slow
    every test after it)."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # a Ray this process started (`uft-ray demo` in process): it ends with us anyway
            ray.shutdown()
    left = procs.wait_gone(procs.SESSION, os.environ[procs.SESSION], STRAY_GRACE_S)
    if left:
        listing = procs.describe(left)
        procs.kill(left)
        pytest.fail(f"{len(left)} processes of this test session outlived it (now killed):\n{listing}")


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEEPSPEED_BUILD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gave up after {DEEPSPEED_BUILD_S} s waiting for DeepSpeed's shm_comm op to build")
    assert r.returncode == 0, f"DeepSpeed's shm_comm op did not build:\n{(r.stdout + r.stderr)[-4000:]}"


@pytest.fixture(scope="session")
def tiny_assets(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths by name: `model`, `samples`, `bad`, `bad_manifest`, and every `samples.sample_paths` entry."""
    from fixtures.bad_samples import write_bad_samples

    from uft_ray.demo import ensure_demo_assets

    root = os.environ.get("UFT_TEST_ASSETS")
    if not root:
        cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
        root = str(cache.mkdir("uft-assets") if cache is not None else tmp_path_factory.mktemp("uft-assets"))
    assets = ensure_demo_assets(Path(root))
    bad = write_bad_samples(Path(root) / "bad-samples")  # deterministic and small: rewritten every session
    return {**assets, "bad": bad["paths"]["root"], "bad_manifest": bad["paths"]["manifest"]}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from fixtures.s3_server import S3Server, apply_env, restore_env

    server = S3Server(str(tmp_path_factory.mktemp("moto") / "moto.log"))
    old = apply_env(server.env)
    yield server
    restore_env(old)
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: object) -> str:
    return s3_server.new_bucket()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def ray_local(s3_server: object, deepspeed_ops: None) -> Iterator[None]:
    """A local Ray with 4 logical CPUs for the whole session (small: the test machine has 2 cores)."""
    import ray
    from ray.data import DataContext

    from uft_ray.config import RayConfig
    from uft_ray.ray_utils import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(RayConfig(), num_cpus=4)
    DataContext.get_current().enable_progress_bars = False
    yield
    if started and ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------------
# Time limits: every fixture's setup gets one of its own, under pytest-timeout's 900 s, that names it.

FIXTURE_LIMIT_S = 480  # the longest fixture (three fits of the interrupted run) takes ~150 s on 2 quiet cores
FIXTURE_LIMITS_S = {"deepspeed_ops": DEEPSPEED_BUILD_S + 60}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> object:
    from fixtures.limits import time_limit

    name = fixturedef.argname
    doc = ((getattr(fixturedef.func, "__doc__", None) or "").strip().splitlines() or [""])[0]
    what = f"fixture '{name}' to set up" + (f" ({doc})" if doc else "")
    with time_limit(FIXTURE_LIMITS_S.get(name, FIXTURE_LIMIT_S), what):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Marks a test whose setup or call ran out of time (`item.timed_out`): work it started may still run."""
    from fixtures.limits import WaitTimeout

    report = yield
    e = call.excinfo
    if e is not None and (e.errisinstance(WaitTimeout) or str(e.value).startswith("Timeout")):
        item.timed_out = True  # type: ignore[attr-defined]
    return report
