"""The hf rollout sampler (uft_ray.rft.sampling): seeded per (seed, position), batch-invariant, exact in distribution."""

from __future__ import annotations

import math

import pytest
import torch

from uft_ray.rft.rollout import request_seed
from uft_ray.rft.sampling import (
    MASK32,
    SeededSampler,
    gumbel_from_bits,
    sample_tokens,
    step_words,
    token_table,
    uniform_bits,
)

V = 1000


def _logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2


def _seeds(n: int, step: int = 1) -> list[int]:
    return [request_seed(0, step, f"row{i}", 0) for i in range(n)]


def test_returns_one_token_id_per_row_and_is_deterministic():
    logits, seeds = _logits(4), _seeds(4)
    out = sample_tokens(logits, seeds, 0, temperature=1.0)
    assert out.shape == (4,) and out.dtype == torch.int64 and out.device == logits.device
    assert torch.equal(sample_tokens(logits.clone(), list(seeds), 0, temperature=1.0), out)
    # the position and the seed are part of the key: over 8 positions, nearly flat logits give different draws
    flat = torch.zeros(4, V)
    by_t = torch.stack([sample_tokens(flat, seeds, t, temperature=1.0) for t in range(8)])
    assert len({tuple(c) for c in by_t.T.tolist()}) == 4  # rows differ
    assert all(len(set(col)) >= 7 for col in by_t.T.tolist())  # positions differ (a repeat has p ~ 8*7/2/V)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_rows_token_does_not_depend_on_the_rest_of_the_batch_or_the_chunking(top_p):
    logits, seeds = _logits(5), _seeds(5)
    order = [3, 0, 4, 1, 2]
    for t in range(6):
        alone = [int(sample_tokens(logits[i : i + 1], [seeds[i]], t, temperature=0.8, top_p=top_p)) for i in range(5)]
        together = sample_tokens(logits[order], [seeds[i] for i in order], t, temperature=0.8, top_p=top_p)
        assert together.tolist() == [alone[i] for i in order]
        for chunk in (7, 64, 5 * V):  # chunk boundaries inside and across rows: the same draws
            tiny = sample_tokens(logits, seeds, t, temperature=0.8, top_p=top_p, chunk_elements=chunk)
            assert tiny.tolist() == alone


def _frequencies(logits_row: torch.Tensor, n: int, **kw) -> torch.Tensor:
    logits = logits_row.expand(n, -1).contiguous()
    tokens = sample_tokens(logits, _seeds(n, step=7), 3, **kw)
    return torch.bincount(tokens, minlength=logits.shape[1]).double() / n


def _assert_matches(freq: torch.Tensor, probs: torch.Tensor, n: int, tol: float) -> None:
    assert (freq - probs).abs().max().item() < tol, (freq, probs)
    support = probs > 0
    assert (freq[~support] == 0).all()
    chi2 = (n * (freq[support] - probs[support]) ** 2 / probs[support]).sum().item()
    assert chi2 < 25, chi2  # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5 for a correct sampler


def test_draws_follow_softmax_of_logits_over_temperature():
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    n = 40_000
    for temperature in (1.0, 0.5, 2.0):
        probs = torch.softmax(row.double() / temperature, -1)
        _assert_matches(_frequencies(row, n, temperature=temperature), probs, n, tol=0.01)
    # a wrong temperature is caught: T=1 draws are far from the T=0.5 distribution
    assert (_frequencies(row, n, temperature=1.0) - torch.softmax(row.double() / 0.5, -1)).abs().max() > 0.05


def test_draws_over_positions_of_one_seed_follow_the_same_distribution():
    row = torch.tensor([[0.5, -1.0, 1.5, 0.0, 0.3]])
    probs = torch.softmax(row[0].double(), -1)
    n = 20_000
    tokens = torch.cat([sample_tokens(row, [12345], t, temperature=1.0) for t in range(n)])
    _assert_matches(torch.bincount(tokens, minlength=5).double() / n, probs, n, tol=0.012)


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalizes():
    row = torch.log(torch.tensor([0.5, 0.05, 0.3, 0.1, 0.05]))
    n = 40_000
    freq = _frequencies(row, n, temperature=1.0, top_p=0.75)  # {0.5, 0.3} reach 0.8 >= 0.75
    _assert_matches(freq, torch.tensor([0.625, 0, 0.375, 0, 0], dtype=torch.float64), n, tol=0.01)


def test_vocab_limit_greedy_rows_and_zero_temperature():
    logits = _logits(3)
    logits[:, V - 10 :] = 50.0  # the padded ids would win every draw if they were allowed
    seeds = _seeds(3)
    out = sample_tokens(logits, seeds, 0, temperature=1.0, vocab_limit=V - 10, greedy=[False, True, False])
    assert (out < V - 10).all()
    assert out[1] == logits[1, : V - 10].argmax()
    assert torch.equal(
        sample_tokens(logits, seeds, 0, temperature=0.0, vocab_limit=V - 10), logits[:, :-10].argmax(-1)
    )
    sampled = sample_tokens(logits, seeds, 0, temperature=1.0, vocab_limit=V - 10)
    assert sampled[[0, 2]].tolist() == out[[0, 2]].tolist()  # a greedy neighbour changes nothing


def test_hash_bits_are_32_bit_uniform_and_independent_across_rows():
    words = torch.tensor(step_words(_seeds(4), 5), dtype=torch.int64)
    bits = uniform_bits(words, token_table(151_936, "cpu"))
    assert bits.min() >= 0 and bits.max() <= MASK32
    u = (bits.double() + 0.5) / 2.0**32
    assert u.mean().item() == pytest.approx(0.5, abs=0.002)  # sd of the mean: 0.29 / sqrt(6e5) = 4e-4
    assert (u < 0.01).double().mean().item() == pytest.approx(0.01, abs=0.001)
    assert (u > 0.99).double().mean().item() == pytest.approx(0.01, abs=0.001)
    corr = torch.corrcoef(u)
    assert (corr - torch.eye(4)).abs().max() < 0.01  # sd 1 / sqrt(1.5e5) = 2.6e-3
    assert len(torch.unique(token_table(151_936, "cpu"))) == 151_936


def test_gumbel_noise_is_finite_at_the_extremes_and_has_the_gumbel_mean():
    extremes = gumbel_from_bits(torch.tensor([0, 1, MASK32 - 1, MASK32], dtype=torch.int64))
    assert torch.isfinite(extremes).all()
    assert extremes[0] > 22 and extremes[0] > extremes[1] and extremes[-1] < -2.5
    bits = uniform_bits(torch.tensor(step_words([1, 2], 0), dtype=torch.int64), token_table(200_000, "cpu"))
    g = gumbel_from_bits(bits).double()
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)  # Euler-Mascheroni; sd 1.28 / sqrt(4e5)
    assert g.var().item() == pytest.approx(math.pi**2 / 6, rel=0.02)


def test_the_logits_processor_returns_the_draw_one_hot_at_its_position():
    scores, seeds = _logits(2), _seeds(2)
    sampler = SeededSampler(seeds, [False, False], 1.0, 1.0, V, prompt_len=4)
    out = sampler(torch.zeros(2, 6, dtype=torch.long), scores.clone())
    expect = sample_tokens(scores, seeds, 2, temperature=1.0)
    assert torch.equal(out.argmax(-1), expect)
    assert (out == 0).sum() == 2 and torch.isinf(out).sum() == 2 * V - 2
