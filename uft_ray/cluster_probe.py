"""The live cluster: what the connected Ray cluster has and can become, read through Ray's GCS and its autoscaler.

The demand model and the verdict are pure (uft_ray.resources: `needs`, `run_phases`, `assess`, `auto_worker_cpus`);
this module reads the cluster they are held against and runs the two checks that need one, in the driver after
it connects and before any work (uft_ray.runner.open_run):

- `resolve_worker_cpus(cfg)`: `train.cpus_per_worker: auto` made a number on the connected cluster, the choice
  said with its reason;
- `check_cluster(cfg)`: fail at once (`ClusterTooSmall`) when the cluster can never hold the run, else one line
  saying what the run needs and has, or what it waits for.

What the cluster can become comes from, in order: the GCS cluster config (`ray._private.state.state.
get_cluster_config()`: node groups with their max counts, what Ray Train and Ray Data read for their own checks,
reported by autoscalers that publish it); else this cluster's autoscaler process when it runs on this node (a
`ray job submit` driver runs on the head): the config file it was started with (read as uft_ray.cluster_spec
reads a launcher file), or no file, which means Ray's read-only monitor of a fixed cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import yaml

from uft_ray.cluster_spec import launcher_worker_types
from uft_ray.config import Config
from uft_ray.console import say
from uft_ray.resources import (
    RESOURCES,
    ClusterView,
    Fit,
    NodeType,
    assess,
    auto_worker_cpus,
    run_phases,
    training_first,
    with_worker_cpus,
)

logger = logging.getLogger(__name__)


def resolve_worker_cpus(cfg: Config, view: ClusterView | None = None) -> Config:
    """`cfg` with `train.cpus_per_worker: auto` made a number (`auto_worker_cpus` on the connected cluster, capped
    at this machine's cores when the cluster is one node), and the choice printed with its reason."""
    if cfg.train.cpus_per_worker != "auto":
        return cfg
    view = view or cluster_view()
    cores = (os.cpu_count() or 1) if len(view.nodes) == 1 else None
    auto = auto_worker_cpus(cfg, view, cores)
    say(auto.why)
    return with_worker_cpus(cfg, auto.cpus)


def check_cluster(cfg: Config) -> Fit:
    """Fail now (`ClusterTooSmall`) when the connected cluster can never hold the run; else print one line:
    what the run needs and has, or what it waits for. `cfg` with `train.cpus_per_worker` resolved."""
    view = cluster_view()
    fit = assess(training_first(run_phases(cfg)), view)
    logger.info("cluster: %s; autoscaler: %s", view, view.autoscaler)
    say(fit.line)
    return fit


def _cpu_gpu(resources: dict[str, Any]) -> dict[str, float]:
    return {r: float(resources.get(r, 0.0)) for r in RESOURCES if resources.get(r)}


def cluster_view() -> ClusterView:
    """The connected cluster: its alive nodes, what is free, and what its autoscaler can add."""
    import ray  # Ray: imported when a cluster is probed

    nodes = [_cpu_gpu(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    view = ClusterView(nodes=nodes, free=_cpu_gpu(ray.available_resources()))
    return _with_gcs_config(view) or _with_monitor_config(view) or dataclasses.replace(view, autoscaler="unknown")


def _with_gcs_config(view: ClusterView) -> ClusterView | None:
    """Node groups from the GCS cluster config, where an autoscaler published one (what Ray Train V2's own
    resource check reads: `ray._private.state.state.get_max_resources_from_cluster_config`)."""
    import ray._private.state  # Ray: imported when a cluster is probed

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # an older GCS: no such key
        logger.info("no GCS cluster config: %s", e)
        return None
    if config is None or not config.node_group_configs:
        return None
    types = [
        NodeType(g.name, _cpu_gpu(dict(g.resources)), None if g.max_count == -1 else int(g.max_count))
        for g in config.node_group_configs
        if g.max_count != 0 and _cpu_gpu(dict(g.resources))
    ]
    caps = {r: float(v) for r, v in dict(config.max_resources).items() if r in RESOURCES}
    return dataclasses.replace(view, node_types=types, autoscaler="gcs", max_resources=caps)


def _with_monitor_config(view: ClusterView) -> ClusterView | None:
    """This cluster's autoscaler process on this node (`ray start --head` runs it; a job's driver runs on the
    head): the config file it was started with, or none (Ray's read-only monitor of a fixed cluster)."""
    args = _monitor_args()
    if args is None:
        return None
    path, cwd = args
    if path is None:
        return dataclasses.replace(view, autoscaler="none")
    try:
        with open(os.path.join(cwd, os.path.expanduser(path))) as f:
            config = yaml.safe_load(f) or {}
    except OSError as e:
        logger.info("cannot read the autoscaler's config %s: %s", path, e)
        return None
    types, cap, _ = launcher_worker_types(config)
    return dataclasses.replace(view, node_types=types, autoscaler=f"config {path}", max_workers=cap)


def _monitor_args() -> tuple[str | None, str] | None:
    """(`--autoscaling-config` or None, its cwd) of the monitor process of the cluster this driver is connected
    to, matched by its `--gcs-address` port; None when it does not run on this node."""
    import psutil  # with Ray, which brings it: imported when a cluster is probed
    import ray

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        # ray/autoscaler/_private/monitor.py (v1) or ray/autoscaler/v2/monitor.py, not the log monitor
        if not any(os.path.basename(c) == "monitor.py" and "autoscaler" in c for c in cmd[:3]):
            continue
        gcs = next((c.split("=", 1)[1] for c in cmd if c.startswith("--gcs-address=")), "")
        if gcs.rsplit(":", 1)[-1] != port:
            continue
        path = next((c.split("=", 1)[1] for c in cmd if c.startswith("--autoscaling-config=")), None)
        try:
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            cwd = "/"
        return path, cwd
    return None
