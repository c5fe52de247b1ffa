"""The trainer's side of the rollout pool (uft_ray.rft.rollout): collectives every training rank calls, so that
the ranks agree on which adapter the actors hold and on every failure, for any online method that samples from
the pool.

- `sync_adapter_collective`: the LoRA tensors to every actor (rank 0 sends, all check the digests);
- `rollouts_collective`: n seeded samples of each prompt, all from the expected adapter version (an actor that
  Ray restarted gets the adapter again and is asked again);
- `evaluate_collective`: greedy samples of held-out prompts scored by a verifier, as metrics over all ranks.

A rank that raised alone would leave the others waiting in their next collective until the timeout, so every
failure goes through `worker.agree_failure`: every rank raises, or none.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.distributed as dist
from ray.exceptions import RayActorError

from uft_ray.rft.actor_calls import ActorCallTimeout
from uft_ray.rft.rollout import RolloutPool, adapter_bytes, adapter_digest, request_seed
from uft_ray.tasks.verifier import CORRECT, VerifierProcess
from uft_ray.train import worker
from uft_ray.train.collectives import records_collective
from uft_ray.train.engine import Engine


def sync_adapter_collective(w: worker.Worker, engine: Engine, pool: RolloutPool, *, version: int) -> tuple[float, int]:
    """Gather the LoRA tensors (a collective), rank 0 sends them to every actor and checks their digests; the
    ranks then agree on the outcome, so no rank generates with an older adapter and none waits alone while
    another raises. Returns (seconds, bytes)."""
    t0 = time.perf_counter()
    state = engine.adapter_state_dict()
    pool.remember(state, version)  # every rank: an actor that restarts gets it back from the rank that finds it
    failure = None
    if w.rank == 0:
        digest = adapter_digest(state)
        try:
            digests = pool.load_adapter(state, version)
        except Exception as e:  # an actor died while loading: every rank stops, not rank 0 alone
            digests, failure = [], f"sending adapter version {version} to the rollout actors failed: {e}"
        if failure is None and any(d != digest for d in digests):
            failure = f"rollout actors hold adapter digests {digests}, the trainer {digest}"
        if failure is None:
            w.hooks.on_adapter_sync(rank=w.rank, step=version, trainer_digest=digest, actor_digests=digests)
    worker.agree_failure(w, failure)
    return time.perf_counter() - t0, adapter_bytes(state)


def rollouts_collective(
    w: worker.Worker,
    engine: Engine,
    pool: RolloutPool,
    prompts: list[dict[str, Any]],
    step: int,
    *,
    n: int,
    seed: int,
    expected_version: int,
) -> list[dict[str, Any]]:
    """n rollouts per prompt (its `prompt_ids`, then its `hint_ids` if any), group by group, each sampled with its
    own seed (seed, step, row_id, k): each prompt's fields plus `k`, `group` and `response_ids`.

    Every rollout must come from the adapter of `expected_version` (an actor behind the trainer would make the
    ratios off-policy). An actor that Ray restarted (it lost its adapter: version -1) gets the current adapter
    again and the rollouts are asked again; the ranks agree on that first, since the resend is a collective.
    """
    requests = [
        {"prompt_ids": p["prompt_ids"] + p.get("hint_ids", []), "seed": request_seed(seed, step + 1, p["row_id"], k)}
        for p in prompts
        for k in range(n)
    ]
    out, failure = _generate(pool, requests)
    if failure is None and _agree_stale(w, out["versions"], expected_version):
        sync_adapter_collective(w, engine, pool, version=expected_version)
        out, failure = _generate(pool, requests)
    stale = failure is None and out["versions"] != {expected_version} and out["versions"] != set()
    if stale:
        failure = f"rollouts used adapter versions {sorted(out['versions'])}, expected {expected_version}"
    worker.agree_failure(w, failure)
    rollouts = []
    for i, response in enumerate(out["responses"]):
        p = prompts[i // n]
        rollouts.append({**p, "k": i % n, "group": i // n, "response_ids": [int(t) for t in response]})
    return rollouts


def _generate(pool: RolloutPool, requests: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """The pool's answer, or the failure every rank must agree on (a rank that raised alone would leave the
    others waiting in the next collective): an actor past its time limit, or one that cannot come back."""
    try:
        return pool.generate(requests), None
    except (ActorCallTimeout, RayActorError) as e:
        return {"responses": [], "seconds": 0.0, "versions": set()}, str(e)


def _agree_stale(w: worker.Worker, versions: set[int], expected: int) -> bool:
    """Whether any rank got rollouts from an actor that lost its adapter (a collective)."""
    stale = bool(versions) and versions != {expected}
    flag = torch.tensor([int(stale)], dtype=torch.int64, device=w.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(int(flag))


def evaluate_collective(
    w: worker.Worker,
    pool: RolloutPool,
    rows: list[dict[str, Any]],
    verifier: VerifierProcess,
    tokenizer: Any,
    *,
    expected_version: int,
    budget_s: float | None = None,
) -> dict[str, float]:
    """Greedy rollouts without hints on this rank's held-out prompts, scored by `verifier`: `eval/accuracy`, the
    share answered correctly over all ranks (nan without held-out prompts). Every rank's verdicts are gathered
    as the offline loop's held-out records are (uft_ray.train.collectives.records_collective)."""
    correct: list[bool] = []
    failure = None
    if rows:
        out, failure = _generate(
            pool, [{"prompt_ids": list(r["prompt_ids"]), "seed": 0, "greedy": True} for r in rows]
        )
        if failure is None and out["versions"] != {expected_version}:
            failure = f"evaluation used adapter versions {sorted(out['versions'])}, expected {expected_version}"
    worker.agree_failure(w, failure)  # every rank raises, or none
    if rows:
        texts = [tokenizer.decode(resp, skip_special_tokens=True) for resp in out["responses"]]
        rewards = verifier.score([json.loads(r["row_json"]) for r in rows], texts, budget_s=budget_s)
        correct = [x == CORRECT for x in rewards]
    every = [c for rank in records_collective(correct, w.world) for c in rank]
    return {"eval/accuracy": sum(every) / len(every) if every else float("nan")}
