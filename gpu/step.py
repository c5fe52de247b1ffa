"""The trainer's step on the Mistral-7B shape, in this process: no Ray, no DeepSpeed, no disk round trip.

    python3 gpu/step.py --json step.json                  # the GPU window's step_7b check (one H100 / H200)
    python3 gpu/step.py --model tiny --device cpu --json s.json --steps 2     # its CPU smoke (gpu/check.py --cpu-smoke)

The model is built on the device in bf16 (a random-init MistralForCausalLM of Mistral-7B-v0.1's shape, the shape
bench/train_throughput.py owns), LoRA r16 on every projection (B nonzero), the project's own activation
checkpointing (uft_ray.train.engine), collate, log-prob and UFT loss code (uft_ray.train.loop.micro_batch_loss,
the reference log-probs read from the batch as a cached reference gives them), torch's AdamW on the adapter.

Rows: lengths lognormal (median `--median-len` 700, sigma 0.7, clipped to [32, `--max-len`]), the prompt the
first 30-50%; sorted by length and cut into micro-batches of at least `--micro-tokens` (16384) tokens each, as a
length-grouped trainer with a token budget makes them, then shuffled. Every variant runs the same micro-batches:

- `packed`: one sequence, attention per row (uft_ray.packing's segment attention: a packed run on sdpa);
- `padded`: right-padded rows, transformers' sdpa;
- `packed_mask`: one sequence, plain sdpa with a sequence-wide packed 4D mask (what eager / a mask costs);
- `packed_nockpt`: `packed` without activation checkpointing, at the whole micro-batch and, if that runs out of
  memory, at half of it (`--nockpt-fractions`); an out-of-memory is recorded, not raised.

A step: collate, the micro-batch's loss, backward, AdamW step, a device sync. The first `--warmup` steps of each
variant are not timed. Per variant: tokens/s (real tokens / timed seconds), median step seconds, peak memory
(torch.cuda.max_memory_allocated and _reserved), and:

- MFU = 4 x N x tokens/s / peak: N the matmul parameters a token goes through (the body; the LM head counted
  only for the scored response tokens, the only ones the project's log-prob code computes logits for; the input
  embedding, a lookup, not at all), forward 2N + backward through frozen weights 2N; against 989 TFLOP/s (H100
  SXM datasheet, dense bf16) and 790 (measured here, 8192^3 matmul): `mfu_989`, `mfu_790`;
- HFU, the hardware's useful utilization: 4N, plus 2N for the forward recomputed by checkpointing, plus causal
  attention (2 x layers x hidden x sum of row length^2 per forward, x3 with backward, x4 with the recompute),
  counted on real rows only (a padded batch's wasted work is not useful): `hfu_989`, `hfu_790`.

`--json` is rewritten after every variant, so a run killed midway leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAKS = (989.0, 790.0)  # bf16 dense TFLOP/s: H100 SXM datasheet; measured on the device (8192^3, random data)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip
PAD = 0


def mistral_shape(name: str) -> dict[str, Any]:
    """The model's config: bench/train_throughput.py's Mistral-7B shape, or a tiny one for the CPU smoke."""
    if name == "tiny":
        return dict(TINY)
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    assert spec is not None and spec.loader is not None
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    return dict(tt.MISTRAL[name])


def lengths(rng: np.random.Generator, n: int, median: int, max_len: int) -> list[int]:
    x = rng.lognormal(math.log(median), 0.7, n)
    return np.clip(np.rint(x), 32, max_len).astype(int).tolist()


def token_micro_batches(lens: list[int], micro_tokens: int, seed: int) -> list[list[int]]:
    """Row indices, sorted by length, cut into consecutive runs of at least `micro_tokens` tokens, shuffled."""
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    cuts, cur, total = [], [], 0
    for i in order:
        cur.append(i)
        total += lens[i]
        if total >= micro_tokens:
            cuts.append(cur)
            cur, total = [], 0
    return [cuts[k] for k in np.random.default_rng(seed).permutation(len(cuts))]


def make_batches(args: argparse.Namespace, vocab: int) -> list[dict[str, np.ndarray]]:
    """`--warmup + --steps` micro-batches as the trainer's feed gives them (numpy columns, ref_logp included)."""
    from uft_ray.schema import REF_LOGP

    rng = np.random.default_rng(args.seed)
    need = args.warmup + args.steps
    mean = args.median_len * math.exp(0.7**2 / 2)
    lens = lengths(rng, int(need * args.micro_tokens / mean * 1.5) + 8, args.median_len, args.max_len)
    cuts = token_micro_batches(lens, args.micro_tokens, args.seed)[:need]
    if len(cuts) < need:
        raise SystemExit(f"only {len(cuts)} micro-batches of {args.micro_tokens} tokens from {len(lens)} rows")
    batches = []
    for cut in cuts:
        n = len(cut)
        ids = np.empty(n, dtype=object)
        for j, i in enumerate(cut):
            ids[j] = rng.integers(1, vocab, lens[i])
        batches.append({
            "row_id": np.array([f"r{i}" for i in cut]), "source": np.array(["ultrachat"] * n),
            "score": rng.uniform(size=n), "input_ids": ids,
            "response_start": np.array([max(1, int(lens[i] * rng.uniform(0.3, 0.5))) for i in cut]),
            REF_LOGP: -rng.uniform(1.0, 3.0, n) * np.array([lens[i] for i in cut]),
        })  # fmt: skip
    return batches


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Mistral of `shape` made on `device` in `dtype`, segment attention registered, LoRA r16 with B nonzero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    from uft_ray.packing import register_segment_attention

    torch.manual_seed(seed)
    config = MistralConfig(**shape, attn_implementation=register_segment_attention())
    config.use_cache = False
    with device:  # made where it trains: 7B parameters initialised on the CPU in fp32 would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft = get_peft_model(model, lora)
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # peft starts B at 0: the adapter would do nothing
            torch.nn.init.normal_(p, std=0.02)
    return peft


def matmul_params(model: Any) -> tuple[int, int]:
    """(parameters of the body's matmuls, of the LM head): the base model's, LoRA and embeddings left out."""
    base = model.get_base_model()
    head = base.get_output_embeddings().weight.numel()
    emb = base.get_input_embeddings().weight.numel()
    body = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) - head - emb
    norms = sum(p.numel() for n, p in base.named_parameters() if "norm" in n)
    return body - norms, head


def step_flops(
    batch: dict[str, np.ndarray], body: int, head: int, layers: int, hidden: int, checkpointing: bool
) -> dict[str, float]:
    """Useful FLOPs of one training step on `batch` (see the module's docstring)."""
    lens = np.array([len(x) for x in batch["input_ids"]], dtype=np.float64)
    scored = float(sum(len(x) - int(s) for x, s in zip(batch["input_ids"], batch["response_start"], strict=True)))
    tokens = float(lens.sum())
    forward = 2.0 * body * tokens + 2.0 * head * scored
    attention = 2.0 * layers * hidden * float((lens**2).sum())  # causal: QK^T and AV over half the square
    model = 2.0 * forward  # forward + backward through frozen weights (no weight gradients of the base)
    hardware = model + attention * 3 + (forward + attention if checkpointing else 0.0)
    return {"tokens": tokens, "scored": scored, "model": model, "hardware": hardware}


def run_variant(
    model: Any, batches: list[dict[str, np.ndarray]], packing: dict[str, Any] | None, args: argparse.Namespace,
    device: torch.device, dims: tuple[int, int, int, int], checkpointing: bool,
) -> dict[str, Any]:  # fmt: skip
    """Train on every micro-batch (`--warmup` untimed); tokens/s, step seconds, MFU, HFU, peak memory."""
    from uft_ray.train import loop as train_loop

    cuda = device.type == "cuda"
    cfg = SimpleNamespace(
        loss=SimpleNamespace(type="uft", beta=0.1, source_weights={}),
        reference=SimpleNamespace(mode="cache"),  # the reference log-probs come with the rows (a cache hit)
    )
    engine = SimpleNamespace(module=model, peft_model=model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    body, head, layers, hidden = dims
    steps, losses = [], []
    for batch in batches:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = train_loop.collate(batch, PAD, device, pairs=False, packing=packing)
        loss, _ = train_loop.micro_batch_loss(engine, cfg, batch, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        f = step_flops(batch, body, head, layers, hidden, checkpointing)
        steps.append({"s": dt, "rows": len(batch["row_id"]), "computed": t["computed"], "padded": t["padded"]} | f)
    timed = steps[args.warmup :] or steps
    seconds = sum(s["s"] for s in timed)
    out: dict[str, Any] = {
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
        "median_step_s": statistics.median(s["s"] for s in timed),
        "tokens_per_micro_batch": statistics.mean(s["tokens"] for s in timed),
        "rows_per_micro_batch": statistics.mean(s["rows"] for s in timed),
        "padding_frac": 1 - sum(s["computed"] for s in timed) / sum(s["padded"] for s in timed),
        "timed_steps": len(timed),
        "steps_s": [round(s["s"], 4) for s in steps],
        "losses": losses,
        "checkpointing": checkpointing,
    }
    for peak in PEAKS:
        out[f"mfu_{peak:.0f}"] = sum(s["model"] for s in timed) / seconds / (peak * 1e12)
        out[f"hfu_{peak:.0f}"] = sum(s["hardware"] for s in timed) / seconds / (peak * 1e12)
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    del opt
    return out


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(figures, f, indent=1, default=str)
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["7b", "tiny"], default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--median-len", type=int, default=700)
    p.add_argument("--max-len", type=int, default=4096, help="Mistral's sliding window: a packed row must fit it")
    p.add_argument("--micro-tokens", type=int, default=16384, help="tokens a micro-batch holds at least")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed micro-batches per variant")
    p.add_argument("--variants", default="packed,padded,packed_mask")
    p.add_argument("--nockpt-fractions", default="1,0.5", help="packed without checkpointing: micro-batch shares "
                   "tried in turn until one fits; empty: not tried")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from uft_ray.train.engine import enable_activation_checkpointing

    shape = mistral_shape(args.model)
    out: dict[str, Any] = {"model": args.model, "device": str(device), "dtype": str(dtype).split(".")[-1],
                           "shape": shape, "peaks_tflops": list(PEAKS), "variants": {}, "checks": {}}  # fmt: skip
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, args.seed)
    enable_activation_checkpointing(model.get_base_model())
    model.train()
    body, head = matmul_params(model)
    dims = (body, head, shape["num_hidden_layers"], shape["hidden_size"])
    out |= {"build_s": time.perf_counter() - t0, "n_params_body": body, "n_params_head": head,
            "n_params": sum(p.numel() for p in model.get_base_model().parameters())}  # fmt: skip
    batches = make_batches(args, shape["vocab_size"])
    out["micro_batches"] = [{"rows": len(b["row_id"]), "tokens": int(sum(len(x) for x in b["input_ids"])),
                             "longest": int(max(len(x) for x in b["input_ids"]))} for b in batches]  # fmt: skip
    write_json(args.json, out)
    segment = model.get_base_model().config._attn_implementation
    packed_args = {"max_tokens": None, "share_prefix": True}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in ("packed", "padded", "packed_mask"):
            raise SystemExit(f"--variants: unknown {name!r}")
        model.get_base_model().set_attn_implementation("sdpa" if name == "packed_mask" else segment)
        t0 = time.perf_counter()
        out["variants"][name] = run_variant(model, batches, None if name == "padded" else packed_args, args, device,
                                            dims, checkpointing=True)  # fmt: skip
        out["variants"][name]["wall_s"] = time.perf_counter() - t0
        print(f"[step] {name}: {json.dumps({k: v for k, v in out['variants'][name].items() if k != 'losses'})}",
              flush=True)  # fmt: skip
        write_json(args.json, out)
    model.get_base_model().set_attn_implementation(segment)
    fractions = [float(x) for x in args.nockpt_fractions.split(",") if x.strip()]
    if fractions:
        base = model.get_base_model()
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    for frac in fractions:
        part = []
        for b in batches:
            keep = max(1, int(round(len(b["row_id"]) * frac)))
            part.append({k: v[:keep] for k, v in b.items()})
        key = "packed_nockpt" if frac == 1 else f"packed_nockpt_{frac:g}"
        try:
            out["variants"][key] = run_variant(model, part, packed_args, args, device, dims, checkpointing=False)
            print(f"[step] {key}: {out['variants'][key]['tokens_per_s']:.0f} tok/s", flush=True)
            write_json(args.json, out)
            break
        except torch.cuda.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:300]
        # out of the except block: the traceback no longer holds the failed step's activations
        gc.collect()
        torch.cuda.empty_cache()
        tokens = statistics.mean(sum(len(x) for x in b["input_ids"]) for b in part)
        out["variants"][key] = {"oom": True, "error": oom, "tokens_per_micro_batch": tokens}
        print(f"[step] {key}: out of memory at {tokens:.0f} tokens a micro-batch", flush=True)
        write_json(args.json, out)
    v = out["variants"]
    if "packed" in v and "padded" in v:
        out["packed_over_padded_tokens_per_s"] = v["packed"]["tokens_per_s"] / v["padded"]["tokens_per_s"]
    if "packed" in v:
        out |= {"tokens_per_s": v["packed"]["tokens_per_s"], "mfu_989": v["packed"]["mfu_989"],
                "mfu_790": v["packed"]["mfu_790"], "hfu_790": v["packed"]["hfu_790"],
                "peak_allocated_gib": v["packed"].get("peak_allocated_gib")}  # fmt: skip
    out["checks"]["losses_finite"] = all(
        math.isfinite(x) for r in v.values() if "losses" in r for x in r["losses"]
    )  # fmt: skip
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
