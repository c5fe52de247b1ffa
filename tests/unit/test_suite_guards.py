"""The suite's own guards (tests/fixtures/limits.py, tests/fixtures/procs.py): a time limit that names what it
waited for and leaves pytest-timeout's timer as it found it, and processes found by their environment marker
even after leaving their parent's process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from fixtures import procs
from fixtures.limits import WaitTimeout, time_limit


def test_time_limit_names_what_it_waited_for():
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="gave up after 0 s waiting for the kettle"), time_limit(0.3, "the kettle"):
        time.sleep(5)
    assert time.monotonic() - t0 < 2


@contextlib.contextmanager
def outer_timer(seconds: float) -> Iterator[list[bool]]:
    """A SIGALRM timer standing in for pytest-timeout's (whose own is saved and put back): the list fills when
    it fires."""
    fired: list[bool] = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    old_left, _ = signal.getitimer(signal.ITIMER_REAL)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, old_left)
        signal.signal(signal.SIGALRM, old)


def test_time_limit_puts_the_outer_timer_back():
    with outer_timer(1.5) as fired:
        with time_limit(10, "nothing"):
            time.sleep(0.2)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 1.0 < left < 1.31  # the outer timer runs on, less the time spent inside
        assert not fired
        time.sleep(1.5)
        assert fired == [True]  # and still fires


def test_an_outer_limit_that_comes_first_is_left_alone():
    with outer_timer(0.3) as fired:
        with time_limit(10, "nothing"):
            time.sleep(0.6)
        assert fired == [True]  # the outer handler, not WaitTimeout


def test_marked_processes_are_found_outside_their_group_and_killed():
    marker = f"guard-{os.getpid()}"
    env = {**os.environ, procs.HEAD: marker}
    # A grandchild in a session of its own whose parent exits at once: re-parented, out of our process group,
    # as Ray Jobs' entrypoints are.
    code = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    deadline = time.monotonic() + 10
    while not (found := procs.marked(procs.HEAD, marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(found) == 1 and os.getpgid(found[0].pid) != os.getpgid(0)
    assert procs.kill(found) == []
    assert procs.marked(procs.HEAD, marker) == []


def test_every_test_module_has_a_basename_of_its_own():
    """pytest imports test modules by basename (rootdir mode, no packages): two `test_x.py` in tests/unit and
    tests/integration stop the whole collection with 'import file mismatch', which a run of one file never shows."""
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parent.parent
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
