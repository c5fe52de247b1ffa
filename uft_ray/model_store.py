"""Model and adapter directories in object storage, as local directories on this node: `local_model(path)`.

`model.path`, `reference.model_path` and the adapters may be `s3://` / `gs://` prefixes (a directory as
`save_pretrained` writes it). Every process that loads one (the driver's tokenizer, the data plane's tokenize
tasks, each training worker, reference and rollout actor, the eval worker) calls `local_model` first: the first
process on a node downloads the files into `{UFT_RAY_MODEL_CACHE or ~/.cache/uft-ray/models}/{key}/` under a
file lock, the others wait for it and reuse the copy; every node gets its own copy once, not once per process.

A download is checked by size only: each file is streamed into a temporary beside its target, its byte count
must equal the listing's size, and only then is it renamed into place. The bucket's own checksums are not
compared (pyarrow's listings carry none, and an S3 ETag is an MD5 only for single-part uploads): the sha256
computed while streaming is of the bytes received, kept to check the local copy later, not the download.
Each file is recorded in `.uft-ray-files.json` (remote size and modification time, local sha256 and mtime). A
later call downloads again what changed in the bucket (size or mtime) and a local file whose size no longer
matches; a local file whose mtime changed is re-hashed and downloaded again unless its sha256 is the recorded
one (a corrupted or edited copy); files gone from the bucket are removed.

A GGUF file (local or in a bucket), or a folder holding one, becomes a converted model directory in the same
cache (uft_ray.model_gguf): converted once per node, keyed by the file's content. Other local paths and hub ids
pass through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from uft_ray import model_gguf, storage

RECORD = ".uft-ray-files.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_CHUNK = 1 << 22


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("UFT_RAY_MODEL_CACHE") or "~/.cache/uft-ray/models")


def gguf_cache() -> str:
    """Where GGUF files are converted to model directories (uft_ray.model_gguf)."""
    return os.path.join(cache_dir(), "gguf")


def check_gguf(path: str | None) -> None:
    """Raise `model_gguf.GGUFError` when `path` is a local GGUF source transformers cannot load (the message names
    its architecture). Cheap once converted; a bucket's GGUF file is checked when it is converted."""
    if not path or storage.is_remote(path):
        return
    local = model_gguf.gguf_file(path)
    if local is not None and model_gguf.record(model_gguf.converted_dir(local, gguf_cache())) is None:
        model_gguf.check_supported(local)


def local_dir_for(uri: str) -> str:
    """Where `uri` is (or will be) kept on this node: a name people can read, plus a hash that keeps it unique."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return os.path.join(cache_dir(), f"{tail}-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:12]}")


def local_model(path: str | None, *, weights: bool = True) -> str | None:
    """A local directory holding `path`'s files (downloaded on first use when `path` is a URI), else `path`.

    `weights=False` fetches everything but the weight files (a tokenizer, a config): what the driver needs. A GGUF
    source is converted whatever `weights` says: its tokenizer lives inside the weights file.
    """
    if path is None:
        return path
    if not storage.is_remote(path):
        local = model_gguf.gguf_file(path)
        return model_gguf.converted(local, gguf_cache()) if local is not None else path
    if model_gguf.is_gguf_name(path):
        return model_gguf.converted(_downloaded_file(path), gguf_cache())
    dest = _downloaded_dir(path, weights)
    local = model_gguf.gguf_file(dest)
    return model_gguf.converted(local, gguf_cache()) if local is not None else dest


def _downloaded_dir(path: str, weights: bool) -> str:
    from filelock import FileLock

    dest = local_dir_for(path)
    os.makedirs(dest, exist_ok=True)
    with FileLock(dest + ".lock"):
        remote = remote_files(path)
        if not remote:
            raise FileNotFoundError(f"{path}: no files there (model.path / adapter must be a directory of files)")
        for rel in remote:
            _inside(dest, rel, path)
        # A folder of one GGUF file: its tokenizer is inside the weights file, so it is fetched either way.
        weights = weights or ("config.json" not in remote and any(model_gguf.is_gguf_name(r) for r in remote))
        record = _read_record(dest)
        for rel, (size, mtime) in sorted(remote.items()):
            if not weights and rel.endswith(WEIGHT_SUFFIXES):
                continue
            if not _is_current(dest, rel, size, mtime, record.get(rel)):
                record[rel] = _download(path, dest, rel, size, mtime)
                _write_record(dest, record)  # after each file: an interrupted download keeps what it finished
        for rel in [r for r in record if r not in remote]:  # gone from the bucket
            record.pop(rel)
            if os.path.isfile(os.path.join(dest, rel)):
                os.unlink(os.path.join(dest, rel))
        _write_record(dest, record)
    return dest


def _downloaded_file(uri: str) -> str:
    """A single remote file (a GGUF checkpoint) as a local file, downloaded once per node and re-fetched when
    its size or modification time in the bucket changes."""
    from filelock import FileLock

    fs, path = storage.filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.size is None or info.type.name != "File":
        raise FileNotFoundError(f"{uri}: no such file")
    dest = local_dir_for(uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    os.makedirs(dest, exist_ok=True)
    mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
    with FileLock(dest + ".lock"):
        record = _read_record(dest)
        if not _is_current(dest, name, int(info.size), mtime, record.get(name)):
            parent = uri.rstrip("/").rsplit("/", 1)[0]
            record = {name: _download(parent, dest, name, int(info.size), mtime)}
            _write_record(dest, record)
    return os.path.join(dest, name)


def _unsafe(rel: str) -> bool:
    """A listed key that is absolute or climbs out (`..`): a bucket's listing is input, never trusted as a path."""
    parts = rel.replace("\\", "/").split("/")
    return not rel or rel.startswith(("/", "\\")) or ".." in parts or (len(rel) > 1 and rel[1] == ":")


def _inside(dest: str, rel: str, uri: str) -> str:
    """`dest/rel`, refusing a listed key that would land outside `dest`, so a hostile key cannot write over the
    node's files."""
    target = os.path.normpath(os.path.join(dest, rel))
    if _unsafe(rel) or os.path.commonpath([dest, target]) != os.path.normpath(dest):
        raise ValueError(f"{uri}: refusing the key {rel!r}: it would be written outside the model cache ({dest})")
    return target


def remote_files(uri: str) -> dict[str, tuple[int, float]]:
    """{path relative to `uri`: (size, mtime)} for every file under it."""
    fs, files = storage.list_files(uri)
    base = storage.filesystem_for(uri)[1].rstrip("/") + "/"
    out = {}
    for info in fs.get_file_info(files):
        rel = info.path[len(base) :]
        if _unsafe(rel) or info.size is None:
            raise ValueError(f"{uri}: refusing the key {rel!r}: it would be written outside the model cache")
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        out[rel] = (int(info.size), mtime)
    return out


def _read_record(dest: str) -> dict[str, dict[str, Any]]:
    try:
        with open(os.path.join(dest, RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_record(dest: str, record: dict[str, dict[str, Any]]) -> None:
    storage.write_json(os.path.join(dest, RECORD), record, sort_keys=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_current(dest: str, rel: str, size: int, mtime: float, entry: dict[str, Any] | None) -> bool:
    local = os.path.join(dest, rel)
    if entry is None or entry.get("remote_size") != size or entry.get("remote_mtime") != mtime:
        return False  # new, or changed in the bucket
    if not os.path.isfile(local):
        return False
    st = os.stat(local)
    if st.st_size != size:
        return False
    if st.st_mtime_ns == entry.get("local_mtime_ns"):
        return True
    return _sha256(local) == entry.get("sha256")  # touched since: trust it only if its bytes are the same


def _download(uri: str, dest: str, rel: str, size: int, mtime: float) -> dict[str, Any]:
    fs, base = storage.filesystem_for(uri)
    target = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")
    h, n = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(storage.join(base, rel)) as src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if n != size:
            raise OSError(f"{uri}/{rel}: downloaded {n} bytes, the listing says {size}")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {
        "remote_size": size,
        "remote_mtime": mtime,
        "sha256": h.hexdigest(),
        "local_mtime_ns": os.stat(target).st_mtime_ns,
    }
