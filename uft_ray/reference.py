"""The reference service: frozen-model log-probs from a Ray actor pool, cached on disk (DESIGN.md "Reference log-probs").

    logp_ref(y|x) = sum_{t in response} log pi_ref(y_t | x, y_<t)       (DESIGN.md "The math")

The reference is frozen and the data fixed, so `ref_logp` is a function of (reference weights, token ids):
we compute it once per fingerprint and reuse it across reruns, resumes and beta / lr sweeps.

Parts:
- `ReferenceScorer`: a callable class for `ds.map_batches` (an actor pool). Loads the model once; scores each
  batch in length-sorted sub-batches; sends its results to a collector actor and appends the columns.
- `attach_reference(cfg, prepared_dir)`: the driver's entry point. Fingerprint -> cache hit (read, no model
  forward) or miss (precompute with the pool, publish the cache); then joins the columns into DIR/rows.
- `stream_stage(ds, cfg)`: the same scorer as a lazy stage of the trainer's dataset (`reference.run: stream`);
  `publish_stream_cache` writes the cache afterwards when every row was scored.
- `adapter_off_logprobs`: `reference.mode: adapter_off`, the policy with LoRA disabled, through the same
  `uft_ray.logprobs` function as the actor.

Cache layout (docs/internals.md "Reference cache"):

    {cache_dir}/ref_logp/{fingerprint}/part-00000.parquet ...   schema.REFERENCE, each row_id exactly once
    {cache_dir}/ref_logp/{fingerprint}/manifest.json            written last: rows, files, fingerprint inputs
    {cache_dir}/ref_logp/file-hashes.json                        sha256 memo keyed by (path, size, mtime)

A cache is published by writing it into a hidden sibling directory and renaming that into place, so a reader
sees either nothing or a complete directory; a directory without a valid manifest, with a listed file missing
or with rows that do not match the expected row ids is treated as a miss and replaced.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from uft_ray import schema
from uft_ray.config import Config

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    import torch

logger = logging.getLogger(__name__)

# Bump when the scorer's numbers could change for the same inputs (e.g. a logprobs fix): old caches then miss.
CACHE_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_ROWS_PER_FILE = 100_000
# Padded tokens per forward: 8 x 2048 keeps the logits of a 152k-vocab bf16 model near 5 GB.
DEFAULT_MAX_TOKENS_PER_FORWARD = 16_384
# Bounded, unlike Ray Data's default of -1: an actor killed by the host's OOM killer on one batch must not
# restart and retry that batch forever. A Python exception (CUDA OOM) is not retried at all: it fails the run.
MAX_ACTOR_RESTARTS = 4
COLLECTOR_PREFIX = "uft-ray-reference-collector-"
_PAIR_COLUMNS = ("rejected_input_ids", "rejected_response_start")
SCORER_INPUT_COLUMNS = ("row_id", "input_ids", "response_start", *_PAIR_COLUMNS)

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


# ---------------------------------------------------------------------------------------------------------
# Fingerprint


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class _HashMemo:
    """sha256 of files, remembered by (realpath, size, mtime_ns): a 64 GB checkpoint is hashed once, not per run."""

    def __init__(self, path: Path | None):
        self.path = path
        self.table: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path is not None and path.is_file():
            with contextlib.suppress(OSError, ValueError):
                self.table = json.loads(path.read_text())

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
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(self.table, sort_keys=True))
            os.replace(tmp, self.path)


def _files_identity(directory: Path, patterns: Iterable[str], memo: _HashMemo) -> dict[str, str]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(Path(p) for p in glob.glob(str(directory / pattern)))
    return {f.name: memo.digest(f) for f in sorted(files) if f.is_file()}


def _weights_identity(path: str, revision: str | None, memo: _HashMemo) -> dict[str, Any]:
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


def resolved_dtype(cfg: Config) -> str:
    """The scorer's compute dtype: `model.dtype`, or bf16 when the actors get GPUs and fp32 on CPU."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if _actor_gpus(cfg) > 0 else "float32"


def _actor_gpus(cfg: Config) -> float:
    # A CPU-only run (train.use_gpu false: tests, the demo) scores on CPU whatever gpus_per_actor says.
    return cfg.reference.gpus_per_actor if cfg.train.use_gpu else 0.0


def fingerprint_inputs(cfg: Config, rows: pa.Table, *, memo_path: Path | None = None) -> dict[str, Any]:
    """Everything the reference log-probs depend on, as a JSON-able dict (stored in the manifest).

    `rows` holds at least `row_id, input_ids, response_start` (+ the rejected columns for pairs). Besides the
    items DESIGN.md names (weights, adapter, tokenizer files, chat template, length limits, row ids), it hashes
    the token ids themselves, order-independently: a change to the tokenization code with the same tokenizer
    files would otherwise reuse stale numbers; and the compute dtype / attention, which move the numbers too.
    """
    memo = _HashMemo(memo_path)
    ref_path = cfg.reference.model_path or cfg.model.path
    revision = cfg.model.revision if ref_path == cfg.model.path else None
    tok_dir = Path(os.path.expanduser(cfg.model.path))  # the data plane tokenizes with the policy's tokenizer
    template = _chat_template(tok_dir) if tok_dir.is_dir() else None
    row_ids = rows.column("row_id").to_pylist()
    if len(set(row_ids)) != len(row_ids):
        raise ValueError("prepared rows have duplicate row_id values; the reference cache keys rows by row_id")
    inputs: dict[str, Any] = {
        "version": CACHE_VERSION,
        "model": _weights_identity(ref_path, revision, memo),
        "adapter": None,
        "tokenizer": (
            _files_identity(tok_dir, TOKENIZER_FILES, memo)
            if tok_dir.is_dir()
            else {"id": cfg.model.path, "revision": cfg.model.revision}
        ),
        "chat_template": hashlib.sha256(template.encode()).hexdigest() if template is not None else None,
        "tokenize": {
            "max_prompt_len": cfg.tokenize.max_prompt_len,
            "max_len": cfg.tokenize.max_len,
            "overflow": cfg.tokenize.overflow,
        },
        "numerics": {"dtype": resolved_dtype(cfg), "attn_implementation": cfg.model.attn_implementation},
        "rows": {"count": len(row_ids), "sha256": hashlib.sha256("\n".join(sorted(row_ids)).encode()).hexdigest()},
        "token_ids": _token_digest(rows),
    }
    if cfg.reference.adapter:
        adapter_dir = Path(os.path.expanduser(cfg.reference.adapter))
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


def cache_root(cfg: Config) -> Path:
    """`{reference.cache_dir}/ref_logp`, with `~` expanded."""
    return Path(os.path.expanduser(cfg.reference.cache_dir)) / "ref_logp"


# ---------------------------------------------------------------------------------------------------------
# The cache on disk


def load_cache(directory: Path, expected_ids: Iterable[str]) -> tuple[pa.Table | None, str]:
    """Read a published cache directory, or return (None, why) when it cannot be trusted.

    Trusted means: a manifest naming this fingerprint, every listed file present with its listed row count,
    and the row ids exactly the expected set, each once.
    """
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return None, "absent"
    if not manifest_path.is_file():
        return None, "no manifest (an interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return None, "unreadable manifest"
    if manifest.get("fingerprint") != directory.name or manifest.get("version") != CACHE_VERSION:
        return None, "manifest of another fingerprint or version"
    tables = []
    for entry in manifest.get("files", []):
        f = directory / entry["name"]
        if not f.is_file():
            return None, f"listed file {entry['name']} is missing"
        try:
            if pq.ParquetFile(f).metadata.num_rows != entry["rows"]:
                return None, f"{entry['name']} does not hold its {entry['rows']} rows"
            tables.append(pq.read_table(f, schema=schema.REFERENCE))
        except (OSError, pa.ArrowException) as e:
            return None, f"{entry['name']} is unreadable: {e}"
    table = pa.concat_tables(tables) if tables else schema.REFERENCE.empty_table()
    expected = set(expected_ids)
    ids = table.column("row_id").to_pylist()
    if table.num_rows != manifest.get("rows") or len(ids) != len(expected) or set(ids) != expected:
        return None, f"rows do not match: cache {table.num_rows}, expected {len(expected)}"
    if table.column(schema.REF_LOGP).null_count:
        return None, "ref_logp has nulls"
    return table, "ok"


def write_cache(
    root: Path,
    fp: str,
    table: pa.Table,
    inputs: dict[str, Any],
    *,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Publish `table` (schema.REFERENCE, one row per row_id) as `root/fp`; the manifest is written last.

    Written into a hidden sibling directory and renamed into place, so concurrent runs of one fingerprint (a
    sweep) never see each other's half-written files: the first rename wins and the others discard theirs.
    """
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, fp)
    final = root / fp
    tmp = root / f".{fp}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    table = table.select(schema.REFERENCE.names).cast(schema.REFERENCE)
    files = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        part = table.slice(start, rows_per_file)
        name = f"part-{k:05d}.parquet"
        pq.write_table(part, tmp / name)
        files.append({"name": name, "rows": part.num_rows, "bytes": (tmp / name).stat().st_size})
    manifest = {
        "version": CACHE_VERSION,
        "fingerprint": fp,
        "rows": table.num_rows,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": inputs,
        **(extra or {}),
    }
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        if load_cache(final, table.column("row_id").to_pylist())[0] is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # an identical run published while we scored: keep theirs
            return final
        shutil.rmtree(final, ignore_errors=True)  # damaged or partial: replace it
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run published the same fingerprint first
    return final


def _remove_stale_partials(root: Path, fp: str, max_age_s: float = 3600.0) -> None:
    # Leftovers of killed runs; a live writer finishes in far less than an hour.
    for d in root.glob(f".{fp}.partial-*"):
        with contextlib.suppress(OSError):
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The prepared directory (docs/internals.md "Prepared directory")


def _row_files(prepared_dir: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """DIR/rows/**.parquet in name order (the prepared row order), on local disk or a URI's filesystem."""
    from uft_ray.data.sources import filesystem_for

    fs, base = filesystem_for(f"{str(prepared_dir).rstrip('/')}/rows")
    files = []
    if fs.get_file_info(base).type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    files = sorted(f for f in files if not f.rsplit("/", 1)[-1].startswith("."))  # dot files: our temporaries
    if not files:
        raise FileNotFoundError(f"{prepared_dir}/rows has no parquet files; run `uft-ray prepare` first")
    return fs, files


def read_scoring_columns(prepared_dir: str | os.PathLike) -> pa.Table:
    """The columns the scorer and the fingerprint need, in prepared row order."""
    fs, files = _row_files(prepared_dir)
    tables = []
    for f in files:
        names = pq.read_schema(f, filesystem=fs).names
        tables.append(pq.read_table(f, filesystem=fs, columns=[c for c in SCORER_INPUT_COLUMNS if c in names]))
    return pa.concat_tables(tables, promote_options="default")


def _replace(fs: pafs.FileSystem, path: str, write: Any) -> None:
    # Write beside the target under a dot name (invisible to readers' listings), then move over it: a crash
    # leaves the old file or the new one, never half of one (on object stores, a copy then a delete).
    head, name = path.rsplit("/", 1)
    tmp = f"{head}/.{name}.{uuid.uuid4().hex}.tmp"
    write(tmp)
    fs.move(tmp, path)


def write_ref_columns(prepared_dir: str | os.PathLike, table: pa.Table) -> None:
    """Join `ref_logp` / `ref_logp_rejected` into every DIR/rows file by row_id, keeping each file's row order."""
    ids = table.column("row_id").to_pylist()
    logp = table.column(schema.REF_LOGP).to_pylist()
    logp_rej = table.column(schema.REF_LOGP_REJECTED).to_pylist()
    lookup = {rid: (a, b) for rid, a, b in zip(ids, logp, logp_rej, strict=True)}
    fs, files = _row_files(prepared_dir)
    for f in files:
        rows = pq.read_table(f, filesystem=fs)
        rows = rows.drop_columns([c for c in (schema.REF_LOGP, schema.REF_LOGP_REJECTED) if c in rows.column_names])
        try:
            values = [lookup[rid] for rid in rows.column("row_id").to_pylist()]
        except KeyError as e:
            raise KeyError(f"{f}: row {e.args[0]!r} has no reference log-prob") from None
        for k, name in enumerate((schema.REF_LOGP, schema.REF_LOGP_REJECTED)):
            rows = rows.append_column(pa.field(name, pa.float64()), pa.array([v[k] for v in values], pa.float64()))
        _replace(fs, f, lambda tmp, rows=rows: pq.write_table(rows, tmp, filesystem=fs))


def _drop_ref_columns(prepared_dir: str | os.PathLike) -> None:
    fs, files = _row_files(prepared_dir)
    for f in files:
        names = pq.read_schema(f, filesystem=fs).names
        stale = [c for c in (schema.REF_LOGP, schema.REF_LOGP_REJECTED) if c in names]
        if stale:
            rows = pq.read_table(f, filesystem=fs).drop_columns(stale)
            _replace(fs, f, lambda tmp, rows=rows: pq.write_table(rows, tmp, filesystem=fs))


def merge_summary(prepared_dir: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Set DIR/summary.json["reference"] = entry, keeping everything else the data plane wrote."""
    from uft_ray.data.sources import filesystem_for

    fs, path = filesystem_for(f"{str(prepared_dir).rstrip('/')}/summary.json")
    summary: dict[str, Any] = {}
    if fs.get_file_info(path).type == pafs.FileType.File:
        with contextlib.suppress(ValueError), fs.open_input_stream(path) as f:
            summary = json.loads(f.read().decode())
    summary["reference"] = entry

    def write(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            f.write((json.dumps(summary, indent=1) + "\n").encode())

    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    _replace(fs, path, write)


# ---------------------------------------------------------------------------------------------------------
# The scorer


def length_groups(lengths: list[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped by similar length: sorted by length, cut so that rows x longest <= max_tokens.

    A sequence longer than `max_tokens` gets a group of its own. Sorting first keeps the padding in a group small.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest
        if current and ((len(current) + 1) * longest > max_tokens or (max_rows and len(current) >= max_rows)):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_reference_model(
    model_path: str,
    *,
    revision: str | None = None,
    adapter: str | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    gpus: float = 0.0,
) -> torch.nn.Module:
    """The frozen reference: base weights (safetensors only), plus an optional peft adapter merged in, eval mode.

    `gpus > 1` spreads the layers over the actor's GPUs with `device_map="auto"` (a model one GPU cannot hold).
    """
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = gpus > 0 and torch.cuda.is_available()
    if gpus > 0 and not on_gpu:
        logger.warning("reference actor was given %s GPUs but sees no CUDA device: scoring on CPU", gpus)
    device_map: Any = None
    if on_gpu:
        device_map = "auto" if gpus > 1 else {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(
        os.path.expanduser(model_path),
        revision=revision,
        dtype=_torch_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        device_map=device_map,
    )
    if adapter:
        from peft import PeftModel

        # Merged: one matmul per layer instead of base + LoRA, and the same frozen function either way.
        model = PeftModel.from_pretrained(model, os.path.expanduser(adapter)).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return model


class ReferenceScorer:
    """Ray Data callable class: adds `ref_logp` (and `ref_logp_rejected` for pairs, null otherwise) per row.

    Use through `ds.map_batches(ReferenceScorer, fn_constructor_kwargs=scorer_kwargs(cfg), ...)` (see
    `stream_stage`). Input batches (pyarrow, or numpy dicts) hold `row_id`, `input_ids`, `response_start` and,
    for pairs, `rejected_input_ids` / `rejected_response_start`. Each batch's sequences (chosen and rejected
    alike) are sorted by length and scored in sub-batches of at most `max_tokens_per_forward` padded tokens.

    With a `collector` (see `new_collector`), every batch's results and its forward count are sent to it before
    the batch returns: the driver's proof of what was computed (a cache hit shows 0 forwards) and the stream
    mode's cache feed. `output_columns` limits what the stage emits (precompute needs only `row_id`).
    """

    def __init__(
        self,
        model_path: str,
        *,
        revision: str | None = None,
        adapter: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        gpus: float = 0.0,
        max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD,
        output_columns: list[str] | None = None,
        collector: Any = None,
    ):
        import torch

        self.model = load_reference_model(
            model_path,
            revision=revision,
            adapter=adapter,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            gpus=gpus,
        )
        self.device = self.model.get_input_embeddings().weight.device
        self.max_tokens = max_tokens_per_forward
        self.output_columns = output_columns
        self.collector = collector
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._torch = torch
        if collector is not None:
            import ray

            ray.get(collector.hello.remote(self.host, self.pid))

    def score(self, sequences: list[np.ndarray], starts: list[int]) -> tuple[np.ndarray, int]:
        """Summed response log-probs of each sequence (float64), and the number of model forwards."""
        from uft_ray.logprobs import model_sequence_logprobs

        torch = self._torch
        out = np.zeros(len(sequences), dtype=np.float64)
        groups = length_groups([len(s) for s in sequences], self.max_tokens)
        with torch.inference_mode():
            for group in groups:
                width = max(len(sequences[i]) for i in group)
                ids = torch.zeros(len(group), width, dtype=torch.long)
                attn = torch.zeros(len(group), width, dtype=torch.long)
                loss = torch.zeros(len(group), width, dtype=torch.long)
                for r, i in enumerate(group):
                    n = len(sequences[i])
                    ids[r, :n] = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
                    attn[r, :n] = 1
                    loss[r, int(starts[i]) : n] = 1
                logp, _ = model_sequence_logprobs(
                    self.model, ids.to(self.device), attn.to(self.device), loss.to(self.device), use_cache=False
                )
                out[group] = logp.double().cpu().numpy()
        return out, len(groups)

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        is_arrow = isinstance(batch, pa.Table)

        def col(name: str) -> list[Any]:
            if is_arrow:
                return batch.column(name).to_numpy(zero_copy_only=False) if name in batch.column_names else None
            return batch.get(name)

        row_ids = [str(r) for r in col("row_id")]
        n = len(row_ids)
        chosen, chosen_start = col("input_ids"), col("response_start")
        rejected, rejected_start = col("rejected_input_ids"), col("rejected_response_start")
        sequences, starts, slots = [], [], []  # slot: (row, 0 chosen | 1 rejected)
        for i in range(n):
            sequences.append(chosen[i])
            starts.append(chosen_start[i])
            slots.append((i, 0))
            if rejected is not None and rejected[i] is not None:
                sequences.append(rejected[i])
                starts.append(rejected_start[i])
                slots.append((i, 1))
        values, forwards = self.score(sequences, starts)
        logp = np.full(n, np.nan)
        logp_rej: list[float | None] = [None] * n
        for (i, side), v in zip(slots, values, strict=True):
            if side == 0:
                logp[i] = v
            else:
                logp_rej[i] = float(v)
        if self.collector is not None:
            import ray

            tokens = int(sum(len(s) for s in sequences))
            ray.get(self.collector.add.remote(self.host, self.pid, row_ids, logp, logp_rej, forwards, tokens))

        if is_arrow:
            out = batch if self.output_columns is None else batch.select(self.output_columns)
            out = out.drop_columns([c for c in (schema.REF_LOGP, schema.REF_LOGP_REJECTED) if c in out.column_names])
            out = out.append_column(pa.field(schema.REF_LOGP, pa.float64()), pa.array(logp, pa.float64()))
            return out.append_column(
                pa.field(schema.REF_LOGP_REJECTED, pa.float64()), pa.array(logp_rej, pa.float64())
            )
        keep = batch.keys() if self.output_columns is None else self.output_columns
        result = {k: batch[k] for k in keep}
        result[schema.REF_LOGP] = logp
        result[schema.REF_LOGP_REJECTED] = np.array([np.nan if v is None else v for v in logp_rej])
        return result


def scorer_kwargs(cfg: Config) -> dict[str, Any]:
    """`fn_constructor_kwargs` for `ReferenceScorer` from the config."""
    ref_path = cfg.reference.model_path or cfg.model.path
    return {
        "model_path": ref_path,
        "revision": cfg.model.revision if ref_path == cfg.model.path else None,
        "adapter": cfg.reference.adapter,
        "dtype": resolved_dtype(cfg),
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": cfg.model.trust_remote_code,
        "gpus": _actor_gpus(cfg),
    }


# ---------------------------------------------------------------------------------------------------------
# The collector: where every scorer actor reports, so the driver sees all results wherever the actors ran.


class _Collector:
    """Keeps the first value per row_id (a retried batch reports its rows again) and per-actor counters."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[float, float | None]] = {}
        self.duplicates = 0
        self.forwards = 0
        self.tokens = 0
        self.actors: dict[str, dict[str, Any]] = {}

    def _actor(self, host: str, pid: int) -> dict[str, Any]:
        key = f"{host}:{pid}"
        if key not in self.actors:
            # ready_at: when the model finished loading; throughput is measured from the first one on.
            self.actors[key] = {"host": host, "pid": pid, "batches": 0, "forwards": 0, "ready_at": time.time()}
        return self.actors[key]

    def hello(self, host: str, pid: int) -> None:
        self._actor(host, pid)

    def add(
        self,
        host: str,
        pid: int,
        row_ids: list[str],
        logp: np.ndarray,
        logp_rej: list[float | None],
        forwards: int,
        tokens: int,
    ) -> None:
        actor = self._actor(host, pid)
        actor["batches"] += 1
        actor["forwards"] += forwards
        actor["last_batch_at"] = time.time()
        self.forwards += forwards
        self.tokens += tokens
        for rid, a, b in zip(row_ids, logp.tolist(), logp_rej, strict=True):
            if rid in self.values:
                self.duplicates += 1
            else:
                self.values[rid] = (a, b)

    def stats(self) -> dict[str, Any]:
        return {
            "rows": len(self.values),
            "duplicates": self.duplicates,
            "forwards": self.forwards,
            "tokens": self.tokens,
            "actors": list(self.actors.values()),
        }

    def table(self) -> pa.Table:
        ids = list(self.values)
        return pa.table(
            {
                "row_id": pa.array(ids, pa.string()),
                schema.REF_LOGP: pa.array([self.values[i][0] for i in ids], pa.float64()),
                schema.REF_LOGP_REJECTED: pa.array([self.values[i][1] for i in ids], pa.float64()),
            },
            schema=schema.REFERENCE,
        )


def new_collector() -> Any:
    """A named collector actor (prefix `COLLECTOR_PREFIX`); pass it to `stream_stage(..., collector=)`."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0)(_Collector)
    return cls.options(name=f"{COLLECTOR_PREFIX}{uuid.uuid4().hex[:12]}").remote()


def stream_stage(
    ds: ray.data.Dataset, cfg: Config, *, collector: Any = None, **scorer_overrides: Any
) -> ray.data.Dataset:
    """Append the scorer to `ds` as a lazy `map_batches` stage on its own actor pool (`reference.run: stream`).

    The stage keeps every input column and adds `ref_logp` / `ref_logp_rejected`. With a `collector`
    (`new_collector()`), each scored batch is also reported there; `publish_stream_cache` then writes the cache
    once every prepared row was scored. Without one, stream mode caches nothing.
    """
    from ray.data import ActorPoolStrategy

    r = cfg.reference
    compute = (
        ActorPoolStrategy(min_size=r.actors[0], max_size=r.actors[1])
        if isinstance(r.actors, list)
        else ActorPoolStrategy(size=r.actors)
    )
    kwargs = {**scorer_kwargs(cfg), "collector": collector, **scorer_overrides}
    num_gpus = _actor_gpus(cfg)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing remote args by keyword but has no named parameter for restarts yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(
            ReferenceScorer,
            fn_constructor_kwargs=kwargs,
            compute=compute,
            batch_size=r.batch_size,
            batch_format="pyarrow",
            num_cpus=r.cpus_per_actor,
            num_gpus=num_gpus or None,
            udf_modifying_row_count=False,
            # A dead actor (node lost, process killed) is restarted and its in-flight batches retried.
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_ACTOR_RESTARTS,
        )


def _collected(collector: Any) -> tuple[pa.Table, dict[str, Any]]:
    import ray

    return ray.get(collector.table.remote()), ray.get(collector.stats.remote())


def publish_stream_cache(
    cfg: Config,
    prepared_dir: str | os.PathLike,
    collector: Any,
    *,
    seconds: float | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> dict[str, Any]:
    """After a stream-mode run: publish the collector's rows as the cache when they cover every prepared row.

    Stream mode caches only complete coverage: a run that stopped early (max_steps) or whose plan dropped a
    tail of rows publishes nothing, and the next run scores again. Returns the summary entry (also merged into
    DIR/summary.json) with `complete` telling which happened.
    """
    rows = read_scoring_columns(prepared_dir)
    inputs = fingerprint_inputs(cfg, rows, memo_path=cache_root(cfg) / "file-hashes.json")
    fp = fingerprint(inputs)
    table, stats = _collected(collector)
    expected = set(rows.column("row_id").to_pylist())
    got = set(table.column("row_id").to_pylist())
    complete = expected <= got
    if complete:
        table = _in_order(table, rows.column("row_id").to_pylist())
        write_cache(cache_root(cfg), fp, table, inputs, rows_per_file=rows_per_file, extra={"run": "stream"})
    entry = {
        "cache": "miss",
        "fingerprint": fp,
        "run": "stream",
        "complete": complete,
        "rows": len(expected),
        "rows_scored": len(got & expected),
        "model_forwards": stats["forwards"],
        "tokens_scored": stats["tokens"],
        "seconds": seconds,
    }
    merge_summary(prepared_dir, entry)
    return entry


def _in_order(table: pa.Table, row_ids: list[str]) -> pa.Table:
    """`table` restricted to `row_ids`, in that order (prepared order); raises when one is missing."""
    index = {rid: i for i, rid in enumerate(table.column("row_id").to_pylist())}
    missing = [rid for rid in row_ids if rid not in index]
    if missing:
        raise RuntimeError(f"reference scoring missed {len(missing)} of {len(row_ids)} rows, e.g. {missing[:3]}")
    return table.take(pa.array([index[rid] for rid in row_ids], pa.int64()))


# ---------------------------------------------------------------------------------------------------------
# The driver's entry point


def _prepared_dataset(rows: pa.Table, block_rows: int) -> ray.data.Dataset:
    import ray

    # Blocks from the driver's table (not read_parquet on a local path, which other nodes cannot read), each a
    # multiple of the batch size so that batches are the same whatever the pool size: 1 and N actors agree.
    blocks = [rows.slice(s, block_rows) for s in range(0, rows.num_rows, block_rows)]
    return ray.data.from_arrow(blocks)


def attach_reference(
    cfg: Config,
    prepared_dir: str | os.PathLike,
    *,
    run: str | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    **scorer_overrides: Any,
) -> dict[str, Any]:
    """Give every prepared row its reference log-probs, from the cache or by scoring; returns the summary entry.

    Computes the fingerprint, then:
    - hit: reads `{cache_dir}/ref_logp/{fingerprint}/`; no Ray, no model.
    - miss, `run == "precompute"` (the default from `cfg.reference.run`): scores every row with the actor pool,
      checks that each row came back exactly once, publishes the cache; the pool ends with the pass, freeing
      its GPUs for training.
    - miss, `run == "stream"`: scores nothing here; the trainer adds `stream_stage` to its dataset and calls
      `publish_stream_cache` after. DIR/rows then have no ref columns (`entry["deferred"]` is true).
    On a hit or a precompute, `ref_logp` / `ref_logp_rejected` (float64) are joined into DIR/rows by row_id.

    The entry, also merged into DIR/summary.json under "reference": `cache` (hit | miss | skipped),
    `fingerprint`, `rows` (rows carrying ref columns), `rows_scored` (rows the model scored in this call),
    `model_forwards`, `tokens_scored`, `seconds`.
    """
    t0 = time.perf_counter()
    run = run or cfg.reference.run
    if not cfg.needs_reference or cfg.reference.mode != "actor":
        why = "loss.type sft needs no reference" if not cfg.needs_reference else "reference.mode adapter_off"
        entry = {"cache": "skipped", "reason": why, "seconds": 0.0}
        merge_summary(prepared_dir, entry)
        return entry

    rows = read_scoring_columns(prepared_dir)
    row_ids = rows.column("row_id").to_pylist()
    root = cache_root(cfg)
    inputs = fingerprint_inputs(cfg, rows, memo_path=root / "file-hashes.json")
    fp = fingerprint(inputs)
    table, why = load_cache(root / fp, row_ids)
    entry: dict[str, Any] = {"fingerprint": fp, "run": run, "rows": len(row_ids)}
    if table is not None:
        entry.update(cache="hit", rows_scored=0, model_forwards=0, tokens_scored=0)
    else:
        logger.info("reference cache %s: %s; scoring %d rows", fp, why, len(row_ids))
        entry.update(cache="miss", miss_reason=why)
        if run == "stream":
            # Columns from an earlier fingerprint would be silently wrong for this one: remove them.
            _drop_ref_columns(prepared_dir)
            entry.update(deferred=True, rows=0, rows_scored=0, model_forwards=0, tokens_scored=0)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            merge_summary(prepared_dir, entry)
            return entry
        table, stats = _precompute(cfg, rows, **scorer_overrides)
        table = _in_order(table, row_ids)
        extra = {"run": run, "model_forwards": stats["forwards"], "duplicates": stats["duplicates"]}
        extra["actors"] = stats["actors"]  # per scorer process: batches and forwards (a restart shows a new pid)
        write_cache(root, fp, table, inputs, rows_per_file=rows_per_file, extra=extra)
        entry.update(
            rows_scored=table.num_rows,
            model_forwards=stats["forwards"],
            tokens_scored=stats["tokens"],
            duplicates=stats["duplicates"],
            actors=len(stats["actors"]),
        )
    write_ref_columns(prepared_dir, table)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    merge_summary(prepared_dir, entry)
    return entry


def _precompute(cfg: Config, rows: pa.Table, **scorer_overrides: Any) -> tuple[pa.Table, dict[str, Any]]:
    import ray

    from uft_ray.ray_utils import init_ray

    if rows.num_rows == 0:
        return schema.REFERENCE.empty_table(), {"forwards": 0, "tokens": 0, "duplicates": 0, "actors": []}
    init_ray(cfg.ray)
    collector = new_collector()
    try:
        ds = _prepared_dataset(rows, block_rows=cfg.reference.batch_size * 4)
        ds = stream_stage(ds, cfg, collector=collector, output_columns=["row_id"], **scorer_overrides)
        emitted = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            emitted += batch.num_rows
        table, stats = _collected(collector)
        if emitted != rows.num_rows:  # Ray Data emits each input row once, retries included
            logger.warning("reference stage emitted %d rows for %d inputs", emitted, rows.num_rows)
        return table, stats
    finally:
        ray.kill(collector)


# ---------------------------------------------------------------------------------------------------------
# reference.mode: adapter_off


def adapter_off_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs as the policy with its LoRA adapter disabled: `(sum_logp, n_tokens)`, no grad.

    `model` is a peft model (not a DeepSpeed engine: pass `engine.module`). The same `model_sequence_logprobs`
    as the actor scorer, so both reference modes give the same numbers on the same model. The caller owns
    train/eval mode: the models we train have no dropout outside LoRA, which `disable_adapter` bypasses.
    """
    import torch

    from uft_ray.logprobs import model_sequence_logprobs

    with torch.no_grad(), model.disable_adapter():
        return model_sequence_logprobs(model, input_ids, attention_mask, loss_mask, use_cache=False, **kwargs)
