"""Reference scoring throughput: 1 vs 2 scorer actors, the tiny model vs a ~50M Qwen2, and a cache hit vs a miss.

Run (CPU, a local Ray with 4 logical CPUs, 1 CPU per actor):

    python bench/reference.py                      # tiny + 50m, 1 and 2 actors, 256 rows
    python bench/reference.py --models tiny --rows 512
    python bench/reference.py --models 0.5b        # a Qwen2-0.5B-shaped random model in bf16, on a GPU machine

For each (model, actors) it runs `attach_reference` on a fresh cache (a miss: actor start, model load, scoring,
cache publish), then again (a hit). It prints:
- `e2e tok/s`: tokens forwarded / wall time of the whole miss (includes starting the actors and loading the model);
- `steady tok/s`: tokens / (last batch done - first actor ready), the scoring rate once a model is loaded;
- `miss s`, `hit s`, and `miss/hit`. Tokens are every token of every forwarded sequence (prompt and response).
`--json PATH` writes every row (and the device and scorer dtype) to PATH as well.
Numbers from a shared 2-core machine are noisy: compare ratios, not absolute values, and rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray import schema
from uft_ray.config import Config, load_config
from uft_ray.reference import attach_reference, cache_root

# Qwen2 shapes: (hidden, layers, heads, kv heads, intermediate, vocab or None for the tiny tokenizer's own).
MODELS = {
    "tiny": None,  # uft_ray.demo.tiny_model defaults: 2 layers, hidden 64
    "50m": (512, 14, 8, 8, 1536, None),
    "0.5b": (896, 24, 14, 2, 4864, 151936),  # Qwen2-0.5B's shape, its real vocabulary size (logits cost)
}


def make_model(name: str, root: Path) -> str:
    from uft_ray.demo.tiny_model import make_tiny_model

    tiny = make_tiny_model(root / "tiny")
    if MODELS[name] is None:
        return tiny
    hidden, layers, heads, kv, inter, vocab = MODELS[name]
    out = root / f"qwen2-{name}"
    if vocab is None:
        return make_tiny_model(out, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                               intermediate_size=inter)  # fmt: skip
    if not (out / "model.safetensors").is_file():
        import torch
        from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

        base = AutoConfig.from_pretrained(tiny)
        config = Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=True, max_position_embeddings=4096,
            bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("model.safetensors", "config.json", "uft_tiny.json"))
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return str(out)


def n_params(model_dir: str) -> float:
    """Millions of parameters, from the safetensors header (no weights loaded)."""
    import math

    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6  # noqa: SIM118


def manifest_dtype(manifest: dict, gpu: bool) -> str:
    """The scorer's dtype as the cache recorded it, else what `model.dtype: auto` resolves to."""
    numerics = (manifest.get("inputs") or {}).get("numerics") or {}  # the fingerprint's inputs
    return numerics.get("dtype") or ("bfloat16" if gpu else "float32")


def make_prepared(out: Path, n_rows: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> int:
    """Random-token rows in schema.TOKENIZED, a quarter of them pairs; returns the tokens one pass forwards."""
    rng = random.Random(seed)
    rows, tokens = [], 0
    for i in range(n_rows):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        pair = i % 4 == 3
        rejected = ids[: length // 3] + [rng.randrange(3, vocab) for _ in range(rng.randint(8, max_len - length // 3))]
        rows.append(
            {
                "row_id": f"bench-{i}", "source": "bench", "kind": "pair" if pair else "score", "prompt": [],
                "response": "", "rejected": "" if pair else None, "score": 0.5, "input_ids": ids,
                "response_start": length // 3, "length": length,
                "rejected_input_ids": rejected if pair else None,
                "rejected_response_start": length // 3 if pair else None,
                "rejected_length": len(rejected) if pair else None,
            }
        )  # fmt: skip
        tokens += length + (len(rejected) if pair else 0)
    shutil.rmtree(out, ignore_errors=True)
    (out / "rows").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=schema.TOKENIZED)
    half = n_rows // 2
    pq.write_table(table.slice(0, half), out / "rows" / "part-00000.parquet")
    pq.write_table(table.slice(half), out / "rows" / "part-00001.parquet")
    return tokens


def config(model: str, cache: Path, actors: int, batch_size: int, gpu: bool) -> Config:
    return load_config(
        {
            "model": {"path": model},
            "data": {"sources": [{"name": "bench", "format": "scored", "path": "unused"}]},
            "mixture": {"counts": {"bench": 1}},
            "train": {"use_gpu": gpu},
            "reference": {"actors": actors, "batch_size": batch_size, "cpus_per_actor": 1, "gpus_per_actor": 1 if gpu
                          else 0, "cache_dir": str(cache)},
        },
        check_paths=False,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,50m", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--actors", default="1,2")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--root", default=None, help="where models, rows and caches go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results, device and dtype to this file")
    args = p.parse_args()

    import ray
    import torch

    from uft_ray.ray_utils import init_ray

    root = Path(args.root or tempfile.mkdtemp(prefix="uft-bench-reference-"))
    gpu = torch.cuda.is_available()
    init_ray(num_cpus=4)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"root {root}; device {'cuda' if gpu else 'cpu'}; {args.rows} rows of {args.min_len}-{args.max_len} "
          f"tokens (1/4 pairs), batch_size {args.batch_size}, 1 CPU per actor")  # fmt: skip
    header = f"{'model':>6} {'params':>8} {'actors':>6} {'tokens':>8} {'e2e tok/s':>10} {'steady tok/s':>12} "
    header += f"{'miss s':>7} {'hit s':>6} {'miss/hit':>8} {'forwards':>8}"
    results = []
    lines = [header]
    for name in args.models.split(","):
        model = make_model(name, root)
        from transformers import AutoConfig

        vocab = min(AutoConfig.from_pretrained(model).vocab_size, 1000)  # ids the tiny tokenizer knows
        prepared = root / "prepared"
        for actors in [int(a) for a in args.actors.split(",")]:
            make_prepared(prepared, args.rows, vocab, args.min_len, args.max_len)
            cache = root / f"cache-{name}-{actors}"
            shutil.rmtree(cache, ignore_errors=True)
            cfg = config(model, cache, actors, args.batch_size, gpu)
            miss = attach_reference(cfg, prepared)
            t0 = time.perf_counter()
            hit = attach_reference(cfg, prepared)
            hit_s = time.perf_counter() - t0
            assert miss["cache"] == "miss" and hit["cache"] == "hit" and hit["model_forwards"] == 0
            manifest = json.loads((Path(cache_root(cfg)) / miss["fingerprint"] / "manifest.json").read_text())
            workers = manifest["actors"]
            window = max(a.get("last_batch_at", 0) for a in workers) - min(a["ready_at"] for a in workers)
            tokens = miss["tokens_scored"]
            row = {
                "model": name, "params_m": round(n_params(model), 1), "actors": actors, "tokens": tokens,
                "dtype": manifest_dtype(manifest, gpu),
                "e2e_tokens_per_s": tokens / miss["seconds"], "steady_tokens_per_s": tokens / window,
                "miss_s": miss["seconds"], "hit_s": hit_s, "forwards": miss["model_forwards"],
            }  # fmt: skip
            results.append(row)
            lines.append(
                f"{name:>6} {row['params_m']:>7.1f}M {actors:>6} {tokens:>8} {row['e2e_tokens_per_s']:>10.0f} "
                f"{row['steady_tokens_per_s']:>12.0f} {row['miss_s']:>7.2f} {hit_s:>6.3f} "
                f"{row['miss_s'] / hit_s:>7.0f}x {row['forwards']:>8}"
            )
            print(lines[-1] if len(lines) > 2 else "\n".join(lines), flush=True)
    by = {(r["model"], r["actors"]): r for r in results}
    for name in args.models.split(","):
        if (name, 1) in by and (name, 2) in by:
            ratio = by[(name, 2)]["steady_tokens_per_s"] / by[(name, 1)]["steady_tokens_per_s"]
            print(f"{name}: 2 actors / 1 actor steady throughput = {ratio:.2f}x")
    (root / "bench-reference.json").write_text(json.dumps(results, indent=1))
    if args.json:
        device = torch.cuda.get_device_name(0) if gpu else "cpu"
        Path(args.json).write_text(json.dumps({"device": device, "rows": args.rows, "results": results}, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
