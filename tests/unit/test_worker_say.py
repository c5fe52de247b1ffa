"""Worker console lines under Ray Train V2's print patch (uft_ray.train.worker.say)."""

from __future__ import annotations

import builtins
import io
import logging
import sys

from ray.train.v2._internal.logging.patch_print import redirected_print


def test_a_worker_line_is_printed_once_under_ray_trains_print_patch(monkeypatch):
    """Ray Train V2 patches `print` in its workers: with stdout wrapped (as Ray's worker wraps it) the patched print
    tees to the stream and logs the line too, so a plain print shows twice on the console. `say` shows it once."""
    from uft_ray.train import worker

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)  # not sys.__stdout__, as in a Ray worker
    root, handler = logging.getLogger(), logging.StreamHandler(out)  # Ray Train's worker logger: INFO to the console
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    monkeypatch.setattr(builtins, "print", redirected_print)
    try:
        print("[uft-ray] plain")
        worker.say("[uft-ray] said")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = out.getvalue().splitlines()
    assert lines.count("[uft-ray] plain") == 2  # Ray's behaviour, reproduced
    assert lines.count("[uft-ray] said") == 1
