"""Where files live: local paths and URIs (s3://, gs://, hf://, ...) behind one interface, and whole-file writes
that a reader never sees half done.

Every module that writes a file whole (a summary, a manifest, a report, a state file, a quarantine part) goes
through `atomic_write`: locally the bytes go to a dot-named temporary beside the target, are flushed and
fsynced, then renamed over it, so a crash leaves the old file or the new one. On object stores the bytes are made
in full first (a spooled local temporary), put under a unique dot-named key beside the target and only then copied
to the final name (a server-side copy: the object appears whole or not at all), the temporary deleted: pyarrow
completes an upload when its stream is closed, even by an exception, so writing the final name directly left half
a file there. Listings skip dot files, so temporaries are never read as data.

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
    if not isinstance(fs, pafs.LocalFileSystem):
        _put_whole(fs, head, name, data)
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


_ONE_PUT_BYTES = 4 << 20  # under the smallest multipart part (5 MiB): the stream sends one put at close
_SPOOL_BYTES = 64 << 20  # a writer's output is held in memory up to this size, then in a local temporary file


def _put_whole(fs: pafs.FileSystem, head: str, name: str, data: bytes | Callable[[Any], None]) -> None:
    """`atomic_write` on an object store: nothing reaches the store unless the writer finished; the final name
    only by a copy of a fully uploaded temporary object; bytes small enough for one put go straight there (one
    PutObject: whole or nothing)."""
    if isinstance(data, bytes) and len(data) <= _ONE_PUT_BYTES:
        with fs.open_output_stream(f"{head}/{name}") as out:
            out.write(data)  # buffered in full: the put happens at close
        return
    if isinstance(data, bytes):
        payload: Any = data
    else:
        payload = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        data(payload)  # raises before anything is uploaded
        payload.seek(0)
    tmp = f"{head}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            if isinstance(payload, bytes):
                out.write(payload)
            else:
                shutil.copyfileobj(payload, out, 8 << 20)
        fs.copy_file(tmp, f"{head}/{name}")
    finally:
        if not isinstance(payload, bytes):
            payload.close()
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)


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
    one swapped in (`_swapped_in`); a failure leaves the old tree as it was and removes the partial copy. On object
    stores (no rename) the old tree's completion files (`last`) are deleted first, so that a tree being overwritten
    is never readable as complete while it mixes old and new objects; then every object of the new tree is put,
    the files named in `last` after all the others, and only then are the objects under `dst` that the new tree
    lacks deleted. A failure part way leaves an incomplete tree (no completion file), never a mixed complete one.
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


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), a)


def _unlocked(path: str) -> bool:
    """Whether no live writer holds `path` (`_swapped_in` locks its temporary while it fills it)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def settle(path: str) -> None:
    """Put a local directory replaced by `_swapped_in` back in order after a crash: when `path` is missing and a
    `.{name}.*.old` sibling is there (the process died between its two renames, where the system cannot swap in
    one step), the newest comes back as `path`; then the `.tmp` / `.old` siblings no live writer holds are
    removed."""
    parent, name = os.path.split(path.rstrip(os.sep))
    if not os.path.isdir(parent):
        return
    siblings = [e for e in os.listdir(parent) if re.fullmatch(rf"\.{re.escape(name)}\.[0-9a-f]{{32}}\.(tmp|old)", e)]
    olds = sorted(
        (e for e in siblings if e.endswith(".old")), key=lambda e: os.lstat(os.path.join(parent, e)).st_mtime
    )
    if not os.path.lexists(path) and olds:
        os.rename(os.path.join(parent, olds.pop()), path)
    for e in siblings:
        full = os.path.join(parent, e)
        if os.path.lexists(full) and (e.endswith(".old") or _unlocked(full)):
            _remove(full)


@contextlib.contextmanager
def _swapped_in(path: str) -> Iterator[str]:
    """An empty sibling directory of `path` for the block to fill; swapped in for `path` if the block succeeds.

    The swap is one step where the system allows (`_exchange`): `path` is never missing, even if the process dies
    there. Elsewhere the old tree is renamed aside and the new one in, and `settle` (run before every swap) brings
    the old one back if a crash fell between the two. The temporary is locked while it fills, so a concurrent
    `settle` leaves it alone."""
    import fcntl

    parent, name = os.path.split(path.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    settle(path)
    tag = uuid.uuid4().hex
    tmp, old = os.path.join(parent, f".{name}.{tag}.tmp"), os.path.join(parent, f".{name}.{tag}.old")
    os.mkdir(tmp)  # not mkdtemp: its 0700 mode would become the tree's
    lock = os.open(tmp, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield tmp
        if os.path.lexists(path) and _exchange(tmp, path):
            os.close(lock)
            lock = -1
            _remove(tmp)  # the old tree, now under the temporary's name
            return
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
    finally:
        if lock >= 0:
            os.close(lock)
    _remove(old)


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
    old = {i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File}
    stale = sorted(old - set(new))
    for rel in sorted(old & last):  # from here on the tree says it is incomplete, until the new ones are in
        dst_fs.delete_file(f"{base}/{rel}")

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
