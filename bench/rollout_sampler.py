"""The hf rollout sampler: tokens/s of `generate` with the old per-row sampler vs the vectorized seeded one.

    python bench/rollout_sampler.py                       # CPU, 1 thread, batch 8, 64 new tokens, vocab 151936
    python bench/rollout_sampler.py --threads 2 --repeats 5
    python bench/rollout_sampler.py --device cuda --batch 64

The model is a random-init Qwen2 with a Qwen2.5-sized vocabulary and a tiny body (hidden 64, 2 layers), so the
per-token cost is dominated by what scales with the vocabulary: the LM head, the sampler, and generate's own
argmax over the processed scores. Both samplers run through the same `generate` call (do_sample=False, the
processor's one-hot decides), no end-of-sequence token, so every row generates exactly --new-tokens tokens.
Reported: the best of --repeats runs (after one warm-up) per sampler, tokens/s = batch x new tokens / seconds,
and the sampler alone (ms per decoding step, the same logits).

- old: the sampler before the counter-based one (a copy, kept here as the baseline): per row, softmax over the vocabulary,
  copied to the host, `torch.multinomial` with that row's `torch.Generator`.
- new: uft_ray.rft.sampling.SeededSampler: all rows at once on the logits' device, Gumbel-max with noise from a
  counter-based hash of (seed, position, token id).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from uft_ray.rft.rollout import request_seed  # noqa: E402
from uft_ray.rft.sampling import SeededSampler  # noqa: E402


class OldPerRowSampler:
    """The previous `_PerRowSampler` of uft_ray/rft/rollout.py, verbatim in behaviour."""

    def __init__(
        self, seeds: list[int], greedy: list[bool], temperature: float, top_p: float, vocab_limit: int
    ) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.greedy = greedy
        self.temperature, self.top_p, self.vocab_limit = temperature, top_p, vocab_limit

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores = scores.float()
        scores[:, self.vocab_limit :] = -float("inf")
        out = torch.full_like(scores, -float("inf"))
        for i, gen in enumerate(self.generators):
            if self.greedy[i]:
                token = int(scores[i].argmax())
            else:
                probs = torch.softmax(scores[i] / self.temperature, dim=-1).cpu()
                if self.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    keep = sorted_p.cumsum(0) - sorted_p < self.top_p
                    probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
                token = int(torch.multinomial(probs, 1, generator=gen))
            out[i, token] = 0.0
        return out


def make_model(vocab: int, device: str) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    return Qwen2ForCausalLM(cfg).to(device).eval()


def make_sampler(kind: str, seeds: list[int], args: argparse.Namespace, prompt_len: int) -> Any:
    greedy = [False] * len(seeds)
    if kind == "old":
        return OldPerRowSampler(seeds, greedy, args.temperature, args.top_p, args.vocab)
    return SeededSampler(seeds, greedy, args.temperature, args.top_p, args.vocab, prompt_len=prompt_len)


def run_generate(model: Any, ids: torch.Tensor, sampler: Any, new_tokens: int) -> tuple[float, torch.Tensor]:
    from transformers import LogitsProcessorList

    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([sampler]),
            eos_token_id=None,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    sync()
    return time.perf_counter() - t0, out[:, ids.shape[1] :]


def sampler_ms(kind: str, seeds: list[int], args: argparse.Namespace, device: str, steps: int = 10) -> float:
    """ms per decoding step of the sampler alone on fixed random logits (best of `steps`)."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(len(seeds), args.vocab, generator=g).to(device)
    sampler = make_sampler(kind, seeds, args, prompt_len=args.prompt_len)
    ids = torch.zeros(len(seeds), args.prompt_len, dtype=torch.long, device=device)
    best = float("inf")
    for _ in range(steps):
        s = scores.clone()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler(ids, s)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the rollout actor's default is 1)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = make_model(args.vocab, args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).to(args.device)
    seeds = [request_seed(0, 1, f"row{i}", 0) for i in range(args.batch)]
    tokens = args.batch * args.new_tokens
    print(
        f"device={args.device} threads={args.threads} vocab={args.vocab} batch={args.batch} "
        f"prompt={args.prompt_len} new_tokens={args.new_tokens} T={args.temperature} top_p={args.top_p}"
    )
    rate = {}
    for kind in ("old", "new"):
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            s, out = run_generate(model, ids, make_sampler(kind, seeds, args, ids.shape[1]), args.new_tokens)
            times.append(s)
        assert out.shape == (args.batch, args.new_tokens)
        rate[kind] = tokens / min(times[1:])
        print(
            f"{kind}: {rate[kind]:8.1f} tokens/s  (generate best {min(times[1:]):.3f} s of {args.repeats}; "
            f"sampler alone {sampler_ms(kind, seeds, args, args.device):.2f} ms/step)"
        )
    print(f"ratio new/old: {rate['new'] / rate['old']:.2f}x")


if __name__ == "__main__":
    main()
