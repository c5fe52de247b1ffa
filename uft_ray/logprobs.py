"""Per-sequence summed log-probabilities of the response tokens, for the policy and the reference alike.

    logp(y|x) = sum_{t in response} log pi(y_t | x, y_<t)

Policy and reference go through the same function on the same token ids (DESIGN.md, "The math"), so a
policy that equals its reference gets r == 0 exactly, not up to two implementations' rounding.

Memory: a full fp32 log-softmax over Qwen's 152k vocabulary is 1.2 GB per 2k-token sequence. We only need
the log-softmax at the target token, `logit[target] - logsumexp(logits)`, so we select the scored positions
first and upcast `chunk_size` of them at a time. The backward recomputes each chunk's softmax from the saved
logsumexp and writes straight into one gradient buffer, instead of letting autograd keep (or zero-fill) a
full-size tensor per chunk. Numbers: `python bench/logprobs.py`.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

# 256 scored tokens x 152k vocab is ~156 MB of fp32 per chunk. On CPU smaller chunks ran faster (bench); on a
# GPU bigger kernels amortize launches. Either way it is small next to the logits themselves.
DEFAULT_CHUNK_SIZE = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16/fp32 logits are reduced in fp32; float64 stays float64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


class _TargetLogProb(torch.autograd.Function):
    """log_softmax(logits[b, t])[target] for a list of positions, in chunks of positions.

    d logp / d logits = onehot(target) - softmax(logits), recomputed chunk by chunk in the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        dtype = _compute_dtype(logits.dtype)
        n = rows.numel()
        token_logp = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            chunk = logits[rows[start:end], cols[start:end]].to(dtype)  # [c, V], a copy of c rows only
            target_logit = chunk.gather(1, targets[start:end, None]).squeeze(1)
            # logsumexp in place on our copy: torch.logsumexp would allocate a second [c, V] buffer.
            shift = chunk.amax(dim=-1, keepdim=True)
            shift.masked_fill_(~torch.isfinite(shift), 0)  # an all -inf row gives -inf, not nan
            lse[start:end] = chunk.sub_(shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(1))
            token_logp[start:end] = target_logit - lse[start:end]
            del chunk  # else the next chunk is allocated while this one is still alive
        ctx.save_for_backward(logits, rows, cols, targets, lse)
        ctx.chunk_size = chunk_size
        return token_logp

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_token_logp: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, rows, cols, targets, lse = ctx.saved_tensors
        dtype = lse.dtype
        grad_logits = torch.zeros_like(logits)
        n = rows.numel()
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            r, c = rows[start:end], cols[start:end]
            # Advanced indexing copies, so the in-place ops below never touch `logits`.
            grad = logits[r, c].to(dtype)
            grad.sub_(lse[start:end, None]).exp_().neg_()  # -softmax
            grad.scatter_add_(1, targets[start:end, None], torch.ones(end - start, 1, dtype=dtype, device=grad.device))
            grad.mul_(grad_token_logp[start:end, None].to(dtype))
            grad_logits[r, c] = grad.to(logits.dtype)
            del grad
        return grad_logits, None, None, None, None


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the masked tokens of each sequence.

    Args:
        logits: [B, T, V] next-token logits, any float dtype, may require grad.
        labels: [B, T] the input ids (not shifted).
        loss_mask: [B, T], non-zero on the tokens to score, indexed like `labels`: mask[b, t] scores token
            `labels[b, t]` under the prediction at position t - 1. mask[:, 0] is ignored (nothing predicts
            the first token). Pads must be 0; their label values are never read.
        chunk_size: how many scored tokens are upcast to the compute dtype at once.

    Returns:
        sum_logp: [B], float64 (summed in float64 whatever the logits' dtype), differentiable w.r.t. `logits`.
        n_tokens: [B] int64, the number of scored tokens; a row with none has sum_logp 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must match logits[:2] "
            f"{tuple(logits.shape[:2])}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch = logits.shape[0]
    device = logits.device

    # The usual shift: position t - 1 predicts token t; select only the scored tokens.
    scored = loss_mask[:, 1:].to(device) != 0
    rows, label_pos = scored.nonzero(as_tuple=True)
    label_pos = label_pos + 1
    targets = labels.to(device)[rows, label_pos].long()
    token_logp = _TargetLogProb.apply(logits, rows, label_pos - 1, targets, chunk_size)

    # Sum in float64: a 2k-token response's log-prob is ~-2000 nats, where fp32 accumulation drifts by 1e-3,
    # more than the 1e-4 the reference cache promises (measured); per-token values stay in the logits' precision.
    sum_logp = torch.zeros(batch, dtype=torch.float64, device=device).index_add(0, rows, token_logp.double())
    n_tokens = scored.sum(dim=1)
    return sum_logp, n_tokens


def model_sequence_logprobs(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a causal LM on a right-padded batch and return `sequence_logprobs` of its response tokens.

    `model(input_ids=..., attention_mask=..., **model_kwargs)` must return the logits [B, T, V], either as
    a tensor or as an object with `.logits` (a transformers `CausalLMOutput`); pass `use_cache=False` etc.
    through `model_kwargs`. Pair rows: call once for `chosen` and once for `rejected`.

    Columns where every row is padding are cut before the forward; `model_kwargs` go through uncut, so do
    not pass per-token tensors (position_ids) there.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must have the same shape"
        )
    attended = attention_mask != 0
    if bool((loss_mask.to(attended.device) != 0).logical_and(~attended).any()):
        raise ValueError("loss_mask selects padding tokens (attention_mask == 0)")
    # Trailing all-padding columns (a batch padded to a fixed length) change no real token's logits under
    # right padding and cost a full-vocabulary logit row each: cut them before the forward.
    used = attended.any(dim=0).nonzero()
    length = int(used[-1]) + 1 if used.numel() else 1
    input_ids, attention_mask, loss_mask = input_ids[:, :length], attention_mask[:, :length], loss_mask[:, :length]

    out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return sequence_logprobs(logits, input_ids, loss_mask, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------------------
# Per-token log-probs and entropies (hint-guided RFT): the same chunked selection, with the entropy's gradient.


class _TargetLogProbEntropy(torch.autograd.Function):
    """Per selected position: log_softmax(logits)[target] and the entropy H = -sum_v p_v log p_v.

    Gradients, chunk by chunk from the saved logsumexp:
        d logp / d z = onehot(target) - p
        d H / d z_v  = -p_v (log p_v + H)
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(logits.dtype)
        n = rows.numel()
        token_logp = torch.empty(n, dtype=dtype, device=logits.device)
        entropy = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = logits[rows[start:end], cols[start:end]].to(dtype)  # [c, V], a copy of c rows only
            target_logit = z.gather(1, targets[start:end, None]).squeeze(1)
            shift = z.amax(dim=-1, keepdim=True)
            shift.masked_fill_(~torch.isfinite(shift), 0)
            p = (z - shift).exp_()
            total = p.sum(dim=-1, keepdim=True)
            lse[start:end] = total.log().add_(shift).squeeze(1)
            p.div_(total)
            # H = lse - sum_v p_v z_v; -inf logits (masked vocab) have p = 0 and contribute nothing
            entropy[start:end] = lse[start:end] - (p * z.nan_to_num(neginf=0.0)).sum(dim=-1)
            token_logp[start:end] = target_logit - lse[start:end]
            del z, p
        ctx.save_for_backward(logits, rows, cols, targets, lse, entropy)
        ctx.chunk_size = chunk_size
        return token_logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logp: torch.Tensor, grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, rows, cols, targets, lse, entropy = ctx.saved_tensors
        dtype = lse.dtype
        grad_logits = torch.zeros_like(logits)
        for start in range(0, rows.numel(), ctx.chunk_size):
            end = min(start + ctx.chunk_size, rows.numel())
            r, c = rows[start:end], cols[start:end]
            logp_v = logits[r, c].to(dtype).sub_(lse[start:end, None])  # log p_v
            p = logp_v.exp()
            # -p (log p + H) * g_H  - p * g_logp, then + g_logp at the target
            g_h, g_l = grad_entropy[start:end, None].to(dtype), grad_logp[start:end, None].to(dtype)
            grad = logp_v.add_(entropy[start:end, None]).nan_to_num_(neginf=0.0).mul_(p).mul_(-g_h)
            grad.sub_(p.mul_(g_l))
            grad.scatter_add_(1, targets[start:end, None], g_l)
            grad_logits[r, c] = grad.to(logits.dtype)
            del logp_v, p, grad
        return grad_logits, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities (and entropies) of the masked tokens, [B, T] each, 0 where the mask is 0.

    Indexing as in `sequence_logprobs` (mask[b, t] scores `labels[b, t]` under the prediction at t - 1).
    The entropy is that of the predictive distribution at the same position. Only masked positions are
    upcast, `chunk_size` at a time: no full-vocabulary fp32 softmax.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits [B, T, V] and labels, loss_mask [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}"
        )
    device = logits.device
    scored = loss_mask[:, 1:].to(device) != 0
    rows, label_pos = scored.nonzero(as_tuple=True)
    label_pos = label_pos + 1
    targets = labels.to(device)[rows, label_pos].long()
    dtype = _compute_dtype(logits.dtype)
    out_logp = torch.zeros(labels.shape, dtype=dtype, device=device)
    if with_entropy:
        logp, ent = _TargetLogProbEntropy.apply(logits, rows, label_pos - 1, targets, chunk_size)
        out_ent = torch.zeros(labels.shape, dtype=dtype, device=device).index_put((rows, label_pos), ent)
    else:
        logp, out_ent = _TargetLogProb.apply(logits, rows, label_pos - 1, targets, chunk_size), None
    return out_logp.index_put((rows, label_pos), logp), out_ent


def model_token_logprobs(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    with_entropy: bool = True,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a causal LM on a right-padded batch and return `token_logprobs` of the masked tokens ([B, T])."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return token_logprobs(logits, input_ids, loss_mask, chunk_size, with_entropy=with_entropy)
