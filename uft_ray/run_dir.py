"""The run directory: `{output.storage_path}/{output.run_name}/`, its file names, and its metrics file.

The one module that knows what a run writes and where (docs/design.md "Storage and the run directory"):

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
serves both. An object store has no append: there `metrics.jsonl` is written as `metrics.jsonl.parts/`, one object
per `METRICS_CHUNK` steps, only the current one rewritten at each step (bytes per step bounded by the chunk, not
the run's length), and sealed into one `metrics.jsonl` when the run ends (`seal_metrics`); readers merge both.

`metrics.jsonl` has one appender (`append_metrics`, rank 0 of the worker loop: a `MetricsWriter`, whose failed write
is a warning and is retried with the next step's, never a lost step), one truncation on resume (`truncate_metrics`:
lines after the checkpoint we resume from were written by a failed attempt), and one reader (`MetricsReader`, also
behind `read_metrics` and `RunDir.read_metrics`), which every consumer uses: the driver, the CLI's progress lines,
the trackers, the report, the tests. A `RunDir`'s reader is incremental: each call reads only what is new (the
bytes after its offset locally; on an object store one listing and the chunks whose size changed).
Importable without Ray, torch or DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import time
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
        self._reader: MetricsReader | None = None
        self._writer: MetricsWriter | None = None

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
    def before_after(self) -> str:
        """The demo's held-out check of the base model and the adapter (uft_ray.demo.before_after)."""
        return self._p("before_after.json")

    @property
    def tensorboard(self) -> str:
        return self._p(TENSORBOARD)

    @property
    def ray_log(self) -> str:
        return self._p(RAY_LOG)

    # metrics.jsonl -------------------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every step's row; incremental across calls on this `RunDir` (what is new since the last call is read)."""
        if self._reader is None:
            self._reader = MetricsReader(self.metrics)
        return self._reader.rows()

    def last_metrics(self) -> dict[str, Any]:
        rows = self.read_metrics()
        return rows[-1] if rows else {}

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one step's line (rank 0 only). A failed write is a warning, retried with the next append."""
        if self._writer is None:
            self._writer = MetricsWriter(self.metrics)
        self._writer.append(row)

    def flush_metrics(self) -> None:
        """Write what a failed append left pending; raises if it still cannot (the end of the loop)."""
        if self._writer is not None:
            self._writer.flush(tries=5, strict=True)

    def truncate_metrics(self, keep_through: int) -> None:
        """Drop the lines of steps after `keep_through`: a failed attempt wrote them after our checkpoint."""
        self._writer = None
        truncate_jsonl(self.metrics, keep_through)

    def seal_metrics(self) -> None:
        """On an object store, the parts become one `metrics.jsonl` (the run has ended: one rewrite per run)."""
        seal_jsonl(self.metrics)


logger = logging.getLogger(__name__)
METRICS_CHUNK = 64  # steps per object of metrics.jsonl's parts on an object store


def parts_dir(path: str) -> str:
    return path + ".parts"


def _chunk_of(row: dict[str, Any]) -> int:
    step = row.get("step")
    return max(int(step) - 1, 0) // METRICS_CHUNK if isinstance(step, int) else 0


def _chunk_uri(path: str, chunk: int) -> str:
    return storage.join(parts_dir(path), f"{chunk:08d}.jsonl")


def _read_or_empty(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return b""


class MetricsWriter:
    """Appends to one metrics.jsonl. Locally one write per line. On an object store the current chunk's object is
    rewritten whole from memory (one put per step, at most `METRICS_CHUNK` lines; nothing read back after the first
    touch, so a false "not found" cannot shorten the history). A failed write logs a warning and stays pending: the
    next append writes it again with its own line."""

    def __init__(self, path: str, retries: int = 3, wait_s: float = 0.2) -> None:
        self.path, self.retries, self.wait_s = path, retries, wait_s
        self.remote = storage.is_remote(path)
        self.pending = b""  # local lines not yet written
        self.chunks: dict[int, bytes] = {}  # object store: the content of the chunks this writer touched
        self.dirty: set[int] = set()

    def append(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row) + "\n").encode()
        if self.remote:
            c = _chunk_of(row)
            if c not in self.chunks:
                old = _read_or_empty(_chunk_uri(self.path, c))
                self.chunks[c] = old if not old or old.endswith(b"\n") else old + b"\n"
            self.chunks[c] += line
            self.dirty.add(c)
        else:
            self.pending += line
        self.flush(tries=self.retries)

    def flush(self, tries: int, strict: bool = False) -> None:
        for attempt in range(tries):
            try:
                self._write()
                return
            except OSError as e:
                error = e
                if attempt + 1 < tries:
                    time.sleep(self.wait_s * 2**attempt)
        logger.warning("metrics.jsonl: could not write %s (%s); the rows stay pending for the next step", self.path,
                       error)  # fmt: skip
        if strict:
            raise error

    def _write(self) -> None:
        if not self.remote:
            if self.pending:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                with open(self.path, "ab") as f:
                    f.write(self.pending)
                self.pending = b""
            return
        for c in sorted(self.dirty):
            storage.atomic_write(_chunk_uri(self.path, c), self.chunks[c])
            self.dirty.discard(c)
        newest = max(self.chunks, default=0)
        for c in [c for c in self.chunks if c < newest and c not in self.dirty]:
            del self.chunks[c]  # a finished chunk is not written again


class MetricsReader:
    """metrics.jsonl's rows, read incrementally: locally from the byte offset reached (a replaced or shortened
    file is read again); on an object store one listing of the parts and only the objects whose size changed,
    plus the sealed file when its size changed. Torn lines are skipped until they are whole."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[str, tuple[Any, list[dict[str, Any]]]] = {}  # object -> (its size or identity, its rows)
        self.offset, self.ident, self.local_rows = 0, None, []

    def rows(self) -> list[dict[str, Any]]:
        """The rows in step order, the last record of each step."""
        try:
            ordered = self._poll_local() if not storage.is_remote(self.path) else self._poll_remote()
        except OSError:  # being replaced, or the store did not answer: what was read so far
            ordered = self._merged()
        by_step = {r.get("step"): r for r in ordered}
        return [by_step[k] for k in sorted(by_step, key=lambda s: (s is None, s))]

    def _merged(self) -> list[dict[str, Any]]:
        if not storage.is_remote(self.path):
            return list(self.local_rows)
        return [r for name in sorted(self.seen, key=lambda n: (n != self.path, n)) for r in self.seen[name][1]]

    def _poll_local(self) -> list[dict[str, Any]]:
        path = storage.filesystem_for(self.path)[1]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.offset, self.ident, self.local_rows = 0, None, []
            return []
        if (st.st_dev, st.st_ino) != self.ident or st.st_size < self.offset:
            self.offset, self.ident, self.local_rows = 0, (st.st_dev, st.st_ino), []
        if st.st_size > self.offset:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read(st.st_size - self.offset)
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for its newline
            self.offset += len(whole)
            self.local_rows += _parse(whole)
        return list(self.local_rows)

    def _poll_remote(self) -> list[dict[str, Any]]:
        import pyarrow.fs as pafs

        fs, base = storage.filesystem_for(parts_dir(self.path))
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        current = {storage.as_uri(self.path, i.path): i.size for i in infos if i.type == pafs.FileType.File}
        sealed = fs.get_file_info(storage.filesystem_for(self.path)[1])
        if sealed.type == pafs.FileType.File:
            current[self.path] = sealed.size
        for name in [n for n in self.seen if n not in current]:
            del self.seen[name]
        for name, size in current.items():
            if name not in self.seen or self.seen[name][0] != size:
                self.seen[name] = (size, _parse(_read_or_empty(name)))
        return self._merged()


def _parse(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in data.decode(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn line: a run killed mid-write
            continue
    return rows


def append_jsonl(path: str, row: dict[str, Any]) -> None:
    """Append one JSON line (a `MetricsWriter` of one append: a failed write raises after its retries)."""
    writer = MetricsWriter(path)
    writer.append(row)
    if writer.pending or writer.dirty:
        writer.flush(tries=1, strict=True)


def truncate_jsonl(path: str, keep_through: int) -> None:
    """Keep the lines whose `step` is at most `keep_through` (torn lines dropped), atomically per object: the
    sealed file, and on an object store the parts (later chunks deleted, the boundary chunk rewritten)."""
    if storage.is_file(path):
        kept = [r for r in _parse(storage.read_bytes(path)) if r.get("step", 0) <= keep_through]
        storage.atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    if not storage.is_remote(path):
        return
    fs, files = storage.list_files(parts_dir(path), ".jsonl", recursive=False)
    boundary = _chunk_of({"step": max(keep_through, 1)})
    for f in files:
        uri = storage.as_uri(path, f)
        chunk = int(f.rsplit("/", 1)[-1].split(".")[0])
        if chunk > boundary:
            fs.delete_file(f)
        elif chunk == boundary:
            kept = [r for r in _parse(storage.read_bytes(uri)) if r.get("step", 0) <= keep_through]
            storage.atomic_write(uri, "".join(json.dumps(r) + "\n" for r in kept).encode())


def seal_jsonl(path: str) -> None:
    """An object store's metrics parts merged into the one `metrics.jsonl` (written before the parts go)."""
    if not storage.is_remote(path) or not storage.is_dir(parts_dir(path)):
        return
    rows = MetricsReader(path).rows()
    storage.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    storage.remove_tree(parts_dir(path))


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl in step order, the last record of each step; torn lines are skipped."""
    return MetricsReader(path).rows()


def read_state(checkpoint_dir: str) -> dict[str, Any]:
    """A checkpoint's driver state (`state.json`)."""
    state = storage.read_json(storage.join(checkpoint_dir, STATE))
    if state is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no readable {STATE}")
    return state


def write_state(checkpoint_dir: str, state: dict[str, Any]) -> None:
    storage.write_json(storage.join(checkpoint_dir, STATE), state)
