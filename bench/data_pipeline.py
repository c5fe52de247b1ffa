"""Data-plane benchmark: read + normalize + tokenize throughput on Ray Data, and the driver's peak memory.

    python bench/data_pipeline.py                          # 100k and 400k raw rows (a few minutes on 2 cores)
    python bench/data_pipeline.py --sizes 20000 80000      # quicker

For each size N the sample generator writes N raw rows (N/2 UltraChat conversations in parquet, N/4 HelpSteer2
prompts = N/2 jsonl.gz rows) and a fresh subprocess, so that its peak RSS is that size's alone:
1. runs `prepare()` with quotas of 70% of the raw rows (ultrachat unfolds to ~1.8 rows per conversation, so the
   band passes tokenize a large part of every source) and records the driver's peak RSS (ru_maxrss: the driver
   process only, not Ray's workers);
2. times one streaming Ray Data job of read + normalize + tokenize over every row (written to parquet, so
   nothing comes back to the driver): the pipeline's throughput.
Streaming means the driver's memory does not grow with the data: the 400k peak must stay within 1.5x of the
100k one. The tiny model's tokenizer is used (a real 150k-vocab tokenizer is slower per row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """One size, in its own process: prepare (peak RSS), then the read+normalize+tokenize job (rows/s)."""
    import ray
    from ray.data import DataContext

    from uft_ray.config import RayConfig, load_config
    from uft_ray.data.pipeline import SourceFilesDatasource, source_parts, to_dataset
    from uft_ray.data.pipeline import prepare as run_prepare
    from uft_ray.data.staged import tokenize_block
    from uft_ray.data.tokenize import encoder_key
    from uft_ray.ray_utils import init_ray

    data = Path(args.data)
    n = args.rows
    cfg = load_config(
        {
            "model": {"path": args.model},
            "data": {
                "sources": [
                    {
                        "name": "ultrachat",
                        "format": "ultrachat_200k",
                        "path": str(data / "ultrachat_200k/data/train_sft-*.parquet"),
                    },
                    {"name": "helpsteer2", "format": "helpsteer2", "path": str(data / "helpsteer2/train.jsonl.gz")},
                ]
            },
            "mixture": {"ratios": {"ultrachat": 0.5, "helpsteer2": 0.5}, "total": int(0.7 * n)},
            "tokenize": {"max_prompt_len": 1024, "max_len": 2048},
            "loss": {"type": "uft"},
        }
    )
    init_ray(RayConfig(), num_cpus=args.num_cpus)
    DataContext.get_current().enable_progress_bars = False
    rss_start = _rss_mb()

    out = Path(args.out)
    t0 = time.time()
    summary = run_prepare(cfg, str(out / "prepared"))
    prepare_s = time.time() - t0
    rss_prepare = _rss_mb()

    # the pipeline's streaming throughput: every row read, normalized and tokenized, in one job
    parts = source_parts(cfg.data.sources)
    m_key, t_key = encoder_key(cfg.model, cfg.tokenize)
    t0 = time.time()
    ds = to_dataset(SourceFilesDatasource(parts, seed=0, mode="rows"))
    ds = ds.map_batches(tokenize_block, fn_kwargs={"model_key": m_key, "tokenize_key": t_key}, batch_size=256,
                        batch_format="pyarrow")  # fmt: skip
    ds.write_parquet(str(out / "throughput"))
    stream_s = time.time() - t0
    unified = sum(s["rows_normalized"] for s in summary["sources"].values())
    raw = sum(s["rows_read"] for s in summary["sources"].values())
    ray.shutdown()
    print(
        json.dumps(
            {
                "rows": n,
                "raw_rows_read": raw,
                "unified_rows": unified,
                "rows_out": summary["rows_out"],
                "rows_tokenized_by_prepare": sum(s["rows_tokenized"] for s in summary["sources"].values()),
                "prepare_s": round(prepare_s, 1),
                "prepare_raw_rows_per_s": round(raw / prepare_s),
                "stream_s": round(stream_s, 1),
                "stream_raw_rows_per_s": round(raw / stream_s),
                "stream_unified_rows_per_s": round(unified / stream_s),
                "driver_rss_mb_after_ray_init": round(rss_start, 1),
                "driver_peak_rss_mb": round(rss_prepare, 1),
                "passes": summary["passes"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000], help="raw rows per run")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--workdir", default=None, help="where data and outputs go (default: a temp dir, removed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from uft_ray.demo.samples import write_samples
    from uft_ray.demo.tiny_model import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="uft-bench-"))
    model = make_tiny_model(work / "tiny-model")
    results = []
    try:
        for n in args.sizes:
            data = work / f"data-{n}"
            t0 = time.time()
            write_samples(data, n_ultrachat=n // 2, n_helpsteer_prompts=n // 4, n_preference=2, n_trl=2)
            print(f"[{n} rows] samples written in {time.time() - t0:.0f}s", flush=True)
            out = work / f"out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, __file__, "--child", "--rows", str(n), "--data", str(data), "--model", model,
                   "--out", str(out), "--num-cpus", str(args.num_cpus)]  # fmt: skip
            env = {**os.environ, "RAY_DEDUP_LOGS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"size {n} failed")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), flush=True)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\nrows      raw rows/s (stream)  unified rows/s (stream)  prepare s  driver peak RSS MB")
    for r in results:
        print(f"{r['rows']:<9} {r['stream_raw_rows_per_s']:<20} {r['stream_unified_rows_per_s']:<24} "
              f"{r['prepare_s']:<10} {r['driver_peak_rss_mb']}")  # fmt: skip
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        ratio = hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"]
        verdict = "OK" if ratio <= 1.5 else "TOO HIGH"
        print(f"driver peak RSS {hi['rows']} / {lo['rows']} rows: {ratio:.2f}x (target <= 1.5x): {verdict}")


if __name__ == "__main__":
    main()
