"""Ray job entrypoint for the paper's sequential baselines: stage 1 SFT, then stage 2 (DPO / KTO / UNA / UFT)
starting from the stage-1 model, whose reference is the stage-1 model too (base + stage-1 adapter). With
`method: hint_rft` it is SFT-then-RFT: stage 1 `rft.objective: sft`, stage 2 an RFT run from its adapter
(jobs/configs/sft_then_rft_stage1_countdown_qwen25_0_5b.yaml, then rft_countdown_qwen25_0_5b.yaml).

    ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/sequential.py \
        --stage1 jobs/configs/seq_stage1_sft.yaml --stage2 jobs/configs/seq_stage2_dpo.yaml

Overrides: `key=value` applies to both stages, `stage1.key=value` / `stage2.key=value` to one, e.g.
`train.num_workers=4 stage2.loss.beta=0.1`. Both configs are validated before any Ray work (exit 2 with
the messages); a failed stage exits 1. Stage 1 keeps its own run_name, so the four stage-2 baselines can share
one finished stage 1.
"""

from __future__ import annotations

import argparse
import sys

from uft_ray import driver, methods
from uft_ray.config import ConfigError, load_config


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Route `stage1.` / `stage2.` prefixed overrides to their stage; the rest go to both."""
    s1, s2 = [], []
    for o in overrides:
        if o.startswith("stage1."):
            s1.append(o[len("stage1.") :])
        elif o.startswith("stage2."):
            s2.append(o[len("stage2.") :])
        else:
            s1.append(o)
            s2.append(o)
    return s1, s2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", required=True, metavar="FILE", help="stage-1 config (loss.type sft)")
    p.add_argument("--stage2", required=True, metavar="FILE", help="stage-2 config (dpo / kto / una_bce / uft)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    o1, o2 = split_overrides(args.overrides)
    cfgs, failed = [], False
    for name, path, ov in (("stage 1", args.stage1, o1), ("stage 2", args.stage2, o2)):
        try:
            cfgs.append(load_config(path, ov))
        except ConfigError as e:
            failed = True
            print(f"{name} config {path} is invalid:", file=sys.stderr)
            for m in e.messages:
                print(f"  - {m}", file=sys.stderr)
    if failed:
        return 2
    c1, c2 = cfgs
    if c1.method != c2.method:
        print(f"the stages must share a method, got {c1.method} then {c2.method}", file=sys.stderr)
        return 2
    if (why := methods.of(c1).first_stage_problem(c1)) is not None:
        print(f"stage 1 config {args.stage1}: {why}", file=sys.stderr)
        return 2
    if c1.output.run_dir == c2.output.run_dir:
        print("the two stages need different output.run_name values (they would share a run dir)", file=sys.stderr)
        return 2

    try:
        results = driver.run_sequential(c1, c2)
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"sequential run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for stage, r in zip(
        ("stage 1", "stage 2"), results if isinstance(results, (list, tuple)) else [results], strict=False
    ):
        print(f"{stage}: adapter {getattr(r, 'adapter_dir', '?')}, metrics {getattr(r, 'metrics_path', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
