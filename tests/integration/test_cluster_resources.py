"""A run never hangs silently for resources: real Ray heads of the tests' own (tests/fixtures/ray_head.py,
token authentication on), and a driver connected to each the way a job's driver is (RAY_ADDRESS).

1. Fixed cluster, the reported scenario: `ray start --head --num-cpus=2`, then the documented entrypoint
   `python jobs/train.py --config jobs/configs/demo_tiny.yaml --demo-assets ...` with 1 CPU per worker. The demo
   then needs 2 workers x 1 CPU + 0.25 CPU for data tasks: it must exit 2 within seconds naming those numbers and
   keys, before any data work, instead of training into a placement group that leaves the data tasks no CPU.
   (`train.cpus_per_worker: auto` sizes the workers to fit beside the data tasks: 0.75 each there.)
2. Autoscaling cluster: a head of 0 CPUs whose autoscaler (the fake multi-node provider) can add up to four
   1-CPU nodes. `check_cluster` in a driver there prints what it waits for on the demo (3 CPUs <= 4), and
   fails naming the numbers for runs the node types can never hold (5 CPUs > 4; a 2-CPU worker on 1-CPU nodes).

No training: about a minute on 2 cores (two heads, two drivers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.ray_head import RayHead, fake_autoscaling_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DRIVER_TIMEOUT = 180  # a regression hangs in training; this turns it into a failure


def test_the_new_user_demo_on_a_two_cpu_head_fails_at_once_with_the_numbers(tiny_assets, tmp_path):
    head = RayHead(tmp_path, num_cpus=2)
    try:
        head.wait_ready()
        cmd = [sys.executable, "jobs/train.py", "--config", "jobs/configs/demo_tiny.yaml", "--demo-assets",
               "--demo-root", tiny_assets["root"], f"output.storage_path={tmp_path / 'runs'}",
               f"reference.cache_dir={tmp_path / 'cache'}", "train.cpus_per_worker=1"]  # fmt: skip
        t0 = time.monotonic()
        r = subprocess.run(
            cmd, cwd=ROOT, env=head.driver_env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT
        )
        took = time.monotonic() - t0
    finally:
        head.stop()
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    expected = (
        "cluster: while training the run needs 2.25 CPUs: 2 training workers x 1 CPU "
        "(train.num_workers, train.cpus_per_worker) + 0.25 for data tasks; the cluster has 2 CPUs and no autoscaler"
    )
    assert expected in r.stderr, out[-4000:]
    assert "Lower train.num_workers or train.cpus_per_worker" in r.stderr
    # Before any work: nothing prepared, no reference pass, no trainer.
    assert not (tmp_path / "runs" / "demo" / "prepared").exists()
    assert "[uft-ray] data:" not in r.stdout and "reference log-probs" not in r.stdout
    print(f"driver exited {r.returncode} after {took:.1f} s")
    assert took < 120, f"{took:.0f} s"


# The driver: connect as a job's driver does, check three configs, print one JSON line per config.
CHECK = """
import json, sys
import ray
from uft_ray.config import load_config
from uft_ray.demo import TINY_CONFIGS
from uft_ray.cluster_probe import check_cluster
from uft_ray.resources import ClusterTooSmall

ray.init(log_to_driver=False)
for overrides in json.loads(sys.argv[1]):
    cfg = load_config(str(TINY_CONFIGS["uft"]), ["train.cpus_per_worker=1", *overrides], check_paths=False)
    try:
        fit = check_cluster(cfg)
        out = {"status": fit.status, "line": fit.line, "autoscaler": fit.view.autoscaler}
    except ClusterTooSmall as e:
        out = {"status": "too small", "messages": e.messages}
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_an_autoscaling_cluster_is_waited_for_or_refused_by_what_its_node_types_can_hold(tmp_path):
    types = {"cpu1": {"resources": {"CPU": 1}, "max_workers": 4}}
    head = RayHead(tmp_path, num_cpus=0, autoscaling=lambda gcs: fake_autoscaling_config(gcs, types))
    cases = [
        [],  # the demo: 2 x {CPU: 1} + 0.25 CPU = 2.25 <= 4 nodes of 1 CPU
        ["train.num_workers=4", "train.micro_batch_size=1"],  # 4 x 1 + 0.25 = 4.25 > 4
        ["train.num_workers=1", "train.cpus_per_worker=2"],  # 2 + 0.25 <= 4, but no 1-CPU node holds 2 CPUs
    ]
    try:
        head.wait_ready()
        r = subprocess.run(
            [sys.executable, "-c", CHECK, json.dumps(cases)],
            cwd=ROOT,
            env=head.driver_env(),
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT,
        )
    finally:
        head.stop()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    fits, five, big = results

    assert fits["status"] == "waiting" and fits["autoscaler"].startswith("config "), fits
    waiting = (
        "[uft-ray] waiting for the autoscaler: need 2 x {CPU: 1} for training workers + 0.25 CPUs for data tasks; "
        "the cluster has 0 of 0 CPUs free (it can add: cpu1 {CPU: 1} x up to 4)"
    )
    assert waiting in r.stdout

    assert five["status"] == "too small", five
    (msg,) = five["messages"]
    assert "while training the run needs 4.25 CPUs: 4 training workers x 1 CPU (train.num_workers, " in msg
    assert "the cluster has 0 CPUs and its autoscaler can grow it to at most 4" in msg

    assert big["status"] == "too small", big
    assert any(
        m.startswith("cluster: no node can ever hold one of the training workers while training, {CPU: 2}")
        and "node types it can add: cpu1 {CPU: 1}" in m
        for m in big["messages"]
    ), big
