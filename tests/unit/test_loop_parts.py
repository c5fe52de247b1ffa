"""Parts of the worker loop that run without a process group: the first-batch prefetch."""

from __future__ import annotations

import threading
import time

import pytest

from uft_ray.train.worker import FirstAhead


def test_first_item_is_fetched_in_the_background_then_the_rest_in_order():
    started = threading.Event()

    def slow_start():
        started.set()
        time.sleep(0.5)  # the pipeline's start-up: read, plan join, sort
        yield from range(5)

    it = FirstAhead(slow_start())
    assert started.wait(2)  # running before anyone asked for an item
    time.sleep(0.6)  # the model loads meanwhile
    t0 = time.perf_counter()
    assert next(it) == 0
    assert time.perf_counter() - t0 < 0.2  # already there
    assert list(it) == [1, 2, 3, 4]


def test_errors_and_exhaustion_reach_the_caller():
    def broken():
        raise ValueError("shard unreadable")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="shard unreadable"):
        next(FirstAhead(broken()))
    with pytest.raises(StopIteration):
        next(FirstAhead(iter(())))


def test_an_abandoned_background_build_has_stopped_and_is_dropped():
    """The driver's error path (a reference pass that raises): `abandon` returns only once the build is over."""
    from uft_ray.train.feeds import Background

    done = []

    def build() -> list[int]:
        time.sleep(0.5)
        done.append(True)
        return [1, 2, 3]

    b = Background(build)
    b.abandon()
    assert done == [True] and b.result() is None
