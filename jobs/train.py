"""Ray job entrypoint: validate a config, then run it to completion in the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.yaml --demo-assets
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo_tiny.yaml --demo-assets
    ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/train.py \
        --config jobs/configs/mistral7b_uft.yaml train.lr=1e-5 output.run_name=lr1e-5

The config is checked first, paths included (they are this cluster's): a bad one exits 2 with one line per
problem, before any Ray work, so the job fails fast with the reason in its logs. A failed run exits 1.
Rerunning the same config and run_name resumes from the run's last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from uft_ray.cli import main
from uft_ray.demo import DEMO_ROOT, demo_overrides


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (jobs/configs/...)")
    p.add_argument(
        "--demo-assets",
        action="store_true",
        help="first make what a demo config points at if it is missing: the sample shards and the packaged SmolLM2 "
        "(demo.yaml, demo_hint_rft.yaml), or the tiny model and synthetic shards (demo_tiny.yaml, ...)",
    )
    p.add_argument(
        "--demo-root", default=DEMO_ROOT, metavar="DIR", help=f"where --demo-assets puts them ({DEMO_ROOT})"
    )
    p.add_argument("--verbose", action="store_true", help="keep Ray's own output (Ray Data's progress bars)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-5")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    raw = yaml.safe_load(open(args.config)) or {}
    method = raw.get("method", "uft")
    tiny = "tiny-model" in str((raw.get("model") or {}).get("path"))  # the tiny demo configs' model
    overrides = (demo_overrides(args.demo_root, method, tiny=tiny) if args.demo_assets else []) + args.overrides
    sys.exit(main(["train", args.config, *(["--verbose"] if args.verbose else []), *overrides]))
