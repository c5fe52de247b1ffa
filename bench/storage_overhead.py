"""Object storage vs local disk: the same run, once with its outputs on local disk, once in an S3 bucket.

Run (CPU, a local Ray; starts a real S3 API server, moto, on 127.0.0.1 as the tests do):

    python bench/storage_overhead.py                  # the demo config, 8 steps, checkpoint every 4
    python bench/storage_overhead.py --steps 20 --every 5

Every run starts cold (its own prepared rows and reference cache) on the demo's tiny model and sample shards.
The bucket run keeps everything in the bucket: `output.storage_path`, `reference.cache_dir` and `model.path`
(downloaded once per node by uft_ray.model_store). The two alternate for `--repeat` rounds; printed: wall time of
each `driver.run`, and bucket / local as a ratio of the best warm runs (the first round is left out); the number of objects the bucket run wrote. On one machine the "network" is loopback, so the ratio
is the cost of the object-store code paths (whole-file puts, metrics.jsonl rewritten per step, checkpoint
uploads and downloads through pyarrow's S3 client), not of a real network.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the S3 server fixture (tests/fixtures/s3_server.py)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=4, help="train.checkpoint_every")
    p.add_argument("--repeat", type=int, default=3, help="rounds of (local, bucket); the first is a warm-up")
    args = p.parse_args()

    from fixtures.s3_server import S3Server, apply_env

    work = Path(tempfile.mkdtemp(prefix="uft-storage-bench-"))
    server = S3Server(str(work / "moto.log"))
    apply_env(server.env)  # before Ray starts: its workers inherit the endpoint and keys
    try:
        import ray
        import yaml

        from uft_ray import driver, storage
        from uft_ray.config import load_config
        from uft_ray.demo import demo_config_text, demo_overrides
        from uft_ray.ray_utils import init_ray

        overrides = demo_overrides()
        common = [f"train.max_steps={args.steps}", f"train.checkpoint_every={args.every}"]
        init_ray(load_config(yaml.safe_load(demo_config_text()), overrides, check_paths=False).ray, num_cpus=6)
        bucket = server.new_bucket("bench")
        model = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.path="))
        storage.copy_tree(model, f"{bucket}/models/tiny")
        runs = {
            "local": [f"output.storage_path={work / 'runs'}", f"reference.cache_dir={work / 'cache'}"],
            "bucket": [
                f"output.storage_path={bucket}/runs",
                f"reference.cache_dir={bucket}/cache",
                f"model.path={bucket}/models/tiny",
            ],
        }
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(args.repeat):  # alternated, each in a fresh place: the first run also warms the caches
            for name, where in runs.items():
                where = [w.replace("/runs", f"/runs{rep}").replace("/cache", f"/cache{rep}") for w in where]
                cfg = load_config(yaml.safe_load(demo_config_text()), overrides + common + where, check_paths=False)
                t0 = time.perf_counter()
                result = driver.run(cfg)
                seconds[name].append(time.perf_counter() - t0)
                print(
                    f"{name:>6} #{rep}: {seconds[name][-1]:7.1f} s  ({result.steps} steps, {result.run_dir})",
                    flush=True,
                )
        best = {name: min(v[1:] or v) for name, v in seconds.items()}  # the warm-up round left out when repeated
        objects = len(storage.list_files(bucket)[1])
        print(
            f"bucket / local wall time (best warm runs): {best['bucket'] / best['local']:.2f}x "
            f"({best['bucket']:.1f} s / {best['local']:.1f} s); {objects} objects in the bucket"
        )
        ray.shutdown()
    finally:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("UFT_RAY_MODEL_CACHE", tempfile.mkdtemp(prefix="uft-model-cache-"))
    main()
