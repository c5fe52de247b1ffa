"""hint_rft's optimizer steps on one rank: the GRPO update on scored rollouts (`grpo_update`) and, for
`rft.objective: sft`, plain SFT on whole reference answers (`sft_update`).

A step's sequences are cut into `rft.updates_per_step` mini-batches (`update_minibatches`: whole GRPO groups,
in order), one optimizer step each, and each mini-batch into micro-batches of `train.micro_batch_size`, padded
(grouped by length) or packed (a prompt's rollouts sharing its forward). Every loss is a global token mean: each
micro-batch's loss is its token sum over the update's token counts on every rank (one all-reduce), then scaled
for DeepSpeed's averaging (uft_ray.train.collectives.backward_scale).

GRPO, per update: first the no-grad passes of every micro-batch (the reference's, only with a KL term: the
initial policy, `reference_adapter`; the old log-probs, only with more than one update), then per micro-batch
the policy's per-token log-probs and entropies in one forward and its backward. All three from logits at the
scored positions only, divided by `rft.temperature` as the rollouts sampled them (`scaled_token_logprobs`);
the loss is uft_ray.losses.hint_rft_loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray.train.torch
import torch

from uft_ray import packing as packing_lib
from uft_ray.config import Config
from uft_ray.logprobs import model_token_logprobs
from uft_ray.losses import group_advantages, hint_rft_loss
from uft_ray.packing import Packed
from uft_ray.reference.adapter_off import reference_model
from uft_ray.train.batches import pad_batch
from uft_ray.train.collectives import backward_scale, sum_collective
from uft_ray.train.engine import Engine
from uft_ray.train.nonfinite import StepWatch, optimizer_step

TERMS = ("loss", "pg_loss", "kl", "entropy", "hint_nll", "clip_frac")  # the GRPO loss's logged terms


def reference_adapter(cfg: Config) -> str | None:
    """The adapter of hint_rft's KL reference: the reference is the initial policy, as the authors' (veRL's
    reference is the actor it starts from). `reference.adapter` when set, else `model.adapter` (SFT-then-RFT's
    stage 2: base + the SFT adapter), else none: a fresh LoRA starts as the base, and the reference is the base
    (the adapter off). A resumed run keeps it: the checkpoint's adapter is the policy's, never the reference's."""
    return cfg.reference.adapter or cfg.model.adapter


def check_adapter_dropout(engine: Engine, cfg: Config) -> None:
    """Config validation checks lora.dropout; a continued adapter (model.adapter, a resumed run) brings its own."""
    dropout = float(getattr(engine.peft_model.peft_config["default"], "lora_dropout", 0.0) or 0.0)
    if cfg.rft.objective == "grpo" and cfg.rft.updates_per_step > 1 and dropout > 0:
        raise ValueError(
            f"the adapter's lora_dropout is {dropout} with rft.updates_per_step {cfg.rft.updates_per_step}: the "
            "old and the new log-probs would disagree; use an adapter with lora.dropout 0 or rft.updates_per_step 1"
        )


def update_minibatches(rollouts: list[dict[str, Any]], updates: int, group: int) -> list[list[dict[str, Any]]]:
    """A rank's rollouts of the step, in order (group by group), cut into `updates` equal mini-batches of whole
    groups of `group` rollouts, one per optimizer step (veRL splits its batch in order into ppo_mini_batch_size
    prompts' rollouts). Raises when the sizes would cut a group (config validation refuses such a config)."""
    size, left = divmod(len(rollouts), updates)
    if left or size % group:
        raise ValueError(
            f"{len(rollouts)} rollouts do not split into {updates} mini-batches of whole groups of {group} "
            "(rft.updates_per_step, train.grad_accum x train.micro_batch_size, rft.n)"
        )
    out = [rollouts[u * size : (u + 1) * size] for u in range(updates)]
    for chunk in out if group > 1 else ():  # groups of one (sft's sequences): any cut is whole
        counts: dict[Any, int] = {}
        for x in chunk:
            counts[x["group"]] = counts.get(x["group"], 0) + 1
        if any(c != group for c in counts.values()):
            raise ValueError(f"a mini-batch holds part of a GRPO group (group sizes {sorted(counts.values())})")
    return out


# ---------------------------------------------------------------------------------------------------------
# Tensors and forwards.


def pad_rollouts(
    rollouts: list[dict[str, Any]], pad_id: int, device: torch.device, packing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """prompt + hint + response, right-padded (uft_ray.train.batches.pad_batch); masks of the response tokens
    and of the hint tokens. `packing` (uft_ray.packing.args): their padding-free layout too, under "packed", the
    rollouts of one prompt sharing it (and its hint, when they share one)."""
    seqs, hints, responses = [], [], []
    for r in rollouts:
        p, h = len(r["prompt_ids"]), len(r["hint_ids"])
        seqs.append(r["prompt_ids"] + r["hint_ids"] + r["response_ids"])
        hints.append((p, p + h))
        responses.append((p + h, len(seqs[-1])))
    out: dict[str, Any] = pad_batch(seqs, pad_id, device, {"response": responses, "hint": hints})
    if packing is not None:
        groups = packing_lib.key_groups([r["group"] for r in rollouts])
        out["packed"] = packing_lib.pack(
            out["input_ids"], out["attention_mask"], groups=groups, pad_id=pad_id, **packing
        )
    return out


def pad_targets(
    targets: list[dict[str, Any]], pad_id: int, device: torch.device, packing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """prompt + target (a whole reference answer), right-padded; the mask of the target tokens. Packed: each
    sequence on its own (no two share a prompt)."""
    seqs = [t["prompt_ids"] + t["target_ids"] for t in targets]
    spans = [(len(t["prompt_ids"]), len(s)) for t, s in zip(targets, seqs, strict=True)]
    out: dict[str, Any] = pad_batch(seqs, pad_id, device, {"target": spans})
    if packing is not None:
        groups = [[i] for i in range(len(seqs))]
        out["packed"] = packing_lib.pack(
            out["input_ids"], out["attention_mask"], groups=groups, pad_id=pad_id, **packing
        )
    return out


def scaled_token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    packed: Packed | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`uft_ray.logprobs.model_token_logprobs`: logits at the scored positions only, divided by the sampling
    temperature (veRL's dp_actor does the same for the policy, the old and the reference log-probs): the ratios
    and the KL are then those of the distribution the rollouts were drawn from, not of the temperature-1 one."""
    return model_token_logprobs(
        model, input_ids, attention_mask, loss_mask, with_entropy=with_entropy, temperature=temperature, packed=packed
    )


def policy_logprobs(
    engine: Engine,
    t: dict[str, Any],
    temperature: float,
    *,
    grad: bool,
    scored: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's per-token log-probs over `scored` (default: hint and response tokens), and their entropies
    when training."""
    if scored is None:
        scored = t["response"] | t["hint"]
    with torch.set_grad_enabled(grad):
        return scaled_token_logprobs(
            engine.module,
            t["input_ids"],
            t["attention_mask"],
            scored,
            temperature=temperature,
            with_entropy=grad,
            packed=t.get("packed"),
        )


def reference_logprobs(engine: Engine, t: dict[str, Any], temperature: float) -> torch.Tensor:
    """The reference's per-token log-probs over the response, no grad: the policy's base with the frozen reference
    adapter, or with the adapter off (through the model inside peft's wrapper, which keeps ZeRO-3's trace:
    uft_ray.reference.adapter_off)."""
    with reference_model(engine.peft_model) as base:
        logp, _ = scaled_token_logprobs(
            base,
            t["input_ids"],
            t["attention_mask"],
            t["response"],
            temperature=temperature,
            with_entropy=False,
            packed=t.get("packed"),
        )
    return logp


# ---------------------------------------------------------------------------------------------------------
# The updates.


def _updates(
    cfg: Config,
    rows: list[dict[str, Any]],
    group: int,
    pad: Callable[..., dict[str, Any]],
    length: Callable[[dict[str, Any]], int],
    pad_id: int,
) -> list[list[dict[str, Any]]]:
    """The step's mini-batches (`update_minibatches`), each as its padded or packed micro-batches, every one
    carrying its rows under "rows". The mini-batch's loss terms are fixed before it trains, so the order inside
    it is free: padded, grouped by length; packed, a prompt's rollouts kept together to share its forward."""
    mb, packing = cfg.train.micro_batch_size, packing_lib.args(cfg)
    device = ray.train.torch.get_device()
    out = []
    for chunk in update_minibatches(rows, cfg.rft.updates_per_step, group):
        if packing is None:
            chunk = sorted(chunk, key=length)
        out.append([pad(chunk[i : i + mb], pad_id, device, packing) | {"rows": chunk[i : i + mb]}
                    for i in range(0, len(chunk), mb)])  # fmt: skip
    return out


def _backward_and_step(engine: Engine, loss: torch.Tensor, world: int, ga: int, watch: StepWatch | None) -> None:
    # hint_rft's losses are already each micro-batch's share of the update's global token mean
    engine.backward(loss * backward_scale(world, ga))
    if watch is not None:
        optimizer_step(engine, watch)
    else:
        engine.step()


def grpo_update(
    engine: Engine,
    cfg: Config,
    rollouts: list[dict[str, Any]],
    pad_id: int,
    world: int,
    watch: StepWatch | None = None,
) -> dict[str, Any]:
    """`rft.updates_per_step` optimizer steps over this rank's scored rollouts (arriving group by group); the
    loss terms' global means, `train_tokens`, the `lr` of the first update and `with_kl`. `watch` records each
    micro-batch's loss terms that are not numbers (uft_ray.train.nonfinite)."""
    r, ga = cfg.rft, cfg.train.grad_accum
    rewards = torch.tensor([x["reward"] for x in rollouts], dtype=torch.float64)
    for x, a in zip(rollouts, group_advantages(rewards, r.n).tolist(), strict=True):
        x["advantage"] = a
    use_hint_term = r.hint.mode != "r3" and r.hint_coef > 0  # R3 reveals hints but does not train on them
    updates = _updates(
        cfg, rollouts, r.n, pad_rollouts,
        lambda x: len(x["prompt_ids"]) + len(x["hint_ids"]) + len(x["response_ids"]), pad_id,
    )  # fmt: skip
    # Every no-grad forward before the first grad forward (uft_ray.reference.adapter_off: ZeRO-3's prefetch
    # order, and no reference activations next to the policy's): the reference's, and the old log-probs,
    # recomputed just before the updates (with one update they equal the training forward's). The reference
    # feeds only the KL term: with rft.kl_coef 0 it is not computed at all (as veRL builds no reference policy
    # without a KL loss), and no "kl" is logged.
    with_kl = r.kl_coef > 0
    refs = [[reference_logprobs(engine, t, r.temperature) if with_kl else None for t in micros] for micros in updates]
    old: list[list[torch.Tensor | None]] = [[None] * len(micros) for micros in updates]
    if r.updates_per_step > 1:
        for u, micros in enumerate(updates):
            for j, t in enumerate(micros):
                old[u][j] = policy_logprobs(engine, t, r.temperature, grad=False)[0]

    sums = dict.fromkeys(TERMS, 0.0)
    tokens = 0
    lr = engine.lr  # the rate the first update uses (the scheduler moves on at each optimizer step)
    for u, micros in enumerate(updates):
        # The update's global token counts: each micro-batch's loss is its token sum over them (rank-invariant).
        n_resp, n_hint = sum_collective(
            [sum(int(t["response"].sum()) for t in micros), sum(int(t["hint"].sum()) for t in micros)]
        )
        use_hint = use_hint_term and n_hint > 0
        for j, t in enumerate(micros):
            logp, entropy = policy_logprobs(engine, t, r.temperature, grad=True)
            adv = torch.tensor([x["advantage"] for x in t["rows"]], dtype=logp.dtype, device=logp.device)
            loss, m = hint_rft_loss(
                logp, old[u][j] if old[u][j] is not None else logp.detach(), refs[u][j], adv, t["response"], entropy,
                hint_logp=logp if use_hint else None, hint_mask=t["hint"] if use_hint else None,
                clip=r.clip, kl_coef=r.kl_coef, entropy_coef=r.entropy_coef, hint_coef=r.hint_coef,
                n_tokens=n_resp, n_hint_tokens=n_hint,
            )  # fmt: skip
            if watch is not None:
                watch.loss(u * len(micros) + j, loss, m, [x.get("row_id", x.get("task", "")) for x in t["rows"]])
            _backward_and_step(engine, loss, world, ga, watch)
            local = float(t["response"].sum())
            for k in sums:
                # clip_frac is the micro-batch's own fraction: weigh it by its share of the update's tokens
                sums[k] += float(m[k]) * (local / max(n_resp, 1.0) if k == "clip_frac" else 1.0)
            tokens += int(t["attention_mask"].sum())
    return {**{k: v / r.updates_per_step for k, v in sums.items()}, "train_tokens": float(tokens), "lr": lr,
            "with_kl": with_kl}  # fmt: skip


def target_nll(logp: torch.Tensor, mask: torch.Tensor, n_tokens: float) -> torch.Tensor:
    """The target tokens' summed NLL over `n_tokens` (the update's target tokens on every rank): this micro-batch's
    share of the global token mean."""
    count = torch.as_tensor(n_tokens, dtype=logp.dtype, device=logp.device)
    return (-logp * mask).sum() / count.clamp(min=1)


def sft_update(
    engine: Engine,
    cfg: Config,
    targets: list[dict[str, Any]],
    pad_id: int,
    world: int,
    watch: StepWatch | None = None,
) -> dict[str, Any]:
    """`rft.objective: sft`: `rft.updates_per_step` optimizer steps of plain SFT over this rank's prompts, each
    with its whole reference answer as the target (uft_ray.rft.prompts.sft_targets): the target tokens' NLL as
    a global token mean, no rollouts, rewards, reference or entropy. Returns `loss` (= `hint_nll`, the answer's
    NLL, averaged over the updates), `train_tokens` and the `lr` of the first update."""
    r, ga = cfg.rft, cfg.train.grad_accum
    updates = _updates(cfg, targets, 1, pad_targets, lambda x: len(x["prompt_ids"]) + len(x["target_ids"]), pad_id)
    total, tokens = 0.0, 0
    lr = engine.lr
    for u, micros in enumerate(updates):
        (n_target,) = sum_collective([sum(int(t["target"].sum()) for t in micros)])
        for j, t in enumerate(micros):
            # The entropy kernel's backward, although the entropy is unused: sft's gradients stay those of the
            # runs before it trained on targets directly, to the bit (without: within 1.5e-8, one float32 step).
            logp, _ = policy_logprobs(engine, t, r.temperature, grad=True, scored=t["target"])
            loss = target_nll(logp, t["target"], n_target)
            if watch is not None:
                terms = {"loss": loss.detach(), "hint_nll": loss.detach()}
                watch.loss(u * len(micros) + j, loss, terms, [x["row_id"] for x in t["rows"]])
            _backward_and_step(engine, loss, world, ga, watch)
            total += float(loss.detach())
            tokens += int(t["attention_mask"].sum())
    nll = total / r.updates_per_step
    return {"loss": nll, "hint_nll": nll, "train_tokens": float(tokens), "lr": lr}
