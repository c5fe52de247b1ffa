"""The run directory: `{output.storage_path}/{output.run_name}/`, its file names, and its metrics file.

The one module that knows what a run writes and where (DESIGN.md "A run's outputs"):

    config.yaml          the resolved config, as run
    prepared/            the data plane's rows (when the run prepared them itself) + prepared.key.json
    prepared_eval/       eval.sources' held-out splits, prepared like the training rows + prepared_eval.key.json
    prompts/             hint_rft: the task's prompts, train.parquet and eval.parquet (uft_ray.rft.prompts)
    plan.parquet         the seeded training plan (uft_ray.train.plan)
    checkpoints/         Ray Train's run folder: checkpoint_{step:06d}/ with adapter/, ds/, state.json
    adapter/             the final LoRA adapter (peft format) with the tokenizer
    metrics.jsonl        one JSON object per optimizer step, appended by rank 0
    quarantine/          rejected rows (copied from the prepared directory) + counts.json (hint_rft: prompts.jsonl)
    summary.json         the data plane's summary, when one is kept beside the run's files (the report reads it)
    report.html, plots/  the report (uft_ray.report): plots/{name}.png
    eval/                benchmark results (uft_ray.evaluation): lm_eval's JSON per task + summary.json
    tensorboard/         logging.trackers tensorboard's event files, unless logging.tensorboard_dir
    ray.log              what Ray forwarded from its workers, off the console (uft_ray.ray_utils)
    lease.json           while a driver runs: its owner and heartbeat (uft_ray.lease; one writer per run directory)

The run directory is a local path or an object-store URI (`output.storage_path: s3://bucket/runs`); every path
here is built with `storage.join` and every read and write goes through `uft_ray.storage`, so one code path
serves both. An object store has no append: `append_jsonl` rewrites the whole (small) file there.

`metrics.jsonl` has one appender (`append_metrics`, rank 0 of the worker loop), one truncation on resume
(`truncate_metrics`: lines after the checkpoint we resume from were written by a failed attempt), and one
reader (`read_metrics`), which every consumer uses: the driver, the CLI's progress lines, the report, the tests.
Importable without Ray, torch or DeepSpeed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from uft_ray import storage

CONFIG = "config.yaml"
PREPARED = "prepared"
PROMPTS = "prompts"  # hint_rft: the task rows, train.parquet and eval.parquet
PROMPT_SPLITS = ("train", "eval")  # prompts/{split}.parquet
PREPARED_KEY = "prepared.key.json"
PREPARED_EVAL = "prepared_eval"  # eval.sources: the held-out splits, prepared like the training rows
PREPARED_EVAL_KEY = "prepared_eval.key.json"
PLAN = "plan.parquet"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
QUARANTINE = "quarantine"
QUARANTINE_COUNTS = "counts.json"  # inside quarantine/
QUARANTINE_PROMPTS = "prompts.jsonl"  # inside quarantine/: hint_rft's unusable task records
DATA_SUMMARY = "summary.json"  # the data plane's summary (uft_ray.data.prepared's summary.json)
REPORT = "report.html"
PLOTS = "plots"
EVAL = "eval"
EVAL_SUMMARY = "summary.json"  # inside eval/
TENSORBOARD = "tensorboard"
RAY_LOG = "ray.log"

# Inside one checkpoint directory.
STATE = "state.json"  # step, rows consumed per source, seeds, plan fingerprint
CHECKPOINT_ADAPTER = "adapter"  # peft format, gathered LoRA weights only
CHECKPOINT_DEEPSPEED = "ds"  # DeepSpeed's optimizer/scheduler state, one partition per rank


def checkpoint_snapshot_name() -> str:
    """Inside checkpoints/: Ray Train's record of the checkpoints it committed, by Ray Train's own name for it
    (imported when first asked: this module loads without Ray)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def __getattr__(name: str) -> str:
    if name == "CHECKPOINT_SNAPSHOT":
        return checkpoint_snapshot_name()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checkpoint_name(step: int) -> str:
    """The directory name Ray Train gives the checkpoint reported after optimizer step `step`."""
    return f"checkpoint_{step:06d}"


class RunDir:
    """Paths inside one run directory, and its metrics file. `RunDir(path)` touches nothing on disk."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def _p(self, name: str) -> str:
        return storage.join(self.path, name)

    @property
    def config(self) -> str:
        return self._p(CONFIG)

    @property
    def prepared(self) -> str:
        return self._p(PREPARED)

    @property
    def prompts(self) -> str:
        return self._p(PROMPTS)

    def prompts_file(self, split: str) -> str:
        """hint_rft's prompts of `split` ("train" or "eval")."""
        if split not in PROMPT_SPLITS:
            raise ValueError(f"prompt split {split!r}: one of {PROMPT_SPLITS}")
        return storage.join(self.prompts, f"{split}.parquet")

    @property
    def prepared_key(self) -> str:
        return self._p(PREPARED_KEY)

    @property
    def prepared_eval(self) -> str:
        return self._p(PREPARED_EVAL)

    @property
    def prepared_eval_key(self) -> str:
        return self._p(PREPARED_EVAL_KEY)

    @property
    def plan(self) -> str:
        return self._p(PLAN)

    @property
    def checkpoints(self) -> str:
        return self._p(CHECKPOINTS)

    @property
    def checkpoint_snapshot(self) -> str:
        return storage.join(self.checkpoints, checkpoint_snapshot_name())

    def checkpoint(self, step: int) -> str:
        return storage.join(self.checkpoints, checkpoint_name(step))

    @property
    def adapter(self) -> str:
        return self._p(ADAPTER)

    @property
    def metrics(self) -> str:
        return self._p(METRICS)

    @property
    def quarantine(self) -> str:
        return self._p(QUARANTINE)

    @property
    def quarantine_counts(self) -> str:
        return storage.join(self.quarantine, QUARANTINE_COUNTS)

    @property
    def quarantine_prompts(self) -> str:
        return storage.join(self.quarantine, QUARANTINE_PROMPTS)

    @property
    def data_summary(self) -> str:
        return self._p(DATA_SUMMARY)

    @property
    def report(self) -> str:
        return self._p(REPORT)

    @property
    def plots(self) -> str:
        return self._p(PLOTS)

    def plot(self, name: str) -> str:
        """The report's figure `name` (a PNG)."""
        return storage.join(self.plots, f"{name}.png")

    @property
    def eval(self) -> str:
        return self._p(EVAL)

    @property
    def eval_summary(self) -> str:
        return storage.join(self.eval, EVAL_SUMMARY)

    @property
    def tensorboard(self) -> str:
        return self._p(TENSORBOARD)

    @property
    def ray_log(self) -> str:
        return self._p(RAY_LOG)

    # metrics.jsonl -------------------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    def last_metrics(self) -> dict[str, Any]:
        rows = self.read_metrics()
        return rows[-1] if rows else {}

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one step's line (rank 0 only)."""
        append_jsonl(self.metrics, row)

    def truncate_metrics(self, keep_through: int) -> None:
        """Drop the lines of steps after `keep_through`: a failed attempt wrote them after our checkpoint."""
        truncate_jsonl(self.metrics, keep_through)


def append_jsonl(path: str, row: dict[str, Any]) -> None:
    """Append one JSON line. Locally one write call per line, so a reader sees whole lines; on an object store
    the file is rewritten whole (one put: a reader sees the old file or the new)."""
    line = json.dumps(row) + "\n"
    if storage.is_remote(path):
        old = storage.read_bytes(path) if storage.is_file(path) else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        storage.atomic_write(path, old + line.encode())
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(line)


def truncate_jsonl(path: str, keep_through: int) -> None:
    """Keep the lines whose `step` is at most `keep_through` (torn lines dropped), atomically."""
    if not storage.is_file(path):
        return
    kept = [r for r in _parse_lines(path) if r.get("step", 0) <= keep_through]
    storage.atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def _parse_lines(path: str) -> list[dict[str, Any]]:
    rows = []
    for line in storage.read_bytes(path).decode(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line: a run killed mid-write, or a line being written now
            continue
    return rows


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl in step order, the last record of each step; torn lines are skipped."""
    try:
        rows = _parse_lines(path)
    except (FileNotFoundError, OSError):  # absent (not started yet), or being replaced
        return []
    by_step = {r.get("step"): r for r in rows}
    return [by_step[k] for k in sorted(by_step, key=lambda s: (s is None, s))]


def read_state(checkpoint_dir: str) -> dict[str, Any]:
    """A checkpoint's driver state (`state.json`)."""
    state = storage.read_json(storage.join(checkpoint_dir, STATE))
    if state is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no readable {STATE}")
    return state


def write_state(checkpoint_dir: str, state: dict[str, Any]) -> None:
    storage.write_json(storage.join(checkpoint_dir, STATE), state)
