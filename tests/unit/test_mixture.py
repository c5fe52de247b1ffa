"""Mixture (no Ray): quotas, exact seeded sampling without replacement, upsampling, and the band rule that lets
the pipeline tokenize only part of a source and still get exactly the rows `sample` would pick."""

from __future__ import annotations

import random

import numpy as np
import pytest

from uft_ray.config import MixtureConfig
from uft_ray.data.mixture import (
    RANK_SPACE,
    MixtureError,
    largest_remainder,
    next_band_end,
    plan_take,
    quotas,
    rank,
    sample,
)


def test_quotas_from_counts() -> None:
    m = MixtureConfig(counts={"ultrachat": 20000, "helpsteer2": 20000})
    assert quotas(m, ["ultrachat", "helpsteer2", "extra"]) == {"ultrachat": 20000, "helpsteer2": 20000, "extra": 0}


@pytest.mark.parametrize(
    ("ratios", "total", "expected"),
    [
        ({"a": 1, "b": 1, "c": 1}, 10, {"a": 4, "b": 3, "c": 3}),  # the tie goes to the first
        ({"a": 0.1, "b": 0.2, "c": 0.7}, 7, {"a": 1, "b": 1, "c": 5}),  # 0.7/1.4/4.9: remainders .7 .4 .9
        ({"a": 0.5, "b": 0.5}, 40000, {"a": 20000, "b": 20000}),
        ({"a": 2, "b": 0}, 5, {"a": 5, "b": 0}),
        ({"a": 1, "b": 2, "c": 3, "d": 4}, 1, {"a": 0, "b": 0, "c": 0, "d": 1}),
    ],
)
def test_largest_remainder_sums_exactly(ratios: dict, total: int, expected: dict) -> None:
    got = largest_remainder(ratios, total)
    assert got == expected and sum(got.values()) == total


def test_ratio_quotas_sum_to_total_for_awkward_ratios() -> None:
    rng = random.Random(0)
    for _ in range(200):
        ratios = {f"s{i}": rng.random() for i in range(rng.randint(1, 6))}
        total = rng.randint(0, 10**6)
        q = quotas(MixtureConfig(ratios=ratios, total=total), list(ratios))
        assert sum(q.values()) == total
        for k, v in q.items():
            assert abs(v - total * ratios[k] / sum(ratios.values())) < 1


IDS = [f"row-{i}" for i in range(1000)]


def test_sample_is_exact_seeded_and_without_replacement() -> None:
    a = sample(IDS, 300, seed=0)
    assert len(a) == 300 and len(set(a)) == 300 and set(a) <= set(IDS)
    assert sample(IDS, 300, seed=0) == a  # same seed, same rows
    shuffled = IDS[:]
    random.Random(5).shuffle(shuffled)
    assert sample(shuffled, 300, seed=0) == a  # the input order (Ray's execution order) does not matter
    b = sample(IDS, 300, seed=1)
    assert len(b) == 300 and set(b) != set(a)  # another seed, another sample
    assert set(sample(IDS, 100, seed=0)) < set(a)  # a smaller quota is a prefix of the same seeded order


def test_source_smaller_than_its_quota_is_an_error_naming_the_fix() -> None:
    with pytest.raises(MixtureError) as e:
        sample(IDS[:50], 80, seed=0, source="helpsteer2")
    msg = str(e.value)
    assert "'helpsteer2'" in msg and "50 trainable rows available" in msg and "80 requested" in msg
    assert "mixture.allow_upsample" in msg


def test_upsampling_repeats_rows_with_suffixed_ids() -> None:
    out = sample(IDS[:40], 100, seed=3, allow_upsample=True)
    assert len(out) == 100 and len(set(out)) == 100
    base = [i.split("#")[0] for i in out]
    counts = {i: base.count(i) for i in IDS[:40]}
    assert (
        sorted(set(counts.values())) == [2, 3] and sum(1 for c in counts.values() if c == 3) == 20
    )  # 100 = 2*40 + 20
    assert {i for i in out if "#" in i} == {f"{i}#{k}" for i, c in counts.items() for k in range(1, c)}
    with pytest.raises(MixtureError, match="no trainable rows"):
        sample([], 5, seed=0, allow_upsample=True)


def test_duplicates_count_once() -> None:
    assert sorted(sample(["a", "a", "b"], 2, seed=0)) == ["a", "b"]


def test_rank_is_uniform_enough_and_seeded() -> None:
    r = np.array([rank(0, i) for i in IDS], dtype=np.float64) / RANK_SPACE
    assert 0.45 < r.mean() < 0.55 and r.min() >= 0 and r.max() < 1
    assert rank(0, "x") == rank(0, "x") != rank(1, "x")


def test_next_band_end() -> None:
    first = next_band_end(0, n_rows=100_000, found=0, quota=20_000)
    frac = first / RANK_SPACE
    assert 0.22 < frac < 0.23  # 20k * 1.1 + a few sigma over 100k rows
    assert next_band_end(0, n_rows=100, found=0, quota=90) == RANK_SPACE  # close to everything: take it all
    # half the band's rows were dropped: the next band is sized by the 50% survival seen
    nxt = next_band_end(first, n_rows=100_000, found=11_000, quota=20_000) / RANK_SPACE
    assert frac + 0.15 < nxt < frac + 0.25
    assert next_band_end(first, n_rows=100_000, found=0, quota=20_000) == RANK_SPACE


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("n", "quota", "drop"), [(5000, 700, 0.0), (5000, 700, 0.4), (2000, 1900, 0.05), (300, 1, 0.9)]
)
def test_bands_give_exactly_what_sample_gives(seed: int, n: int, quota: int, drop: float) -> None:
    """The pipeline's loop, in memory: tokenize band after band (rows 'too long' at random), then cut."""
    rng = random.Random(seed)
    ids = [f"{seed}-{i}" for i in range(n)]
    valid = [i for i in ids if rng.random() >= drop]  # rows that survive tokenization
    ranked = {i: rank(seed, i) for i in ids}
    end, found, tokenized, take = 0, [], 0, None
    while take is None:
        new_end = next_band_end(end, n, len(found), quota)
        band = [i for i in ids if end <= ranked[i] < new_end]
        tokenized += len(band)
        found += [ranked[i] for i in band if i in set(valid)]
        end = new_end
        if len(valid) < quota and end >= RANK_SPACE:
            with pytest.raises(MixtureError):
                plan_take("s", np.array(found, np.uint64), quota, complete=True, allow_upsample=False)
            return
        take = plan_take("s", np.array(found, np.uint64), quota, complete=end >= RANK_SPACE, allow_upsample=False)
    picked = sorted(i for i in valid if take.copies(ranked[i]))
    assert picked == sorted(sample(valid, quota, seed))
    if quota < n // 5 and drop < 0.5:
        assert tokenized < n // 2  # lazy: most of the source was never tokenized
