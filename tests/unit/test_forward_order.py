"""ZeRO-3 prefetch: every no-grad reference / old-log-prob forward of a micro-batch runs before
the policy's grad forward, and the adapter-off reference does not run peft's top-level forward.

Why the second half: DeepSpeed's ZeRO-3 restarts its recorded module order at each forward of the module it wraps
(the peft model; `_start_of_forward_hook` -> `reset_step` in deepspeed/runtime/zero/parameter_offload.py). A
reference forward through it makes consecutive traces differ (one without LoRA's modules, one with them), so
the trace is invalidated every micro-batch and nothing is prefetched; below it, every micro-batch records the
same order. (Measured on one CPU process under ZeRO-3: 8 invalidations in 8 micro-batches with the reference
first but through the wrapper, 0 with it below.)

Each forward of the tiny LoRA model is recorded as (adapter on, grad enabled, through peft's wrapper), from a
pre-hook on the embedding (every forward starts there) while the loops' own functions run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.tiny_lora import PAD, Engine, loss_cfg, quiet_collectives, rows, tiny_lora

from uft_ray.train import collectives
from uft_ray.train import loop as train_loop

REF = (False, False, False)  # adapter off, no grad, below peft's wrapper
POLICY = (True, True, True)  # the grad forward through the wrapper (DeepSpeed's engine calls it)
NO_GRAD_POLICY = (True, False, True)  # old log-probs, KTO's z, evaluation


def recorded(model) -> list:
    """Events appended as forwards start: (adapter on, grad enabled, through peft's top-level forward)."""
    events: list = []
    inside = []
    model.register_forward_pre_hook(lambda m, a: inside.append(True))
    model.register_forward_hook(lambda m, a, out: inside.clear())  # returns None: the output stays
    lora = next(m for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
    embed = model.get_base_model().get_input_embeddings()
    embed.register_forward_pre_hook(
        lambda m, a: events.append((not lora.disable_adapters, torch.is_grad_enabled(), bool(inside)))
    )
    return events


def test_uft_micro_batch_scores_the_reference_first():
    model = tiny_lora()
    events = recorded(model)
    engine = Engine(model, events)
    for seed in (1, 2):  # two micro-batches: the same order each time
        batch = rows(seed=seed)
        t = train_loop.collate(batch, PAD, torch.device("cpu"), pairs=False)
        loss, _ = train_loop.micro_batch_loss(engine, loss_cfg("uft"), batch, t)
        engine.backward(loss)
    assert events == [REF, POLICY, "backward"] * 2


def test_cached_references_need_no_forward():
    model = tiny_lora()
    events = recorded(model)
    batch = rows() | {"ref_logp": np.array([-1.0, -2.0, -3.0])}
    t = train_loop.collate(batch, PAD, torch.device("cpu"), pairs=False)
    train_loop.micro_batch_loss(Engine(model, events), loss_cfg("uft", mode="actor"), batch, t)
    assert events == [POLICY]


def test_kto_with_accumulation_scores_each_reference_once_before_any_grad_forward(monkeypatch):
    quiet_collectives(monkeypatch, collectives)
    model = tiny_lora()
    events = recorded(model)
    engine = Engine(model, events)
    cfg = loss_cfg("kto")
    step = [(b, train_loop.collate(b, PAD, torch.device("cpu"), pairs=False)) for b in (rows(), rows(seed=2))]
    z, refs = train_loop.kto_reference_point(engine, cfg, step)
    for (batch, t), ref in zip(step, refs, strict=True):
        loss, _ = train_loop.micro_batch_loss(engine, cfg, batch, t, kto_z=z, ref=ref)
        engine.backward(loss)
    assert events == [REF, NO_GRAD_POLICY] * 2 + [POLICY, "backward"] * 2


def test_heldout_evaluation_scores_the_reference_first(monkeypatch):
    from types import SimpleNamespace

    quiet_collectives(monkeypatch, collectives)
    monkeypatch.setattr(collectives.dist, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    model = tiny_lora()
    events = recorded(model)
    cfg = loss_cfg("sft")
    cfg.train = SimpleNamespace(micro_batch_size=3, packing=False)
    shard = SimpleNamespace(iter_batches=lambda batch_size, batch_format: iter([rows(), rows(pairs=True)]))
    train_loop.evaluate_collective(Engine(model, events), cfg, shard, PAD, world=1)
    assert events == [REF, NO_GRAD_POLICY] * 2


def test_hint_rft_runs_every_no_grad_forward_before_the_first_grad_forward(monkeypatch):
    """Two updates of two micro-batches: 4 reference and 4 old-log-prob forwards first, then 4 x (forward,
    backward); the reference's forwards below peft's wrapper."""
    from uft_ray.config import load_config
    from uft_ray.rft import update

    quiet_collectives(monkeypatch, collectives)
    cfg = load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        ["model.path=/tmp", "train.grad_accum=1", "rft.updates_per_step=2", "rft.temperature=0.7"],
        check_paths=False,
    )
    model = tiny_lora()
    events = recorded(model)
    g = np.random.default_rng(0)
    rollouts = [
        {"group": i // 4, "prompt_ids": g.integers(1, 100, 5).tolist(), "hint_ids": g.integers(1, 100, i % 3).tolist(),
         "response_ids": g.integers(1, 100, 3 + i % 4).tolist(), "reward": float(i % 2)}
        for i in range(16)
    ]  # fmt: skip
    update.grpo_update(Engine(model, events), cfg, rollouts, PAD, world=1)
    assert events == [REF] * 4 + [NO_GRAD_POLICY] * 4 + [POLICY, "backward"] * 4


def test_hint_rft_without_a_kl_term_runs_no_reference_forward(monkeypatch):
    """rft.kl_coef 0: the reference feeds nothing, so none of its forwards run, the loss is the same as with the
    reference computed (kl weighs 0), and the step reports no kl."""
    from uft_ray.config import load_config
    from uft_ray.rft import update

    quiet_collectives(monkeypatch, collectives)
    g = np.random.default_rng(1)
    rollouts = [
        {"group": i // 4, "prompt_ids": g.integers(1, 100, 5).tolist(), "hint_ids": g.integers(1, 100, i % 3).tolist(),
         "response_ids": g.integers(1, 100, 3 + i % 4).tolist(), "reward": float(i % 3 == 0)}
        for i in range(8)
    ]  # fmt: skip
    out = {}
    for kl in (0.0, 1e-12):  # a KL term too small to change the loss, but computed
        cfg = load_config(
            "jobs/configs/demo_hint_rft_tiny.yaml",
            ["model.path=/tmp", "train.grad_accum=1", "train.micro_batch_size=8", f"rft.kl_coef={kl}"],
            check_paths=False,
        )
        model = tiny_lora()
        events = recorded(model)
        out[kl] = (update.grpo_update(Engine(model, events), cfg, [dict(r) for r in rollouts], PAD, world=1), events)
    (without, events_without), (with_, events_with) = out[0.0], out[1e-12]
    assert events_without == [POLICY, "backward"] and events_with == [REF, POLICY, "backward"]
    assert without["with_kl"] is False and with_["with_kl"] is True and without["kl"] == 0.0 and with_["kl"] > 0
    assert without["loss"] == pytest.approx(with_["loss"], rel=1e-6)
