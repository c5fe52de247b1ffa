"""One run, one writer (uft_ray/lease.py): the run directory's lease on local disk and on the local S3 API server.

Racers are real: separate processes creating the lease at the same instant (local), concurrent conditional puts
(S3). The full path through `uft-ray train` is in tests/integration/test_rerun_refused.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from uft_ray import lease, storage


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/runs/run"


def _age(run_dir: str, seconds: float) -> None:
    """Make the lease's heartbeat `seconds` old (its owner stopped beating then)."""
    path = storage.join(run_dir, lease.LEASE)
    owner = json.loads(storage.read_bytes(path))
    owner["heartbeat"] -= seconds
    storage.atomic_write(path, (json.dumps(owner, sort_keys=True) + "\n").encode())


def test_a_second_driver_is_refused_naming_the_owner(run_dir: str) -> None:
    first = lease.acquire(run_dir)
    with pytest.raises(lease.LeaseHeld) as e:
        lease.acquire(run_dir)
    (msg,) = e.value.messages
    assert f"pid {first.record['pid']}" in msg and first.record["host"] in msg and "in use by another driver" in msg
    first.release()
    assert lease.read_owner(run_dir) is None  # released: the directory is free again
    lease.acquire(run_dir).release()


def test_the_owner_records_its_ray_job_and_heartbeat(run_dir: str) -> None:
    held = lease.acquire(run_dir)
    t0 = lease.read_owner(run_dir)["heartbeat"]
    time.sleep(0.01)
    assert held.beat(ray_job_id="02000000")
    owner = lease.read_owner(run_dir)
    assert owner["ray_job_id"] == "02000000" and owner["heartbeat"] > t0
    held.release()


def test_a_stale_lease_is_taken_over_and_its_old_owner_knows(run_dir: str, monkeypatch) -> None:
    old = lease.acquire(run_dir)
    _age(run_dir, lease.LEASE_TIMEOUT_S + 5)
    new = lease.acquire(run_dir)
    assert new.taken_over is not None and new.taken_over["token"] == old.record["token"]
    assert old.beat() is False and old.lost  # the old driver finds out at its next heartbeat
    old.release()  # and does not delete the new owner's lease
    assert lease.read_owner(run_dir)["token"] == new.record["token"]
    new.release()


def test_a_lease_within_the_timeout_is_not_taken_over(run_dir: str, monkeypatch) -> None:
    monkeypatch.setenv(lease.TIMEOUT_ENV, "60")
    held = lease.acquire(run_dir)
    _age(run_dir, 50)
    # 50 s and whatever the acquire took on a loaded machine (it once read 51 s on the S3 server)
    with pytest.raises(lease.LeaseHeld, match=r"last heartbeat 5\d s ago"):
        lease.acquire(run_dir)
    held.release()


def test_two_takers_of_one_stale_lease_one_wins(run_dir: str) -> None:
    lease.acquire(run_dir)
    _age(run_dir, lease.LEASE_TIMEOUT_S + 5)
    takers = [lease.Lease(run_dir) for _ in range(4)]

    def take(t: lease.Lease) -> bool:
        try:
            t.acquire()
            return True
        except lease.LeaseHeld:
            return False

    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(take, takers))
    assert sum(won) == 1, won
    assert lease.read_owner(run_dir)["token"] == takers[won.index(True)].record["token"]


def _race(path: str, start: float, out: mp.Queue) -> None:
    while time.time() < start:
        pass
    try:
        held = lease.acquire(path)
        out.put(held.record["token"])
    except lease.LeaseHeld:
        out.put(None)


def test_drivers_in_separate_processes_starting_together_get_one_lease(tmp_path: Path) -> None:
    """Exclusive create on local disk: of 4 processes released at the same instant, exactly one holds it."""
    path = str(tmp_path / "run")
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(path, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    tokens = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [t for t in tokens if t is not None]
    assert len(winners) == 1, tokens
    assert lease.read_owner(path)["token"] == winners[0]


def test_concurrent_creates_on_s3_get_one_lease(s3_bucket: str) -> None:
    """If-None-Match: * on the real S3 API: of 6 concurrent creators exactly one succeeds."""
    path = s3_bucket + "/runs/race"
    contenders = [lease.Lease(path) for _ in range(6)]

    def take(t: lease.Lease) -> bool:
        try:
            t.acquire()
            return True
        except lease.LeaseHeld:
            return False

    with ThreadPoolExecutor(6) as pool:
        won = list(pool.map(take, contenders))
    assert sum(won) == 1, won
    assert lease.read_owner(path)["token"] == contenders[won.index(True)].record["token"]


def test_the_heartbeat_thread_renews_the_lease(tmp_path: Path) -> None:
    held = lease.acquire(str(tmp_path / "run"))
    first = lease.read_owner(str(tmp_path / "run"))["heartbeat"]
    held.start_heartbeat(interval_s=0.05)
    deadline = time.time() + 5
    while lease.read_owner(str(tmp_path / "run"))["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    held.release()
    assert time.time() < deadline
    assert not (tmp_path / "run" / lease.LEASE).exists()
