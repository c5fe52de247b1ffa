"""Training throughput: length grouping on vs off, and uft-ray's per-step time vs a plain single-process loop.

Run (CPU, a local Ray; one training worker with 1 CPU in every case):

    python bench/train_throughput.py                         # "small" random Qwen2 (~4M), 160 rows, 16 steps
    python bench/train_throughput.py --model tiny --steps 24
    python bench/train_throughput.py --model 50m --rows 96 --steps 12   # overheads amortized over more compute
    python bench/train_throughput.py --model 0.5b --gpu      # Qwen2-0.5B shape, bf16, ZeRO-3, one GPU: adds MFU

On the same prepared rows (UltraChat + HelpSteer2 samples, reference log-probs precomputed once):
1. uft-ray with `train.group_by_length` true, then false: median tokens/s (real tokens, steps after the first two)
   and `padding_frac` (pad tokens / padded tokens over the run, also what the plan predicts).
2. A plain loop in this process: transformers + peft, the same LoRA, AdamW, cosine schedule, gradient
   checkpointing, the same micro-batches in the same order and the same UFT loss (uft_ray.logprobs/losses), no
   Ray, no DeepSpeed. Printed: median step time of each and uft-ray / plain as a ratio (the cost of ZeRO-3,
   Ray Data feeding and per-step metric aggregation at one worker).
With --gpu: tokens/s and MFU of the uft-ray run, counting 4 x params x tokens per step (forward plus a backward
through frozen weights, which need no weight gradients) against the peak bf16 dense FLOP/s given by
--peak-tflops (H100 SXM: 989).
Numbers from a shared 2-core machine are noisy: compare ratios, not absolute values, and rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from uft_ray.config import Config, load_config

# Qwen2 shapes: (hidden, layers, heads, kv heads, intermediate, vocab or None for the tiny tokenizer's own).
MODELS: dict[str, tuple[int, int, int, int, int, int | None] | None] = {
    "tiny": None,  # uft_ray.tiny_model defaults: 2 layers, hidden 64
    "small": (256, 4, 8, 4, 704, None),
    "50m": (512, 14, 8, 8, 1536, None),
    "0.5b": (896, 24, 14, 2, 4864, 151936),
}


def make_model(name: str, root: Path) -> str:
    from uft_ray.tiny_model import make_tiny_model

    if MODELS[name] is None:
        return make_tiny_model(root / "tiny")
    hidden, layers, heads, kv, inter, vocab = MODELS[name]
    out = make_tiny_model(
        root / f"qwen2-{name}",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=inter,
    )
    if vocab is not None:  # the real vocabulary size: the logits cost what they cost on the real model
        cfg_path = Path(out) / "config.json"
        config = json.loads(cfg_path.read_text())
        if config["vocab_size"] != vocab:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            c = AutoConfig.from_pretrained(out)
            c.vocab_size = vocab
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(c).save_pretrained(out)
    return out


def bench_config(args: argparse.Namespace, root: Path, model: str, run_name: str, **train: Any) -> Config:
    half = args.rows // 2
    return load_config(
        {
            "model": {"path": model, "gradient_checkpointing": True},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {
                "seed": 0,
                "sources": [
                    {
                        "name": "ultrachat",
                        "format": "ultrachat_200k",
                        "path": str(root / "samples/ultrachat_200k/data/train_sft-*.parquet"),
                    },
                    {
                        "name": "helpsteer2",
                        "format": "helpsteer2",
                        "path": str(root / "samples/helpsteer2/train.jsonl.gz"),
                    },
                ],
            },
            "mixture": {"counts": {"ultrachat": half, "helpsteer2": half}},
            "tokenize": {"max_prompt_len": args.max_len // 2, "max_len": args.max_len},
            "loss": {"type": "uft", "beta": 0.1},
            "reference": {
                "actors": 1,
                "gpus_per_actor": 1 if args.gpu else 0,
                "batch_size": 8,
                "cache_dir": str(root / "ref-cache"),
            },  # fmt: skip
            "train": {
                "num_workers": 1,
                "use_gpu": args.gpu,
                "micro_batch_size": args.micro_batch,
                "grad_accum": 1,
                "lr": 1e-3,
                "max_steps": args.steps,
                "checkpoint_every": 10_000,
                "max_failures": 0,
                "deepspeed": {"zero_stage": args.zero_stage},
                **train,
            },
            "output": {"storage_path": str(root / "runs"), "run_name": run_name},
        }
    )


def metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    steady = rows[2:] or rows  # the first steps pay for the data pipeline's start and lazy inits
    padded = sum(r["tokens_per_s"] * r["step_time_s"] / (1 - r["padding_frac"]) for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "padding_frac": 1 - tokens / padded,
        "tokens_per_step": tokens / len(rows),
    }


def plain_loop(cfg: Config, prepared: str, plan_path: str, threads: int) -> list[float]:
    """The same training in one process with transformers + peft: returns each step's wall time."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from uft_ray.data.pipeline import read_prepared
    from uft_ray.logprobs import model_sequence_logprobs
    from uft_ray.losses import uft_loss
    from uft_ray.train.plan import load_plan

    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    dtype = torch.bfloat16 if cfg.train.use_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype).to(device)
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(cfg.train.seed)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    plan = load_plan(plan_path)
    sched = get_cosine_schedule_with_warmup(
        opt, round(cfg.train.warmup_ratio * plan.summary.steps), plan.summary.steps
    )
    rows = {
        r["row_id"]: r
        for r in read_prepared(prepared, ["row_id", "input_ids", "response_start", "score", "ref_logp"]).to_pylist()
    }
    t = plan.table.to_pandas().sort_values(["step", "micro", "slot"])
    times = []
    model.train()
    for _, step_rows in t.groupby("step", sort=True):
        t0 = time.perf_counter()
        for _, micro in step_rows.groupby("micro", sort=True):
            batch = [rows[i] for i in micro.row_id]
            longest = max(len(r["input_ids"]) for r in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n], attention[i, :n] = torch.tensor(r["input_ids"]), 1
                loss_mask[i, r["response_start"] : n] = 1
            policy, n_tokens = model_sequence_logprobs(
                model, ids.to(device), attention.to(device), loss_mask.to(device)
            )
            ref = torch.tensor([r["ref_logp"] for r in batch], dtype=torch.float64, device=device)
            score = torch.tensor([r["score"] for r in batch], dtype=torch.float64, device=device)
            loss, _ = uft_loss(policy, ref, score, cfg.loss.beta, n_tokens=n_tokens)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.train.use_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--rows", type=int, default=160, help="trainable rows, half UltraChat, half HelpSteer2")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--zero-stage", type=int, default=3, help="uft-ray's ZeRO stage (2 isolates ZeRO-3's cost)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--root", default=None, help="work dir (default: a temp dir)")
    args = p.parse_args()

    import ray

    from uft_ray import driver
    from uft_ray.data.pipeline import prepare
    from uft_ray.ray_utils import init_ray
    from uft_ray.reference import attach_reference
    from uft_ray.samples import write_samples
    from uft_ray.train.plan import load_plan

    root = Path(args.root or tempfile.mkdtemp(prefix="uft-bench-train-"))
    shutil.rmtree(root / "runs", ignore_errors=True)  # a rerun would resume (here: find nothing left to train)
    write_samples(root / "samples", scale=max(1, args.rows // 40))
    model = make_model(args.model, root)
    init_ray(num_cpus=4)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        base = bench_config(args, root, model, "prepare")
        prepared = str(root / "prepared")
        prepare(base, prepared)
        attach_reference(base, prepared)
        results = {}
        for group in (True, False):
            name = "grouped" if group else "ungrouped"
            cfg = bench_config(args, root, model, name, group_by_length=group)
            r = driver.run(cfg, prepared_dir=prepared)
            results[name] = summarize(metrics(r.run_dir)) | {
                "plan_padding_frac": load_plan(r.plan_path).summary.padding_frac
            }
            results[name]["plan_path"] = r.plan_path
        grouped_cfg = bench_config(args, root, model, "grouped", group_by_length=True)
        plain = plain_loop(
            grouped_cfg, prepared, results["grouped"]["plan_path"], threads=1
        )  # a Ray worker with 1 CPU runs 1 thread
    finally:
        ray.shutdown()

    print(f"\nmodel {args.model} ({model}); {args.rows} rows, {args.steps} steps of {args.micro_batch} rows, max_len {args.max_len}; "
          f"device {'cuda' if args.gpu else 'cpu'}, one worker, ZeRO-{args.zero_stage}")  # fmt: skip
    print(f"{'':>10} {'tokens/s':>10} {'padding_frac':>13} {'plan padding':>13} {'step s':>8}")
    for name in ("grouped", "ungrouped"):
        r = results[name]
        print(
            f"{name:>10} {r['tokens_per_s']:>10.1f} {r['padding_frac']:>13.3f} {r['plan_padding_frac']:>13.3f} {r['step_time_s']:>8.3f}"
        )
    g, u = results["grouped"], results["ungrouped"]
    print(
        f"length grouping: tokens/s x{g['tokens_per_s'] / u['tokens_per_s']:.2f}, padding {u['padding_frac']:.3f} -> {g['padding_frac']:.3f}"
    )
    plain_step = statistics.median(plain[2:] or plain)
    print(f"per-step time: uft-ray {g['step_time_s']:.3f} s, plain transformers+peft {plain_step:.3f} s, "
          f"ratio uft-ray / plain = {g['step_time_s'] / plain_step:.2f}")  # fmt: skip
    if args.gpu:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model)
        n_params = _count_params(c)
        flops = 4 * n_params * g["tokens_per_s"]
        print(
            f"GPU: {g['tokens_per_s']:.0f} tokens/s, {n_params / 1e6:.0f}M params, MFU {flops / (args.peak_tflops * 1e12):.1%}"
        )
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "plan_path"} for k, v in results.items()}, indent=1))
    print(f"plain step times: {np.round(plain, 3).tolist()}")


def _count_params(c: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    main()
