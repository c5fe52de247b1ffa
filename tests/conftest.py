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
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


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
def ray_local(s3_server: object) -> Iterator[None]:
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
