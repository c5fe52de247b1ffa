"""uft-ray's own console lines: every one starts with `MARK`, and this module is the one place that writes them.

The driver prints one line per phase (`say`), the CLI one line per optimizer step, and training workers a few
lines of their own (the ZeRO stage, a skipped step). Ray forwards a worker's output to the driver, where
`uft_ray.ray_utils.route_worker_output` keeps on the console only the lines that carry `MARK` and sends the rest
of Ray's output to the run's `ray.log`; so a line meant for the user must go through here to be seen.

`say` writes with `sys.stdout.write`, never `print`: Ray Train patches `print` in its workers to tee it to the
(wrapped) stdout and to its log as well, which would show every worker line twice.
"""

from __future__ import annotations

import sys
from typing import Any

MARK = "[uft-ray]"


def marked(msg: str) -> str:
    """`msg` as a console line (`[uft-ray] msg`); a line already marked is left as it is."""
    return msg if msg.startswith(MARK) else f"{MARK} {msg}"


def say(msg: str, *, err: bool = False) -> None:
    """One marked line on stdout (stderr with `err`), flushed at once (a job's log shows it as it happens)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(marked(msg) + "\n")
    stream.flush()


def number(row: dict[str, Any], key: str, spec: str) -> str | None:
    """`row[key]` formatted for a console line, or None when the row has no number there (absent, null, a string,
    a bool): a metrics row's term that a config leaves out is left out of the line."""
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return format(v, spec)
