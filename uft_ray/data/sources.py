"""Finding and reading source files: paths, globs, and one raw-record reader per file type.

A source `path` (config `data.sources[i].path`) is a file, a directory (every data file under it, recursively,
skipping hidden and `_`-prefixed names), a glob (`*`, `?`, `[..]`, `**`), or any of those behind a URI. Local
paths and `s3://` / `gs://` URIs go through pyarrow's native filesystems; every other scheme (`hf://`, `az://`,
`http(s)://`, ...) through fsspec, wrapped as a pyarrow filesystem so that the readers see one interface
(uft_ray.storage owns the filesystems).
Remote filesystems need their fsspec package (`pip install uft-ray[cloud]`: s3fs, gcsfs, huggingface_hub).

The readers yield `RawRecord`s in file order and never interpret a row: that is `normalize`'s job. The one
decision taken here is what counts as unreadable:
- a file that cannot be opened or parsed at all (missing, not parquet, not gzip) raises `SourceError` naming it;
- a JSON line that does not parse is a record with `error` set (quarantined as `json_parse_error`), so one bad
  line costs one row;
- a compressed file that breaks part way (truncated download) keeps the rows read before the break and ends
  with one `unreadable_file` record saying where it stopped;
- a record larger than `MAX_RECORD_BYTES` (a minified JSON array on one line) is a `too_long` record holding only
  the line's first bytes: reading stays linear in the file and memory stays at one record;
- JSON nested deeper than `MAX_NESTING` levels is a `json_parse_error` record; a string that is not Unicode text
  (a lone UTF-16 surrogate escape such as `"\\ud800"` in JSON, invalid UTF-8 in a parquet string column) makes an
  `invalid_text` record. So no value that reaches the normalizer can break Arrow, JSON or recursion later.

Every file is read whole by one task (parquet files may be split by row groups, see `plan_parts`), in order:
that is what keeps HelpSteer2's consecutive response pairs together and gives every row a stable position.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import posixpath
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uft_ray.storage import StorageError, as_uri, filesystem_for, is_remote

# file type by suffix (after removing a compression suffix)
_TYPES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".lz4": "lz4"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_READ_CHUNK = 1 << 16  # small enough that a file breaking part way keeps nearly every line before the break
MAX_RECORD_BYTES = 16 << 20  # one JSON line (one row) at most 16 MiB; a longer line is quarantined as too_long
MAX_NESTING = 100  # JSON arrays/objects nested deeper than this are refused (rows nest 3-4 levels)
_RAW_PREFIX = 4096  # what a too_long record keeps of its line, for the quarantine file


class SourceError(StorageError):
    """A source or one of its files cannot be read at all. The message names the file."""


@dataclass(frozen=True)
class RawRecord:
    """One row as read. `value` is the parsed row (None when `error` is set); `text` the raw line for jsonl."""

    pos: int  # 1-based line (jsonl) or 0-based row index (parquet)
    value: Any = None
    text: str | None = None
    error: str | None = None  # set: the row is unusable (`kind` says why)
    kind: str = "ok"  # ok | json_parse_error | unreadable_file | too_long | invalid_text (quarantine reasons)

    def raw(self) -> str:
        """The row as JSON text, for quarantine."""
        if self.text is not None:
            return self.text
        if self.value is None:
            return ""
        return json.dumps(self.value, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class FilePart:
    """A unit of reading: a whole file, or a range of a parquet file's row groups."""

    uri: str  # what `filesystem_for` resolves: a local absolute path or a URI
    relpath: str  # path relative to the source's root: the position part of stable row ids
    file_type: str  # parquet | jsonl
    compression: str | None = None
    row_groups: tuple[int, ...] | None = None  # parquet: None = every row group
    first_row: int = 0  # parquet: index in the file of the first row of `row_groups`
    num_rows: int | None = None  # parquet: rows in this part (from the footer)
    size_bytes: int | None = None

    @property
    def name(self) -> str:
        return self.relpath if self.row_groups is None else f"{self.relpath}@{self.first_row}"


# ---------------------------------------------------------------------------------------------------------
# Listing


def file_type(path: str) -> tuple[str, str | None] | None:
    """(type, compression) from the file name, or None when it is not a data file uft-ray reads."""
    name = posixpath.basename(path).lower()
    compression = None
    stem, ext = posixpath.splitext(name)
    if ext in _COMPRESSIONS:
        compression = _COMPRESSIONS[ext]
        stem, ext = posixpath.splitext(stem)
    kind = _TYPES.get(ext)
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Shell-glob semantics: `*` and `?` stay within one path segment, `**/` spans any number."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def list_files(path: str) -> tuple[list[str], str]:
    """The data files a source path names, sorted, and the root that relative paths are taken from.

    Raises `SourceError` when the path matches nothing or names a file of an unknown type.
    """
    fs, p = filesystem_for(path)
    remote = is_remote(path)
    if _GLOB_CHARS.search(p):
        base = p[: _GLOB_CHARS.search(p).start()].rsplit("/", 1)[0] or "/"
        if remote:
            regex = _glob_regex(p.lstrip("/"))
            try:
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            except (OSError, pa.ArrowException) as e:
                raise SourceError(f"{path}: cannot list {base}: {e}") from e
            matches = [i.path for i in infos if i.type == pafs.FileType.File and regex.match(i.path.lstrip("/"))]
        else:
            matches = [m for m in _glob.glob(p, recursive=True) if os.path.isfile(m)]
        files = [m for m in matches if file_type(m) is not None]
        if matches and not files:
            raise SourceError(f"{path}: matches only files of unknown type ({_known()})")
        root = base
    else:
        try:
            info = fs.get_file_info(p)
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"{path}: cannot access: {e}") from e
        if info.type == pafs.FileType.File:
            if file_type(p) is None:
                raise SourceError(f"{path}: unknown file type; expected {_known()}")
            files, root = [p], posixpath.dirname(p) if remote else os.path.dirname(p)
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
            root = p
            files = [
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and file_type(i.path) is not None
                and not _hidden(_relative(i.path, root))
            ]
        else:
            raise SourceError(f"{path}: does not exist")
    if not files:
        raise SourceError(f"{path}: no data files ({_known()})")
    return sorted(as_uri(path, f) for f in files), as_uri(path, root)


def _known() -> str:
    return ".parquet, .jsonl, .json, .ndjson (jsonl optionally .gz, .bz2, .zst, .lz4)"


def _relative(path: str, root: str) -> str:
    if "://" in path:
        path, root = path.split("://", 1)[1], root.split("://", 1)[1]
    # filesystems disagree on a leading "/" (fsspec's memory fs adds one): compare without it
    path, root = path.replace(os.sep, "/").lstrip("/"), root.replace(os.sep, "/").lstrip("/")
    return posixpath.relpath(path, root or ".")


def plan_parts(path: str, *, split_parquet: bool = True, rows_per_part: int = 50_000) -> list[FilePart]:
    """List a source's files and cut them into read tasks.

    Parquet footers are read here, on the driver: a corrupt parquet file fails now, naming the file, before any
    cluster work. A parquet file with many row groups is split into parts of about `rows_per_part` rows when
    `split_parquet` (rows of one part never depend on another part's rows).
    """
    files, root = list_files(path)
    parts: list[FilePart] = []
    for uri in files:
        kind, compression = file_type(uri)  # type: ignore[misc]  # list_files kept known types only
        relpath = _relative(uri, root)
        fs, p = filesystem_for(uri)
        if kind != "parquet":
            size = None
            try:
                size = fs.get_file_info(p).size
            except (OSError, pa.ArrowException):
                pass
            parts.append(FilePart(uri, relpath, kind, compression, size_bytes=size))
            continue
        try:
            with fs.open_input_file(p) as f:
                meta = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read parquet file {uri}: {e}") from e
        groups = [
            (g, meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)
        ]
        if not split_parquet or len(groups) <= 1:
            parts.append(FilePart(uri, relpath, kind, None, None, 0, meta.num_rows, sum(g[2] for g in groups)))
            continue
        start, cur, cur_rows, cur_bytes = 0, [], 0, 0
        for g, n, b in groups:
            cur.append(g)
            cur_rows += n
            cur_bytes += b
            if cur_rows >= rows_per_part:
                parts.append(FilePart(uri, relpath, kind, None, tuple(cur), start, cur_rows, cur_bytes))
                start, cur, cur_rows, cur_bytes = start + cur_rows, [], 0, 0
        if cur:
            parts.append(FilePart(uri, relpath, kind, None, tuple(cur), start, cur_rows, cur_bytes))
    return parts


# ---------------------------------------------------------------------------------------------------------
# Readers


def iter_records(part: FilePart) -> Iterator[RawRecord]:
    """The raw records of one part, in file order."""
    if part.file_type == "parquet":
        return iter_parquet(part)
    return iter_jsonl(part.uri, part.compression)


def iter_jsonl(
    uri: str, compression: str | None = None, *, max_record_bytes: int | None = None
) -> Iterator[RawRecord]:
    """JSON lines, parsed one at a time: a bad line is a record with an error, not the end of the file.

    Blank lines are skipped. Streams in linear time: memory is one read chunk plus one record, whatever the file
    size; a line longer than `max_record_bytes` (default `MAX_RECORD_BYTES`) is a `too_long` record keeping only
    its first bytes.
    """
    limit = MAX_RECORD_BYTES if max_record_bytes is None else max_record_bytes
    fs, p = filesystem_for(uri)
    try:
        stream = fs.open_input_stream(p, compression=compression)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot open {uri}: {e}") from e
    line = _Line(limit)
    line_no = 0
    with stream:
        while True:
            try:
                chunk = stream.read(_READ_CHUNK)
            except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
                if line_no == 0 and not line.size:
                    raise SourceError(f"cannot read {uri}: {e}") from e
                # a file that breaks part way keeps what was read before the break
                yield RawRecord(
                    line_no + 1, error=f"{uri}: read failed after line {line_no}: {e}", kind="unreadable_file"
                )
                return
            if not chunk:
                break
            # only the new chunk is searched for newlines: a line spanning many chunks costs its bytes once
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                line.add(chunk, start, end)
                line_no += 1
                rec = line.take(line_no)
                if rec is not None:
                    yield rec
                start = end + 1
            line.add(chunk, start, len(chunk))
        if line.size:
            line_no += 1
            rec = line.take(line_no)
            if rec is not None:
                yield rec


class _Line:
    """The line being read: its pieces while it fits `limit` bytes, only its first bytes once it does not."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes, start: int, end: int) -> None:
        n = end - start
        if n <= 0:
            return
        if self.size + n <= self.limit:
            self.parts.append(chunk[start:end])
        elif self.size <= self.limit:  # the line just went over: keep its head for the quarantine record
            head = b"".join(self.parts)
            head += chunk[start : start + max(0, _RAW_PREFIX - len(head))]
            self.parts = [head[:_RAW_PREFIX]]
        self.size += n

    def take(self, line_no: int) -> RawRecord | None:
        data = b"".join(self.parts)
        size, self.parts, self.size = self.size, [], 0
        if size > self.limit:
            head = data[:_RAW_PREFIX].decode("utf-8", "replace")
            return RawRecord(
                line_no,
                text=head,
                error=f"a line of {size} bytes, over the {self.limit}-byte record limit (MAX_RECORD_BYTES); "
                "uft-ray reads JSON lines, one row per line: a JSON array on one line must be split into lines",
                kind="too_long",
            )
        return _parse_line(data, line_no)


def _parse_line(line: bytes, line_no: int) -> RawRecord | None:
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        return RawRecord(
            line_no, text=line.decode("utf-8", "replace"), error=f"not UTF-8: {e}", kind="json_parse_error"
        )
    try:
        value = json.loads(text)
    except RecursionError:
        return RawRecord(
            line_no, text=text, error=f"JSON nested deeper than {MAX_NESTING} levels", kind="json_parse_error"
        )
    except ValueError as e:
        return RawRecord(line_no, text=text, error=f"invalid JSON: {e}", kind="json_parse_error")
    problem = check_value(value)
    if problem is not None:
        return RawRecord(line_no, text=text, error=problem[1], kind=problem[0])
    return RawRecord(line_no, value, text)


def check_value(value: Any) -> tuple[str, str] | None:
    """(reason, detail) when a parsed JSON value cannot be a row whatever its format: nested deeper than
    `MAX_NESTING`, or a string (key or value) that is not Unicode text (a lone surrogate). Iterative: a value
    nested just below the parser's limit cannot exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and not _is_text(v):
                return "invalid_text", f"a string with a lone UTF-16 surrogate: {_surrogate_context(v)}"
        elif isinstance(v, (list, dict)):
            if depth >= MAX_NESTING:
                return "json_parse_error", f"JSON nested deeper than {MAX_NESTING} levels"
            if isinstance(v, dict):
                for k, x in v.items():
                    stack.append((k, depth))
                    stack.append((x, depth + 1))
            else:
                stack.extend((x, depth + 1) for x in v)
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_context(s: str) -> str:
    i = next(i for i, c in enumerate(s) if "\ud800" <= c <= "\udfff")
    return ascii(s[max(0, i - 20) : i + 20])


def iter_parquet(part: FilePart, batch_rows: int = 1024) -> Iterator[RawRecord]:
    """Rows of a parquet part as dicts, streamed a record batch at a time."""
    fs, p = filesystem_for(part.uri)
    pos = part.first_row
    try:
        f = fs.open_input_file(p)
        pf = pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read parquet file {part.uri}: {e}") from e
    with f:
        batches = pf.iter_batches(batch_size=batch_rows, row_groups=list(part.row_groups) if part.row_groups else None)
        while True:
            try:
                batch = next(batches, None)
            except (OSError, pa.ArrowException) as e:
                if pos == part.first_row:
                    raise SourceError(f"cannot read parquet file {part.uri}: {e}") from e
                yield RawRecord(pos, error=f"{part.uri}: read failed at row {pos}: {e}", kind="unreadable_file")
                return
            if batch is None:
                return
            try:
                rows = batch.to_pylist()
            except (UnicodeDecodeError, pa.ArrowException):  # a string that is not UTF-8: find its row
                rows = None
            for i in range(batch.num_rows):
                yield RawRecord(pos, rows[i]) if rows is not None else _parquet_row(batch, i, pos)
                pos += 1


def _parquet_row(batch: pa.RecordBatch, i: int, pos: int) -> RawRecord:
    """Row `i` of a batch that did not convert as a whole: the row, or an `invalid_text` record whose raw text
    shows the undecodable strings with replacement characters."""
    row: dict[str, Any] = {}
    bad: list[str] = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            row[name] = column[i].as_py()
        except (UnicodeDecodeError, pa.ArrowException) as e:
            bad.append(f"`{name}`: {e}")
            row[name] = _replaced(column.slice(i, 1))
    if not bad:
        return RawRecord(pos, row)
    raw = json.dumps(row, ensure_ascii=False, default=str)
    return RawRecord(pos, text=raw, error=f"not UTF-8 text in {'; '.join(bad)}", kind="invalid_text")


def _replaced(cell: pa.Array) -> Any:
    """A string cell's bytes decoded with replacement characters (other types: a placeholder)."""
    if pa.types.is_string(cell.type) or pa.types.is_large_string(cell.type):
        data = cell.cast(pa.large_binary())[0].as_py()
        return None if data is None else data.decode("utf-8", "replace")
    return f"<{cell.type} with text that is not UTF-8>"
