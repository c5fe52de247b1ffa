"""One metrics.jsonl row per hint_rft step (names in docs/internals.md "Metrics"), from every rank's record of
the step gathered once (uft_ray.train.collectives.records_collective, as the offline loop's rows are).

A GRPO step logs its rollouts (rewards, lengths, the verifier's failures, the loss's GRPO terms); an sft step
(`rft.objective: sft`) samples nothing, so its row has none of `ROLLOUT_ONLY`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from uft_ray.tasks.verifier import CORRECT, FORMATTED
from uft_ray.train.collectives import records_collective
from uft_ray.train.engine import Engine

# The metrics of sampled, scored rollouts: only a GRPO step has them.
ROLLOUT_ONLY = ("pg_loss", "reward/mean", "reward/accuracy", "reward/format", "response/length", "kl", "entropy",
                "clip_frac", "time/generate_frac", "rollout/tokens_per_s", "verifier/timeouts",
                "verifier/failed")  # fmt: skip


def _local(
    prompts: list[dict[str, Any]],
    rollouts: list[dict[str, Any]] | None,
    train: dict[str, Any],
    times: dict[str, float],
    step_time: float,
    failed: Counter[str],
) -> dict[str, float]:
    """This rank's share of the step: sums (the loss terms are already global means, each rank holding its share
    of the sum) and its times (the slowest rank's are logged)."""
    local = {
        "prompts": len(prompts),
        "hint_share": sum(p["revealed"] / p["n_chunks"] if p["n_chunks"] else 0.0 for p in prompts),
        "train_tokens": train["train_tokens"],
        "loss": train["loss"],
        "hint_nll": train["hint_nll"],
        "generate_s": times["generate"],
        "train_s": times["train"],
        "wait_s": times["wait"],
        "step_s": step_time,
    }
    if rollouts is None:  # sft: the targets are the hint term's tokens
        return local | {"hint_tokens": sum(len(p["target_ids"]) for p in prompts)}
    rewards = [x["reward"] for x in rollouts]
    return local | {
        "hint_tokens": sum(len(x["hint_ids"]) for x in rollouts),
        "reward": sum(rewards),
        "correct": sum(1 for x in rewards if x == CORRECT),
        "formatted": sum(1 for x in rewards if x >= FORMATTED),
        "rollouts": len(rollouts),
        "response_tokens": sum(len(x["response_ids"]) for x in rollouts),
        # rollouts scored 0 without the verifier's verdict: past the time limit or the step's budget, or any reason
        "verifier_timeouts": failed["timeout"] + failed["step_budget"],
        "verifier_failed": sum(failed.values()),
        **{k: train[k] for k in ("pg_loss", "kl", "entropy", "clip_frac")},
    }


def metrics_row_collective(
    step: int,
    prompts: list[dict[str, Any]],
    rollouts: list[dict[str, Any]] | None,
    train: dict[str, Any],
    times: dict[str, float],
    step_time: float,
    sync_s: float,
    sync_bytes: int,
    eval_metrics: dict[str, float] | None,
    engine: Engine,
    failed: Counter[str],
    *,
    world: int,
) -> dict[str, Any]:
    """The step's row over all ranks (a collective). `rollouts` None: an sft step (`prompts` are its targets)."""
    records = records_collective(_local(prompts, rollouts, train, times, step_time, failed), world)
    g = {k: sum(r[k] for r in records) for k in records[0] if not k.endswith("_s")}
    gen_s, train_s, wait_s, step_s = (
        max(r[k] for r in records) for k in ("generate_s", "train_s", "wait_s", "step_s")
    )
    row: dict[str, Any] = {
        "step": step + 1,
        "time": time.time(),
        "loss": g["loss"],
        "hint/share": g["hint_share"] / g["prompts"],
        "tokens_per_s": g["train_tokens"] / train_s if train_s > 0 else 0.0,
        "sync/adapter_s": sync_s,
        "sync/adapter_bytes": sync_bytes,
        "data_wait_frac": min(wait_s / step_s, 1.0),
        "step_time_s": step_s,
        "lr": train["lr"],
        "grad_norm": engine.grad_norm,
    }
    if rollouts is not None:
        row |= {
            "pg_loss": g["pg_loss"],
            "reward/mean": g["reward"] / g["rollouts"],
            "reward/accuracy": g["correct"] / g["rollouts"],
            "reward/format": g["formatted"] / g["rollouts"],
            "response/length": g["response_tokens"] / g["rollouts"],
            "entropy": g["entropy"],
            "clip_frac": g["clip_frac"],
            "time/generate_frac": min(gen_s / step_s, 1.0),
            "rollout/tokens_per_s": g["response_tokens"] / gen_s if gen_s > 0 else 0.0,
            "verifier/timeouts": int(g["verifier_timeouts"]),
            "verifier/failed": int(g["verifier_failed"]),
        }
        if train["with_kl"]:
            row["kl"] = g["kl"]
    if g["hint_tokens"] > 0:  # no hint revealed anywhere: no hint term, and no number to log
        row["hint_nll"] = g["hint_nll"]
    return row | (eval_metrics or {})
