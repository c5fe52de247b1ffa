"""Per-sequence summed log-probabilities of the response tokens, for the policy and the reference alike.

    logp(y|x) = sum_{t in response} log pi(y_t | x, y_<t)

Policy and reference go through the same function on the same token ids (docs/design.md "The losses"), so a
policy that equals its reference gets r == 0 exactly, not up to two implementations' rounding.

Memory: a full fp32 log-softmax over Qwen's 152k vocabulary is 1.2 GB per 2k-token sequence. We only need
the log-softmax at the target token, `logit[target] - logsumexp(logits)`, so we select the scored positions
first and upcast `chunk_size` of them at a time. The backward recomputes each chunk's softmax from the saved
logsumexp and writes straight into one gradient buffer, instead of letting autograd keep (or zero-fill) a
full-size tensor per chunk. Numbers: `python bench/logprobs.py`.

Logits only where they are used: `model_sequence_logprobs` / `model_token_logprobs` hand the model's output head
(`get_output_embeddings()`, the `lm_head`) only the final hidden states of the scored positions (a forward
pre-hook on the head), so prompt and padding positions get no logits, no log-softmax and no gradient buffer.
The head still runs once, as a module, inside the model's own forward: ZeRO-3 gathers its (possibly tied,
partitioned) weight as before, the module order it traces does not change, and DeepSpeed's backward hooks on
the forward's outputs still fire. Grad and no-grad forwards (policy, reference, old log-probs, evaluation) share
this one head call, so a policy equal to its reference still gets r == 0 exactly; a chunked head outside the
forward would also re-gather a ZeRO-3 head per chunk. The backward writes the logits' gradient into their own
buffer. A model without `get_output_embeddings` (a plain callable) gives its full logits and the positions are
selected from them. Numbers: `python bench/logits_only.py`.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from uft_ray.packing import Packed, forward_kwargs

# 256 scored tokens x 152k vocab is ~156 MB of fp32 per chunk. On CPU smaller chunks ran faster (bench); on a
# GPU bigger kernels amortize launches. Either way it is small next to the logits themselves.
DEFAULT_CHUNK_SIZE = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16/fp32 logits are reduced in fp32; float64 stays float64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _rows(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    start: int,
    end: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Scored rows start:end as a fresh tensor of `dtype` (the callers work on it in place).

    rows/cols None: `logits` is [N, V], one row per scored position; else [B, T, V] indexed by (rows, cols)."""
    if rows is None:
        return logits[start:end].to(dtype, copy=True)
    return logits[rows[start:end], cols[start:end]].to(dtype)  # advanced indexing copies already


def _grad_buffer(logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Where the backward writes d/d logits. [B, T, V]: a zeroed tensor (unscored positions keep 0). [N, V] (the
    head's output at the scored positions, ours alone): its own buffer, each chunk of rows overwritten once read,
    so the gradient takes no second [N, V] tensor. Safe because the head's backward reads its input and weight,
    not its output; were the logits saved elsewhere, autograd's version check would raise, not miscompute."""
    return logits if rows is None else torch.zeros_like(logits)


def _write(
    grad_logits: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    start: int,
    end: int,
    g: torch.Tensor,
) -> None:
    if rows is None:
        grad_logits[start:end] = g.to(grad_logits.dtype)
    else:
        grad_logits[rows[start:end], cols[start:end]] = g.to(grad_logits.dtype)


class _TargetLogProb(torch.autograd.Function):
    """log_softmax(logits[position])[target] for a list of positions, in chunks of positions.

    d logp / d logits = onehot(target) - softmax(logits), recomputed chunk by chunk in the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        dtype = _compute_dtype(logits.dtype)
        n = targets.numel()
        token_logp = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            chunk = _rows(logits, rows, cols, start, end, dtype)  # [c, V], a copy of c rows only
            target_logit = chunk.gather(1, targets[start:end, None]).squeeze(1)
            # logsumexp in place on our copy: torch.logsumexp would allocate a second [c, V] buffer.
            shift = chunk.amax(dim=-1, keepdim=True)
            shift.masked_fill_(~torch.isfinite(shift), 0)  # an all -inf row gives -inf, not nan
            lse[start:end] = chunk.sub_(shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(1))
            token_logp[start:end] = target_logit - lse[start:end]
            del chunk  # else the next chunk is allocated while this one is still alive
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows, ctx.cols, ctx.chunk_size = rows, cols, chunk_size
        return token_logp

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_token_logp: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, targets, lse = ctx.saved_tensors
        rows, cols = ctx.rows, ctx.cols
        dtype = lse.dtype
        grad_logits = _grad_buffer(logits, rows)
        n = targets.numel()
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            grad = _rows(logits, rows, cols, start, end, dtype)
            grad.sub_(lse[start:end, None]).exp_().neg_()  # -softmax
            grad.scatter_add_(1, targets[start:end, None], torch.ones(end - start, 1, dtype=dtype, device=grad.device))
            grad.mul_(grad_token_logp[start:end, None].to(dtype))
            _write(grad_logits, rows, cols, start, end, grad)
            del grad
        return grad_logits, None, None, None, None


def _scored(labels: torch.Tensor, loss_mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(scored [B, T-1] bool, rows, label positions, targets): mask[b, t] scores labels[b, t] under position t - 1."""
    scored = loss_mask[:, 1:].to(device) != 0
    rows, label_pos = scored.nonzero(as_tuple=True)
    label_pos = label_pos + 1
    return scored, rows, label_pos, labels.to(device)[rows, label_pos].long()


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
    scored, rows, label_pos, targets = _scored(labels, loss_mask, logits.device)
    token_logp = _TargetLogProb.apply(logits, rows, label_pos - 1, targets, chunk_size)
    return _row_sums(token_logp, rows, logits.shape[0]), scored.sum(dim=1)


def _row_sums(token_logp: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    # Sum in float64: a 2k-token response's log-prob is ~-2000 nats, where fp32 accumulation drifts by 1e-3,
    # more than the 1e-4 the reference cache promises (measured); per-token values stay in the logits' precision.
    out = torch.zeros(batch, dtype=torch.float64, device=token_logp.device)
    return out.index_add(0, rows.to(token_logp.device), token_logp.double())


def output_head(model: Any) -> torch.nn.Module | None:
    """The module that turns final hidden states into logits (`lm_head`), or None for a plain callable.

    A transformers model, peft's PeftModel (it forwards the call to the model it wraps) and DeepSpeed's engine
    (likewise) all answer `get_output_embeddings()`; a tied head is still its own module."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def scored_logits(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the model and return its logits at positions (rows, cols) only: `(logits [N, V], None, None)`.

    The output head is called once, inside the forward, on `hidden[rows, cols]` (a forward pre-hook swaps its
    input), so no other position is projected onto the vocabulary. A model without an output head (a plain
    callable returning logits) gives `(its [B, T, V] logits, rows, cols)` to be indexed by the caller.
    """
    head = output_head(model)
    if head is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return logits, rows.to(logits.device), cols.to(logits.device)
    calls: list[tuple[int, ...]] = []

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        calls.append(tuple(hidden.shape))
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
            raise RuntimeError(
                f"output head input {tuple(hidden.shape)} is not [B, T, H] for {tuple(input_ids.shape)}"
            )
        # the hidden states may sit on another device than the ids (a model spread over GPUs)
        return (hidden[rows.to(hidden.device), cols.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    finally:
        handle.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if len(calls) != 1 or logits.dim() != 2 or logits.shape[0] != rows.numel():
        # Fail loudly: a model that reshapes its logits or calls its head twice would be scored wrongly.
        raise RuntimeError(
            f"expected the output head to run once on the final hidden states and the model to return its [N, V] "
            f"output; head inputs {calls}, logits {tuple(logits.shape)}, {rows.numel()} scored positions"
        )
    return logits, None, None


def _logits(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    packed: Packed | None,
    model_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`scored_logits` at logical positions (rows, cols): on the padded batch, or on its packed layout."""
    if packed is None:
        return scored_logits(model, input_ids, attention_mask, rows, cols, **model_kwargs)
    if "position_ids" in model_kwargs:
        raise ValueError("a packed forward sets its own position_ids")
    bins, at = packed.select(rows, cols)
    # A cache would switch off transformers' packed-sequence masks (they are for training forwards).
    model_kwargs = {"use_cache": False, **model_kwargs, **forward_kwargs(model, packed)}
    attention = model_kwargs.pop("attention_mask")
    return scored_logits(model, packed.input_ids, attention, bins, at, **model_kwargs)


def model_sequence_logprobs(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    packed: Packed | None = None,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a causal LM on a right-padded batch and return `sequence_logprobs` of its response tokens.

    `model(input_ids=..., attention_mask=..., **model_kwargs)` is a transformers causal LM (or a peft / DeepSpeed
    wrapper of one): logits are computed at the scored positions only (`scored_logits`). A plain callable
    returning the logits [B, T, V] (a tensor or an object with `.logits`) works too. Pass `use_cache=False` etc.
    through `model_kwargs`. Pair rows: call once for `chosen` and once for `rejected`.

    Columns where every row is padding are cut before the forward; `model_kwargs` go through uncut, so do
    not pass per-token tensors (position_ids) there.

    `packed` (`uft_ray.packing.pack` of this batch): the forward runs on its padding-free layout instead, and the
    [B, T] tensors only say which tokens to score; the result is the padded forward's, up to rounding.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must have the same shape"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    attended = attention_mask != 0
    if bool((loss_mask.to(attended.device) != 0).logical_and(~attended).any()):
        raise ValueError("loss_mask selects padding tokens (attention_mask == 0)")
    if packed is None:
        # Trailing all-padding columns (a batch padded to a fixed length) change no real token's logits under
        # right padding: cut them before the forward.
        used = attended.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if used.numel() else 1
        input_ids, attention_mask, loss_mask = input_ids[:, :length], attention_mask[:, :length], loss_mask[:, :length]

    scored, rows, label_pos, targets = _scored(input_ids, loss_mask, input_ids.device)
    logits, r, c = _logits(model, input_ids, attention_mask, rows, label_pos - 1, packed, model_kwargs)
    token_logp = _TargetLogProb.apply(logits, r, c, targets.to(logits.device), chunk_size)
    return _row_sums(token_logp, rows, input_ids.shape[0]), scored.sum(dim=1).to(token_logp.device)


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
        ctx: Any,
        logits: torch.Tensor,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(logits.dtype)
        n = targets.numel()
        token_logp = torch.empty(n, dtype=dtype, device=logits.device)
        entropy = torch.empty(n, dtype=dtype, device=logits.device)
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = _rows(logits, rows, cols, start, end, dtype)  # [c, V], a copy of c rows only
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
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.rows, ctx.cols, ctx.chunk_size = rows, cols, chunk_size
        return token_logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logp: torch.Tensor, grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, targets, lse, entropy = ctx.saved_tensors
        rows, cols = ctx.rows, ctx.cols
        dtype = lse.dtype
        grad_logits = _grad_buffer(logits, rows)
        for start in range(0, targets.numel(), ctx.chunk_size):
            end = min(start + ctx.chunk_size, targets.numel())
            logp_v = _rows(logits, rows, cols, start, end, dtype).sub_(lse[start:end, None])  # log p_v
            p = logp_v.exp()
            # -p (log p + H) * g_H  - p * g_logp, then + g_logp at the target
            g_h, g_l = grad_entropy[start:end, None].to(dtype), grad_logp[start:end, None].to(dtype)
            grad = logp_v.add_(entropy[start:end, None]).nan_to_num_(neginf=0.0).mul_(p).mul_(-g_h)
            grad.sub_(p.mul_(g_l))
            grad.scatter_add_(1, targets[start:end, None], g_l)
            _write(grad_logits, rows, cols, start, end, grad)
            del logp_v, p, grad
        return grad_logits, None, None, None, None


def _per_token(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    index: tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    shape: torch.Size,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked per-position values scattered into [B, T] tensors at `index` (0 elsewhere)."""
    device = logits.device
    dtype = _compute_dtype(logits.dtype)
    index = (index[0].to(device), index[1].to(device))
    out_logp = torch.zeros(shape, dtype=dtype, device=device)
    if with_entropy:
        logp, ent = _TargetLogProbEntropy.apply(logits, rows, cols, targets, chunk_size)
        out_ent = torch.zeros(shape, dtype=dtype, device=device).index_put(index, ent)
    else:
        logp, out_ent = _TargetLogProb.apply(logits, rows, cols, targets, chunk_size), None
    return out_logp.index_put(index, logp), out_ent


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
    _, rows, label_pos, targets = _scored(labels, loss_mask, logits.device)
    return _per_token(logits, rows, label_pos - 1, (rows, label_pos), targets, labels.shape, chunk_size, with_entropy)


def model_token_logprobs(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    with_entropy: bool = True,
    temperature: float = 1.0,
    packed: Packed | None = None,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a causal LM on a right-padded batch and return `token_logprobs` of the masked tokens ([B, T]), with
    logits at the scored positions only (`scored_logits`), divided by `temperature` first. `packed`: as in
    `model_sequence_logprobs`."""
    if input_ids.shape != attention_mask.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} must have the same shape"
        )
    _, rows, label_pos, targets = _scored(input_ids, loss_mask, input_ids.device)
    logits, r, c = _logits(model, input_ids, attention_mask, rows, label_pos - 1, packed, model_kwargs)
    if temperature != 1.0:
        # In place, as veRL: a scaled copy would be a second logits tensor; the head's backward does not read
        # its own output.
        logits = logits.div_(temperature)
    return _per_token(
        logits, r, c, (rows, label_pos), targets.to(logits.device), input_ids.shape, chunk_size, with_entropy
    )
