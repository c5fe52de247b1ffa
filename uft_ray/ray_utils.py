"""Connecting to Ray: the running cluster when there is one, else a local one bound to 127.0.0.1."""

from __future__ import annotations

import os

from uft_ray.config import RayConfig


def init_ray(rc: RayConfig | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to `rc.address` or RAY_ADDRESS (set by `ray job submit`), or start a local cluster.

    A local cluster keeps Ray's token authentication as Ray sets it up and binds its dashboard to
    127.0.0.1. `num_cpus` may declare more logical CPUs than cores: on a 2-core laptop the trainer's
    workers and the reference actors must be schedulable at once.
    """
    import ray

    if ray.is_initialized():
        return
    rc = rc or RayConfig()
    address = rc.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    ray.init(
        num_cpus=rc.num_cpus or num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
    )
