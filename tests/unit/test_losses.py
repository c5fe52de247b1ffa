"""uft_ray.losses: hand-worked values, gradients, numerics at large |r|, weights, rank-split reduction."""

import math

import pytest
import torch

from uft_ray.losses import (
    dpo_loss,
    kto_loss,
    per_source_metrics,
    rank_scale,
    sft_loss,
    uft_loss,
    una_bce_loss,
)

LN3 = math.log(3)
F64 = torch.float64


def t(*values, dtype=F64, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


# ---------------------------------------------------------------- hand-worked values


def test_uft_hand_worked():
    """beta = 0.5, logratio = [0, 2 ln 3, -2 ln 3] -> r = [0, ln 3, -ln 3] -> sigmoid(r) = [0.5, 0.75, 0.25].

    s = [1, 0.5, 0]: rows (0.5 - 1)^2 = 0.25, (0.75 - 0.5)^2 = 0.0625, (0.25 - 0)^2 = 0.0625; mean 0.125.
    """
    policy, ref = t(-5.0, -5.0 + 2 * LN3, -5.0 - 2 * LN3), t(-5.0, -5.0, -5.0)
    loss, m = uft_loss(policy, ref, t(1.0, 0.5, 0.0), beta=0.5, n_tokens=torch.tensor([2, 4, 1]))
    assert loss.item() == pytest.approx(0.125, abs=1e-12)
    torch.testing.assert_close(m["rows/loss"], t(0.25, 0.0625, 0.0625))
    torch.testing.assert_close(m["rows/reward"], t(0.0, LN3, -LN3))
    torch.testing.assert_close(m["rows/score_pred"], t(0.5, 0.75, 0.25))
    # kl = logratio / n_tokens = [0, 2 ln 3 / 4, -2 ln 3 / 1]
    torch.testing.assert_close(m["rows/kl"], t(0.0, LN3 / 2, -2 * LN3))
    assert m["reward"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["score_pred"].item() == pytest.approx(0.5)
    assert m["score_target"].item() == pytest.approx(0.5)
    assert m["logp"].item() == pytest.approx(-5.0)


def test_uft_at_r_zero_is_mean_half_minus_s_squared():
    """policy == ref (LoRA B = 0 before the first step): loss = mean((0.5 - s)^2) = (0.25 + 0 + 0.09) / 3."""
    logp = t(-12.0, -3.0, -40.0)
    loss, _ = uft_loss(logp, logp.clone(), t(1.0, 0.5, 0.2), beta=0.01)
    assert loss.item() == pytest.approx((0.25 + 0.0 + 0.09) / 3, abs=1e-12)


def test_una_bce_hand_worked():
    """beta = 1, r = [0, ln 3, -ln 3], s = [1, 0.5, 0]; sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4.

    row 0: -log(1/2) = ln 2
    row 1: -(0.5 ln(3/4) + 0.5 ln(1/4)) = 0.5 ln(16/3)
    row 2: -log sigmoid(ln 3) = ln(4/3)
    """
    loss, m = una_bce_loss(t(0.0, LN3, -LN3), t(0.0, 0.0, 0.0), t(1.0, 0.5, 0.0), beta=1.0)
    rows = [math.log(2), 0.5 * math.log(16 / 3), math.log(4 / 3)]
    torch.testing.assert_close(m["rows/loss"], t(*rows))
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-12)


def test_dpo_hand_worked():
    """beta = 1, margins r_c - r_r = [ln 3, -ln 3, 0]: rows -log(3/4) = ln(4/3), -log(1/4) = ln 4, ln 2.

    accuracy = 1/3 (only the first margin is > 0), score_pred = sigmoid(margin) = [3/4, 1/4, 1/2].
    """
    pc, pr = t(-1.0, -2.0, -3.0), t(-1.0 - LN3, -2.0 + LN3, -3.0)
    zeros = t(0.0, 0.0, 0.0)
    loss, m = dpo_loss(pc, pr, zeros, zeros, beta=1.0)
    rows = [math.log(4 / 3), math.log(4), math.log(2)]
    torch.testing.assert_close(m["rows/loss"], t(*rows))
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-12)
    torch.testing.assert_close(m["rows/reward_margin"], t(LN3, -LN3, 0.0))
    torch.testing.assert_close(m["rows/score_pred"], t(0.75, 0.25, 0.5))
    assert m["accuracy"].item() == pytest.approx(1 / 3)
    assert m["reward_chosen"].item() == pytest.approx(-2.0)
    assert m["reward"].item() == pytest.approx(-2.0)  # the chosen responses' mean reward, by hand
    assert m["reward_rejected"].item() == pytest.approx(-2.0)


def test_dpo_at_r_zero_is_log_2():
    """policy == ref: every margin is 0, -log sigmoid(0) = ln 2."""
    c, r = t(-10.0, -7.0), t(-11.0, -4.0)
    loss, m = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["reward_margin"].item() == 0.0


def test_kto_hand_worked_with_given_kl():
    """beta = 1, z = 0, logratio = [ln 3, 0], desirable = [True, False]:

    desirable: 1 - sigmoid(ln 3) = 0.25; undesirable: 1 - sigmoid(0 - 0) = 0.5; mean 0.375.
    With lambda_D = 2: 0.5 and 0.5, mean 0.5.
    """
    policy, ref, desirable = t(LN3, 0.0), t(0.0, 0.0), torch.tensor([True, False])
    loss, m = kto_loss(policy, ref, desirable, beta=1.0, kl=0.0)
    torch.testing.assert_close(m["rows/loss"], t(0.25, 0.5))
    assert loss.item() == pytest.approx(0.375, abs=1e-12)
    torch.testing.assert_close(m["rows/score_target"], t(1.0, 0.0))
    loss, _ = kto_loss(policy, ref, desirable, beta=1.0, kl=0.0, desirable_weight=2.0)
    assert loss.item() == pytest.approx(0.5, abs=1e-12)


def test_kto_batch_kl_estimate_is_detached_mean_clamped_at_zero():
    """kl=None: z = mean logratio = ln 3 / 2 = ln sqrt(3).

    desirable (logratio ln 3): 1 - sigmoid(ln 3 - ln sqrt 3) = 1 - sqrt3 / (1 + sqrt3) = 1 / (1 + sqrt3);
    undesirable (logratio 0): 1 - sigmoid(ln sqrt3 - 0) = 1 / (1 + sqrt3) too.
    A negative mean clamps to z = 0.
    """
    policy = t(LN3, 0.0, requires_grad=True)
    loss, m = kto_loss(policy, t(0.0, 0.0), torch.tensor([True, False]), beta=1.0)
    assert loss.item() == pytest.approx(1 / (1 + math.sqrt(3)), abs=1e-12)
    assert m["kto_z"].item() == pytest.approx(LN3 / 2)
    # z is a constant: the gradient equals that of the same loss with kl given.
    (grad,) = torch.autograd.grad(loss, policy)
    policy2 = policy.detach().clone().requires_grad_()
    (grad_fixed,) = torch.autograd.grad(
        kto_loss(policy2, t(0.0, 0.0), torch.tensor([True, False]), beta=1.0, kl=LN3 / 2)[0], policy2
    )
    torch.testing.assert_close(grad, grad_fixed)

    _, m = kto_loss(t(-LN3, -1.0), t(0.0, 0.0), torch.tensor([True, False]), beta=1.0)
    assert m["kto_z"].item() == 0.0


def test_sft_hand_worked():
    """sum_logp = [-2 ln 2, -3, 0], n_tokens = [2, 3, 0]: per-row token NLL = [ln 2, 1, 0].

    reduction="row": (ln 2 + 1 + 0) / 3; reduction="token": (2 ln 2 + 3) / 5.
    """
    sum_logp, n_tokens = t(-2 * math.log(2), -3.0, 0.0), torch.tensor([2, 3, 0])
    loss, m = sft_loss(sum_logp, n_tokens)
    assert loss.item() == pytest.approx((math.log(2) + 1) / 3, abs=1e-12)
    torch.testing.assert_close(m["rows/loss"], t(math.log(2), 1.0, 0.0))
    loss, _ = sft_loss(sum_logp, n_tokens, reduction="token")
    assert loss.item() == pytest.approx((2 * math.log(2) + 3) / 5, abs=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(sum_logp, n_tokens, reduction="sum")


# ---------------------------------------------------------------- weights


def test_weights_multiply_rows():
    """uft rows at r = 0 with s = [1, 0]: 0.25 each. weight [2, 0] -> (2 * 0.25 + 0) / 2 rows = 0.25;
    weight [1, 1] is the plain mean. The denominator is the row count, not sum(w)."""
    logp, s = t(-1.0, -2.0), t(1.0, 0.0)
    loss, m = uft_loss(logp, logp.clone(), s, beta=1.0, weight=t(2.0, 0.0))
    assert loss.item() == pytest.approx(0.25)
    torch.testing.assert_close(m["rows/loss"], t(0.25, 0.25))  # rows are unweighted
    loss, _ = uft_loss(logp, logp.clone(), s, beta=1.0, weight=t(3.0, 1.0))
    assert loss.item() == pytest.approx((0.75 + 0.25) / 2)
    assert uft_loss(logp, logp.clone(), s, beta=1.0, weight=t(1.0, 1.0))[0].item() == pytest.approx(0.25)

    w = t(0.5, 2.0, 0.0, 1.0)
    for name, fn in LOSSES.items():
        x = make_inputs(name, n=4, seed=1)
        loss, m = fn(x, weight=w)
        if name == "sft_token":  # sum_i w_i * nll_i / total tokens
            expected = (w * -x["policy"]).sum().item() / x["n_tokens"].sum().item()
        else:
            expected = (w * m["rows/loss"]).sum().item() / 4
        assert loss.item() == pytest.approx(expected, rel=1e-12), name


def test_weight_shape_mismatch():
    with pytest.raises(ValueError):
        uft_loss(t(0.0, 0.0), t(0.0, 0.0), t(1.0, 1.0), beta=1.0, weight=t(1.0))


# ---------------------------------------------------------------- every loss: gradcheck, large |r|, rank split


def make_inputs(name, n, seed, scale=5.0):
    g = torch.Generator().manual_seed(seed)

    def rnd():
        return (torch.randn(n, generator=g, dtype=F64) * scale - 20).requires_grad_()

    return {
        "policy": rnd(),
        "ref": rnd(),
        "policy_rejected": rnd(),
        "ref_rejected": rnd(),
        "score": torch.rand(n, generator=g, dtype=F64),
        "desirable": torch.rand(n, generator=g) < 0.5,
        "n_tokens": torch.randint(0, 6, (n,), generator=g),
    }


LOSSES = {
    "uft": lambda x, beta=0.3, **kw: uft_loss(x["policy"], x["ref"], x["score"], beta, **kw),
    "una_bce": lambda x, beta=0.3, **kw: una_bce_loss(x["policy"], x["ref"], x["score"], beta, **kw),
    "dpo": lambda x, beta=0.3, **kw: dpo_loss(
        x["policy"], x["policy_rejected"], x["ref"], x["ref_rejected"], beta, **kw
    ),
    "kto": lambda x, beta=0.3, kl=0.7, **kw: kto_loss(x["policy"], x["ref"], x["desirable"], beta, kl=kl, **kw),
    "sft_row": lambda x, beta=None, **kw: sft_loss(x["policy"], x["n_tokens"], **kw),
    "sft_token": lambda x, beta=None, **kw: sft_loss(x["policy"], x["n_tokens"], reduction="token", **kw),
}
DIFF_KEYS = ["policy", "ref", "policy_rejected", "ref_rejected"]


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_float64(name):
    x = make_inputs(name, n=5, seed=2, scale=2.0)
    w = t(1.0, 0.5, 2.0, 0.0, 1.5)

    def fn(*tensors):
        return LOSSES[name](dict(x, **dict(zip(DIFF_KEYS, tensors, strict=True))), weight=w)[0]

    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in DIFF_KEYS))


@pytest.mark.parametrize("name", LOSSES)
def test_large_reward_is_finite(name):
    """|r| = 1e4 (beta = 1, logratio = +-1e4): finite loss and finite gradients."""
    x = make_inputs(name, n=4, seed=3)
    x["policy"] = t(1e4, -1e4, 1e4, -1e4, requires_grad=True)
    x["policy_rejected"] = t(-1e4, 1e4, 0.0, 1e4, requires_grad=True)
    for k in ("ref", "ref_rejected"):
        x[k] = t(0.0, 0.0, 0.0, 0.0, requires_grad=True)
    loss, m = LOSSES[name](x, beta=1.0)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in m.values())
    grads = torch.autograd.grad(loss, [x[k] for k in DIFF_KEYS], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


# Rows of one optimizer step over 3 ranks x 2 micro-batches, uneven, one micro-batch empty.
SPLITS = [[1, 3], [4, 0], [2, 1]]


@pytest.mark.parametrize("name", LOSSES)
def test_rank_split_average_equals_global(name):
    """Emulates DeepSpeed: each micro-batch's loss is divided by grad_accum and summed, then averaged over ranks.

    With `loss * rank_scale(local, global, world, grad_accum)` that equals the global-batch loss, and so do
    its gradients, however unevenly the rows are split.
    """
    n = sum(map(sum, SPLITS))
    x = make_inputs(name, n=n, seed=4)
    weight = torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(5)) + 0.5
    token_mean = name == "sft_token"
    kw = {}
    if name == "kto":
        # z must be the global estimate: all_reduce_sum(logratio) / global_rows.
        kw["kl"] = (x["policy"] - x["ref"]).detach().mean()

    global_loss, _ = LOSSES[name](x, weight=weight, **kw)
    global_grads = torch.autograd.grad(global_loss, [x[k] for k in DIFF_KEYS], allow_unused=True)

    world, grad_accum = len(SPLITS), len(SPLITS[0])
    global_count = int(x["n_tokens"].sum()) if token_mean else n
    total, start = 0.0, 0
    for rank_sizes in SPLITS:
        for size in rank_sizes:
            part = {k: v[start : start + size] for k, v in x.items()}
            local_loss, _ = LOSSES[name](part, weight=weight[start : start + size], **kw)
            local_count = int(part["n_tokens"].sum()) if token_mean else size
            scaled = local_loss * rank_scale(local_count, global_count, world, grad_accum)
            total = total + scaled / grad_accum / world  # what DeepSpeed applies
            start += size
    split_grads = torch.autograd.grad(total, [x[k] for k in DIFF_KEYS], allow_unused=True)

    torch.testing.assert_close(total, global_loss, rtol=1e-12, atol=1e-14)
    for g_split, g_global in zip(split_grads, global_grads, strict=True):
        assert (g_split is None) == (g_global is None)
        if g_global is not None:
            torch.testing.assert_close(g_split, g_global, rtol=1e-12, atol=1e-14)


def test_rank_scale_hand_worked():
    """3 of 8 rows, 2 ranks, 2 micro-batches: 3 * 2 * 2 / 8 = 1.5. An empty step has no mean."""
    assert rank_scale(3, 8, world_size=2, grad_accum=2) == 1.5
    with pytest.raises(ValueError):
        rank_scale(0, 0, world_size=2)


def test_empty_batch_loss_is_zero_not_nan():
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    loss, _ = uft_loss(empty, empty.detach(), empty.detach(), beta=0.1)
    assert loss.item() == 0.0
    loss.backward()


# ---------------------------------------------------------------- per-source metrics


def test_per_source_metrics_groups_rows():
    """Two sources: a = rows 0, 2; b = row 1. beta = 1, logratio = [0, ln 3, 2], n_tokens = [1, 3, 4].

    reward/a = (0 + 2) / 2 = 1, reward/b = ln 3; kl/a = (0/1 + 2/4) / 2 = 0.25, kl/b = ln 3 / 3;
    score_target/a = (1 + 0.2) / 2 = 0.6; loss/b = (sigmoid(ln 3) - 0.5)^2 = 0.0625.
    """
    policy, ref = t(-1.0, -1.0 + LN3, 1.0), t(-1.0, -1.0, -1.0)
    _, m = uft_loss(policy, ref, t(1.0, 0.5, 0.2), beta=1.0, n_tokens=torch.tensor([1, 3, 4]))
    out = per_source_metrics(m, ["a", "b", "a"])
    assert out["reward/a"] == pytest.approx(1.0)
    assert out["reward/b"] == pytest.approx(LN3)
    assert out["kl/a"] == pytest.approx(0.25)
    assert out["kl/b"] == pytest.approx(LN3 / 3)
    assert out["score_target/a"] == pytest.approx(0.6)
    assert out["loss/b"] == pytest.approx(0.0625)
    assert out["logp/a"] == pytest.approx(0.0)
    assert set(out) == {
        f"{k}/{s}" for k in ("loss", "reward", "score_pred", "score_target", "logp", "kl") for s in "ab"
    }
    with pytest.raises(ValueError):
        per_source_metrics(m, ["a", "b"])
