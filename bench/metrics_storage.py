"""metrics.jsonl in a bucket: bytes and requests per step at steps 10, 1,000 and 5,000, before and after.

Run (CPU; starts a real S3 API server, moto, on 127.0.0.1 as the tests do):

    python bench/metrics_storage.py

For each step N the bucket is first seeded with the N - 1 earlier rows (written directly, not timed), then one step
is measured: the writer's append of row N (rank 0, inside the step) and one poll of a reader that had read through
row N - 1 (the CLI's progress line and the trackers' thread poll every 1-2 s). "before": the code this benchmark
keeps as its baseline (`_old_append`, `_old_read`: what uft_ray.run_dir did, the whole file downloaded and put
again at each append, and downloaded whole at each poll). "after": `RunDir.append_metrics` and
`RunDir.read_metrics` (chunked parts, incremental readers). Steady state: the writer has already written the step
before (its first append after a restart also reads its current chunk once). Bytes: payloads through
uft_ray.storage (up + down); requests: the HTTP requests the S3 server logged.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the S3 server fixture (tests/fixtures/s3_server.py)
sys.path.insert(0, str(ROOT))

STEPS = (10, 1_000, 5_000)


def _row(step: int) -> dict:
    """A uft metrics line of the demo's size (two sources, held-out metrics every step left out)."""
    row = {"step": step, "epoch": 0, "time": 1.7e9 + step, "loss": 0.693 / step}
    for s in ("helpsteer2", "ultrachat"):
        row |= {
            f"loss/{s}": 0.5,
            f"reward/{s}": 0.1,
            f"score_pred/{s}": 0.5,
            f"score_target/{s}": 0.6,
            f"rows/{s}": 8,
            f"mixture/{s}/target": 0.5,
            f"mixture/{s}/step": 0.5,
            f"mixture/{s}/cumulative": 0.5,
        }
    return row | {
        "tokens_per_s": 1234.5,
        "samples_per_s": 12.3,
        "padding_frac": 0.01,
        "data_wait_frac": 0.0,
        "step_time_s": 1.5,
        "lr": 3e-5,
        "grad_norm": 0.25,
    }


class Meter:
    """Bytes through uft_ray.storage, and the requests the server logged."""

    def __init__(self, log: str) -> None:
        from uft_ray import storage

        self.log, self.bytes = log, 0
        real_write, real_read = storage.atomic_write, storage.read_bytes

        def write(uri, data):
            self.bytes += len(data) if isinstance(data, bytes) else 0
            return real_write(uri, data)

        def read(uri):
            data = real_read(uri)
            self.bytes += len(data)
            return data

        storage.atomic_write, storage.read_bytes = write, read

    def requests(self) -> int:
        time.sleep(0.3)  # the server's log line lands after its response
        with open(self.log, errors="replace") as f:
            return sum(1 for line in f if re.search(r'"(GET|PUT|HEAD|POST|DELETE) ', line))

    def measure(self, fn) -> tuple[int, int]:
        b, r = self.bytes, self.requests()
        fn()
        return self.bytes - b, self.requests() - r


def _old_append(path: str, row: dict) -> None:
    """The baseline: uft_ray.run_dir.append_jsonl before the parts (the whole file read, then put whole again)."""
    from uft_ray import storage

    line = json.dumps(row) + "\n"
    old = storage.read_bytes(path) if storage.is_file(path) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    storage.atomic_write(path, old + line.encode())


def _old_read(path: str) -> int:
    from uft_ray import storage

    return len(storage.read_bytes(path).splitlines())


def _seed_old(path: str, n: int) -> None:
    from uft_ray import storage

    storage.atomic_write(path, "".join(json.dumps(_row(s)) + "\n" for s in range(1, n + 1)).encode())


def _seed_new(path: str, n: int) -> None:
    from uft_ray import storage
    from uft_ray.run_dir import METRICS_CHUNK, _chunk_uri

    for c in range((n + METRICS_CHUNK - 1) // METRICS_CHUNK):
        lines = [json.dumps(_row(s)) + "\n" for s in range(c * METRICS_CHUNK + 1, min(n, (c + 1) * METRICS_CHUNK) + 1)]
        storage.atomic_write(_chunk_uri(path, c), "".join(lines).encode())


def main() -> None:
    from fixtures.s3_server import S3Server, apply_env

    from uft_ray.run_dir import RunDir

    log = os.path.join(tempfile.mkdtemp(prefix="uft-bench-"), "moto.log")
    server = S3Server(log)
    apply_env(server.env)
    meter = Meter(log)
    print(f"{'step':>6} {'':>7} {'write B':>10} {'write req':>9} {'read B':>10} {'read req':>8}")
    try:
        for n in STEPS:
            bucket = server.new_bucket()
            old = f"{bucket}/old/metrics.jsonl"
            _seed_old(old, n - 2)
            _old_append(old, _row(n - 1))
            w = meter.measure(lambda old=old, n=n: _old_append(old, _row(n)))
            r = meter.measure(lambda old=old: _old_read(old))
            print(f"{n:>6} {'before':>7} {w[0]:>10} {w[1]:>9} {r[0]:>10} {r[1]:>8}")

            writer, reader = RunDir(f"{bucket}/new"), RunDir(f"{bucket}/new")
            _seed_new(writer.metrics, n - 2)
            writer.append_metrics(_row(n - 1))  # the writer's first append (reads its chunk once)
            reader.read_metrics()
            w = meter.measure(lambda writer=writer, n=n: writer.append_metrics(_row(n)))
            r = meter.measure(lambda reader=reader: reader.read_metrics())
            assert reader.read_metrics()[-1]["step"] == n
            print(f"{n:>6} {'after':>7} {w[0]:>10} {w[1]:>9} {r[0]:>10} {r[1]:>8}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
