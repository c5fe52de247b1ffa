"""The hf rollout backend's token sampler: seeded per request and position, batch-invariant, on the logits' device.

Each row b has its own 63-bit seed (`request_seed(seed, step, row_id, k)`); the token it draws at generated position
t (0 for the first generated token) is

    argmax_v  logits[b, v] / temperature + g(seed_b, t, v)        (Gumbel-max: a draw from softmax(logits / T))

over the ids below `vocab_limit` (and inside the top-p set when top_p < 1), or argmax_v logits[b, v] for a greedy
row. The Gumbel noise g = -log(-log(1 - w)) comes from a uniform w with 32 random bits per (seed, t, v), made by a
counter-based integer hash rather than a generator's state, so:

- a row's tokens depend on its seed, its position and its own logits only, not on which other rows share the batch
  or where it sits in it (every step is elementwise per (row, token), plus a per-row argmax);
- rerunning with the same seeds gives the same tokens; CPU and GPU make the same random bits (integer arithmetic);
- the whole step runs on the logits' device, for all rows at once: nothing of vocabulary size is copied to the host.

The hash: per (seed, t), two 32-bit words (s1, s2) from splitmix64 (Python integers, B of them per step); per token
a fixed pseudo-random 32-bit code `table[v]`; then w-bits = mix32(((table[v] ^ s1) + s2) mod 2^32), with mix32 the
two-multiply xorshift hash [16 21f0aaad 15 735a2d97 15] (hash-prospector's constants). All integer work is in int64
tensors holding values below 2^32 and multipliers below 2^31, so no product exceeds 2^63: nothing relies on signed
overflow. w = (bits + 0.5) / 2^32 (clamped below 1 in float32) and E = -log1p(-w) keep the noise's upper tail (the
rare large g that lets an unlikely token win) exact to about g = 22; the lower tail is cut at about g = -2.8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # both odd and below 2^31: x * c < 2^63 for x < 2^32
_TABLE_SALT = 0x6A09E667
# Elements per chunk of the noise on the CPU: the int64 temporaries stay in cache (about 1.5x faster than one pass
# over the whole batch x vocabulary at batch 8, vocabulary 151936). On an accelerator the whole step is one chunk.
CPU_CHUNK_ELEMENTS = 1 << 16


def splitmix64(x: int) -> int:
    """The splitmix64 finalizer of a Python integer (mod 2^64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def step_words(seeds: Sequence[int], t: int) -> list[tuple[int, int]]:
    """The two 32-bit hash words of each seed at generated position `t`."""
    ct = splitmix64(0x5EED0000 ^ t)
    out = []
    for s in seeds:
        z = splitmix64(splitmix64(int(s) & MASK64) ^ ct)
        out.append((z & MASK32, z >> 32))
    return out


def _mix32_(x: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """mix32 in place on an int64 tensor of values in [0, 2^32); `tmp` (same shape) saves an allocation."""
    tmp = torch.bitwise_right_shift(x, 16, out=tmp) if tmp is not None else x >> 16
    x.bitwise_xor_(tmp).mul_(_MUL1).bitwise_and_(MASK32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp)).mul_(_MUL2).bitwise_and_(MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp))


_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def token_table(vocab: int, device: torch.device | str) -> torch.Tensor:
    """table[v]: distinct pseudo-random 32-bit codes of the token ids (int64, shape (1, vocab)), cached per device."""
    key = (vocab, str(device))
    if key not in _TABLES:
        x = torch.arange(vocab, dtype=torch.int64, device=device).bitwise_xor_(_TABLE_SALT)
        _TABLES[key] = _mix32_(_mix32_(x)).unsqueeze(0)  # a bijection of [0, 2^32): distinct codes
    return _TABLES[key]


def uniform_bits(words: torch.Tensor, table: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """The 32 random bits of each (row, token): words (B, 2) int64 from `step_words`, table (1, n) -> (B, n) int64."""
    x = table ^ words[:, :1]
    x.add_(words[:, 1:]).bitwise_and_(MASK32)
    return _mix32_(x, tmp)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float32) from 32-bit uniform integers: -log(-log1p(-w)), w = (bits + 0.5) / 2^32."""
    w = bits.to(torch.float32).mul_(2.0**-32).add_(2.0**-33).clamp_(max=1.0 - 2.0**-24)
    return w.neg_().log1p_().neg_().log_().neg_()


def top_p_mask(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row, True on the smallest set of ids whose probability (softmax of `scaled`) sums to at least top_p."""
    probs = torch.softmax(scaled, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def sample_tokens(
    scores: torch.Tensor,
    seeds: Sequence[int],
    t: int,
    *,
    temperature: float,
    top_p: float = 1.0,
    greedy: Sequence[bool] | None = None,
    vocab_limit: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """The next token of each row (int64, shape (B,), on scores' device) for logits `scores` (B, V).

    Row b draws from softmax(scores[b, :vocab_limit] / temperature) (restricted to the top-p set) with the noise of
    (seeds[b], t); a greedy row (or every row when temperature <= 0) takes the argmax. `chunk_elements` bounds the
    noise computed at once (default: `CPU_CHUNK_ELEMENTS` on the CPU, everything elsewhere); it does not change the
    result.
    """
    b, v = scores.shape
    limit = v if vocab_limit is None else min(int(vocab_limit), v)
    raw = scores[:, :limit]
    rows_greedy = [True] * b if temperature <= 0 else [bool(g) for g in greedy] if greedy is not None else [False] * b
    if all(rows_greedy):
        return raw.argmax(-1)
    if top_p < 1.0:
        scaled = raw.float() / temperature
        logits, inv_t = scaled.masked_fill_(~top_p_mask(scaled, top_p), -float("inf")), 1.0
    else:
        logits, inv_t = raw, 1.0 / temperature
    words = torch.tensor(step_words(seeds, t), dtype=torch.int64).to(scores.device, non_blocking=True)
    table = token_table(limit, scores.device)
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if scores.device.type == "cpu" else b * limit
    width = max(1, chunk_elements // b)
    best_val = best_idx = tmp = None
    for start in range(0, limit, width):
        end = min(limit, start + width)
        if tmp is None or tmp.shape[1] != end - start:
            tmp = torch.empty((b, end - start), dtype=torch.int64, device=scores.device)
        g = gumbel_from_bits(uniform_bits(words, table[:, start:end], tmp))
        val, idx = g.add_(logits[:, start:end], alpha=inv_t).max(-1)
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val  # strict: the first maximum wins, as one argmax over the row would
            best_val, best_idx = torch.where(better, val, best_val), torch.where(better, idx + start, best_idx)
    assert best_idx is not None
    if any(rows_greedy):
        best_idx = torch.where(torch.tensor(rows_greedy, device=scores.device), raw.argmax(-1), best_idx)
    return best_idx


class SeededSampler:
    """A transformers logits processor around `sample_tokens`: each row's draw at each generated position.

    It overwrites `scores` with 0 at the drawn token and -inf elsewhere (on their device), so `generate`'s greedy
    step picks exactly the draw. The position is the number of ids past the (left-padded) prompt, `prompt_len`.
    """

    def __init__(
        self,
        seeds: list[int],
        greedy: list[bool],
        temperature: float,
        top_p: float,
        vocab_limit: int,
        prompt_len: int,
    ) -> None:
        self.seeds, self.greedy = [int(s) for s in seeds], [bool(g) for g in greedy]
        self.temperature, self.top_p, self.vocab_limit, self.prompt_len = temperature, top_p, vocab_limit, prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        tokens = sample_tokens(
            scores,
            self.seeds,
            int(input_ids.shape[1]) - self.prompt_len,
            temperature=self.temperature,
            top_p=self.top_p,
            greedy=self.greedy,
            vocab_limit=self.vocab_limit,
        )
        out = scores if scores.dtype == torch.float32 else torch.empty_like(scores, dtype=torch.float32)
        return out.fill_(-float("inf")).scatter_(1, tokens.unsqueeze(1), 0.0)
