"""Connecting to Ray: the running cluster when there is one, else a local one bound to 127.0.0.1.

Also the one place that decides how much of Ray's own output a run shows. By default none of Ray Data's
progress bars: the workers that iterate the datasets re-print theirs through the driver's log on every update
(the demo's log was mostly those), and a job's log is no terminal anyway. A run shows its own lines instead
(`uft-ray` prints one per step from metrics.jsonl), plus warnings and errors. `--verbose` (UFT_RAY_VERBOSE=1 in
a job's environment) keeps Ray's output as Ray prints it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from uft_ray.config import RayConfig

VERBOSE_ENV = "UFT_RAY_VERBOSE"
# Read in every worker process of the job: Ray Data's progress bars (ray.data.context), and the tqdm bars of
# transformers and huggingface_hub (a worker loading the model re-prints "Loading weights" through the driver).
QUIET_ENV_VARS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def verbose() -> bool:
    """Whether Ray's own output stays: `--verbose` on the command line, or UFT_RAY_VERBOSE=1."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_ray_data() -> None:
    """This process's Ray Data without progress bars or per-dataset banners (unless `verbose()`).

    A dataset copies the current DataContext when it is made, and the workers execute it with that copy, so
    this runs before the driver makes any. Ray Data's INFO lines still go to its own log file
    (`{ray temp dir}/session_*/logs/ray-data/`); its console shows warnings and errors.
    """
    if verbose():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    # Its "progress bars disabled, to enable set ..." warning: we disabled them on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:  # its console handler; the file handler keeps all
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def train_logging() -> Any:
    """Ray Train's `RunConfig(logging_config=...)`: its INFO lines (worker group started, every checkpoint and
    report with its metrics dict) only with `verbose()`; they stay in its log files under the session dir."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def init_ray(rc: RayConfig | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to `rc.address` or RAY_ADDRESS (set by `ray job submit`), or start a local cluster.

    A local cluster keeps Ray's token authentication as Ray sets it up and binds its dashboard to
    127.0.0.1. `num_cpus` may declare more logical CPUs than cores: on a 2-core laptop the trainer's
    workers and the reference actors must be schedulable at once. Ray's own output as `quiet_ray_data` says.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    rc = rc or RayConfig()
    address = rc.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"} | ({} if verbose() else QUIET_ENV_VARS)
    runtime_env = {"env_vars": env_vars}
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
