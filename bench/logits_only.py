"""Logits only where they are used: the old full-logits path against uft_ray.logprobs, CPU.

    python bench/logits_only.py                 # vocab 151936, hidden 64, 2 layers, LoRA, 4 x 256 tokens, half prompt
    python bench/logits_only.py --modes fwdbwd fwd --repeats 5

The model is a random Qwen2 (tied embeddings, as Qwen2's small models) with LoRA on every linear layer; each
row is `--prompt-frac` prompt tokens, the rest response. Per step: the summed response log-probs of every row,
and for `fwdbwd` the backward of their sum (the LoRA gradients), as a training step computes them; `fwd` is a
no-grad forward (the reference, old log-probs, evaluation).

- before: the model's full [B, T, V] logits, then the chunked log-softmax over the scored positions
  (`full_logits_logprobs` below: what `model_sequence_logprobs` did before the logits-only path);
- after: `uft_ray.logprobs.model_sequence_logprobs`, whose output head sees the scored positions only.

Each (variant, mode) runs in a fresh subprocess. Memory: the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before every step) minus its resident set just before the step: what the step itself
added at its peak, model and inputs excluded. torch's CPU allocations are plain malloc/mmap, so RSS sees them
(tracemalloc would not). tokens/s: all B x T tokens (prompt included) over the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from uft_ray.logprobs import model_sequence_logprobs, sequence_logprobs  # noqa: E402


def full_logits_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: every position's logits, then the scored ones' log-softmax (the pre-issue-20 path)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return sequence_logprobs(out.logits, input_ids, loss_mask)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        Qwen2ForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    )
    model.config.use_cache = False
    ids = torch.randint(1, args.vocab, (args.batch, args.length))
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, int(args.prompt_frac * args.length) :] = 1
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


def child(args: argparse.Namespace) -> None:
    model, batch = build(args)
    fn = full_logits_logprobs if args.variant == "before" else model_sequence_logprobs
    backward = args.mode == "fwdbwd"

    def step() -> None:
        with torch.set_grad_enabled(backward):
            logp, _ = fn(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            if backward:
                logp.sum().backward()
                model.zero_grad(set_to_none=True)

    step()  # warm-up
    times, peaks = [], []
    for _ in range(args.repeats):
        _reset_peak()
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(_status_kb("VmHWM") - base)
    t = statistics.median(times)
    print(json.dumps({"tokens_per_s": args.batch * args.length / t, "step_s": t, "peak_mb": max(peaks) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--prompt-frac", type=float, default=0.5)
    p.add_argument("--modes", nargs="+", default=["fwdbwd", "fwd"], choices=["fwdbwd", "fwd"])
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (median time, max peak)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)

    full_mb = args.batch * args.length * args.vocab * 4 / 2**20
    print(
        f"V={args.vocab} hidden={args.hidden} layers={args.layers} B={args.batch} T={args.length} "
        f"prompt={args.prompt_frac:.0%} threads={torch.get_num_threads()}; fp32 [B, T, V] logits = {full_mb:.0f} MB"
    )
    print(f"{'mode':7} {'variant':7} {'tokens/s':>9} {'step_s':>7} {'peak_MB':>8}")
    for mode in args.modes:
        results = {}
        for variant in ("before", "after"):
            cmd = [sys.executable, __file__, "--variant", variant, "--mode", mode]
            for name in ("vocab", "hidden", "layers", "batch", "length", "prompt_frac", "repeats"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = results[variant] = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:7} {variant:7} {r['tokens_per_s']:9.0f} {r['step_s']:7.3f} {r['peak_mb']:8.0f}", flush=True)
        a, b = results["after"], results["before"]
        print(
            f"{mode:7} after/before: tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
            f"peak memory x{a['peak_mb'] / b['peak_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
