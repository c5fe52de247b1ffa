"""hint_rft's step on this machine: rollout vs trainer throughput, the generation share, the adapter sync.

    python bench/rft_step.py                          # the demo's tiny model on CPU, transformers rollouts
    python bench/rft_step.py --model small --steps 4  # a larger random-init Qwen2 (bench/train_throughput.py)
    python bench/rft_step.py --model 0.5b --gpu --backend vllm   # Qwen2.5-0.5B's shape on one GPU (uft-ray[vllm])

Runs `uft_ray.driver.run` on a hint_rft config (generated Countdown, 2 workers on CPU or 1 GPU worker + 1
rollout actor on GPU) and prints, over the steps after the first (its numbers include start-up): rollout
tokens/s of the actor pool, trainer tokens/s, the share of step time spent generating, and the adapter sync's
seconds and bytes as a fraction of the base model's weights (the point of syncing only the adapter).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import MODELS, make_model  # noqa: E402

from uft_ray import driver  # noqa: E402
from uft_ray.config import load_config  # noqa: E402
from uft_ray.run_dir import read_metrics  # noqa: E402
from uft_ray.train.engine import base_model_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--response-len", type=int, default=24)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="uft-bench-rft-"))
    model = make_model(args.model, root)
    overrides = [
        f"model.path={model}",
        f"output.storage_path={root / 'runs'}",
        f"train.max_steps={args.steps}",
        f"rft.max_response_len={args.response_len}",
        f"rft.rollout.backend={args.backend}",
        "eval.every=null",
        "eval.max_rows=4",
        f"train.checkpoint_every={args.steps}",
    ]
    if args.gpu:
        overrides += ["train.use_gpu=true", "train.num_workers=1", "train.micro_batch_size=8", "train.grad_accum=2",
                      "rft.rollout.gpus_per_actor=0.4", "train.gpus_per_worker=0.5", "model.dtype=bfloat16",
                      "rft.rollout.gpu_memory_utilization=0.3"]  # fmt: skip
    cfg = load_config(ROOT / "jobs/configs/demo_hint_rft_tiny.yaml", overrides)
    result = driver.run(cfg)
    rows = read_metrics(result.metrics_path)[1:] or read_metrics(result.metrics_path)

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    base = base_model_bytes(cfg) or 0
    figures = {
        "model": args.model,
        "device": "gpu" if args.gpu else "cpu",
        "backend": args.backend,
        "steps_measured": len(rows),
        "rollout_tokens_per_s": mean("rollout/tokens_per_s"),
        "trainer_tokens_per_s": mean("tokens_per_s"),
        "generate_frac": mean("time/generate_frac"),
        "step_time_s": mean("step_time_s"),
        "adapter_sync_s": mean("sync/adapter_s"),
        "adapter_bytes": rows[-1]["sync/adapter_bytes"],
        "base_model_bytes": base,
        "adapter_over_base": rows[-1]["sync/adapter_bytes"] / base if base else float("nan"),
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
