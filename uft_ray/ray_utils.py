"""Connecting to Ray: the running cluster when there is one, else a local one bound to 127.0.0.1.

Also the one place that decides how much of Ray's own output a run shows. By default none of Ray Data's
progress bars: the workers that iterate the datasets re-print theirs through the driver's log on every update
(the demo's log was mostly those), and a job's log is no terminal anyway. A run shows its own lines instead
(`uft-ray` prints one per step from metrics.jsonl), plus warnings and errors. `--verbose` (UFT_RAY_VERBOSE=1 in
a job's environment) keeps Ray's output as Ray prints it.

What Ray forwards from its worker processes (raylet and core_worker warnings, Ray Train's controller and its
placement-group cleaner, every worker's stdout) goes to a log file in the run directory instead
(`route_worker_output`, `RunDir.ray_log`); the console keeps the lines uft-ray itself marks with `[uft-ray]`
(its per-phase lines, and every uft_ray warning a worker logs: `mark_worker_logs` marks them).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from uft_ray.config import RayConfig
from uft_ray.console import MARK  # the lines of uft-ray's own, which stay on the console

VERBOSE_ENV = "UFT_RAY_VERBOSE"
# The name under which Ray's driver registers the printer of forwarded worker output (ray._private.worker.connect).
_RAY_PRINTER = "ray_print_logs"
_ROUTER = "uft_ray_output"
# Read in every worker process of the job: Ray Data's progress bars (ray.data.context), and the tqdm bars of
# transformers and huggingface_hub (a worker loading the model re-prints "Loading weights" through the driver).
QUIET_ENV_VARS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Ray Data's parquet reader starts a pool of footer-reading actors for every `read_parquet`, 32 by default: sized
# for datasets of many thousands of files. uft-ray reads a few files at a time (prepared rows, prompts, a
# dataset's shards), and one actor reads 128 footers at once. Measured on 2 cores: four reads of a 140-row file
# registered 130 actors with the default (a fresh Python process for each one that starts before the listing
# ends), 6 with one. Read where the reader is made, in the driver; a value in the environment wins.
DATA_ENV_DEFAULTS = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


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
    workers and the reference actors must be schedulable at once. Ray's own output as `quiet_ray_data` says;
    Ray Data's parquet reads as `DATA_ENV_DEFAULTS` says (set in this process even when Ray is already up).
    """
    import ray

    quiet_ray_data()
    for name, value in DATA_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    rc = rc or RayConfig()
    address = rc.address or os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"} | ({} if verbose() else QUIET_ENV_VARS)
    env_vars |= {name: os.environ[name] for name in DATA_ENV_DEFAULTS}  # a reader made in a worker: the same
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if not verbose():
        runtime_env["worker_process_setup_hook"] = "uft_ray.ray_utils.mark_worker_logs"
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


def mark_worker_logs() -> None:
    """Ray's `worker_process_setup_hook`: a worker's uft_ray warnings carry the `[uft-ray]` mark, so they stay on
    the console when `route_worker_output` sends the rest of Ray's worker output to the run's log file."""
    log = logging.getLogger("uft_ray")
    if any(getattr(h, "uft_ray_mark", False) for h in log.handlers):
        return
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{MARK} %(levelname)s %(name)s: %(message)s"))
    handler.uft_ray_mark = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.propagate = False  # once, not again through the root logger's lastResort


def route_worker_output(log_path: str | None) -> bool:
    """Send what Ray forwards from its workers to `log_path` (a local file, appended), keeping on the console only
    the lines marked `[uft-ray]`; `None` puts Ray's own printer back. Needs `ray.init` done.

    Ray has no public switch between "print everything" (`log_to_driver=True`) and "print nothing" (False, which
    would hide uft-ray's worker lines too), so this swaps the handler Ray registers on its driver-side dispatcher.
    Returns False, changing nothing, with `verbose()` or when this Ray version has no such dispatcher.
    """
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray layout: keep its printing
        return False
    if verbose() or not any(name in (_RAY_PRINTER, _ROUTER) for name, _ in dispatcher.handlers):
        return False
    dispatcher.remove_handler(_ROUTER)
    dispatcher.remove_handler(_RAY_PRINTER)
    if log_path is None:
        ignore = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.add_handler(_RAY_PRINTER, lambda data: ray_worker.print_to_stdstream(data, ignore_prefix=ignore))
        return True
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    dispatcher.add_handler(_ROUTER, WorkerOutput(log_path))
    return True


class WorkerOutput:
    """One batch of forwarded worker output (Ray's dict: `lines`, `pid`, `ip`, `is_err`, `actor_name`,
    `task_name`): every line to the log file with its origin, the `[uft-ray]` ones also to the console."""

    def __init__(self, log_path: str) -> None:
        self.path = log_path

    def __call__(self, data: dict[str, Any]) -> None:
        origin = data.get("actor_name") or data.get("task_name") or ""
        head = f"({origin + ' ' if origin else ''}pid={data.get('pid')}, ip={data.get('ip')})"
        lines = [str(line) for line in data.get("lines", ())]
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(f"{head} {line}\n" for line in lines)
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in lines:
            if MARK in line:
                print(line[line.index(MARK) :], file=sink, flush=True)
