"""Quarantine: every row the data plane rejects, with its reason, source, detail and raw content.

A bad row never crashes a run and is never silently lost: it becomes a `Quarantined` record in
`DIR/quarantine/*.parquet` (schema.QUARANTINE), and `summary.json` counts them per reason.

Records are written from inside Ray tasks. Ray may run a task twice (a retried task, a lost worker), so every
file name is a function of the work it holds (`file_name`): a rerun overwrites the same file with the same
rows instead of adding a second copy. Files are written whole through `uft_ray.storage.atomic_write`, so a
reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uft_ray import schema, storage

# docs/internals.md "Quarantine reasons"; `no_pair` and `duplicate` are this module's additions.
JSON_PARSE_ERROR = "json_parse_error"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
ROLES_NOT_ALTERNATING = "roles_not_alternating"
EMPTY_RESPONSE = "empty_response"
EMPTY_PROMPT = "empty_prompt"
RATING_OUT_OF_RANGE = "rating_out_of_range"
BAD_ROLE = "bad_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
TOO_LONG = "too_long"
TIE = "tie"
ZERO_PREFERENCE = "zero_preference"
UNREADABLE_FILE = "unreadable_file"
NO_PAIR = "no_pair"  # a HelpSteer2 binary/pair row whose partner response is missing or malformed
DUPLICATE = "duplicate"  # a second row with the same row_id (same prompt_id twice): the first one is kept
INVALID_TEXT = "invalid_text"  # a string that is not Unicode text: invalid UTF-8 bytes, a lone UTF-16 surrogate

REASONS = (
    JSON_PARSE_ERROR,
    MISSING_FIELD,
    WRONG_TYPE,
    ROLES_NOT_ALTERNATING,
    EMPTY_RESPONSE,
    EMPTY_PROMPT,
    RATING_OUT_OF_RANGE,
    BAD_ROLE,
    NO_ASSISTANT_TURN,
    TOO_LONG,
    TIE,
    ZERO_PREFERENCE,
    UNREADABLE_FILE,
    NO_PAIR,
    DUPLICATE,
    INVALID_TEXT,
)


class Reject(Exception):
    """Raised by a per-row function: this row is quarantined for `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Quarantined:
    """One rejected row, as written to DIR/quarantine."""

    reason: str
    source: str
    detail: str
    raw: str


def _text(s: str) -> str:
    """`s` as valid UTF-8 for Arrow: a lone surrogate (from a file name or a hostile row) becomes its escape."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def to_table(records: Iterable[Quarantined]) -> pa.Table:
    records = list(records)
    return pa.table(
        {
            "reason": pa.array([r.reason for r in records], pa.string()),
            "source": pa.array([_text(r.source) for r in records], pa.string()),
            "detail": pa.array([_text(r.detail) for r in records], pa.string()),
            "raw": pa.array([_text(r.raw) for r in records], pa.string()),
        },
        schema=schema.QUARANTINE,
    )


def file_name(stage: str, *key: object) -> str:
    """A deterministic file name for the records of one unit of work (stage + what the work was)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(k) for k in key[:1]))[:40]
    digest = hashlib.sha1("\x1f".join(map(str, (stage, *key))).encode()).hexdigest()[:16]
    return f"{stage}-{readable}-{digest}.parquet"


def write_records(qdir: str, name: str, records: list[Quarantined]) -> str | None:
    """Write `records` to `qdir/name` (idempotent: the same name always holds the same rows). None if empty."""
    if not records:
        return None
    table = to_table(records)
    path = storage.join(qdir, name)
    storage.atomic_write(path, lambda out: pq.write_table(table, out))
    return path


def _files(qdir: str) -> tuple[pafs.FileSystem, list[str]]:
    return storage.list_files(qdir, ".parquet", recursive=False)


def count_reasons(qdir: str) -> dict[str, Counter[str]]:
    """{source: Counter(reason)} over every quarantine file, streamed (two columns, batch by batch)."""
    fs, files = _files(qdir)
    counts: dict[str, Counter[str]] = {}
    if not files:
        return counts
    ds = pads.dataset(files, schema=schema.QUARANTINE, filesystem=fs, format="parquet")
    for batch in ds.to_batches(columns=["source", "reason"]):
        for source, reason in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            counts.setdefault(source, Counter())[reason] += 1
    return counts


def read_quarantine(qdir: str) -> pa.Table:
    """Every quarantine record (for tests and inspection; quarantine is small)."""
    fs, files = _files(qdir)
    if not files:
        return schema.QUARANTINE.empty_table()
    return pads.dataset(files, schema=schema.QUARANTINE, filesystem=fs, format="parquet").to_table()
