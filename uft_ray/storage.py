"""Where files live: local paths and URIs (s3://, gs://, hf://, ...) behind one interface, and whole-file writes
that a reader never sees half done.

Every module that writes a file whole (a summary, a manifest, a report, a state file, a quarantine part) goes
through `atomic_write`: locally the bytes go to a dot-named temporary beside the target, are flushed and
fsynced, then renamed over it, so a crash leaves the old file or the new one; on object stores a single put is
already atomic. Listings skip dot files, so temporaries are never read as data.

Object stores have no rename and no append. Directories are trees copied whole (`copy_tree`; `local_dir` and
`local_copy` for code that only writes or reads local paths), the new tree written before the old one goes (a
sibling swapped in locally; on object stores new objects put, completion files last, then stale ones deleted);
a directory a reader must trust whole (the reference cache) is published by writing its parts and then a
manifest last (uft_ray.reference.cache); an appended file (metrics.jsonl) is rewritten whole on each append
(uft_ray.run_dir). Endpoint and credentials come from the standard environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ..., or the node's role), never from configs.

Importable without pyarrow's filesystems loaded: they are imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs as pafs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class StorageError(RuntimeError):
    """A path or URI that cannot be opened at all (no filesystem for its scheme). The message names it."""


def is_remote(path: str) -> bool:
    """Whether `path` is a URI for a non-local filesystem (any `scheme://` but `file://`)."""
    return bool(_URI.match(path)) and not path.lower().startswith("file://")


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike (URIs always use '/')."""
    return "/".join([str(base).rstrip("/"), *parts])


@functools.lru_cache(maxsize=32)
def _remote_filesystem(scheme: str, authority: str) -> tuple[pafs.FileSystem, bool]:
    """A filesystem for `scheme://authority/...`; the bool says whether it is fsspec-backed."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    uri = f"{scheme}://{authority}/"
    if scheme in ("s3", "gs", "gcs"):
        try:
            fs, _ = pafs.FileSystem.from_uri(uri)
            return fs, False
        except (pa.ArrowException, ValueError, OSError):
            pass  # pyarrow built without this filesystem: fall back to fsspec
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec is a dependency
        raise StorageError(f"{uri}: no filesystem for {scheme}:// (install fsspec)") from e
    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"{uri}: no filesystem for {scheme}://: {e}; install its fsspec package "
            "(pip install 'uft-ray[cloud]' gives s3fs, gcsfs and huggingface_hub)"
        ) from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), True


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path (`~` expanded, made absolute) or a URI."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    authority = rest.split("/", 1)[0]
    fs, is_fsspec = _remote_filesystem(scheme.lower(), authority)
    if is_fsspec and scheme.lower() in ("http", "https"):
        return fs, uri  # fsspec's http filesystem wants whole URLs
    return fs, rest


def as_uri(original: str, path: str) -> str:
    """A path listed by the filesystem of `original` back as what readers take (URIs keep their scheme)."""
    if not is_remote(original) or "://" in path:
        return path
    return f"{original.split('://', 1)[0].lower()}://{path}"


def list_files(directory: str, suffix: str = "", *, recursive: bool = True) -> tuple[pafs.FileSystem, list[str]]:
    """Files under `directory` ending with `suffix`, sorted by path, dot files (temporaries) left out.

    Returns the filesystem and paths inside it; an absent directory lists nothing.
    """
    import pyarrow.fs as pafs

    fs, base = filesystem_for(directory)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return fs, []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]
    return fs, sorted(f for f in files if not f.rsplit("/", 1)[-1].startswith("."))


def atomic_write(uri: str, data: bytes | Callable[[Any], None]) -> None:
    """Write a whole file so that readers see the old content or the new, never a part.

    `data` is the bytes, or a function that writes into the binary stream it is given (e.g. a parquet writer).
    """
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    head, name = path.rsplit("/", 1) if "/" in path else (".", path)
    fs.create_dir(head, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):  # an object store's put is atomic already
        with fs.open_output_stream(path) as out:
            out.write(data) if isinstance(data, bytes) else data(out)
        return
    tmp = os.path.join(head, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data) if isinstance(data, bytes) else data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(uri: str, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`obj` as a JSON file (one trailing newline), atomically."""
    atomic_write(uri, (json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n").encode())


def read_json(uri: str, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it is absent or unreadable (a torn or foreign file)."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return default
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return default


def exists(uri: str) -> bool:
    """Whether a file or a directory (on object stores: any key under the prefix) is at `uri`."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = filesystem_for(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def remove_tree(uri: str) -> None:
    """Delete the directory (or file) at `uri` and everything under it; nothing there is not an error."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


# Files a reader takes as "the tree is complete" (peft's adapter config, a manifest): put after every other file.
COMPLETION_FILES = ("adapter_config.json", "manifest.json")


def copy_tree(src: str, dst: str, *, last: Sequence[str] = COMPLETION_FILES) -> None:
    """Copy the directory `src` to `dst` (either side local or a URI), replacing what was at `dst`.

    `dst` is never removed before the new tree is written. Locally the copy goes into a dot-named sibling of
    `dst` (same parent: one filesystem, so the renames are atomic), then the old tree is renamed aside, the new
    one renamed in, and the old one removed; a failure leaves the old tree as it was and removes the partial
    copy. On object stores (no rename) every object of the new tree is put first, the top-level files named in
    `last` after all the others (a reader that waits for them sees them only once the rest is there), and only
    then are the objects under `dst` that the new tree lacks deleted; a failure part way deletes nothing (the
    old objects stay, some of them already overwritten by new ones).
    """
    import pyarrow.fs as pafs

    src_fs, src_path = filesystem_for(src)
    dst_fs, dst_path = filesystem_for(dst)
    if not isinstance(dst_fs, pafs.LocalFileSystem):
        _put_tree(src, src_fs, src_path, dst_fs, dst_path, set(last))
        return
    with _swapped_in(dst_path) as tmp:
        if isinstance(src_fs, pafs.LocalFileSystem):
            shutil.copytree(src_path, tmp, dirs_exist_ok=True)
        else:
            pafs.copy_files(src_path, tmp, source_filesystem=src_fs, destination_filesystem=dst_fs)


@contextlib.contextmanager
def _swapped_in(path: str) -> Iterator[str]:
    """An empty sibling directory of `path` for the block to fill; swapped in for `path` if the block succeeds."""
    parent, name = os.path.split(path.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex
    tmp, old = os.path.join(parent, f".{name}.{tag}.tmp"), os.path.join(parent, f".{name}.{tag}.old")
    os.mkdir(tmp)  # not mkdtemp: its 0700 mode would become the tree's
    try:
        yield tmp
        moved = os.path.lexists(path)
        if moved:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if moved:
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(old):
        os.unlink(old)


def _tree_files(uri: str, fs: pafs.FileSystem, path: str) -> list[str]:
    """The files under the directory `path` of `fs`, relative to it; raises if there is no such directory."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{uri}: no directory to copy")
        # os.walk lists a dangling symlink (its copy then fails) where a stat-based listing would skip it
        return sorted(
            os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
            for d, _, names in os.walk(path, followlinks=True)
            for f in names
        )
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no directory to copy")
    base = path.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File)


def _put_tree(
    src: str, src_fs: pafs.FileSystem, src_path: str, dst_fs: pafs.FileSystem, dst_path: str, last: set[str]
) -> None:
    """`copy_tree` onto an object store: put every new object (`last` at the end), then delete the stale ones."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    new = _tree_files(src, src_fs, src_path)
    base = dst_path.rstrip("/")
    infos = dst_fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    stale = sorted({i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File} - set(new))

    def put(rel: str) -> None:
        pafs.copy_files(
            f"{src_path.rstrip('/')}/{rel}", f"{base}/{rel}", source_filesystem=src_fs, destination_filesystem=dst_fs
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, [rel for rel in new if rel not in last]))  # list(): the first failure raises here
    for rel in [rel for rel in new if rel in last]:
        put(rel)
    for rel in stale:
        dst_fs.delete_file(f"{base}/{rel}")


@contextlib.contextmanager
def local_dir(uri: str, *, last: Sequence[str] = COMPLETION_FILES) -> Iterator[str]:
    """An empty local directory to write the tree that belongs at `uri`; when the block ends without error the
    tree replaces what was at `uri` (as `copy_tree` does: a sibling swapped in locally, an upload with `last`
    put last and stale objects then deleted on object stores). On an error `uri` is left as it was.

    For writers that only know local paths (`save_pretrained`, lm_eval's output, matplotlib).
    """
    if not is_remote(uri):
        with _swapped_in(filesystem_for(uri)[1]) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="uft-ray-upload-") as tmp:
        yield tmp
        copy_tree(tmp, uri, last=last)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """The directory at `uri` as a local path for the block: itself when local, else a temporary download."""
    if not is_remote(uri):
        yield filesystem_for(uri)[1]
        return
    with tempfile.TemporaryDirectory(prefix="uft-ray-download-") as tmp:
        copy_tree(uri, tmp)
        yield tmp
