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
  with one `unreadable_file` record saying where it stopped.

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


class SourceError(StorageError):
    """A source or one of its files cannot be read at all. The message names the file."""


@dataclass(frozen=True)
class RawRecord:
    """One row as read. `value` is the parsed row (None when `error` is set); `text` the raw line for jsonl."""

    pos: int  # 1-based line (jsonl) or 0-based row index (parquet)
    value: Any = None
    text: str | None = None
    error: str | None = None  # set: the row is unusable (`kind` says why)
    kind: str = "ok"  # ok | json_parse_error | unreadable_file

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


def iter_jsonl(uri: str, compression: str | None = None) -> Iterator[RawRecord]:
    """JSON lines, parsed one at a time: a bad line is a record with an error, not the end of the file.

    Blank lines are skipped. Streams: memory is one read chunk, whatever the file size.
    """
    fs, p = filesystem_for(uri)
    try:
        stream = fs.open_input_stream(p, compression=compression)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot open {uri}: {e}") from e
    line_no = 0
    buf = b""
    with stream:
        while True:
            try:
                chunk = stream.read(_READ_CHUNK)
            except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
                if line_no == 0:
                    raise SourceError(f"cannot read {uri}: {e}") from e
                # a file that breaks part way keeps what was read before the break
                yield RawRecord(
                    line_no + 1, error=f"{uri}: read failed after line {line_no}: {e}", kind="unreadable_file"
                )
                return
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line_no += 1
                rec = _parse_line(line, line_no)
                if rec is not None:
                    yield rec
        if buf:
            line_no += 1
            rec = _parse_line(buf, line_no)
            if rec is not None:
                yield rec


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
        return RawRecord(line_no, json.loads(text), text)
    except ValueError as e:
        return RawRecord(line_no, text=text, error=f"invalid JSON: {e}", kind="json_parse_error")


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
            for row in batch.to_pylist():
                yield RawRecord(pos, row)
                pos += 1
