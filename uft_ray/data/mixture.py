"""The mixture: how many trainable rows each source gives, and which ones. Pure (hashlib + numpy).

Quotas come from `mixture.counts`, or from `mixture.ratios` and `mixture.total` rounded by largest remainder
so that they sum to `total` exactly. A quota counts rows that survive normalization *and* tokenization.

Which rows: every row gets a seeded rank, `rank(seed, row_id)` = the first 64 bits of sha1(seed, row_id). A
source's selection is its `quota` valid rows of smallest rank: a seeded shuffle of the source, cut at the
quota. The rank depends on the row alone, not on which Ray task read it, how the files were split into blocks
or in which order tasks finished, so the selection is the same on a laptop and on a 100-node cluster, run
after run (Ray Data's execution order is not deterministic; we never depend on it). Another seed gives
another order. (Alternatives rejected: `preserve_order` + `random_shuffle(seed)` + `limit` is deterministic
only for a fixed block layout, i.e. a fixed cluster size, and shuffles the whole source through the object
store before the first row is tokenized.)

Laziness: rank is uniform over [0, 2^64), so the rows with rank below `f * 2^64` are a uniform `f` sample.
`pipeline.prepare` tokenizes only the band of ranks it expects to need (`next_band_end`: the quota, plus a
margin, over the source's normalized rows and the survival rate seen so far) and widens the band only when
too many rows were dropped. The result equals the quota smallest ranks among all valid rows, whatever the
bands were: the bands only decide how much work is done. `sample` is the same rule on an in-memory list, the
executable spec that the tests compare against.

Upsampling (`mixture.allow_upsample`): a source with n < quota valid rows gives every row quota // n times and
the (quota mod n) smallest-rank rows once more; copy k >= 1 of a row gets row_id `"{row_id}#{k}"`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from uft_ray.config import MixtureConfig

RANK_SPACE = 1 << 64  # ranks are in [0, RANK_SPACE)
BAND_MARGIN = 1.1  # tokenize 10% (+ a few standard deviations) more than the quota needs, to absorb drops


class MixtureError(ValueError):
    """The mixture cannot be met (a source smaller than its quota, without upsampling)."""


def rank(seed: int, row_id: str) -> int:
    """A row's place in the seeded order of its source: 64 bits of sha1(seed, row_id)."""
    return int.from_bytes(hashlib.sha1(f"{seed}\x1f{row_id}".encode()).digest()[:8], "big")


def largest_remainder(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Integers proportional to `weights` that sum to `total` exactly (Hamilton's method).

    Each gets floor(total * w / sum w); the rows left over go one each to the largest fractional parts
    (ties: the earlier name). Exact rational arithmetic, so the result does not depend on float rounding.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    ws = {k: Fraction(v) for k, v in weights.items()}
    if any(w < 0 for w in ws.values()):
        raise ValueError(f"weights must be >= 0, got {dict(weights)}")
    s = sum(ws.values())
    if s == 0:
        raise ValueError("at least one weight must be > 0")
    exact = {k: total * w / s for k, w in ws.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(ws, key=lambda k: (-(exact[k] - out[k]), list(ws).index(k)))
    for k in order[:left]:
        out[k] += 1
    return out


def quotas(mix: MixtureConfig, sources: Sequence[str]) -> dict[str, int]:
    """Trainable rows per source (every configured source; one the mixture does not name gets 0)."""
    if mix.counts is not None:
        return {s: int(mix.counts.get(s, 0)) for s in sources}
    if mix.ratios is None or mix.total is None:
        raise MixtureError("mixture: give counts, or ratios with total")
    return largest_remainder({s: float(mix.ratios.get(s, 0.0)) for s in sources}, int(mix.total))


def shortfall_message(source: str, available: int, requested: int, *, stage: str = "") -> str:
    what = f"{available} trainable rows" + (f" {stage}" if stage else "")
    return (
        f"source {source!r}: {what} available, {requested} requested by the mixture; lower its mixture "
        f"count/ratio, or set mixture.allow_upsample=true to repeat rows"
    )


@dataclass(frozen=True)
class Take:
    """How many copies of a row of rank r a source takes."""

    cutoff: int | None  # rows of rank <= cutoff are taken once; None: every row (upsampling)
    base: int = 1  # upsampling: copies of every row
    extra_cutoff: int | None = None  # upsampling: rows of rank <= this get one more copy

    def copies(self, r: int) -> int:
        if self.cutoff is not None:
            return 1 if r <= self.cutoff else 0
        return self.base + (1 if self.extra_cutoff is not None and r <= self.extra_cutoff else 0)

    def visited(self, r: int) -> bool:
        """Whether the seeded walk through the source reached rank r before filling the quota."""
        return self.cutoff is None or r <= self.cutoff


def plan_take(
    source: str, ranks: np.ndarray, quota: int, *, complete: bool, allow_upsample: bool, at_most: bool = False
) -> Take | None:
    """The selection for one source, from the (unique) ranks of its valid rows found so far.

    `complete`: the ranks cover the whole source. Returns None when more of the source must be tokenized.
    `at_most`: the quota is a cap; a source with fewer valid rows gives them all.
    """
    ranks = np.asarray(ranks, dtype=np.uint64)
    n = len(ranks)
    if quota <= 0:
        return Take(cutoff=-1)
    if n >= quota:
        return Take(cutoff=int(np.partition(ranks, quota - 1)[quota - 1]))
    if not complete:
        return None
    if at_most:
        return Take(cutoff=int(ranks.max()) if n else -1)
    if not allow_upsample:
        raise MixtureError(shortfall_message(source, n, quota))
    if n == 0:
        raise MixtureError(f"source {source!r}: no trainable rows (all quarantined), {quota} requested")
    base, rem = divmod(quota, n)
    extra = int(np.partition(ranks, rem - 1)[rem - 1]) if rem else None
    return Take(cutoff=None, base=base, extra_cutoff=extra)


def next_band_end(prev_end: int, n_rows: int, found: int, quota: int, margin: float = BAND_MARGIN) -> int:
    """Where the next band of ranks should end so that it likely completes the quota.

    `prev_end`: the end of the ranks already tokenized (0 at first); `n_rows`: the source's normalized rows;
    `found`: valid rows among the ranks below `prev_end`. The survival rate seen so far (1 at first) scales
    the estimate; a first band that found nothing jumps to the whole source.
    """
    if n_rows <= 0 or prev_end >= RANK_SPACE:
        return RANK_SPACE
    done = prev_end / RANK_SPACE
    if prev_end == 0:
        rows_per_unit = float(n_rows)
    elif found == 0:
        return RANK_SPACE
    else:
        rows_per_unit = found / done  # valid rows per unit of rank space
    remaining = max(0, quota - found)
    need = remaining * margin + 3.0 * math.sqrt(remaining) + 4.0
    end = done + need / rows_per_unit
    if end >= 1.0:
        return RANK_SPACE
    return max(prev_end + 1, int(end * RANK_SPACE))


def copy_id(row_id: str, k: int) -> str:
    return row_id if k == 0 else f"{row_id}#{k}"


def sample(
    row_ids: Iterable[str], quota: int, seed: int, *, allow_upsample: bool = False, source: str = "source"
) -> list[str]:
    """The mixture rule on an in-memory list of valid row ids (duplicates count once): the selected ids,
    upsampled copies included, in rank order."""
    ids = sorted(set(row_ids), key=lambda i: rank(seed, i))
    ranks = np.array([rank(seed, i) for i in ids], dtype=np.uint64)
    take = plan_take(source, ranks, quota, complete=True, allow_upsample=allow_upsample)
    assert take is not None
    return [copy_id(i, k) for i, r in zip(ids, ranks, strict=True) for k in range(take.copies(int(r)))]
