"""One run, one writer: a lease on the run directory, held by the driver from the moment it opens the run.

`{run_dir}/lease.json` names the owner (host, pid, Ray job id, when it started) and carries a heartbeat the owner
renews every `HEARTBEAT_S`. A second driver on the same run directory (a double submit, a rerun while the first
job still lives, a sweep that forgot `output.run_name`) finds the lease and exits 2 naming the owner, before it
writes anything. A lease whose heartbeat is older than `LEASE_TIMEOUT_S` (a driver that was killed, a node that
went away) is taken over, and the new driver says so. The owner deletes the lease when the run ends.

Creating the lease cannot race:
- local disk: `open(O_CREAT | O_EXCL)`, one winner; a takeover, a heartbeat and a release run under an exclusive
  `flock` on the run directory, so two drivers taking over one stale lease cannot both win.
- S3: a conditional put. `PutObject` with `If-None-Match: *` creates the lease only where there is none; a takeover
  or a heartbeat puts with `If-Match: <etag>` of the lease it read, so only one of two racers succeeds. pyarrow's S3
  filesystem sends no conditions, so these calls go through boto3 (`pip install 'uft-ray[cloud]'`), with the
  endpoint and keys from the environment like pyarrow's.
- other object stores (gs://, ...): no conditional create through the libraries the project uses (pyarrow's GCS
  filesystem sends no generation precondition), so the lease is written and read back: it catches a second driver
  that comes later, not two that start in the same second. The driver warns once.

`UFT_RAY_LEASE_TIMEOUT_S` overrides the timeout (seconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from uft_ray import storage
from uft_ray.config import ConfigError

logger = logging.getLogger(__name__)

LEASE = "lease.json"
HEARTBEAT_S = 30.0
LEASE_TIMEOUT_S = 300.0  # ten missed heartbeats: the owner is gone
TIMEOUT_ENV = "UFT_RAY_LEASE_TIMEOUT_S"


class LeaseHeld(ConfigError):
    """Another live driver holds the run directory (exit 2, like a config that cannot run)."""


def lease_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, LEASE_TIMEOUT_S))


def _describe(owner: dict[str, Any], now: float) -> str:
    age = now - float(owner.get("heartbeat", 0))
    job = owner.get("ray_job_id") or "-"
    return (f"host {owner.get('host')}, pid {owner.get('pid')}, Ray job {job}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(owner.get('started', 0))))}, last heartbeat "
            f"{age:.0f} s ago")  # fmt: skip


class Lease:
    """The run directory's lease, once acquired (`acquire`); `beat` renews it, `release` ends it."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.path = storage.join(run_dir, LEASE)
        self.record: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ray_job_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or None,
            "token": uuid.uuid4().hex,
            "started": time.time(),
            "heartbeat": time.time(),
        }
        self.taken_over: dict[str, Any] | None = None  # the stale owner's record, when this lease replaced it
        self.lost = False
        self._store = _store_for(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring ---------------------------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Take the lease or raise LeaseHeld naming the live owner; a stale lease is taken over (logged)."""
        for _ in range(5):  # a lease released between our create and our read: try again
            if self._store.create(self._bytes()):
                return self
            current = self._store.read()
            if current is None:
                continue
            owner, tag = current
            now = time.time()
            if owner.get("token") == self.record["token"]:
                return self
            if now - float(owner.get("heartbeat", 0)) <= lease_timeout():
                raise LeaseHeld(
                    [
                        f"{self.run_dir}: in use by another driver ({_describe(owner, now)}); wait for it to end or "
                        "stop it, or use a new output.run_name. A lease whose heartbeat is older than "
                        f"{lease_timeout():.0f} s is taken over ({self.path})"
                    ]
                )
            if self._store.replace(tag, self._bytes(), expect_token=owner.get("token")):
                self.taken_over = owner
                logger.warning("%s: took over a stale lease (%s)", self.run_dir, _describe(owner, now))
                return self
        raise LeaseHeld([f"{self.run_dir}: could not take the run directory's lease ({self.path}); try again"])

    def _bytes(self) -> bytes:
        return (json.dumps(self.record, sort_keys=True) + "\n").encode()

    # -- holding -----------------------------------------------------------------------------------------

    def beat(self, **updates: Any) -> bool:
        """Renew the heartbeat (and record `updates`, e.g. the Ray job id); False once the lease was lost."""
        if self.lost:
            return False
        self.record.update(updates, heartbeat=time.time())
        current = self._store.read()
        if current is None or current[0].get("token") != self.record["token"]:
            self._lose(current[0] if current else None)
            return False
        if not self._store.replace(current[1], self._bytes(), expect_token=self.record["token"]):
            self._lose(None)
            return False
        return True

    def _lose(self, owner: dict[str, Any] | None) -> None:
        self.lost = True
        who = _describe(owner, time.time()) if owner else "no lease"
        logger.error("%s: this driver lost its lease (now: %s); another driver may be writing here", self.run_dir, who)

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    if not self.beat():
                        return
                except Exception as e:  # a network blip: the next beat retries; the timeout allows ten misses
                    logger.warning("%s: lease heartbeat failed: %s", self.run_dir, e)

        self._thread = threading.Thread(target=loop, name="uft-ray-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            try:
                self._store.delete(self.record["token"])
            except Exception as e:  # the run's outcome stands; the lease goes stale and is taken over later
                logger.warning("%s: could not remove the lease: %s", self.run_dir, e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(run_dir: str) -> Lease:
    return Lease(run_dir).acquire()


def read_owner(run_dir: str) -> dict[str, Any] | None:
    """The lease's record, or None when the run directory has none."""
    current = _store_for(storage.join(run_dir, LEASE)).read()
    return current[0] if current else None


# ---------------------------------------------------------------------------------------------------------
# Where the lease lives: create-if-absent, read with a version tag, replace-if-unchanged, delete-if-ours.


def _store_for(path: str) -> Any:
    if not storage.is_remote(path):
        return _LocalStore(storage.filesystem_for(path)[1])
    if path.lower().startswith("s3://"):
        return _S3Store(path)
    return _PlainStore(path)


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        owner = json.loads(data.decode())
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


class _LocalStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = os.path.dirname(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def create(self, data: bytes) -> bool:
        os.makedirs(self.dir, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        owner = _parse(data)
        # a lease being created (empty for an instant) or torn: an owner with no heartbeat, never taken over
        # before it is seen whole -- unless it stays so past the timeout (its creator died mid-write)
        if owner is None:
            owner = {"heartbeat": os.stat(self.path).st_mtime}
        return owner, data

    def replace(self, tag: Any, data: bytes, *, expect_token: str | None) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != tag:
                return False
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return True

    def delete(self, token: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[0].get("token") == token:
                os.unlink(self.path)


class _S3Store:
    def __init__(self, uri: str) -> None:
        bucket, _, key = uri[len("s3://") :].partition("/")
        self.bucket, self.key = bucket, key
        try:
            import boto3
        except ImportError as e:
            raise storage.StorageError(
                f"{uri}: the run directory's lease on S3 needs boto3 for its conditional writes "
                "(pip install 'uft-ray[cloud]')"
            ) from e
        self.client = boto3.client("s3")

    def _failed(self, e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def create(self, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
            return True
        except Exception as e:
            if self._failed(e):
                return False
            raise

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        data = got["Body"].read()
        owner = _parse(data) or {"heartbeat": got["LastModified"].timestamp()}
        return owner, got["ETag"]

    def replace(self, tag: Any, data: bytes, *, expect_token: str | None) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfMatch=tag)
            return True
        except Exception as e:
            if self._failed(e) or getattr(e, "response", {}).get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current[0].get("token") == token:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _PlainStore:
    """An object store without a conditional create here: write, then read back (see the module docstring)."""

    warned = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if not _PlainStore.warned:
            _PlainStore.warned = True
            logger.warning("%s: no conditional write on this store: the lease catches a later driver, not one that "
                           "starts in the same second", uri)  # fmt: skip

    def create(self, data: bytes) -> bool:
        if storage.is_file(self.uri):
            return False
        storage.atomic_write(self.uri, data)
        return storage.read_bytes(self.uri) == data

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            data = storage.read_bytes(self.uri)
        except (FileNotFoundError, OSError):
            return None
        return (_parse(data) or {"heartbeat": 0}), data

    def replace(self, tag: Any, data: bytes, *, expect_token: str | None) -> bool:
        current = self.read()
        if current is None or current[1] != tag:
            return False
        storage.atomic_write(self.uri, data)
        return storage.read_bytes(self.uri) == data

    def delete(self, token: str) -> None:
        current = self.read()
        if current is not None and current[0].get("token") == token:
            storage.remove_tree(self.uri)
