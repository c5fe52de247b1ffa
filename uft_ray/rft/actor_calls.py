"""Calls to rollout actors that outlive an actor's restart, within a time limit that names the actor.

The rollout actors run with `max_restarts=-1`: Ray brings a dead actor back by rerunning its constructor, so it
returns with the base model and no adapter. A call that was in flight when it died fails with `RayActorError`;
generation is seeded per request, so asking again gives the same tokens, and the caller only has to put the
adapter back first (`recover`). Restarting the whole trainer group from its checkpoint for this, as a raised
error would, throws away the steps since that checkpoint for nothing.

A hung engine is the other failure: `ray.get` without a timeout would block its trainer rank until the process
group's own timeout (30 minutes) and then fail with an error that names no actor. Every call here has a deadline
(`rft.rollout.call_timeout_s`), and the error says which actor did not answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError


class ActorCallTimeout(TimeoutError):
    """A rollout actor did not answer within the call's time limit."""


def actor_label(actor: Any, index: int) -> str:
    """`rollout actor 2 (id 1f3a..)`: the pool's index and Ray's actor id, for errors and logs."""
    actor_id = getattr(actor, "_actor_id", None)
    hex_id = actor_id.hex()[:12] if actor_id is not None else "?"
    return f"rollout actor {index} (id {hex_id})"


def call_all(
    actors: Sequence[Any],
    submit: Callable[[Any], Any],
    *,
    what: str,
    timeout_s: float,
    labels: Sequence[str] | None = None,
    recover: Callable[[Any], Any] | None = None,
    max_restarts: int = 3,
    retry_wait_s: float = 0.5,
) -> list[Any]:
    """`submit(actor)` (an ObjectRef) for every actor at once; their results in actor order.

    An actor that dies during its call is waited for while Ray restarts it, `recover(actor)` (an ObjectRef, or
    None) is run on the new process first, and the call is submitted again, up to `max_restarts` times per
    actor. Past `timeout_s` from the start, ActorCallTimeout names every actor still out. An actor whose
    constructor failed on restart (it cannot come back) fails at once with Ray's error."""
    labels = list(labels) if labels is not None else [actor_label(a, i) for i, a in enumerate(actors)]
    deadline = time.monotonic() + timeout_s
    results: list[Any] = [None] * len(actors)
    restarts = [0] * len(actors)
    pending = {i: submit(a) for i, a in enumerate(actors)}
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=_left(deadline, what, labels, pending))
        for ref in ready:
            i = next(j for j, r in pending.items() if r == ref)
            try:
                results[i] = ray.get(ref)
                del pending[i]
            except RayActorError as e:
                if getattr(e, "actor_init_failed", False) or restarts[i] >= max_restarts:
                    raise
                restarts[i] += 1
                _come_back(actors[i], recover, deadline, what, labels[i], retry_wait_s)
                pending[i] = submit(actors[i])
    return results


def _left(deadline: float, what: str, labels: Sequence[str], pending: dict[int, Any]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        out = ", ".join(labels[i] for i in sorted(pending))
        raise ActorCallTimeout(f"{what}: no answer from {out} within the time limit (rft.rollout.call_timeout_s)")
    return left


def _come_back(
    actor: Any, recover: Callable[[Any], Any] | None, deadline: float, what: str, label: str, wait_s: float
) -> None:
    """Wait until the restarted actor answers `recover` (a call queued to a restarting actor can itself fail with
    RayActorError, so it is asked again until the deadline)."""
    while True:
        time.sleep(min(wait_s, max(0.0, deadline - time.monotonic())))
        ref = recover(actor) if recover is not None else actor.__ray_ready__.remote()
        if ref is None:
            return
        try:
            ray.get(ref, timeout=_left(deadline, what, [label], {0: ref}))
            return
        except GetTimeoutError:
            _left(deadline, what, [label], {0: ref})
        except RayActorError as e:
            if getattr(e, "actor_init_failed", False):
                raise
            wait_s = min(wait_s * 2, 5.0)
