"""The collector: one named Ray actor where every scorer actor reports what it computed.

The driver reads the results from it wherever the scorer actors ran (no shared disk needed), and it is the
proof of what was computed: it keeps the first value per row_id (a retried batch reports its rows again, so
each row counts exactly once under actor restarts) and counts model forwards and tokens per actor process.

The scorers report asynchronously (uft_ray.reference.scorer): a batch's report may land after the batch has left
the stage, so a reader that expects a number of rows waits for them first (`wait_for_rows`, `collected(...,
expect_rows=)`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from uft_ray import schema

COLLECTOR_PREFIX = "uft-ray-reference-collector-"
REPORTS_QUIET_S = 5.0  # no new row for this long: the reports still expected are not coming


class _Collector:
    """Keeps the first value per row_id (a retried batch reports its rows again) and per-actor counters."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[float, float | None]] = {}
        self.duplicates = 0
        self.forwards = 0
        self.tokens = 0
        self.actors: dict[str, dict[str, Any]] = {}

    def _actor(self, host: str, pid: int) -> dict[str, Any]:
        key = f"{host}:{pid}"
        if key not in self.actors:
            # ready_at: when the model finished loading; throughput is measured from the first one on.
            self.actors[key] = {"host": host, "pid": pid, "batches": 0, "forwards": 0, "ready_at": time.time()}
        return self.actors[key]

    def hello(self, host: str, pid: int) -> None:
        self._actor(host, pid)

    def add(
        self,
        host: str,
        pid: int,
        row_ids: list[str],
        logp: np.ndarray,
        logp_rej: list[float | None],
        forwards: int,
        tokens: int,
    ) -> None:
        actor = self._actor(host, pid)
        actor["batches"] += 1
        actor["forwards"] += forwards
        actor["last_batch_at"] = time.time()
        self.forwards += forwards
        self.tokens += tokens
        for rid, a, b in zip(row_ids, logp.tolist(), logp_rej, strict=True):
            if rid in self.values:
                self.duplicates += 1
            else:
                self.values[rid] = (a, b)

    def stats(self) -> dict[str, Any]:
        return {
            "rows": len(self.values),
            "duplicates": self.duplicates,
            "forwards": self.forwards,
            "tokens": self.tokens,
            "actors": list(self.actors.values()),
        }

    def table(self) -> pa.Table:
        ids = list(self.values)
        return pa.table(
            {
                "row_id": pa.array(ids, pa.string()),
                schema.REF_LOGP: pa.array([self.values[i][0] for i in ids], pa.float64()),
                schema.REF_LOGP_REJECTED: pa.array([self.values[i][1] for i in ids], pa.float64()),
            },
            schema=schema.REFERENCE,
        )


def new_collector() -> Any:
    """A named collector actor (prefix `COLLECTOR_PREFIX`); pass it to `stream_stage(..., collector=)`."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0)(_Collector)
    return cls.options(name=f"{COLLECTOR_PREFIX}{uuid.uuid4().hex[:12]}").remote()


def wait_for_rows(
    stats: Callable[[], dict[str, Any]],
    rows: int,
    *,
    quiet_s: float = REPORTS_QUIET_S,
    poll_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll `stats` (a collector's counters) until they count at least `rows` rows, or their row count has not
    moved for `quiet_s` (what is missing then was lost with its actor, or never scored); the last counters."""
    last = stats()
    moved = clock()
    while last["rows"] < rows and clock() - moved < quiet_s:
        sleep(poll_s)
        now = stats()
        if now["rows"] != last["rows"]:
            moved = clock()
        last = now
    return last


def collected(
    collector: Any, expect_rows: int | None = None, quiet_s: float = REPORTS_QUIET_S
) -> tuple[pa.Table, dict[str, Any]]:
    """(schema.REFERENCE table of every row reported, the counters) from a collector actor; with `expect_rows`,
    after `wait_for_rows` (the scorers' last reports may still be on their way)."""
    import ray

    if expect_rows is not None:
        wait_for_rows(lambda: ray.get(collector.stats.remote()), expect_rows, quiet_s=quiet_s)
    return ray.get(collector.table.remote()), ray.get(collector.stats.remote())
