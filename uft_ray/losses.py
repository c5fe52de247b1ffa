"""The losses of docs/design.md "The losses", as pure tensor functions. Imports torch only.

Inputs are per-row summed response log-probs from `uft_ray.logprobs` (policy and reference), so

    r(x, y) = beta * (logp_theta(y|x) - logp_ref(y|x))            implicit reward (UNA Eq. 6)

Every loss returns `(loss, metrics)`:
- `loss`: the batch objective, `sum_i w_i * l_i / n_rows` (w = 1 without `weight`, so it is the plain row
  mean; a per-source weight scales its rows' share of the gradient without renormalizing the others).
- `metrics`: detached tensors. 0-dim batch means under the metric names of docs/internals.md (`loss`, `reward`, `score_pred`,
  `score_target`, `logp`, `kl`, ...) and, under `rows/{name}`, the 1-D per-row values they are means of
  (`rows/loss` is the *unweighted* row loss). Feed `metrics` and the rows' sources to `per_source_metrics`
  for `loss/{source}`, `reward/{source}`, ...: nothing is recomputed.

Data parallelism and gradient accumulation (the training loop's contract)
-------------------------------------------------------------------------
DeepSpeed's `engine.backward(loss)` divides `loss` by `grad_accum` (`scale_wrt_gas`) and its gradient
all-reduce averages over the `world_size` data-parallel ranks. If each micro-batch hands it its local mean,
a row in a 3-row micro-batch weighs 3x a row in a 9-row one. Instead hand it

    loss * rank_scale(local_rows, global_rows, world_size, grad_accum)

where `global_rows` counts the rows of the whole optimizer step: every rank, every micro-batch (all-reduce
the local counts once per step, or `micro_batch_size * world_size * grad_accum` when every micro-batch is
full). The applied gradient is then exactly the gradient of the global-batch mean. For `sft_loss(...,
reduction="token")` count tokens instead of rows; for `dpo_loss` a row is a pair. `kto_loss` also needs its
reference point z from the whole step (its `kl` argument), or ranks optimize different objectives. The
logged global loss is `all_reduce_sum(sum of the step's scaled losses) / (world_size * grad_accum)`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def implicit_reward(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * (logp_theta - logp_ref), UNA Eq. 6."""
    return beta * (policy_logp - ref_logp)


def row_mean(row_losses: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i * l_i / n_rows; an empty batch gives 0 (still part of the graph) rather than nan."""
    if weight is not None:
        if weight.shape != row_losses.shape:
            raise ValueError(f"weight {tuple(weight.shape)} must match the rows {tuple(row_losses.shape)}")
        row_losses = row_losses * weight.to(row_losses.dtype)
    return row_losses.sum() / max(row_losses.numel(), 1)


def rank_scale(local_count: int, global_count: int, world_size: int, grad_accum: int = 1) -> float:
    """Factor for a micro-batch's local mean loss so that DeepSpeed's averaging yields the global mean.

    `local_mean * local_count * world_size * grad_accum / global_count`, averaged over ranks (/ world_size)
    and summed over micro-batches after DeepSpeed's / grad_accum, is `sum of all rows / global_count`.
    Counts are rows, or tokens for a token-mean loss; `global_count` spans all ranks and all micro-batches
    of one optimizer step. `grad_accum` is what the engine divides by: 1 if it does not (`scale_wrt_gas`
    off, or plain DDP).
    """
    if global_count <= 0:
        raise ValueError(f"global_count must be > 0, got {global_count}")
    return local_count * world_size * grad_accum / global_count


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.sum() / max(x.numel(), 1)


def _per_token(logratio: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    # Rows with no scored tokens have logratio 0 and report kl 0.
    return logratio / n_tokens.clamp(min=1).to(logratio.dtype)


def _report(loss: torch.Tensor, rows: dict[str, torch.Tensor]) -> Metrics:
    metrics: Metrics = {"loss": loss.detach()}
    for name, values in rows.items():
        values = values.detach()
        metrics.setdefault(name, _mean(values.to(loss.dtype)))
        metrics[f"rows/{name}"] = values
    return metrics


def _check_rows(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"expected 1-D per-row tensors of one length, got {shapes}")


def _scored_rows(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    r: torch.Tensor,
    row_losses: torch.Tensor,
    score_target: torch.Tensor,
    n_tokens: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    rows = {
        "loss": row_losses,
        "reward": r,
        "score_pred": torch.sigmoid(r),
        "score_target": score_target.to(r.dtype),
        "logp": policy_logp,
    }
    if n_tokens is not None:
        rows["kl"] = _per_token(policy_logp - ref_logp, n_tokens)
    return rows


def uft_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    score: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """UFT score MSE, UFT Eq. 7 / UNA Eq. 13: per row `(sigmoid(r) - s)^2`.

    `score` s in [0, 1] (1 for sft rows). `n_tokens` (scored tokens per row) only feeds the `kl` metric.
    """
    _check_rows(policy_logp=policy_logp, ref_logp=ref_logp, score=score, weight=weight, n_tokens=n_tokens)
    r = implicit_reward(policy_logp, ref_logp, beta)
    # sigmoid saturates to exactly 0 or 1 for |r| >> 1: finite value, zero gradient.
    row_losses = (torch.sigmoid(r) - score.to(r.dtype)).square()
    loss = row_mean(row_losses, weight)
    return loss, _report(loss, _scored_rows(policy_logp, ref_logp, r, row_losses, score, n_tokens))


# UFT on an SFT row (target 1) is SFT with a fading step size. With u = r and n response tokens,
# d/dlogp (sigmoid(u) - 1)^2 = -2 beta sigmoid(u) (1 - sigmoid(u))^2, and SFT's row NLL -logp / n has gradient
# -1 / n: UFT moves the policy along SFT's gradient scaled by rho(u) = 2 n beta sigmoid(u) (1 - sigmoid(u))^2.
# rho is n beta / 4 at u = 0 and falls like 2 n beta e^-2u: past sigmoid(r) = 0.9 (u = ln 9 = 2.2) a row's pull is
# under 8% of its start, so a row stops learning once its log-ratio to the reference is about 2 / beta nats.
SATURATED = 0.9


def uft_sft_gain(r: torch.Tensor, n_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """rho(r) = 2 n beta sigmoid(r) (1 - sigmoid(r))^2 per row: UFT's gradient on an SFT row (target 1) as a
    multiple of SFT's (the row's mean token NLL)."""
    s = torch.sigmoid(r)
    return 2 * n_tokens.to(r.dtype) * beta * s * (1 - s).square()


def sft_row_saturation(
    rows: dict[str, torch.Tensor], kinds: list[str], sources: list[str], beta: float, *, kappa: bool = False
) -> dict[str, float]:
    """Per source, over its SFT rows (kind `sft`, target 1) of a UFT step, from `uft_loss`'s per-row metrics
    (`rows/reward` r and `rows/logp`):

    - `saturated/{source}`: the share with sigmoid(r) > SATURATED: rows that no longer teach (see rho above).
    - `kappa/{source}` (with `kappa`, for the run's first step): the mean of `-beta * logp_ref` =
      `beta * n * (the reference's NLL per token)`. kappa = beta x n x (per-token NLL drop needed) decides whether
      UFT can teach a row before it saturates (about 1 or below: it can; well above 2: the row saturates first);
      this estimate takes the drop needed to be the whole reference NLL (the response made certain), an upper
      bound: a skill learned to a per-token NLL L needs beta n (NLL_ref - L). logp_ref = logp - r / beta.
    Sources without SFT rows in the step get no key."""
    groups: dict[str, list[int]] = {}
    for i, (kind, source) in enumerate(zip(kinds, sources, strict=True)):
        if kind == "sft":
            groups.setdefault(source, []).append(i)
    if not groups:
        return {}
    r = rows["rows/reward"].detach().double().cpu()
    out: dict[str, float] = {}
    for source, index in groups.items():
        out[f"saturated/{source}"] = float((torch.sigmoid(r[index]) > SATURATED).double().mean())
        if kappa:
            ref = rows["rows/logp"].detach().double().cpu()[index] - r[index] / beta
            out[f"kappa/{source}"] = float((-beta * ref).mean())
    return out


def una_bce_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    score: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """UNA binary cross-entropy, UNA Eq. 12: per row `-[s log sigmoid(r) + (1 - s) log sigmoid(-r)]`."""
    _check_rows(policy_logp=policy_logp, ref_logp=ref_logp, score=score, weight=weight, n_tokens=n_tokens)
    r = implicit_reward(policy_logp, ref_logp, beta)
    s = score.to(r.dtype)
    # logsigmoid, not log(sigmoid): log(sigmoid(-1e4)) is log(0) = -inf.
    row_losses = -(s * F.logsigmoid(r) + (1 - s) * F.logsigmoid(-r))
    loss = row_mean(row_losses, weight)
    return loss, _report(loss, _scored_rows(policy_logp, ref_logp, r, row_losses, score, n_tokens))


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
    n_tokens_chosen: torch.Tensor | None = None,
    n_tokens_rejected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, Eq. 7): per pair `-log sigmoid(r_chosen - r_rejected)`.

    Metrics: `reward` and `logp` are the chosen response's (the row's `response`); `score_pred` is the
    Bradley-Terry probability sigmoid(r_c - r_r) that the chosen wins, `score_target` is 1; `accuracy` is
    the fraction with r_c > r_r; `kl` (with both token counts) is per token over both responses.
    """
    _check_rows(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        weight=weight,
        n_tokens_chosen=n_tokens_chosen,
        n_tokens_rejected=n_tokens_rejected,
    )
    r_chosen = implicit_reward(policy_chosen, ref_chosen, beta)
    r_rejected = implicit_reward(policy_rejected, ref_rejected, beta)
    margin = r_chosen - r_rejected
    row_losses = -F.logsigmoid(margin)
    loss = row_mean(row_losses, weight)
    rows = {
        "loss": row_losses,
        "reward": r_chosen,
        "reward_chosen": r_chosen,
        "reward_rejected": r_rejected,
        "reward_margin": margin,
        "accuracy": (margin > 0).to(margin.dtype),
        "score_pred": torch.sigmoid(margin),
        "score_target": torch.ones_like(margin),
        "logp": policy_chosen,
        "logp_rejected": policy_rejected,
    }
    if n_tokens_chosen is not None and n_tokens_rejected is not None:
        logratio = (policy_chosen - ref_chosen) + (policy_rejected - ref_rejected)
        rows["kl"] = _per_token(logratio, n_tokens_chosen + n_tokens_rejected)
    return loss, _report(loss, rows)


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    kl: torch.Tensor | float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weight: torch.Tensor | None = None,
    n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, Eq. 8), in TRL's form with z in log-ratio units:

        desirable:   lambda_D * (1 - sigmoid(beta * (logratio - z)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z - logratio)))

    with logratio = logp_theta - logp_ref, i.e. DESIGN's `1 - sigmoid(r - beta z)`. z is the reference
    point, detached and clamped at 0. `kl=None` takes the mean logratio of this batch. The paper and TRL
    estimate it on mismatched (x, y') pairs instead; and a per-rank batch mean differs between ranks, so
    for rank-invariant training pass `kl` = all_reduce_sum(logratio) / global_rows (any estimate is
    accepted, in log-ratio units). Metric `kto_z` is the z used.
    """
    _check_rows(policy_logp=policy_logp, ref_logp=ref_logp, desirable=desirable, weight=weight, n_tokens=n_tokens)
    logratio = policy_logp - ref_logp
    if kl is None:
        z = _mean(logratio.detach())
    else:
        z = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device).detach()
    z = z.clamp(min=0)
    desirable = desirable.bool()
    r = beta * logratio
    row_losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - logratio))),
    )
    loss = row_mean(row_losses, weight)
    metrics = _report(loss, _scored_rows(policy_logp, ref_logp, r, row_losses, desirable, n_tokens))
    metrics["kto_z"] = z
    return loss, metrics


def sft_loss(
    sum_logp: torch.Tensor,
    n_tokens: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: Literal["row", "token"] = "row",
) -> tuple[torch.Tensor, Metrics]:
    """Plain SFT: mean token negative log-likelihood of the response.

    reduction="row" (default, DESIGN's "per row, averaged over rows"): each row's token mean
    `-sum_logp / n_tokens` (0 for a row with no tokens), then `row_mean`. Every row counts the same,
    however long its response.
    reduction="token": `sum_i w_i * -sum_logp_i / sum_i n_tokens_i`, the global token mean of HF/TRL SFT,
    where long responses weigh more. Rank-invariant too, with `rank_scale` over token counts.

    `rows/loss` is the per-row token mean in both cases.
    """
    _check_rows(sum_logp=sum_logp, n_tokens=n_tokens, weight=weight)
    row_losses = -sum_logp / n_tokens.clamp(min=1).to(sum_logp.dtype)
    if reduction == "row":
        loss = row_mean(row_losses, weight)
    elif reduction == "token":
        nll = -sum_logp if weight is None else -sum_logp * weight.to(sum_logp.dtype)
        loss = nll.sum() / max(int(n_tokens.sum()), 1)
    else:
        raise ValueError(f"reduction must be 'row' or 'token', got {reduction!r}")
    return loss, _report(loss, {"loss": row_losses, "logp": sum_logp})


def per_source_metrics(per_row_values: dict[str, torch.Tensor], sources: list[str]) -> dict[str, float]:
    """Mean of each per-row value over the rows of each source: `{name}/{source}`.

    `per_row_values` may be a loss's `metrics` as is: keys `rows/{name}` lose the prefix and 0-dim batch
    means are skipped. Across ranks, gather the per-row values and sources first (a few floats per row),
    then call this once, so a source's mean weighs every row equally.
    """
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        groups.setdefault(source, []).append(i)
    out: dict[str, float] = {}
    for key, values in per_row_values.items():
        if values.dim() == 0:
            continue
        if values.shape != (len(sources),):
            raise ValueError(f"{key}: {tuple(values.shape)} values for {len(sources)} sources")
        name = key.removeprefix("rows/")
        values = values.detach().double().cpu()
        for source, index in groups.items():
            out[f"{name}/{source}"] = float(values[index].mean())
    return out


# ---------------------------------------------------------------------------------------------------------
# Hint-guided RFT (Liu et al., arXiv 2505.16984; docs/design.md "Hint-guided RFT"): GRPO + a hint log-likelihood.
# Token-level tensors [rows, tokens] over the response; `mask` marks generated tokens. Token means are
# sum / n_tokens, where `n_tokens` defaults to this batch's count: pass the global batch's token count (all
# ranks and micro-batches) for a rank-invariant objective, as `rank_scale` does for rows.


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(group)) / (std(group) + eps), rows ordered group by group (n rollouts of a prompt).

    The std is the unbiased one (the authors' veRL). A group whose rewards are all equal gets A = 0: no signal.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} rows")
    groups = rewards.double().view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1).to(rewards.dtype)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | float | None) -> torch.Tensor:
    total = (x * mask).sum()
    count = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=x.dtype, device=x.device)
    return total / count.clamp(min=1)


def clipped_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    n_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, the row's advantage on every token (GRPO):

        ratio = exp(logp - old_logp);  l = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))

    Returns (token mean of l, the fraction of tokens where the clip was active).
    """
    ratio = torch.exp(logp - old_logp.detach())
    a = advantages.detach()[:, None]
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1 - clip, 1 + clip)
    losses = torch.maximum(unclipped, clipped)
    return _token_mean(losses, mask, n_tokens), _token_mean((clipped > unclipped).to(logp.dtype), mask, None)


def k3_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token, clamped to [-10, 10] (the authors' veRL):

    exp(l_ref - l) - (l_ref - l) - 1, non-negative, 0 where policy == reference."""
    d = ref_logp.detach() - logp
    return _token_mean((torch.exp(d) - d - 1).clamp(-10, 10), mask, n_tokens)


def hint_rft_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor,
    hint_logp: torch.Tensor | None = None,
    hint_mask: torch.Tensor | None = None,
    *,
    clip: float = 0.2,
    kl_coef: float = 0.001,
    entropy_coef: float = 0.001,
    hint_coef: float = 0.001,
    n_tokens: torch.Tensor | float | None = None,
    n_hint_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The UFT (Liu et al.) objective: loss = pg - c_ent entropy + c_hint hint_nll + c_kl kl.

    pg, kl and entropy are token means over generated tokens (`mask`); the hint sits in the prompt, so it gets
    no policy gradient, KL or entropy, only its mean NLL (`hint_logp` per token over `hint_mask`). Without a
    hint (no revealed chunk, `r3`, evaluation) the hint term is 0. Coefficients default to the authors'.
    `ref_logp` None (no KL term, `kl_coef` 0): the reference is not needed, and kl is 0.
    """
    pg, clip_frac = clipped_pg_loss(logp, old_logp, advantages, mask, clip, n_tokens)
    kl = k3_kl(logp, ref_logp, mask, n_tokens) if ref_logp is not None else logp.new_zeros(())
    ent = _token_mean(entropy, mask, n_tokens)
    if hint_logp is not None and hint_mask is not None and bool(hint_mask.any()):
        hint_nll = _token_mean(-hint_logp, hint_mask, n_hint_tokens)
    else:
        hint_nll = logp.new_zeros(())
    loss = pg - entropy_coef * ent + hint_coef * hint_nll + kl_coef * kl
    metrics = {
        "loss": loss.detach(),
        "pg_loss": pg.detach(),
        "kl": kl.detach(),
        "entropy": ent.detach(),
        "hint_nll": hint_nll.detach(),
        "clip_frac": clip_frac.detach(),
    }
    return loss, metrics
