"""Rollout tokens/s of the hf backend (what `rollout.backend: auto` falls back to without vLLM), in this process.

    python3 gpu/rollout.py --json rollout.json                        # the GPU window's rollout_0.5b check
    python3 gpu/rollout.py --model tiny --device cpu --batch 8 --new-tokens 16 --json r.json      # its CPU smoke

The rollout actor's own code (uft_ray.rft.rollout.RolloutActor, used as a plain object: no Ray), backend `hf`,
its seeded sampler (uft_ray.rft.sampling), on a random-init model of Qwen2-0.5B's shape (bench/train_throughput.py
owns it; the real 151,936-token vocabulary) in bf16, LoRA r16 on every projection with a trainer-like adapter
loaded (B nonzero). The model is made on the device and saved once (the actor loads a path, as in a run).
`--batch` prompts (64: one actor batch) of lengths uniform in [--min-prompt, --max-prompt], temperature 1,
`--new-tokens` each; no end-of-sequence token can be drawn (its id is above the vocabulary limit), so every row
generates all of them. One short warm-up call, then `--repeats` timed calls: tokens/s = generated tokens / seconds
(best call and mean), seconds per decoding step, peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = (64, 2, 4, 2, 128, 4096)  # hidden, layers, heads, kv heads, intermediate, vocab


def qwen2_shape(name: str) -> tuple[int, int, int, int, int, int]:
    if name == "tiny":
        return TINY
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    assert spec is not None and spec.loader is not None
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    return tt.MODELS[name]


def make_model(name: str, out: Path, device: torch.device, dtype: torch.dtype) -> str:
    """A random-init Qwen2 of the shape, made on `device` in `dtype`, saved to `out` (config + safetensors)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers, heads, kv, inter, vocab = qwen2_shape(name)
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    del model
    return str(out)


def adapter_state(actor: Any) -> dict[str, torch.Tensor]:
    """The actor's adapter tensors with B nonzero, as a trainer's adapter after some steps."""
    from peft import get_peft_model_state_dict

    g = torch.Generator().manual_seed(1)
    state = get_peft_model_state_dict(actor.model)
    return {k: (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype) if "lora_B" in k else v.cpu()
            for k, v in state.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["0.5b", "tiny"], default="0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--root", default="/tmp/uft-gpu-rollout", help="where the model is saved")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from uft_ray.rft.rollout import RolloutActor, request_seed

    out: dict[str, Any] = {"model": args.model, "device": str(device), "dtype": str(dtype).split(".")[-1],
                           "batch": args.batch, "new_tokens": args.new_tokens, "checks": {}}  # fmt: skip
    t0 = time.perf_counter()
    path = make_model(args.model, Path(args.root) / f"qwen2-{args.model}", device, dtype)
    vocab = qwen2_shape(args.model)[5]
    actor = RolloutActor(
        path, lora={"r": 16, "alpha": 32, "target_modules": TARGETS}, backend="hf",
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32", max_new_tokens=args.new_tokens,
        temperature=1.0, top_p=1.0, eos_token_ids=[vocab + 7], pad_token_id=0, vocab_limit=vocab,
        batch_size=args.batch, threads=max(1, (os.cpu_count() or 2) // 2),
    )  # fmt: skip
    if actor.device != device:
        raise SystemExit(f"the rollout actor chose {actor.device}, not {device}")
    actor.load_adapter(adapter_state(actor), 1)
    out["load_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    requests = []
    for i in range(args.batch):
        n = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab, (n,), generator=g).tolist()
        requests.append({"prompt_ids": prompt, "seed": request_seed(0, 1, f"row{i}", 0)})
    out["prompt_tokens"] = sum(len(r["prompt_ids"]) for r in requests)
    actor.max_new_tokens = 8
    out["warmup_s"] = actor.generate(requests)["seconds"]
    actor.max_new_tokens = args.new_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calls = []
    for _ in range(args.repeats):
        r = actor.generate(requests)
        tokens = sum(len(x) for x in r["responses"])
        calls.append({"seconds": r["seconds"], "tokens": tokens, "tokens_per_s": tokens / r["seconds"]})
        out["calls"] = calls
    best = max(calls, key=lambda c: c["tokens_per_s"])
    out |= {
        "tokens_per_s": best["tokens_per_s"],
        "mean_tokens_per_s": statistics.mean(c["tokens_per_s"] for c in calls),
        "step_ms": best["seconds"] / args.new_tokens * 1e3,
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["checks"]["every_row_full_length"] = all(c["tokens"] == args.batch * args.new_tokens for c in calls)
    print(f"[rollout] {json.dumps(out)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
