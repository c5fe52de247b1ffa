"""Hint-guided RFT's loss terms (uft_ray.losses), numbers worked out by hand in each docstring."""

from __future__ import annotations

import math

import pytest
import torch

from uft_ray.losses import clipped_pg_loss, group_advantages, hint_rft_loss, k3_kl


def test_group_advantages_one_rewarded_of_four():
    """r = [1, 0, 0, 0]: mean 1/4; unbiased std = sqrt((3/4)^2 + 3 (1/4)^2) / 3) = sqrt(1/4) = 1/2;
    A = (r - 1/4) / (1/2 + 1e-6) = [1.5, -0.5, -0.5, -0.5] (to 1e-5). Equal rewards: A = 0."""
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1]), group_size=4)
    torch.testing.assert_close(a[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    assert torch.equal(a[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(6), group_size=4)


def test_clipped_surrogate_by_hand():
    """One token per row. A = 1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped). A = -1, ratio 0.5:
    max(0.5, 0.8) = 0.8 (clipped). A = 1, ratio 1: -1 (not clipped). Mean (-1.2 + 0.8 - 1) / 3; clip frac 2/3."""
    old = torch.zeros(3, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.0]]))
    loss, frac = clipped_pg_loss(logp, old, torch.tensor([1.0, -1.0, 1.0]), torch.ones(3, 1))
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 1.0) / 3, abs=1e-6)
    assert float(frac) == pytest.approx(2 / 3)


def test_k3_kl_by_hand():
    """d = l_ref - l: 0 -> 0; 1 -> e - 2; 5 -> e^5 - 6 = 142.4, clamped to 10. Mean over the three tokens."""
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[0.0, 1.0, 5.0]])
    got = k3_kl(logp, ref, torch.ones(1, 3))
    assert float(got) == pytest.approx((0 + (math.e - 2) + 10) / 3, abs=1e-6)
    assert float(k3_kl(logp, logp, torch.ones(1, 3))) == 0.0


def test_the_rewarded_rollout_rises_after_one_update_and_equal_rewards_give_no_policy_gradient():
    """A constructed group: 4 rollouts of 3 tokens from a per-position softmax policy over 5 tokens. One rollout
    is rewarded: after one SGD step its log-prob rises relative to the other three. With all rewards equal the
    policy-gradient term is zero (A = 0), and so is its gradient."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    seqs = torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 1], [2, 3, 4]])
    mask = torch.ones(4, 3)

    def token_logp() -> torch.Tensor:
        return torch.log_softmax(logits, dim=-1).gather(1, seqs.T).T  # [4 rollouts, 3 tokens]

    before = token_logp().detach().sum(1)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    loss, _ = clipped_pg_loss(token_logp(), token_logp().detach(), adv, mask)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    after = token_logp().detach().sum(1)
    gain = after - before
    assert gain[0] > 0 and all(gain[0] > g for g in gain[1:])

    logits.grad = None
    flat = group_advantages(torch.full((4,), 0.3), group_size=4)
    loss, _ = clipped_pg_loss(token_logp(), token_logp().detach(), flat, mask)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().max()) == 0.0


def test_hint_rft_loss_combines_the_terms_and_drops_the_hint_term_without_hint_tokens():
    """loss = pg - 0.001 entropy + 0.001 hint_nll + 0.001 kl, each a token mean. Here at ratio 1 and A = [1, -1]:
    pg = mean(-A) over 2 + 2 tokens = 0; kl with d = [0, 0, 1, 1] = (e - 2) / 2; entropy mean 2;
    hint NLL of log-probs [-1, -3] = 2. loss = 0 - 0.002 + 0.002 + 0.001 (e - 2) / 2."""
    logp = torch.zeros(2, 2, requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    entropy = torch.full((2, 2), 2.0)
    hint = torch.tensor([[-1.0, 0.0], [-3.0, 0.0]])
    hint_mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, m = hint_rft_loss(logp, logp.detach(), ref, adv, torch.ones(2, 2), entropy, hint, hint_mask)
    assert float(m["pg_loss"]) == 0.0 and float(m["hint_nll"]) == pytest.approx(2.0)
    assert float(m["kl"]) == pytest.approx((math.e - 2) / 2, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(-0.002 + 0.002 + 0.001 * (math.e - 2) / 2, abs=1e-7)
    no_hint, m0 = hint_rft_loss(logp, logp.detach(), ref, adv, torch.ones(2, 2), entropy, hint, torch.zeros(2, 2))
    assert float(m0["hint_nll"]) == 0.0 and float(no_hint.detach()) == pytest.approx(
        float(loss.detach()) - 0.002, abs=1e-7
    )


def test_global_token_count_makes_the_split_over_ranks_exact():
    """Two ranks' token sums over the global count add up to the whole batch's token mean."""
    torch.manual_seed(1)
    logp, old, ref = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).float()
    adv = torch.randn(4)
    whole, _ = clipped_pg_loss(logp, old, adv, mask)
    n = mask.sum()
    parts = [
        clipped_pg_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], n_tokens=n)[0]
        for i in (0, 2)
    ]
    assert float(sum(parts)) == pytest.approx(float(whole), abs=1e-6)
    kl_parts = [k3_kl(logp[i : i + 2], ref[i : i + 2], mask[i : i + 2], n_tokens=n) for i in (0, 2)]
    assert float(sum(kl_parts)) == pytest.approx(float(k3_kl(logp, ref, mask)), abs=1e-6)
