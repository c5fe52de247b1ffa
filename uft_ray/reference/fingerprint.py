"""The reference cache key: everything the reference log-probs depend on, hashed (docs/internals.md "Reference cache").

`fingerprint_inputs(cfg, rows)` lists them as a JSON-able dict (stored in the cache's manifest, so a miss can be
explained); `fingerprint(inputs)` is its short hash, the cache directory's name. Besides what docs/design.md names
(the reference weights' identity, the adapter, the tokenizer files, the chat template, the length limits, the
row ids) it hashes the token ids themselves and the compute dtype / attention implementation, which move the
numbers too. What does not: the actor count, the batch size, the order of the rows.

Files are hashed with sha256, remembered by (path, size, mtime) in `{cache root}/file-hashes.json` so that a
64 GB checkpoint is hashed once, not per run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uft_ray import model_gguf, model_store, storage
from uft_ray.config import Config, compute_dtype, reference_revision

logger = logging.getLogger(__name__)

# Bump when the scorer's numbers could change for the same inputs (e.g. a logprobs fix): old caches then miss.
CACHE_VERSION = 1

# Files that define what the tokenizer (and its chat template) produce; hashed when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# config.json fixes the architecture the weights are loaded into; the weights are loaded via safetensors only.
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class _HashMemo:
    """sha256 of files, remembered by (realpath, size, mtime_ns): a 64 GB checkpoint is hashed once, not per run."""

    def __init__(self, path: str | None):
        self.path = path  # a local path or a URI (the cache dir may be in object storage)
        self.table: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path is not None:
            memo = storage.read_json(os.fspath(path))
            self.table = memo if isinstance(memo, dict) else {}

    def digest(self, file: Path) -> str:
        real = os.path.realpath(file)
        st = os.stat(real)
        hit = self.table.get(real)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = _sha256_file(Path(real))
        self.table[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        with contextlib.suppress(OSError):  # a read-only cache dir only costs the memo
            storage.write_json(str(self.path), self.table, indent=None, sort_keys=True)


def _files_identity(directory: Path, patterns: Iterable[str], memo: _HashMemo) -> dict[str, str]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(Path(p) for p in glob.glob(str(directory / pattern)))
    return {f.name: memo.digest(f) for f in sorted(files) if f.is_file()}


def _weights_identity(path: str, revision: str | None, memo: _HashMemo) -> dict[str, Any]:
    # A GGUF source by its own bytes (and the converter's version): the converted copy is made from exactly them.
    if storage.is_remote(path) and model_gguf.is_gguf_name(path):
        fs, where = storage.filesystem_for(path)
        info = fs.get_file_info(where)
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return {"gguf": {"uri": path, "file": f"{info.size}:{mtime}"}, "converter": model_gguf.CONVERTER_VERSION}
    local_gguf = None if storage.is_remote(path) else model_gguf.gguf_file(path)
    if local_gguf is not None:
        digest = model_gguf.sha256(local_gguf, model_store.gguf_cache())
        return {"gguf": {"sha256": digest}, "converter": model_gguf.CONVERTER_VERSION}
    if storage.is_remote(path):  # a bucket's model: its files' sizes and modification times (no download)
        listed = model_store.remote_files(path)
        files = {rel: f"{size}:{mtime}" for rel, (size, mtime) in listed.items() if _is_weight_file(rel)}
        if not any(rel.endswith(".safetensors") for rel in files):
            raise FileNotFoundError(f"reference model {path!r} has no *.safetensors weights")
        return {"uri": path, "files": files}
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        files = _files_identity(local, WEIGHT_PATTERNS, memo)
        if not any(name.endswith(".safetensors") for name in files):
            raise FileNotFoundError(
                f"reference model {path!r} has no *.safetensors weights; the scorer loads safetensors only "
                "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
            )
        return {"files": files}
    # A hub id or remote prefix: only its name and revision identify it; an unpinned id can move under us.
    if revision is None:
        logger.warning("reference model %r has no model.revision: the cache key cannot see new uploads", path)
    return {"id": path, "revision": revision}


def _remote_code(path: str, memo: _HashMemo) -> dict[str, str] | None:
    """{file: sha256} of a local model's .py files: with trust_remote_code its forward is that code."""
    local = None if storage.is_remote(path) else Path(os.path.expanduser(path))
    if local is None or not local.is_dir():
        return None  # a bucket's or hub's model: its files are keyed by the weights' identity and revision
    return _files_identity(local, ("*.py",), memo)


def _chat_template(tokenizer_dir: Path) -> str | None:
    """The template text as transformers would find it: chat_template.jinja, .json, or tokenizer_config.json."""
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = tokenizer_dir / name
        if f.is_file():
            with contextlib.suppress(ValueError):
                value = json.loads(f.read_text()).get("chat_template")
                if value is not None:
                    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return None


def _is_weight_file(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], p) for p in WEIGHT_PATTERNS)


def tokenizer_identity(cfg: Config, memo: _HashMemo | None = None) -> dict[str, Any]:
    """What the policy's tokenizer produces, by its files' content: {file name: sha256} of TOKENIZER_FILES (the
    chat template among them); a hub id that is not a local directory by its name and revision. The prepared
    rows' key and the reference cache's both use it, so changed tokenizer files at the same path miss both."""
    tok_dir = Path(os.path.expanduser(model_store.local_model(cfg.model.path, weights=False)))
    if not tok_dir.is_dir():
        return {"id": cfg.model.path, "revision": cfg.model.revision}
    return _files_identity(tok_dir, TOKENIZER_FILES, memo or _HashMemo(None))


def fingerprint_inputs(cfg: Config, rows: pa.Table, *, memo_path: str | Path | None = None) -> dict[str, Any]:
    """Everything the reference log-probs depend on, as a JSON-able dict (stored in the manifest).

    `rows` holds at least `row_id, input_ids, response_start` (+ the rejected columns for pairs). Besides the
    items docs/design.md names (weights, adapter, tokenizer files, chat template, length limits, row ids), it hashes
    the token ids themselves, order-independently: a change to the tokenization code with the same tokenizer
    files would otherwise reuse stale numbers; and the compute dtype / attention, which move the numbers too.
    """
    memo = _HashMemo(os.fspath(memo_path) if memo_path is not None else None)
    ref_path = cfg.reference.model_path or cfg.model.path
    revision = reference_revision(cfg)
    # The data plane tokenizes with the policy's tokenizer (from a bucket: its small files, downloaded here).
    tok_dir = Path(os.path.expanduser(model_store.local_model(cfg.model.path, weights=False)))
    template = _chat_template(tok_dir) if tok_dir.is_dir() else None
    row_ids = rows.column("row_id").to_pylist()
    if len(set(row_ids)) != len(row_ids):
        raise ValueError("prepared rows have duplicate row_id values; the reference cache keys rows by row_id")
    inputs: dict[str, Any] = {
        "version": CACHE_VERSION,
        "model": _weights_identity(ref_path, revision, memo),
        "adapter": None,
        "tokenizer": tokenizer_identity(cfg, memo),
        "chat_template": hashlib.sha256(template.encode()).hexdigest() if template is not None else None,
        "tokenize": {
            "max_prompt_len": cfg.tokenize.max_prompt_len,
            "max_len": cfg.tokenize.max_len,
            "overflow": cfg.tokenize.overflow,
        },
        "numerics": {"dtype": compute_dtype(cfg), "attn_implementation": cfg.model.attn_implementation},
        # the code that computes them: kernels and defaults move between releases
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers")},
        "remote_code": _remote_code(ref_path, memo) if cfg.model.trust_remote_code else None,
        "rows": {"count": len(row_ids), "sha256": hashlib.sha256("\n".join(sorted(row_ids)).encode()).hexdigest()},
        "token_ids": _token_digest(rows),
    }
    if cfg.reference.adapter:
        adapter_dir = Path(os.path.expanduser(model_store.local_model(cfg.reference.adapter)))
        if adapter_dir.is_dir():
            inputs["adapter"] = {"files": _files_identity(adapter_dir, ADAPTER_PATTERNS, memo)}
        else:
            inputs["adapter"] = {"id": cfg.reference.adapter}
    memo.save()
    return inputs


def _list_rows(column: pa.ChunkedArray | None, n: int) -> list[np.ndarray | None]:
    """A list<int> column as one numpy view per row (None for nulls), without a Python int per token."""
    if column is None:
        return [None] * n
    out: list[np.ndarray | None] = []
    for chunk in column.chunks:
        if pa.types.is_null(chunk.type):
            out.extend([None] * len(chunk))
            continue
        offsets = chunk.offsets.to_numpy()  # indexes `values`, which ignores the chunk's slice offset
        values = chunk.values.to_numpy(zero_copy_only=False)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out.extend(values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(chunk)))
    return out


def _token_digest(rows: pa.Table) -> str:
    """sha256 over the per-row hashes of (row_id, token ids, response start), sorted: row order does not count."""
    n = rows.num_rows
    names = rows.column_names
    ids = _list_rows(rows.column("input_ids"), n)
    starts = rows.column("response_start").to_pylist()
    rejected = _list_rows(rows.column("rejected_input_ids") if "rejected_input_ids" in names else None, n)
    rejected_starts = (
        rows.column("rejected_response_start").to_pylist() if "rejected_response_start" in names else [None] * n
    )
    digests = []
    for rid, a, s, b, t in zip(rows.column("row_id").to_pylist(), ids, starts, rejected, rejected_starts, strict=True):
        h = hashlib.sha256(rid.encode())
        h.update(np.asarray(a, dtype=np.int64).tobytes())
        h.update(f"|{s}|".encode())
        if b is not None:
            h.update(np.asarray(b, dtype=np.int64).tobytes())
            h.update(f"|{t}|".encode())
        digests.append(h.digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    """A stable short hash of `fingerprint_inputs` (the cache directory's name)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
