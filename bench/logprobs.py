"""Chunked target log-probs (uft_ray.logprobs) vs the naive full log-softmax: time and peak extra memory, CPU.

    python bench/logprobs.py                      # 2 x 2048 tokens, vocab 152064, fp32 and bf16 logits
    python bench/logprobs.py --dtypes float32 --modes fwd --chunk-sizes 64 256 1024

Each (variant, dtype, mode, chunk size) runs in a fresh subprocess, so one variant's peak never hides in
another's: peak extra = the process's max RSS (getrusage) minus its RSS once the logits exist. Torch's own
allocations are invisible to tracemalloc, hence RSS. "fwdbwd" counts the logits' gradient (the same size as
the logits, needed by any method) in the extra.

Variants:
- naive: `log_softmax(logits.float()).gather(targets)`, then the masked sum.
- chunked: `sequence_logprobs` (custom backward that recomputes each chunk's softmax).
- chunked_autograd (fwdbwd only): the same chunks left to autograd, to show why the custom backward exists:
  autograd saves every upcast chunk for logsumexp's backward, i.e. the full fp32 log-softmax input again.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from uft_ray.logprobs import DEFAULT_CHUNK_SIZE, sequence_logprobs  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def naive(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, labels[:, 1:, None]).squeeze(-1)
    return (token_logp * loss_mask[:, 1:]).sum(1)


def chunked_autograd(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, chunk: int) -> torch.Tensor:
    rows, pos = loss_mask[:, 1:].nonzero(as_tuple=True)
    targets = labels[rows, pos + 1]
    parts = []
    for s in range(0, rows.numel(), chunk):
        x = logits[rows[s : s + chunk], pos[s : s + chunk]].float()
        parts.append(x.gather(1, targets[s : s + chunk, None]).squeeze(1) - torch.logsumexp(x, dim=-1))
    return torch.zeros(logits.shape[0]).index_add(0, rows, torch.cat(parts))


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    logits = torch.empty(args.batch, args.length, args.vocab, dtype=dtype).normal_()
    labels = torch.randint(0, args.vocab, (args.batch, args.length))
    loss_mask = torch.zeros(args.batch, args.length, dtype=torch.long)
    loss_mask[:, args.length - int(args.response_frac * (args.length - 1)) :] = 1
    backward = args.mode == "fwdbwd"
    if backward:
        logits.requires_grad_()

    def step() -> None:
        with torch.set_grad_enabled(backward):
            if args.variant == "naive":
                out = naive(logits, labels, loss_mask)
            elif args.variant == "chunked":
                out = sequence_logprobs(logits, labels, loss_mask, chunk_size=args.chunk_size)[0]
            else:
                out = chunked_autograd(logits, labels, loss_mask, args.chunk_size)
            if backward:
                out.sum().backward()
                logits.grad = None

    base = rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"time_s": statistics.median(times), "peak_extra_mb": (peak - base) / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--response-frac", type=float, default=1.0, help="scored fraction of tokens (1 = worst case)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--chunk-sizes", nargs="+", type=int, default=[DEFAULT_CHUNK_SIZE])
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs (the first includes warmup)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)

    logits_mb = args.batch * args.length * args.vocab * 4 / 2**20
    grad_mb = {d: logits_mb * getattr(torch, d).itemsize / 4 for d in args.dtypes}
    print(
        f"B={args.batch} T={args.length} V={args.vocab} scored={args.response_frac:.0%} "
        f"threads={torch.get_num_threads()} fp32 logits={logits_mb:.0f} MB; extra = peak RSS above the logits"
    )
    print(
        f"{'dtype':9} {'mode':7} {'variant':17} {'chunk':>5} {'time_s':>8} {'extra_MB':>9} {'w/o_grad':>9} {'mem_x':>6} {'time_x':>6}"
    )
    for dtype in args.dtypes:
        for mode in args.modes:
            variants = [("naive", None)] + [("chunked", c) for c in args.chunk_sizes]
            if mode == "fwdbwd":
                variants += [("chunked_autograd", c) for c in args.chunk_sizes]
            results = {}
            for variant, chunk in variants:
                cmd = [sys.executable, __file__, "--variant", variant, "--dtype", dtype, "--mode", mode]
                cmd += ["--chunk-size", str(chunk or 0), "--batch", str(args.batch), "--length", str(args.length)]
                cmd += ["--vocab", str(args.vocab), "--response-frac", str(args.response_frac)]
                cmd += ["--repeats", str(args.repeats)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = results[(variant, chunk)] = json.loads(out.strip().splitlines()[-1])
                r["no_grad_mb"] = r["peak_extra_mb"] - (grad_mb[dtype] if mode == "fwdbwd" else 0)
                base = results[("naive", None)]
                print(
                    f"{dtype:9} {mode:7} {variant:17} {chunk or '-':>5} {r['time_s']:8.2f} {r['peak_extra_mb']:9.0f} "
                    f"{r['no_grad_mb']:9.0f} {r['no_grad_mb'] / base['no_grad_mb']:6.3f} "
                    f"{r['time_s'] / base['time_s']:6.2f}",
                    flush=True,
                )
    print("w/o_grad: extra minus the logits' gradient (fwdbwd); mem_x (of w/o_grad), time_x: relative to naive")


if __name__ == "__main__":
    main()
