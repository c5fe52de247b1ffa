"""Training throughput: length grouping on vs off, and uft-ray's per-step time vs a plain single-process loop.

Run (CPU, a local Ray; one training worker with 1 CPU in every case):

    python bench/train_throughput.py                         # "small" random Qwen2 (~4M), 160 rows, 16 steps
    python bench/train_throughput.py --model tiny --steps 24
    python bench/train_throughput.py --model 50m --rows 96 --steps 12   # overheads amortized over more compute
    python bench/train_throughput.py --model 0.5b --gpu      # Qwen2-0.5B shape, bf16, ZeRO-3, one GPU: adds MFU
    python bench/train_throughput.py --model 7b --gpu --runs grouped --no-plain --steps 6 --micro-batch 16 \
        --grad-accum 2 --max-len 1024 --json out.json        # Mistral-7B shape (real MistralConfig), made on the GPU

On the same prepared rows (UltraChat + HelpSteer2 samples, reference log-probs precomputed once):
1. uft-ray with `train.group_by_length` true, then false: median tokens/s (real tokens, steps after the first two)
   and `padding_frac` (pad tokens / padded tokens over the run, also what the plan predicts).
2. A plain loop in this process: transformers + peft, the same LoRA, AdamW, cosine schedule, gradient
   checkpointing, the same micro-batches in the same order and the same UFT loss (uft_ray.logprobs/losses), no
   Ray, no DeepSpeed. Printed: median step time of each and uft-ray / plain as a ratio (the cost of ZeRO-3,
   Ray Data feeding and per-step metric aggregation at one worker).
With --gpu: tokens/s and MFU of the uft-ray run, counting 4 x params x tokens per step (forward plus a backward
through frozen weights, which need no weight gradients) against the peak bf16 dense FLOP/s given by
--peak-tflops (H100 SXM: 989; gpu/check.py passes the H200's measured 790), and the peak device memory
while each uft-ray run trains (`nvidia-smi` memory.used sampled every 200 ms: the worker is a Ray process, so
this process's torch.cuda.max_memory_allocated cannot see it; the figure includes CUDA contexts and the caching
allocator's reserve).
`--runs` / `--no-plain` drop parts; `--check-adapter` reloads the saved adapter with peft; `--json PATH` writes
every figure (rewritten after each stage, so a run killed midway leaves what it had measured), with `checks`:
the loss falls (mean of the last third of the steps below the first third's), step 1's implicit reward is 0
(|kl/source| per token within bf16 rounding: the policy equals the reference before the first update) and,
with --check-adapter, the adapter reloads and changes the logits.
Numbers from a shared 2-core machine are noisy: compare ratios, not absolute values, and rerun.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from uft_ray.config import Config, load_config

# Qwen2 shapes: (hidden, layers, heads, kv heads, intermediate, vocab or None for the tiny tokenizer's own).
MODELS: dict[str, tuple[int, int, int, int, int, int | None] | None] = {
    "tiny": None,  # uft_ray.demo.tiny_model defaults: 2 layers, hidden 64
    "small": (256, 4, 8, 4, 704, None),
    "50m": (512, 14, 8, 8, 1536, None),
    "0.5b": (896, 24, 14, 2, 4864, 151936),
}
# Real MistralConfig shapes (Mistral-7B-v0.1's config.json), random init in bf16: no weights to download.
MISTRAL: dict[str, dict[str, Any]] = {
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
    },
}
KL_TOL = 0.02  # nats per token: bf16 rounding between two forwards of the same weights (tests/gpu's bound)


def make_model(name: str, root: Path) -> str:
    from uft_ray.demo.tiny_model import make_tiny_model

    if name in MISTRAL:
        return make_mistral(name, root)
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


def make_mistral(name: str, root: Path) -> str:
    """A random-init MistralForCausalLM of a real shape in bf16, with the tiny tokenizer (its ids fit any vocab).

    Built on the GPU: 7B parameters initialised on the CPU in fp32 would take minutes and ~29 GB of memory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

    from uft_ray.demo.tiny_model import make_tiny_model

    out = root / f"mistral-{name}"
    if (out / "config.json").is_file():  # the dir is moved in whole: one that exists is complete
        return str(out)
    if not torch.cuda.is_available():
        raise SystemExit(f"--model {name} needs a GPU: the model is made there in bf16")
    tiny = make_tiny_model(root / "tiny")
    base = AutoConfig.from_pretrained(tiny)
    config = MistralConfig(**MISTRAL[name], bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                           pad_token_id=base.pad_token_id, dtype="bfloat16")  # fmt: skip
    tmp = root / f".mistral-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny, tmp, ignore=shutil.ignore_patterns("model.safetensors", "config.json", "uft_tiny.json"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out)


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
                "grad_accum": args.grad_accum,
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
    from uft_ray.run_dir import RunDir

    return RunDir(run_dir).read_metrics()


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

    from uft_ray.data.prepared import read_rows
    from uft_ray.logprobs import model_sequence_logprobs
    from uft_ray.losses import uft_loss
    from uft_ray.reference.cache import as_lookup
    from uft_ray.reference.service import attach_reference, read_reference
    from uft_ray.train.engine import enable_activation_checkpointing
    from uft_ray.train.plan import load_plan

    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    dtype = torch.bfloat16 if cfg.train.use_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype).to(device)
    model.config.use_cache = False
    enable_activation_checkpointing(model)  # the engine's own call: either transformers API, non-reentrant
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
        r["row_id"]: r for r in read_rows(prepared, ["row_id", "input_ids", "response_start", "score"]).to_pylist()
    }
    # The reference log-probs from the cache the uft-ray runs read (a hit: computed once before them).
    ref = as_lookup(read_reference(attach_reference(cfg, prepared), list(rows)))
    for rid, r in rows.items():
        r["ref_logp"] = ref[rid][0]
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
            (loss / cfg.train.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.train.use_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def step_checks(rows: list[dict[str, Any]], kl_tol: float = KL_TOL) -> tuple[dict[str, bool], dict[str, Any]]:
    """From a run's metrics rows: whether the loss falls and step 1's reward is 0, and the figures behind them."""
    losses = [float(r["loss"]) for r in rows]
    third = max(1, len(losses) // 3)
    head, tail = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
    first = rows[0] if rows else {}
    rewards = {k: float(v) for k, v in first.items() if k.startswith("reward/")}
    kls = {k: float(v) for k, v in first.items() if k.startswith("kl/")}
    checks = {
        "loss_falls": len(losses) >= 2 and tail < head,
        # before the first update LoRA's B is 0: policy == reference up to the two forwards' bf16 rounding
        "reward_zero_at_step1": bool(kls) and all(abs(v) <= kl_tol for v in kls.values()),
    }
    figures = {
        "losses": losses,
        "loss_head_mean": head,
        "loss_tail_mean": tail,
        "step1_reward": rewards,
        "step1_reward_abs_max": max((abs(v) for v in rewards.values()), default=None),
        "step1_kl_per_token": kls,
        "kl_tol": kl_tol,
    }
    return checks, figures


def mfu(n_params: float, tokens_per_s: float, peak_tflops: float) -> float:
    """4 x params x tokens: a forward (2) plus a backward through frozen weights (2, no weight gradients)."""
    return 4 * n_params * tokens_per_s / (peak_tflops * 1e12)


class GpuMemory:
    """Peak memory.used of GPU 0 while the block runs, from `nvidia-smi -lms 200` (GiB; None without it)."""

    def __enter__(self) -> GpuMemory:
        self.samples: list[float] = []
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0", "-lms", "200"]
        try:
            self.proc: subprocess.Popen[str] | None = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            self.proc = None
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()) / 1024)  # MiB -> GiB
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)

    @property
    def peak_gib(self) -> float | None:
        return max(self.samples) if self.samples else None


def check_adapter(model_path: str, adapter_dir: str, gpu: bool) -> dict[str, Any]:
    """Reload the saved adapter with peft on the base: its tensors are the saved ones and it moves the logits."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    # peft only warns on missing keys: compare the tensors themselves
    same = set(saved) == set(loaded) and all(torch.equal(saved[k].to(loaded[k]), loaded[k]) for k in saved)
    ids = torch.arange(3, 67, device=device)[None]  # ids the tiny tokenizer knows, within every vocabulary
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            without = model(input_ids=ids).logits.float()
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    out = {
        "tensors": len(saved),
        "reloaded_equal": same,
        "lora_B_abs_max": max((float(v.abs().max()) for v in lora_b), default=0.0),
        "logits_max_abs_diff": float((with_adapter - without).abs().max()),
    }
    out["ok"] = bool(out["tensors"] and same and out["lora_B_abs_max"] > 0 and out["logits_max_abs_diff"] > 0)
    return out


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(figures, f, indent=1, default=str)
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS | MISTRAL), default="small")
    p.add_argument("--rows", type=int, default=160, help="trainable rows, half UltraChat, half HelpSteer2")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--zero-stage", type=lambda v: v if v == "auto" else int(v), default=3,
                   help="uft-ray's ZeRO stage: 0-3 or auto (default 3: the sharded path; 0 isolates ZeRO-3's cost)")  # fmt: skip
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--runs", default="grouped,ungrouped", help="uft-ray runs, a comma list of grouped, ungrouped")
    p.add_argument("--no-plain", action="store_true", help="skip the plain transformers + peft loop")
    p.add_argument("--check-adapter", action="store_true", help="reload the first run's adapter with peft")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--root", default=None, help="work dir (default: a temp dir)")
    args = p.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in ("grouped", "ungrouped") for r in runs):
        p.error(f"--runs: a comma list of grouped, ungrouped; got {args.runs!r}")

    import ray

    from uft_ray import driver
    from uft_ray.data.pipeline import prepare
    from uft_ray.demo.samples import write_samples
    from uft_ray.ray_utils import init_ray
    from uft_ray.reference import attach_reference
    from uft_ray.train.plan import load_plan

    root = Path(args.root or tempfile.mkdtemp(prefix="uft-bench-train-"))
    shutil.rmtree(root / "runs", ignore_errors=True)  # a rerun would resume (here: find nothing left to train)
    out: dict[str, Any] = {
        "model": args.model, "device": "cuda" if args.gpu else "cpu", "zero_stage": args.zero_stage,
        "dtype": "bfloat16" if args.gpu else "float32", "rows": args.rows, "steps": args.steps,
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "max_len": args.max_len,
        "peak_tflops": args.peak_tflops, "checks": {},
    }  # fmt: skip
    t0 = time.perf_counter()
    write_samples(root / "samples", scale=max(1, args.rows // 40))
    model = make_model(args.model, root)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    n_params = _count_params(c)
    out.update(model_path=model, architecture=(c.architectures or [c.model_type])[0], n_params=n_params,
               model_s=time.perf_counter() - t0)  # fmt: skip
    write_json(args.json, out)
    init_ray(num_cpus=4)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    results: dict[str, dict[str, Any]] = {}
    adapter_dir = None
    plain: list[float] = []
    try:
        base = bench_config(args, root, model, "prepare")
        prepared = str(root / "prepared")
        t0 = time.perf_counter()
        prepare(base, prepared)
        attach_reference(base, prepared)
        out["prepare_and_reference_s"] = time.perf_counter() - t0
        for name in runs:
            cfg = bench_config(args, root, model, name, group_by_length=name == "grouped")
            t0 = time.perf_counter()
            with GpuMemory() if args.gpu else contextlib.nullcontext() as mem:
                r = driver.run(cfg, prepared_dir=prepared)
            rows = metrics(r.run_dir)
            results[name] = summarize(rows) | {"plan_padding_frac": load_plan(r.plan_path).summary.padding_frac}
            results[name]["plan_path"] = r.plan_path
            results[name]["wall_s"] = time.perf_counter() - t0
            results[name]["gpu_mem_peak_gib"] = mem.peak_gib if mem is not None else None
            checks, figures = step_checks(rows)
            results[name] |= figures
            if name == runs[0]:  # the headline figures: in the JSON at once, should a later stage hang
                adapter_dir = r.adapter_dir
                out["checks"] |= checks
                g = results[name]
                out.update(run=name, tokens_per_s=g["tokens_per_s"], step_time_s=g["step_time_s"],
                           tokens_per_step=g["tokens_per_step"], gpu_mem_peak_gib=g["gpu_mem_peak_gib"])  # fmt: skip
                if args.gpu:
                    out["mfu"] = mfu(n_params, g["tokens_per_s"], args.peak_tflops)
                    out["gpu_mem_source"] = "nvidia-smi memory.used of GPU 0, sampled every 200 ms during the run"
            out["runs"] = {k: {kk: vv for kk, vv in v.items() if kk != "plan_path"} for k, v in results.items()}
            write_json(args.json, out)
        if not args.no_plain:
            first_cfg = bench_config(args, root, model, runs[0], group_by_length=runs[0] == "grouped")
            if args.gpu:
                import torch

                torch.cuda.reset_peak_memory_stats()
            plain = plain_loop(first_cfg, prepared, results[runs[0]]["plan_path"], threads=1)  # a Ray worker: 1 CPU
            out["plain"] = {"step_time_s": statistics.median(plain[2:] or plain), "step_times": plain}
            if args.gpu:
                out["plain"]["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            write_json(args.json, out)
    finally:
        ray.shutdown()

    g = results[runs[0]]
    if args.check_adapter and adapter_dir:
        try:
            out["adapter"] = check_adapter(model, adapter_dir, args.gpu)
        except Exception as e:  # a failed reload is a finding to report with the figures already measured
            out["adapter"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out["checks"]["adapter_reloads"] = out["adapter"]["ok"]
    write_json(args.json, out)

    print(f"\nmodel {args.model} ({model}); {args.rows} rows, {args.steps} steps of {args.micro_batch} x {args.grad_accum} rows, "
          f"max_len {args.max_len}; device {'cuda' if args.gpu else 'cpu'}, one worker, ZeRO-{args.zero_stage}")  # fmt: skip
    print(f"{'':>10} {'tokens/s':>10} {'padding_frac':>13} {'plan padding':>13} {'step s':>8}")
    for name in runs:
        r = results[name]
        print(
            f"{name:>10} {r['tokens_per_s']:>10.1f} {r['padding_frac']:>13.3f} {r['plan_padding_frac']:>13.3f} {r['step_time_s']:>8.3f}"
        )
    if "grouped" in results and "ungrouped" in results:
        gr, u = results["grouped"], results["ungrouped"]
        print(
            f"length grouping: tokens/s x{gr['tokens_per_s'] / u['tokens_per_s']:.2f}, padding {u['padding_frac']:.3f} -> {gr['padding_frac']:.3f}"
        )
    if plain:
        plain_step = statistics.median(plain[2:] or plain)
        print(f"per-step time: uft-ray {g['step_time_s']:.3f} s, plain transformers+peft {plain_step:.3f} s, "
              f"ratio uft-ray / plain = {g['step_time_s'] / plain_step:.2f}")  # fmt: skip
    if args.gpu:
        peak = g["gpu_mem_peak_gib"]
        note = f", peak GPU memory {peak:.1f} GiB (nvidia-smi)" if peak is not None else ""
        print(f"GPU: {g['tokens_per_s']:.0f} tokens/s, {n_params / 1e6:.0f}M params, MFU {out['mfu']:.1%}{note}")
    print(f"checks: {json.dumps(out['checks'])}")
    print(
        json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk not in ("plan_path", "losses")} for k, v in results.items()},
            indent=1,
        )
    )
    if plain:
        print(f"plain step times: {np.round(plain, 3).tolist()}")


def _count_params(c: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    main()
