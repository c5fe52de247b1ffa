"""The hint schedule: how much of a reference solution the prompt reveals at a training step (docs/design.md
"Hint-guided RFT", the numbers of the authors' code).

A row's hint has L chunks and K = min(5, L) buckets with boundaries s_k = round(k L / K). At step t (from 1)

    p(t) = p_low + (p_high - p_low) * (1 + cos(pi t / T_hint)) / 2          (p_low 0.05, p_high 0.95, T_hint 300)

and k ~ Binomial(K, p(t)); the first s_k chunks are revealed. No hint after T_hint, and never at evaluation.
The draw is a pure function of (seed, step, row_id): every process, and a resumed run, reveals the same hint,
and all n rollouts of a prompt share it. The paper's baselines are modes of the same schedule:
`cosine` (UFT), `rft` (never a hint), `r3` (a uniform bucket; the trainer drops the hint loss), `staged` (k
falls by one every T_hint / (K + 1) steps).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

MODES = ("cosine", "rft", "r3", "staged")


@dataclass(frozen=True)
class HintSchedule:
    mode: str = "cosine"
    p_low: float = 0.05
    p_high: float = 0.95
    t_hint: int = 300
    max_buckets: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"hint mode {self.mode!r}: use one of {', '.join(MODES)}")

    def p(self, step: int) -> float:
        """The probability of revealing each bucket at step `step` (1-based)."""
        return self.p_low + (self.p_high - self.p_low) * (1 + math.cos(math.pi * step / self.t_hint)) / 2

    def buckets(self, n_chunks: int) -> list[int]:
        """s_0..s_K: how many chunks bucket k reveals."""
        k = min(self.max_buckets, n_chunks)
        return [round(i * n_chunks / k) for i in range(k + 1)] if k else [0]

    def revealed(self, step: int, row_id: str, n_chunks: int, *, evaluation: bool = False) -> int:
        """How many of the row's `n_chunks` hint chunks the prompt shows at `step` (1-based)."""
        if evaluation or self.mode == "rft" or step > self.t_hint or n_chunks == 0:
            return 0
        s = self.buckets(n_chunks)
        k_max = len(s) - 1
        if self.mode == "staged":
            k = max(0, k_max - int(step // (self.t_hint / (k_max + 1))))
        else:
            rng = np.random.default_rng(_key(self.seed, step, row_id))
            k = int(rng.integers(0, k_max + 1)) if self.mode == "r3" else int(rng.binomial(k_max, self.p(step)))
        return s[k]


def _key(seed: int, step: int, row_id: str) -> list[int]:
    # A stable hash, not Python's salted hash(): the same in every process.
    digest = hashlib.sha256(f"{seed}\x1f{step}\x1f{row_id}".encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def with_hint(prompt: str, hint: list[str], revealed: int) -> str:
    """The prompt the policy continues: the prompt plus the first `revealed` chunks, concatenated as they are (each
    chunk carries its own separator, as in the authors' data: `"".join(hint[:slice_length])` in their
    verl/utils/dataset/rl_dataset.py)."""
    return prompt + "".join(hint[:revealed])
