"""Packed against padded micro-batches on the real model (SmolLM2-135M-Instruct, the demo's config and data), CPU.

    python bench/packing_real.py            # 4 runs of 8 steps, alternating padded / packed; ~4 min on 2 cores
    python bench/packing_real.py train.group_by_length=false    # extra overrides for every run: more padding

Each run goes through the product's driver (`train.packing=true|false`, `train.max_steps=8`); a run's time is the
median `step_time_s` of steps 3-8. Printed: each run, then packed / padded (the median of each). On 2 quiet cores
(2026-12-07): padded 2.507 and 2.194 s/step, packed 2.654 and 2.789, packed/padded 1.16, at a padding share of
0.04 (the demo's length-grouped micro-batches); with `train.group_by_length=false`, 2.299 / 2.547 against
2.652 / 2.721, packed/padded 1.11 at 0.09: what `train.packing: auto`'s CPU break-even (uft_ray.packing) is from.
"""

import statistics
import sys
import time

from uft_ray import driver, methods
from uft_ray.config import load_config
from uft_ray.run_dir import RunDir


def main(extra: list[str]) -> None:
    root = "/tmp/uft-bench-packing-real"
    m = methods.get("uft")
    over = m.demo_overrides(root, False)
    out = {}
    for packing in ("false", "true", "false", "true"):
        name = f"pack-{packing}-{len(out)}"
        cfg = load_config(
            str(m.demo_config(False)),
            over
            + extra
            + [
                f"train.packing={packing}",
                "train.max_steps=8",
                "eval.every=1000",
                "output.storage_path=/tmp/uft-bench-packing-real/runs",
                f"output.run_name={name}",
            ],
        )
        t0 = time.time()
        res = driver.run(cfg)
        rows = RunDir(res.run_dir).read_metrics()
        st = [r["step_time_s"] for r in rows if r["step"] >= 3]
        out.setdefault(packing, []).append(statistics.median(st))
        print(
            name,
            "median step_time_s",
            round(statistics.median(st), 3),
            "padding_frac",
            rows[-1].get("padding_frac"),
            "wall",
            round(time.time() - t0),
            flush=True,
        )
    print({k: [round(x, 3) for x in v] for k, v in out.items()})
    print("packed/padded", round(statistics.median(out["true"]) / statistics.median(out["false"]), 3))


if __name__ == "__main__":
    main(sys.argv[1:])
