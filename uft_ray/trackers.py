"""Experiment trackers (`logging.trackers`): Weights & Biases, MLflow, TensorBoard, fed from metrics.jsonl.

    logging: {trackers: [wandb, mlflow, tensorboard], project: uft-ray}     pip install 'uft-ray[trackers]'

They run in the driver, not in the training workers: a thread tails `{run_dir}/metrics.jsonl` (which rank 0
appends, one line per optimizer step) and logs each new row under its step. So a tracker gets the same keys as
the file and the report by construction, both methods (offline UFT and hint_rft) are tracked without touching
their worker loops, and no tracker client or credential goes to a worker. Credentials come from the driver's
environment only (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...), as each client reads them; nothing here logs an
environment variable. Per tracker:

    wandb        a run named output.run_name in project logging.project (mode online / offline: logging.wandb_mode,
                 else WANDB_MODE); config = the resolved config; history = the rows; the adapter as a model Artifact
    mlflow       a run in experiment logging.project at logging.mlflow_tracking_uri (else MLFLOW_TRACKING_URI);
                 params = the resolved config, flattened; metrics = the rows (timestamped by their `time`); the
                 adapter under the artifact path `adapter/`
    tensorboard  event files in {run_dir}/tensorboard (or {logging.tensorboard_dir}/{run_name}); scalars = the rows
                 (`time` as the events' wall time), the config as text; no artifacts

Each `run()` is one tracker run holding the whole history: a resumed run logs the rows of the steps before its
checkpoint first (its TensorBoard file hides the older files' events), and ignores rows a failed earlier attempt
left after the checkpoint until the workers have rewritten them. Steps retrained after a worker failure inside
one run keep the values first logged. A tracker that fails while logging is dropped with a warning (training goes
on; metrics.jsonl stays the record); one that cannot be opened fails the run before training starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from uft_ray import storage
from uft_ray.console import say
from uft_ray.run_dir import RunDir

# The names live beside config validation's other small tables; TRACKERS is re-exported for existing callers.
from uft_ray.tracker_names import INSTALL, TRACKERS, missing_packages  # noqa: F401

if TYPE_CHECKING:  # pragma: no cover
    from uft_ray.config import Config

MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a parameter value, in characters


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as `section.key` -> text (lists of mappings by index: `data.sources.0.path`)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", cfg.to_dict())
    return out


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's numeric values by key, `step` aside (it is the step they are logged at)."""
    return {
        k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Benchmark results (`{run_dir}/eval/summary.json`) as `eval/{task}/{metric}` (lm_eval's `,none` filter
    dropped from the name) and `eval/{derived}`."""
    out: dict[str, float] = {}
    for task, metrics in (summary.get("tasks") or {}).items():
        for name, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"eval/{task}/{name.removesuffix(',none').replace(',', '_')}"] = float(value)
    for name, d in (summary.get("derived") or {}).items():
        if isinstance(d, dict) and isinstance(d.get("value"), (int, float)):
            out[f"eval/{name}"] = float(d["value"])
    return out


# ---------------------------------------------------------------------------------------------------------
# One class per tracker, each with open (in __init__), log, log_adapter, close: no shared base.


class _Wandb:
    name = "wandb"

    def __init__(self, cfg: Config, run_dir: RunDir) -> None:
        import wandb

        lg = cfg.logging
        mode = lg.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        self.run_name = cfg.output.run_name
        # console="off": W&B must not wrap the driver's stdout (the step lines); silent: its banners and the
        # end-of-run table would double the log. The one line below says where the run is.
        self.run = wandb.init(
            project=lg.project,
            name=cfg.output.run_name,
            dir=os.environ.get("WANDB_DIR") or run_dir.path,
            mode=mode,
            config=cfg.to_dict(),
            tags=[cfg.method],
            settings=wandb.Settings(console="off", silent=True),
        )
        # (`run.url` warns when offline; `run.dir` is the run's files/ folder)
        self.where = f"offline run in {os.path.dirname(self.run.dir)}" if mode == "offline" else self.run.url

    def log(self, values: dict[str, float], step: int, wall_time: float | None) -> None:
        self.run.log(values, step=step)

    def log_adapter(self, path: str) -> None:
        import wandb

        art = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.run_name}-adapter"), type="model")
        art.add_dir(path)
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg: Config, run_dir: RunDir) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        lg = cfg.logging
        self.client = MlflowClient(tracking_uri=lg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        experiment = self.client.get_experiment_by_name(lg.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(lg.project)
            except Exception:  # another run of a sweep made it meanwhile
                experiment_id = self.client.get_experiment_by_name(lg.project).experiment_id
        tags = {"uft_ray.run_dir": run_dir.path, "uft_ray.method": cfg.method}
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.output.run_name, tags=tags).info.run_id
        params = [Param(k, v[:MLFLOW_PARAM_MAX]) for k, v in flat_params(cfg).items()]
        self.client.log_batch(self.run_id, params=params)  # the client sends them in batches of MLflow's size
        self.where = f"run {self.run_id} at {self.client.tracking_uri}"

    def log(self, values: dict[str, float], step: int, wall_time: float | None) -> None:
        from mlflow.entities import Metric

        ms = int((wall_time or time.time()) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def log_adapter(self, path: str) -> None:
        self.client.log_artifacts(self.run_id, path, artifact_path="adapter")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: Config, run_dir: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter

        d = cfg.logging.tensorboard_dir
        self.upload_to = None
        if d:
            self.dir = os.path.join(os.path.expanduser(d), cfg.output.run_name)
        elif storage.is_remote(run_dir.path):  # the writer writes local files: staged here, uploaded at close
            self.upload_to = run_dir.tensorboard
            self.dir = tempfile.mkdtemp(prefix="uft-ray-tensorboard-")
        else:
            self.dir = run_dir.tensorboard
        # purge_step=1: this run writes the whole history again, so TensorBoard hides the events of older files.
        self.writer = SummaryWriter(self.dir, purge_step=1)
        text = cfg.to_yaml()
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # markdown code
        self.where = self.dir

    def log(self, values: dict[str, float], step: int, wall_time: float | None) -> None:
        for k, v in values.items():
            if k != "time":  # it is the event's wall time; as a float32 scalar it would read in 2-minute steps
                self.writer.add_scalar(k, v, step, walltime=wall_time)

    def log_adapter(self, path: str) -> None:  # TensorBoard keeps no files
        pass

    def close(self, ok: bool) -> None:
        self.writer.close()
        if self.upload_to:
            storage.copy_tree(self.dir, self.upload_to)
            shutil.rmtree(self.dir, ignore_errors=True)


_CLASSES = {"wandb": _Wandb, "mlflow": _Mlflow, "tensorboard": _TensorBoard}


# ---------------------------------------------------------------------------------------------------------


class Tracked:
    """The open trackers of one run and the thread that feeds them metrics.jsonl's rows.

    `adapter`: set it to the trained adapter's directory before the block ends; it is logged as an artifact
    once every row is in.
    """

    def __init__(self, trackers: list[Any], run_dir: RunDir, start: int, poll_s: float) -> None:
        self.trackers, self.run, self.poll_s = trackers, run_dir, poll_s
        self.adapter: str | None = None
        self.last = -1  # the last step logged (step 0: a baseline evaluation before training)
        # Rows past the checkpoint we resume from were written by a failed attempt: the workers truncate and
        # rewrite them. Such a row is known by its (step, time) as found now, and is not logged.
        self._stale = {(r.get("step"), r.get("time")) for r in run_dir.read_metrics() if r.get("step", 0) > start}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uft-ray-trackers", daemon=True)

    def _call(self, tracker: Any, what: str, *args: Any) -> None:
        try:
            getattr(tracker, what)(*args)
        except Exception as e:  # the run goes on; metrics.jsonl keeps every row
            say(f"warning: {tracker.name}: {what} failed, not logging to it any more: {type(e).__name__}: {e}")
            self.trackers.remove(tracker)

    def feed(self) -> int:
        """Log the rows not logged yet, in step order; returns how many."""
        with self._lock:
            n = 0
            for row in self.run.read_metrics():
                step = row.get("step")
                if not isinstance(step, int) or step <= self.last or (step, row.get("time")) in self._stale:
                    continue
                values = row_metrics(row)
                for t in list(self.trackers):
                    self._call(t, "log", values, step, row.get("time"))
                self.last, n = step, n + 1
            return n

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.feed()

    def _finish(self, ok: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.feed()
        summary = storage.read_json(self.run.eval_summary)
        if summary is not None:
            values = eval_metrics(summary)
            for t in list(self.trackers):
                if values:
                    self._call(t, "log", values, max(self.last, 0), None)
        if ok and self.adapter and storage.is_dir(self.adapter):
            with storage.local_copy(self.adapter) as adapter:  # trackers upload local files
                for t in list(self.trackers):
                    self._call(t, "log_adapter", adapter)
        for t in list(self.trackers):
            self._call(t, "close", ok)


@contextlib.contextmanager
def open_trackers(cfg: Config, run_dir: RunDir, start: int = 0, *, poll_s: float = 2.0) -> Iterator[Tracked]:
    """Open `cfg.logging.trackers` (none: a no-op), log the resolved config, and feed them the run's metrics
    while the block runs; at its end the rest of the rows, the eval results and `Tracked.adapter`, then close.

    `start`: the step the run resumes from (its checkpoint's); 0 for a fresh run.
    """
    names = list(dict.fromkeys(cfg.logging.trackers))
    missing = missing_packages(names)
    if missing:
        raise RuntimeError(f"logging.trackers: {', '.join(missing)} not installed here; {INSTALL}")
    opened: list[Any] = []
    try:
        for name in names:
            opened.append(_CLASSES[name](cfg, run_dir))
    except Exception:
        for t in opened:
            with contextlib.suppress(Exception):
                t.close(False)
        raise
    tracked = Tracked(opened, run_dir, start, poll_s)
    if opened:
        say("trackers: " + "; ".join(f"{t.name} {t.where}" for t in opened))
        tracked._thread.start()
    ok = False
    try:
        yield tracked
        ok = True
    finally:
        if opened:
            tracked._finish(ok)
