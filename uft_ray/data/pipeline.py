"""The data plane on Ray Data: source files -> unified rows -> mixture -> tokenized rows in a prepared directory.

`prepare(cfg, out_dir)` writes the layout that `uft_ray.data.prepared` owns (docs/internals.md "Prepared
directory"):

    DIR/rows/*.parquet        schema.TOKENIZED, exactly the mixture's quota of rows per source
    DIR/quarantine/*.parquet  schema.QUARANTINE, every rejected row with reason, source, detail, raw
    DIR/summary.json          see below

How it runs (every pass is a streaming Ray Data job; the driver holds counts and, per source, one 8-byte rank
per tokenized row, never the rows):

1. *Normalize pass.* One read task per file (or per run of parquet row groups): read, normalize, write the
   quarantine records of that part (file names fixed by the part, so a retried task rewrites the same file),
   return one count row per part. This is the only pass that quarantines normalization failures, so each bad
   row is reported exactly once, and it tells each source's number of valid unified rows N.
2. *Band passes.* For each source still short of its quota, read and normalize again (cheap) but keep only
   rows whose seeded rank falls in the next band (`mixture.next_band_end`, about quota / N of the source),
   tokenize those, and stage them under DIR/_work. Usually one pass; a second one when more rows than
   expected were too long. Only the band is ever tokenized, not the whole source. A file that breaks part way
   in a band pass (and not, or elsewhere, in the normalize pass) is quarantined as `unreadable_file`, so a
   sample that differs from a clean prepare says why in the summary.
3. *Select pass.* From the staged rows keep, per source, the quota smallest ranks (`mixture.plan_take`),
   copies for upsampling, and write DIR/rows. Too-long rows (and duplicate row ids) that the seeded walk
   reached before the quota filled go to quarantine here. The staged files, `tokenize_block` that writes them
   and `select_block` that reads them: `uft_ray.data.staged`.

summary.json: `sources.{name}`: format, kind, path, files, rows_read (raw rows), rows_normalized (unified rows,
after unfolding and pairing), rows_tokenized (rows the band passes tokenized), quota, rows_out, quarantined,
dropped_for_length, upsampled (copies `#k`), quarantine {reason: n}; `quarantine` {reason: n} over all sources;
`mixture.{name}`: target / realized (fractions of all rows) and target_rows / realized_rows; rows_out; seed;
passes (read passes over the sources: 1 normalize + the band passes); tokenizer; tokenize; reference (null,
filled by the reference stage); seconds.

See `uft_ray.data.mixture` for why ranks (not Ray's execution order) decide the sample.
On a multi-node cluster DIR must be shared storage (a URI or a shared mount), as workers write into it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data import Dataset
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from uft_ray import schema, storage
from uft_ray.config import Config, SourceConfig
from uft_ray.data import mixture
from uft_ray.data import prepared as prep
from uft_ray.data import quarantine as q
from uft_ray.data.mixture import RANK_SPACE, MixtureError, Take
from uft_ray.data.normalize import Normalizer, Outcome
from uft_ray.data.quarantine import Quarantined
from uft_ray.data.sources import FilePart, SourceError, iter_records, plan_parts
from uft_ray.data.staged import StagedDatasource, count_rows, keepers, staged_ranks, tokenize_block
from uft_ray.data.tokenize import TokenizerError, encoder_key, load_tokenizer
from uft_ray.ray_utils import init_ray
from uft_ray.storage import StorageError, filesystem_for, is_remote

log = logging.getLogger(__name__)

BLOCK_ROWS = 1024  # unified rows per block out of a read task
TOKENIZE_BATCH = 256
QUARANTINE_FLUSH = 5000  # records a read task buffers before writing a quarantine file

# Unified rows as read: + their seeded rank and where they came from ("relpath:position").
READ_SCHEMA = pa.schema([*schema.UNIFIED, ("_rank", pa.uint64()), ("_origin", pa.string())])
STATS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("part", pa.int64()),
        ("rows_read", pa.int64()),
        ("normalized", pa.int64()),
        ("quarantined", pa.int64()),
    ]
)


# ---------------------------------------------------------------------------------------------------------
# Reading: one Ray read task per file part


def _where(part: FilePart, pos: int) -> str:
    return f"{part.uri}:{pos}" if part.file_type == "jsonl" else f"{part.uri}[row {pos}]"


def iter_part(src: SourceConfig, part: FilePart) -> Iterator[tuple[list[Outcome], int]]:
    """Normalize one file part, in file order: per raw record, (its outcomes, 1 if it counts as a row read).

    Pure Python: what a read task runs. A HelpSteer2 pair half waits for its partner (no outcome yet); the
    last item holds what the normalizer still had at the end of the part.
    """
    norm = Normalizer(src)
    for rec in iter_records(part):
        yield norm.add(rec, part.relpath, _where(part, rec.pos)), int(rec.kind != q.UNREADABLE_FILE)
    yield norm.finish(), 0


def read_part(
    src: SourceConfig, index: int, part: FilePart, seed: int, mode: str, band: tuple[int, int], qdir: str | None
) -> Iterator[pa.Table]:
    lo, hi = band
    rows: list[dict[str, Any]] = []
    bad: list[Quarantined] = []
    n_read = n_ok = n_bad = seq = 0
    for outs, counted in iter_part(src, part):
        n_read += counted
        for out in outs:
            if isinstance(out, Quarantined):
                n_bad += 1
                if out.reason == q.UNREADABLE_FILE and qdir is not None:
                    # in every pass, not only the normalize pass (a band pass reading less than it would change
                    # the sample silently); named by the failure, so a pass breaking the same way rewrites it
                    q.write_records(qdir, q.file_name("unreadable", src.name, index, out.detail), [out])
                elif mode == "stats" and qdir is not None:
                    bad.append(out)
                continue
            n_ok += 1
            if mode == "rows":
                r = mixture.rank(seed, out["row_id"])
                if lo <= r < hi:
                    out["_rank"] = r
                    rows.append(out)
        if len(bad) >= QUARANTINE_FLUSH:
            q.write_records(qdir, q.file_name("normalize", src.name, index, seq), bad)  # type: ignore[arg-type]
            bad, seq = [], seq + 1
        if len(rows) >= BLOCK_ROWS:
            yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
    if mode == "stats":
        if bad and qdir is not None:
            q.write_records(qdir, q.file_name("normalize", src.name, index, seq), bad)
        yield pa.Table.from_pylist(
            [{"source": src.name, "part": index, "rows_read": n_read, "normalized": n_ok, "quarantined": n_bad}],
            schema=STATS_SCHEMA,
        )


class SourceFilesDatasource(Datasource):
    """Ray Data datasource over the file parts of one or more sources: one read task per part.

    mode "stats": normalize, write quarantine, yield one count row per part.
    mode "rows": yield unified rows (READ_SCHEMA) whose rank is in their source's band; a file that breaks part way
    is quarantined here too (`unreadable_file`).
    """

    def __init__(
        self,
        parts: list[tuple[SourceConfig, int, FilePart]],
        *,
        seed: int,
        mode: str,
        bands: dict[str, tuple[int, int]] | None = None,
        quarantine_dir: str | None = None,
    ):
        super().__init__()
        self.parts, self.seed, self.mode = parts, seed, mode
        self.bands = bands or {}
        self.quarantine_dir = quarantine_dir

    def get_name(self) -> str:
        return f"UftSources[{self.mode}]"

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [p.size_bytes for _, _, p in self.parts]
        return None if any(s is None for s in sizes) else int(sum(sizes))  # type: ignore[arg-type]

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None):
        tasks = []
        for src, index, part in self.parts:
            band = self.bands.get(src.name, (0, RANK_SPACE))
            fn = functools.partial(read_part, src, index, part, self.seed, self.mode, band, self.quarantine_dir)
            meta = BlockMetadata(num_rows=None, size_bytes=part.size_bytes, exec_stats=None, input_files=(part.uri,))
            tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def to_dataset(datasource: SourceFilesDatasource | StagedDatasource) -> Dataset:
    # one block stream per read task: without this, Ray splits a few tasks' output into ~100 tiny blocks
    # (and the writes after them into ~100 tiny files)
    n = len(datasource.parts if isinstance(datasource, SourceFilesDatasource) else datasource.files)
    return ray.data.read_datasource(datasource, override_num_blocks=max(1, n))


def source_parts(sources: list[SourceConfig]) -> list[tuple[SourceConfig, int, FilePart]]:
    out = []
    for src in sources:
        # HelpSteer2 pairs are consecutive rows: never cut such a file between read tasks
        split = not (src.format == "helpsteer2" and src.resolved_kind in ("binary", "pair"))
        for i, part in enumerate(plan_parts(src.path, split_parquet=split)):
            out.append((src, i, part))
    return out


def read_source(src: SourceConfig, *, seed: int = 0) -> Dataset:
    """A lazy Ray Dataset of one source's unified rows (schema.UNIFIED); malformed rows are skipped.

    For exploration and other stages; `prepare` is the path that quarantines and samples.
    """
    parts = source_parts([src])
    ds = to_dataset(SourceFilesDatasource(parts, seed=seed, mode="rows"))
    return ds.select_columns(schema.UNIFIED.names)


# ---------------------------------------------------------------------------------------------------------
# The driver side


def _unwrap(e: BaseException) -> BaseException | None:
    """The data-plane error inside a Ray task failure (Ray wraps user exceptions once or twice)."""
    seen = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (SourceError, StorageError, TokenizerError, MixtureError)):
            return cur
        for nxt in (cur.__cause__, cur.__context__, getattr(cur, "cause", None)):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return None


def _execute(what: str, fn: Any) -> Any:
    """Run one Ray Data job; a data-plane error raised in a task comes back as itself, not wrapped by Ray."""
    t0 = time.time()
    try:
        out = fn()
        log.info("%s pass: %.1fs", what, time.time() - t0)
        return out
    except Exception as e:
        inner = _unwrap(e)
        if inner is not None and inner is not e:
            raise type(inner)(str(inner)) from e
        if isinstance(e, ray.exceptions.RayError):
            # Ray's text holds the worker traceback; keep the first line that names our error
            for line in str(e).splitlines():
                for cls in (SourceError, StorageError, TokenizerError, MixtureError):
                    if line.startswith(f"{cls.__module__}.{cls.__name__}: ") or line.startswith(f"{cls.__name__}: "):
                        raise cls(line.split(": ", 1)[1]) from e
        raise


def prepare(cfg: Config, out_dir: str) -> dict[str, Any]:
    """Run the data plane for `cfg` into `out_dir` (replacing its rows/, quarantine/ and summary.json).

    Returns the summary (also written to DIR/summary.json, last). Raises `SourceError` for a file that cannot
    be read at all, `TokenizerError` for an unusable tokenizer, `MixtureError` for a source smaller than its
    quota (without `mixture.allow_upsample`). The passes of the module docstring, in order.
    """
    t0 = time.time()
    if not is_remote(out_dir):  # Ray's workers may run in another working directory
        out_dir = os.path.abspath(os.path.expanduser(out_dir))
    load_tokenizer(cfg.model)  # fail before any cluster work when the tokenizer cannot render chats
    quota = mixture.quotas(cfg.mixture, [s.name for s in cfg.data.sources])
    active = [s for s in cfg.data.sources if quota[s.name] > 0]
    parts = source_parts(active)  # lists files and reads parquet footers: bad paths fail here, named
    if not ray.is_initialized():
        init_ray(cfg.ray)
    prep.reset(out_dir)
    qdir = prep.quarantine_dir(out_dir)

    counts = _normalize_pass(cfg, parts, active, quota, qdir)  # 1.
    bands = _band_passes(cfg, parts, active, quota, counts["normalized"], prep.work_dir(out_dir), qdir)  # 2.
    _select_pass(out_dir, bands, qdir)  # 3.
    summary = _summary(cfg, out_dir, parts, quota, counts, bands, seconds=time.time() - t0)
    for s in bands.takes:
        out = summary["sources"][s]["rows_out"]
        # an invariant of select_block: the quota exactly (at most the quota for a capped held-out split)
        if (out > quota[s]) if cfg.mixture.at_most else (out != quota[s]):  # pragma: no cover
            raise RuntimeError(
                f"source {s!r}: wrote {summary['sources'][s]['rows_out']} rows for a quota of {quota[s]}"
            )
    prep.write_summary(out_dir, summary)
    fs, base = filesystem_for(prep.work_dir(out_dir))
    if fs.get_file_info(base).type == pafs.FileType.Directory:
        fs.delete_dir(base)
    return summary


def _normalize_pass(
    cfg: Config, parts: list[tuple[SourceConfig, int, FilePart]], active: list[SourceConfig], quota: dict, qdir: str
) -> dict[str, Counter[str]]:
    """Normalize everything once: quarantine and counts. A source with fewer valid rows than its quota fails here."""
    stats_ds = to_dataset(SourceFilesDatasource(parts, seed=cfg.data.seed, mode="stats", quarantine_dir=qdir))
    stats = _execute("normalize", stats_ds.take_all)
    counts: dict[str, Counter[str]] = {"rows_read": Counter(), "normalized": Counter()}
    for st in stats:
        counts["rows_read"][st["source"]] += st["rows_read"]
        counts["normalized"][st["source"]] += st["normalized"]
    for s in active:
        n = counts["normalized"][s.name]
        if n < quota[s.name] and not (cfg.mixture.allow_upsample or cfg.mixture.at_most):
            stage = "(after normalization; tokenization can only drop more)"
            raise MixtureError(mixture.shortfall_message(s.name, n, quota[s.name], stage=stage))
    return counts


class _Bands:
    """What the band passes found: per source the take (quota cutoff), the staged ranks, tokenized counts."""

    def __init__(self, active: list[SourceConfig]) -> None:
        self.ranks: dict[str, list[np.ndarray]] = {s.name: [] for s in active}
        self.tokenized: Counter[str] = Counter()
        self.takes: dict[str, Take] = {}
        self.stage_dirs: list[str] = []


def _band_passes(
    cfg: Config,
    parts: list[tuple[SourceConfig, int, FilePart]],
    active: list[SourceConfig],
    quota: dict[str, int],
    normalized: Counter[str],
    work: str,
    qdir: str,
) -> _Bands:
    """Tokenize bands of the seeded order, staged under `work`, until every source's quota is met."""
    m_key, t_key = encoder_key(cfg.model, cfg.tokenize)
    found = _Bands(active)
    ends = {s.name: 0 for s in active}
    pending = [s.name for s in active]
    while pending:
        bands = {
            s: (ends[s], mixture.next_band_end(ends[s], normalized[s], _found(found, s), quota[s])) for s in pending
        }
        stage = storage.join(work, f"pass{len(found.stage_dirs)}")
        band_parts = [p for p in parts if p[0].name in bands]
        ds = to_dataset(
            SourceFilesDatasource(band_parts, seed=cfg.data.seed, mode="rows", bands=bands, quarantine_dir=qdir)
        )
        ds = ds.map_batches(
            tokenize_block,
            fn_kwargs={"model_key": m_key, "tokenize_key": t_key},
            batch_size=TOKENIZE_BATCH,
            batch_format="pyarrow",
        )
        _execute("tokenize", functools.partial(ds.write_parquet, stage))
        found.stage_dirs.append(stage)
        new_ranks, staged = staged_ranks(stage)
        found.tokenized.update(staged)
        for s in list(pending):
            ends[s] = bands[s][1]
            if s in new_ranks:
                found.ranks[s].append(new_ranks[s])
            take = mixture.plan_take(
                s,
                _unique(found, s),
                quota[s],
                complete=ends[s] >= RANK_SPACE,
                allow_upsample=cfg.mixture.allow_upsample,
                at_most=cfg.mixture.at_most,
            )
            if take is not None:
                found.takes[s] = take
                pending.remove(s)
        log.info("band pass %d: found %s of %s", len(found.stage_dirs), {s: _found(found, s) for s in ends}, quota)
    return found


def _unique(found: _Bands, source: str) -> np.ndarray:
    ranks = found.ranks[source]
    return np.unique(np.concatenate(ranks)) if ranks else np.zeros(0, np.uint64)


def _found(found: _Bands, source: str) -> int:
    return len(_unique(found, source))


def _select_pass(out_dir: str, found: _Bands, qdir: str) -> None:
    """The quota smallest ranks per source (+ copies) into DIR/rows; too-long rows and duplicate row ids the
    seeded walk reached go to quarantine (a duplicate: the same rank staged twice, the first in file order kept)."""
    dups = {}
    for s in found.takes:
        all_ranks = np.concatenate(found.ranks[s]) if found.ranks[s] else np.zeros(0, np.uint64)
        vals, counts = np.unique(all_ranks, return_counts=True)
        dups[s] = vals[counts > 1]
    keep = keepers(found.stage_dirs, dups)
    take_args = {s: (t.cutoff, t.base, t.extra_cutoff) for s, t in found.takes.items()}
    staged_files = [storage.as_uri(out_dir, f) for d in found.stage_dirs for f in prep.parquet_files(d)[1]]
    if staged_files:
        sel = to_dataset(StagedDatasource(staged_files, take_args, keep, qdir))
        _execute("select", functools.partial(sel.write_parquet, prep.rows_dir(out_dir)))


def _summary(
    cfg: Config,
    out_dir: str,
    parts: list[tuple[SourceConfig, int, FilePart]],
    quota: dict[str, int],
    counts: dict[str, Counter[str]],
    found: _Bands,
    *,
    seconds: float,
) -> dict[str, Any]:
    """summary.json (the fields of the module docstring), from what is on disk."""
    rows_out, upsampled = count_rows(prep.rows_dir(out_dir))
    qcounts = q.count_reasons(prep.quarantine_dir(out_dir))
    total_q = sum(quota.values())
    total_out = sum(rows_out.values())
    summary: dict[str, Any] = {"sources": {}, "quarantine": {}, "mixture": {}}
    by_reason: Counter[str] = Counter()
    for src in cfg.data.sources:
        s = src.name
        qc = qcounts.get(s, Counter())
        by_reason.update(qc)
        summary["sources"][s] = {
            "format": src.format,
            "kind": src.resolved_kind,
            "path": src.path,
            "files": len({p.uri for x, _, p in parts if x.name == s}),
            "rows_read": counts["rows_read"][s],
            "rows_normalized": counts["normalized"][s],
            "rows_tokenized": found.tokenized[s],
            "quota": quota[s],
            "rows_out": rows_out[s],
            "quarantined": sum(qc.values()),
            "dropped_for_length": qc.get(q.TOO_LONG, 0),
            "upsampled": upsampled[s],
            "quarantine": dict(sorted(qc.items())),
        }
        summary["mixture"][s] = {
            "target": quota[s] / total_q if total_q else 0.0,
            "realized": rows_out[s] / total_out if total_out else 0.0,
            "target_rows": quota[s],
            "realized_rows": rows_out[s],
        }
    summary["quarantine"] = dict(sorted(by_reason.items()))
    summary["rows_out"] = total_out
    summary["seed"] = cfg.data.seed
    summary["passes"] = 1 + len(found.stage_dirs)
    summary["tokenizer"] = cfg.model.path
    summary["tokenize"] = {
        "max_prompt_len": cfg.tokenize.max_prompt_len,
        "max_len": cfg.tokenize.max_len,
        "overflow": cfg.tokenize.overflow,
    }
    summary["reference"] = None
    summary["seconds"] = round(seconds, 2)
    return summary
