"""A rollout actor that Ray restarts (it comes back with no adapter) costs a repeated call, not the run: the pool
puts the trainer's adapter back and asks again, mid-call or on the next call (evaluation included), and gets
the same tokens (generation is seeded per request). A hung actor fails the call within
`rft.rollout.call_timeout_s`, naming it. Real Ray actors on the tiny model (transformers backend)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import ray
import torch

from uft_ray.config import load_config
from uft_ray.rft.actor_calls import ActorCallTimeout
from uft_ray.rft.driver import start_rollout_actors, stop_rollout_actors
from uft_ray.rft.rollout import RolloutPool, adapter_digest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]

REQUESTS = 48  # with batch_size 4: 12 generate batches, long enough to be killed in the middle


@pytest.fixture(scope="module")
def actor_pool(tiny_assets, tmp_path_factory) -> Any:
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uft_ray.rft.rollout import _lora_config

    cfg = load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        [f"model.path={tiny_assets['model']}", f"output.storage_path={tmp_path_factory.mktemp('runs')}",
         "rft.max_response_len=16", "rft.rollout.batch_size=4", "rft.rollout.actors=1",
         "rft.rollout.cpus_per_actor=1", "rft.temperature=1.0"],
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), _lora_config(lora))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B nonzero, so its loss would change the tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    actors: list[Any] = []
    try:
        start_rollout_actors(cfg, tokenizer, into=actors)
        yield actors, state
    finally:
        stop_rollout_actors(actors, close_timeout_s=5.0)


def _requests() -> list[dict[str, Any]]:
    return [{"prompt_ids": [5 + i % 7, 9, 11 + i % 3], "seed": 1000 + i} for i in range(REQUESTS)]


def _pid(actor: Any) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)


def _restart(actor: Any) -> None:
    ray.kill(actor, no_restart=False)  # the process dies; Ray reruns the constructor (max_restarts=-1)


def test_an_actor_killed_during_generate_is_asked_again_after_its_adapter_is_resent(actor_pool):
    actors, state = actor_pool
    pool = RolloutPool(actors, timeout_s=240)
    pool.load_adapter(state, 3)
    expected = pool.generate(_requests())
    assert expected["versions"] == {3}
    pid = _pid(actors[0])

    # The generate call waits behind a 2-second call on the actor (one call at a time) and is in flight when
    # the process is killed at 1 s: its reply never comes (RayActorError), whatever the machine's speed.
    ahead = actors[0].__ray_call__.remote(lambda self: time.sleep(2))
    killer = threading.Timer(1.0, _restart, args=(actors[0],))
    killer.start()
    out = pool.generate(_requests())
    killer.join()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(ahead, timeout=60)
    assert _pid(actors[0]) != pid, "the actor was not restarted"
    assert out["versions"] == {3} and out["responses"] == expected["responses"]
    assert ray.get(actors[0].digest.remote()) == adapter_digest(state)


def test_evaluation_after_an_actor_restart_gets_the_adapter_back(actor_pool):
    actors, state = actor_pool
    pool = RolloutPool(actors, timeout_s=240)
    pool.load_adapter(state, 5)
    greedy = [{"prompt_ids": r["prompt_ids"], "seed": 0, "greedy": True} for r in _requests()[:8]]
    expected = pool.generate(greedy)
    pid = _pid(actors[0])
    _restart(actors[0])
    out = pool.generate(greedy)  # the restarted actor answers version -1 first: resent, asked again
    assert _pid(actors[0]) != pid
    assert out["versions"] == {5} and out["responses"] == expected["responses"]


def test_a_hung_actor_fails_the_call_within_its_limit_naming_the_actor(actor_pool):
    actors, state = actor_pool
    pool = RolloutPool(actors, timeout_s=3)
    pool.load_adapter(state, 7)
    hang = actors[0].__ray_call__.remote(lambda self: time.sleep(8))  # the actor runs one call at a time
    t0 = time.monotonic()
    with pytest.raises(ActorCallTimeout, match=r"no answer from rollout actor 0 \(id [0-9a-f]+\)"):
        pool.generate(_requests()[:4])
    assert time.monotonic() - t0 < 10
    ray.get(hang, timeout=60)
