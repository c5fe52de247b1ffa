"""Ray's own autoscaler with fake nodes: a run submitted as a job to a head with no worker nodes, the
autoscaler adding the nodes its training workers and reference actor ask for, one of those nodes killed mid-run,
the run recovering through FailureConfig from its last checkpoint on a node the autoscaler brings back, and the
idle nodes scaled back down after the job. One short run (20 steps of the tiny model) checks all of it.

The cluster is what `ray.cluster_utils.AutoscalingCluster` starts: `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...` with Ray's fake multi-node provider, whose nodes are real raylets (with their own
workers) on this machine, started and terminated by the autoscaler in its monitor process. Not through that class
itself: its config template (`fake_multi_node/example.yaml`) is not in the Ray 2.60 wheel, and its start and
shutdown run `ray stop --force`, which would kill every Ray on the machine. Here the head has its own temp dir,
ports and token, and is stopped by its process id. The provider is Ray's with one change
(tests/fixtures/fake_provider.py): each node unpacks a job's working_dir into a directory of its own, as on
nodes with their own disks; with Ray's shared one, a joining node replaced the driver's working directory.

- The head declares 0 CPUs: it runs the job's driver (Ray Jobs puts the entrypoint on the head with no CPU) and
  nothing else. A node type has 3 CPUs and a training worker asks for 2, so every node holds one worker, and at
  most 2 nodes: after a node dies, the restarted worker group fits only on a node the autoscaler adds.
- A node is killed as a machine dies: SIGKILL to its raylet and every process under it (its workers and
  agents), not through Ray. GCS health checks mark it dead; the autoscaler (v2: v1 never replaces a dead fake
  node) terminates its instance through the provider and launches a replacement for the pending worker group.
- The job's storage variables (S3 endpoint and keys) reach every node's processes through the job's
  `runtime_env.env_vars` only: the cluster itself is started without them.

About 4 minutes on 2 CPU cores (247 s on a fresh machine), the run's outputs in an S3 bucket on the moto server. Its
waits are budgeted from the run's own start-up and step times (STARTUP_S, STEP_FACTOR) and DeepSpeed's op is built
before the run (the `deepspeed_ops` fixture): on a fresh machine its ~2 min JIT build fell inside the job's budget.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
from fixtures.ray_head import RayHead
from ray._private.services import node_ip_address_from_perspective
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from uft_ray import api, storage
from uft_ray.config import Config
from uft_ray.run_dir import RunDir, checkpoint_name, parts_dir

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Where the run lives: "s3", a bucket on the session's moto server (the `s3_bucket` fixture): the run dir, its
# prepared rows, checkpoints and the reference cache; or "local", a directory (the fake nodes share this disk).
STORAGE = "s3"

NODE_TYPE = "cpu_node"
NODE_CPUS = 3  # one 2-CPU training worker per node, beside a 1-CPU reference actor or data task
WORKER_CPUS = 2
MAX_NODES = 2
IDLE_TIMEOUT_MIN = 0.25  # idle nodes go after 15 s: long enough not to lose one between phases of the run
STEPS, CHECKPOINT_EVERY = 20, 3  # the kill lands around step 6-7 (Ray Train registers a checkpoint late)
# The waits are budgeted from what the run shows, not fixed: STARTUP_S from the submission to the first step
# (scale-up, data, reference pass, workers; measured 60-150 s on 2 busy cores), then per remaining step
# STEP_FACTOR x the measured step time, and after the kill the first attempt's start-up time again (a node
# replaced, workers restarted) plus the remaining steps. UFT_TEST_AUTOSCALING_STARTUP_S overrides STARTUP_S
# (a small value makes the job miss its budget: the way to check that a failure here leaves nothing behind).
STARTUP_S = float(os.environ.get("UFT_TEST_AUTOSCALING_STARTUP_S", 360))
STEP_FACTOR, SLACK_S = 4.0, 90.0
TRAIN_WORKER = "RayTrainWorker"
PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # Ray Train V2's worker actor class

# The head's environment: autoscaler v2 (its environment as AutoscalingCluster sets it), its loop every second,
# and a raylet that stops answering marked dead after 5 failed 1 s health checks (default 3 s period, 10 s
# timeout: the 5 s timeout here still leaves a busy raylet time to answer).
CLUSTER_ENV = {
    "RAY_FAKE_CLUSTER": "1",
    "RAY_enable_autoscaler_v2": "1",
    "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "5",
}


def autoscaling_config(gcs_address: str) -> dict[str, Any]:
    """The cluster config AutoscalingCluster generates (fake_multi_node/example.yaml with our node types)."""
    return {
        "cluster_name": "uft-fake",
        "max_workers": MAX_NODES,
        "provider": {
            "type": "external",  # Ray's fake_multinode provider, each node with its own runtime_env directory
            "module": "fixtures.fake_provider.OwnDiskFakeProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # the provider's nodes join this head, not the default port 6379
            # autoscaler v2 (what AutoscalingCluster(autoscaler_v2=True) sets): v1 never terminates a fake node
            # that died, since the read-only provider keeps it "uninitialized", so it is never replaced.
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            NODE_TYPE: {
                "resources": {"CPU": NODE_CPUS, "object_store_memory": 300 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_NODES,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class FakeCluster(RayHead):
    """A head (0 CPUs, token auth on) whose autoscaler adds and removes fake worker nodes."""

    def __init__(self, tmp: Path) -> None:
        # The address the provider's nodes find for themselves: the head takes the same, so that each node has
        # one address (Ray's address discovery refuses two spellings of one cluster).
        super().__init__(
            tmp,
            num_cpus=0,
            dashboard=True,
            autoscaling=autoscaling_config,
            env=CLUSTER_ENV | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *PYTHONPATH])},
            without=("AWS_",),  # the job must bring its own
            node_ip=node_ip_address_from_perspective(),
            object_store_mb=300,
        )

    # Ray's state API, over the dashboard -------------------------------------------------------------------

    def _list(self, resource: str, filters: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.address, headers=self.headers)
        options = ListApiOptions(filters=filters, detail=True, limit=10_000, timeout=30)
        rows = client.list(StateResource(resource), options=options, raise_on_missing_output=False)
        return [r if isinstance(r, dict) else r.__dict__ for r in rows]

    def nodes(self, state: str = "ALIVE") -> list[dict[str, Any]]:
        return self._list("nodes", [("state", "=", state)])

    def worker_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.nodes() if not n["is_head_node"]}

    def train_workers(self) -> list[dict[str, Any]]:
        """Every Ray Train worker actor of the cluster so far, alive or dead, with its node and pid."""
        return self._list("actors", [("class_name", "=", TRAIN_WORKER)])

    def actors(self) -> list[dict[str, Any]]:
        return self._list("actors", [])

    # Processes ------------------------------------------------------------------------------------------

    def raylet(self, node_id: str) -> psutil.Process:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            args = p.info["cmdline"] or []
            if f"--node_id={node_id}" in args and f"--gcs-address={self.gcs_address}" in args:
                found.append(p)
        assert len(found) == 1, f"raylets of node {node_id}: {found}"
        return found[0]

    def kill_node(self, node_id: str) -> set[int]:
        """SIGKILL the node's raylet and every process under it, at once; returns their pids."""
        raylet = self.raylet(node_id)
        procs = [raylet, *raylet.children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        return {p.pid for p in procs}


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory, deepspeed_ops: None) -> Iterator[FakeCluster]:
    c = FakeCluster(tmp_path_factory.mktemp("fake", numbered=True))
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if STORAGE == "s3":
        return request.getfixturevalue("s3_bucket")
    return str(tmp_path / "store")


# ---------------------------------------------------------------------------------------------------------
# Reading the run


def metrics_lines(run: RunDir) -> list[dict[str, Any]]:
    """Every whole line of metrics.jsonl as written (RunDir.read_metrics keeps the last line of each step: here a
    step written twice must show). In a bucket a live run writes it as parts (uft_ray.run_dir), sealed into the one
    file when the run ends: the parts' lines in order until then. A last line without its newline is still being
    written."""
    if storage.is_file(run.metrics):
        text = storage.read_bytes(run.metrics).decode()
    else:
        _, parts = storage.list_files(parts_dir(run.metrics), ".jsonl", recursive=False)
        text = "".join(storage.read_bytes(storage.join(parts_dir(run.metrics), p.rsplit("/", 1)[-1])).decode()
                       for p in sorted(parts))  # fmt: skip
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def planned_rows_by_step(run: RunDir) -> dict[int, Counter]:
    """Rows per source of every optimizer step (1-based) in the run's plan."""
    fs, path = storage.filesystem_for(run.plan)
    table = pq.read_table(path, filesystem=fs, columns=["step", "source"])
    out: dict[int, Counter] = {}
    for step, source in zip(table["step"].to_pylist(), table["source"].to_pylist(), strict=True):
        out.setdefault(step + 1, Counter())[source] += 1
    return out


def committed_checkpoints(run: RunDir) -> str:
    """Ray Train's checkpoint manager snapshot (names the checkpoints it registered), or ''."""
    path = storage.join(run.checkpoints, "checkpoint_manager_snapshot.json")
    try:
        return storage.read_bytes(path).decode() if storage.is_file(path) else ""
    except OSError:  # being replaced
        return ""


# ---------------------------------------------------------------------------------------------------------


def test_job_scales_up_recovers_from_a_killed_node_and_scales_down(
    cluster: FakeCluster, make_config: Callable[..., Config], storage_root: str
) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    head = [n["node_id"] for n in cluster.nodes() if n["is_head_node"]]
    assert len(head) == 1 and cluster.worker_node_ids() == set(), cluster.nodes()
    head_id = head[0]

    run_name = "autoscaled"
    cfg = make_config(
        run_name,
        train={  # 2 epochs of 40 rows, global batch 4: STEPS steps
            "checkpoint_every": CHECKPOINT_EVERY,
            "max_failures": 1,
            "cpus_per_worker": WORKER_CPUS,
        },
        reference={"cache_dir": storage.join(storage_root, "ref-cache")},
        output={"storage_path": storage.join(storage_root, "runs"), "run_name": run_name},
    )
    run = RunDir(cfg.output.run_dir)
    env = sorted(k for k in os.environ if k.startswith("AWS_")) if storage.is_remote(storage_root) else []
    job = api.submit(cfg, address=cluster.address, working_dir=ROOT, env=env, headers=cluster.headers)

    # Scale-up, then the node kill once checkpoint CHECKPOINT_EVERY is committed. Ray Train registers a
    # reported checkpoint when its controller next polls the workers: wait until its snapshot names it, else
    # the restart would rightly begin from an earlier one.
    killed: dict[str, Any] = {}
    submitted = time.monotonic()
    seen, first_step_at, step_s = 0, None, None
    deadline, waiting_for = submitted + STARTUP_S, "the first step (scale-up, data, reference pass, workers)"
    while not killed:
        status = job.status()
        assert status in ("PENDING", "RUNNING"), f"job {status} before the kill:\n{job.logs()[-6000:]}"
        assert time.monotonic() < deadline, f"gave up waiting for {waiting_for}:\n{job.logs()[-6000:]}"
        if "first_worker_node" not in timings and cluster.worker_node_ids():
            timings["first_worker_node"] = time.monotonic() - t0
        lines = metrics_lines(run)
        if len(lines) > seen:  # a new step: budget the rest from the steps so far
            seen, now = len(lines), time.monotonic()
            first_step_at = first_step_at or now
            step_s = (now - first_step_at) / (seen - 1) if seen > 1 else None
            todo = max(CHECKPOINT_EVERY - seen, 0) + 1
            deadline = now + SLACK_S + STEP_FACTOR * (step_s or 30.0) * todo
            waiting_for = (
                f"checkpoint {CHECKPOINT_EVERY} and a step past it (after step {seen}, {step_s or 0:.1f} s/step)"
            )
        # ... and a step written past it: the kill then always leaves trained steps to redo from the checkpoint
        # (a kill between the checkpoint and the next step's line resumed at the step it died on: nothing to check)
        if len(lines) > CHECKPOINT_EVERY and checkpoint_name(CHECKPOINT_EVERY) in committed_checkpoints(run):
            alive = [a for a in cluster.train_workers() if a["state"] == "ALIVE"]
            assert len(alive) == cfg.train.num_workers, alive
            victim = sorted(alive, key=lambda a: a["node_id"])[0]
            killed = {"node_id": victim["node_id"], "worker_pid": victim["pid"]}
            killed["nodes_before"] = cluster.worker_node_ids()
            killed["lines"] = metrics_lines(run)  # the first attempt's steps
            killed["t"] = time.time()
            killed["pids"] = cluster.kill_node(victim["node_id"])
            timings["kill"] = time.monotonic() - t0
        time.sleep(0.2)

    # The recovery: a node replaced and the workers restarted (budgeted as the first attempt's start-up), then
    # the steps from the checkpoint on.
    startup = (first_step_at or time.monotonic()) - submitted
    budget = SLACK_S + 2 * startup + STEP_FACTOR * (step_s or 30.0) * (STEPS - CHECKPOINT_EVERY)
    deadline = time.monotonic() + budget
    while (status := job.status()) not in api.TERMINAL:
        assert time.monotonic() < deadline, (
            f"gave up after {budget:.0f} s waiting for the job to recover and finish (start-up {startup:.0f} s, "
            f"{step_s or 0:.1f} s/step; now {status}, {len(metrics_lines(run))} metrics lines):\n{job.logs()[-6000:]}"
        )
        time.sleep(1)
    logs = job.logs()
    assert status == "SUCCEEDED", logs[-8000:]
    timings["job_done"] = time.monotonic() - t0

    # Scale-down: every worker node idle, then terminated by the autoscaler.
    deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 90
    while (left := cluster.worker_node_ids()) and time.monotonic() < deadline:
        time.sleep(1)
    timings["scaled_down"] = time.monotonic() - t0
    assert not left, f"worker nodes still alive {timings['scaled_down'] - timings['job_done']:.0f} s after the job"

    # Where the training workers ran: never on the head; the killed node hosted one (its pid died with it); the
    # restarted group ran on a node that did not exist when the node died (the autoscaler's replacement).
    workers = cluster.train_workers()
    assert workers and all(w["node_id"] != head_id for w in workers), workers
    assert killed["worker_pid"] in killed["pids"]
    assert killed["node_id"] in killed["nodes_before"] and len(killed["nodes_before"]) == MAX_NODES
    new_nodes = {w["node_id"] for w in workers} - killed["nodes_before"]
    assert new_nodes, f"no training worker on a node added after the kill: {workers}"
    assert len(workers) >= 2 * cfg.train.num_workers  # two attempts
    dead = {n["node_id"] for n in cluster.nodes("DEAD")}
    assert killed["node_id"] in dead  # Ray saw the node die, not only its worker
    assert new_nodes <= dead  # and, after the job, the autoscaler took the replacement away again

    # The reference actor pool ran off the head too.
    scorers = [a for a in cluster.actors() if "ReferenceScorer" in a["class_name"]]
    assert scorers and all(a["node_id"] != head_id for a in scorers), scorers

    # The run: every step exactly once, in order; the steps up to the last committed checkpoint written before
    # the kill and kept, every later one (re)trained after it, each with the plan's rows of that step.
    lines = metrics_lines(run)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)), [r["step"] for r in lines]
    killed_step = len(killed["lines"])
    assert [r["step"] for r in killed["lines"]] == list(range(1, killed_step + 1))
    resumed_at = next(r["step"] for r in lines if r["time"] > killed["t"]) - 1
    assert resumed_at % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed_at < killed_step < STEPS, (
        resumed_at,
        killed_step,
    )
    assert lines[:resumed_at] == killed["lines"][:resumed_at]  # kept as written
    assert all(r["time"] > killed["t"] for r in lines[resumed_at:])
    assert storage.is_file(storage.join(run.checkpoint(resumed_at), "state.json"))
    # The steps the dead attempt had trained past its checkpoint, trained again from that checkpoint on other
    # nodes: the same numbers, as an exact resume gives (adapter, optimizer and data position restored).
    keys = ["loss", *(f"loss/{s.name}" for s in cfg.data.sources), "grad_norm"]
    for before, after in zip(killed["lines"][resumed_at:], lines[resumed_at:killed_step], strict=True):
        assert [after[k] for k in keys] == pytest.approx([before[k] for k in keys], rel=1e-5), before["step"]
    planned = planned_rows_by_step(run)
    sources = [s.name for s in cfg.data.sources]
    for r in lines:
        assert {s: r[f"rows/{s}"] for s in sources} == {s: planned[r["step"]][s] for s in sources}, r["step"]
    final = json.loads(storage.read_bytes(storage.join(run.checkpoint(STEPS), "state.json")))
    assert final["step"] == STEPS
    totals = {s: sum(c[s] for c in planned.values()) for s in sources}
    assert final["consumed"] == totals == {"ultrachat": 40, "helpsteer2": 40}
    assert storage.is_file(storage.join(run.adapter, "adapter_model.safetensors"))
    assert f"[uft-ray] step {STEPS}/{STEPS} " in logs

    print(
        f"autoscaling run: {json.dumps({k: round(v) for k, v in timings.items()})} s; killed node "
        f"{killed['node_id'][-5:]} ({len(killed['pids'])} processes) after step {killed_step}, resumed at "
        f"step {resumed_at} on node(s) {sorted(n[-5:] for n in new_nodes)}; {len(dead)} worker nodes in all"
    )
