"""Logits only where they are used: every path scores the response positions alone, and gives
what the old full-logits computation gave.

The model: a random 2-layer Qwen2 (tied embeddings, as the tiny models have) with LoRA whose B matrices are
random, so policy and reference differ. The old computation is spelled out here: the model's full [B, T, V]
logits, `log_softmax` in fp32, the targets gathered, masked and summed. Per-row log-probs, losses and the LoRA
gradients must agree within 1e-5 relative (fp32), through the functions the loops call.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures.tiny_lora import (
    PAD,
    REL,
    Engine,
    V,
    assert_rel,
    assert_same_grads,
    lora_grads,
    loss_cfg,
    rows,
    tiny_lora,
)

from uft_ray import losses
from uft_ray.logprobs import model_sequence_logprobs, model_token_logprobs
from uft_ray.train import collectives
from uft_ray.train import loop as train_loop


def full_logits(model, ids, attention, mask, temperature: float = 1.0):
    """The old path: per-token log-probs and entropies [B, T] from the full logits (0 where not scored)."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    m = (mask[:, 1:] != 0).to(token.dtype)
    zero = torch.zeros_like(token[:, :1])
    return torch.cat([zero, token * m], 1), torch.cat([zero, entropy * m], 1)


def full_sums(model, ids, attention, mask):
    token, _ = full_logits(model, ids, attention, mask)
    return token.double().sum(1), (mask[:, 1:] != 0).sum(1)


def full_reference(model, ids, attention, mask):
    with torch.no_grad(), model.disable_adapter():
        return full_sums(model, ids, attention, mask)[0]


def old_micro_batch_loss(model, cfg, batch, t, kto_z):
    """micro_batch_loss as it was, on full logits."""
    ids, attention, mask = t["input_ids"], t["attention_mask"], t["loss_mask"]
    policy, n_tokens = full_sums(model, ids, attention, mask)
    weight = torch.tensor([2.0 if s == "a" else 1.0 for s in batch["source"]], dtype=torch.float64)
    lt, beta, n = cfg.loss.type, cfg.loss.beta, len(batch["row_id"])
    if lt == "sft":
        return losses.sft_loss(policy, n_tokens, weight=weight)[0], policy
    ref = full_reference(model, ids, attention, mask)
    if lt == "dpo":
        return losses.dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta, weight=weight)[0], policy
    score = torch.as_tensor(batch["score"])
    if lt == "kto":
        return losses.kto_loss(policy, ref, score >= 0.5, beta, kl=kto_z, desirable_weight=1.0,
                               undesirable_weight=0.5, weight=weight)[0], policy  # fmt: skip
    fn = losses.uft_loss if lt == "uft" else losses.una_bce_loss
    return fn(policy, ref, score, beta, weight=weight)[0], policy


# --- the head sees the scored positions only ------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_projects_only_the_scored_positions_and_matches_full_logits(tied):
    model = tiny_lora(tied=tied)
    head_inputs = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_inputs.append(tuple(a[0].shape)))
    batch = rows()
    t = train_loop.collate(batch, PAD, torch.device("cpu"), pairs=False)
    got, n_tokens = model_sequence_logprobs(model, t["input_ids"], t["attention_mask"], t["loss_mask"], chunk_size=5)
    # lengths 9, 13, 6 with responses from 4, 7, 3: 5 + 6 + 3 scored tokens, each predicted by the position before
    assert n_tokens.tolist() == [5, 6, 3]
    assert head_inputs == [(14, 32)]  # not (3, 13, 32): no prompt or padding position reaches the head
    got.sum().backward()
    new = lora_grads(model)
    want, _ = full_sums(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
    want.sum().backward()
    assert_rel(got, want)
    assert_same_grads(new, lora_grads(model))


def test_token_logprobs_entropies_and_temperature_match_full_logits():
    model = tiny_lora()
    t = train_loop.collate(rows(), PAD, torch.device("cpu"), pairs=False)
    ids, attention, mask = t["input_ids"], t["attention_mask"], t["loss_mask"]
    logp, ent = model_token_logprobs(model, ids, attention, mask, chunk_size=4, temperature=0.7)
    (logp.sum() + 0.3 * ent.sum()).backward()
    new = lora_grads(model)
    want_logp, want_ent = full_logits(model, ids, attention, mask, temperature=0.7)
    (want_logp.sum() + 0.3 * want_ent.sum()).backward()
    assert_rel(logp, want_logp)
    assert_rel(ent, want_ent)
    assert_same_grads(new, lora_grads(model))


def test_no_scored_token_still_runs_the_head_once():
    """An evaluation's empty forward (ZeRO-3 needs every rank to run one): the head runs on no position."""
    model = tiny_lora()
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    ids = torch.full((1, 2), PAD)
    got, n = model_sequence_logprobs(model, ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert got.tolist() == [0.0] and n.tolist() == [0] and calls == [(0, V)]


# --- every loss path, through the loop's own functions ----------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["uft", "una_bce", "dpo", "kto", "sft"])
def test_micro_batch_loss_matches_the_full_logits_loss_and_grads(loss_type):
    model = tiny_lora()
    pairs = loss_type == "dpo"
    batch = rows(pairs=pairs)
    t = train_loop.collate(batch, PAD, torch.device("cpu"), pairs=pairs)
    cfg = loss_cfg(loss_type)
    loss, metrics = train_loop.micro_batch_loss(Engine(model), cfg, batch, t, kto_z=0.05)
    loss.backward()
    new = lora_grads(model)
    want, policy = old_micro_batch_loss(model, cfg, batch, t, kto_z=0.05)
    want.backward()
    assert_rel(loss, want)
    assert_rel(metrics["rows/logp"], policy[: len(batch["row_id"])])
    assert_same_grads(new, lora_grads(model))


def test_kto_reference_point_reuses_its_references(monkeypatch):
    """With grad_accum > 1 KTO's z pass already scores the reference: z and the losses as on full logits."""
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op=None: None)  # one rank
    monkeypatch.setattr(collectives.ray.train.torch, "get_device", lambda: torch.device("cpu"))
    model = tiny_lora()
    cfg = loss_cfg("kto")
    step = [(b, train_loop.collate(b, PAD, torch.device("cpu"), pairs=False)) for b in (rows(), rows(seed=2))]
    z, refs = train_loop.kto_reference_point(Engine(model), cfg, step)
    logratio, count = 0.0, 0
    for (batch, t), ref in zip(step, refs, strict=True):
        want_ref = full_reference(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
        with torch.no_grad():
            policy, _ = full_sums(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
        assert_rel(ref, want_ref)
        logratio, count = logratio + float((policy - want_ref).sum()), count + len(batch["row_id"])
    assert z == pytest.approx(logratio / count, rel=REL)
    batch, t = step[1]
    loss, _ = train_loop.micro_batch_loss(Engine(model), cfg, batch, t, kto_z=z, ref=refs[1])
    want, _ = old_micro_batch_loss(model, cfg, batch, t, kto_z=z)
    assert_rel(loss, want)


def test_hint_rft_loss_matches_the_full_logits_loss_and_grads():
    from uft_ray.rft import update

    model = tiny_lora()
    g = np.random.default_rng(3)
    rollouts = [
        {"prompt_ids": g.integers(1, V, 5).tolist(), "hint_ids": g.integers(1, V, h).tolist(),
         "response_ids": g.integers(1, V, k).tolist()}
        for h, k in ((2, 4), (0, 6), (3, 2))
    ]  # fmt: skip
    t = update.pad_rollouts(rollouts, PAD, torch.device("cpu"))
    adv = torch.tensor([1.0, -0.5, 0.25])
    temperature, kw = 0.8, dict(clip=0.2, kl_coef=0.1, entropy_coef=0.01, hint_coef=0.5)

    def loss_of(logp, ent, ref):
        return losses.hint_rft_loss(logp, logp.detach() * 0.999, ref, adv, t["response"], ent,
                                    hint_logp=logp, hint_mask=t["hint"], **kw)[0]  # fmt: skip

    engine = Engine(model)
    ref = update.reference_logprobs(engine, t, temperature)
    logp, ent = update.policy_logprobs(engine, t, temperature, grad=True)
    loss = loss_of(logp, ent, ref)
    loss.backward()
    new = lora_grads(model)

    scored = t["response"] | t["hint"]
    want_logp, want_ent = full_logits(model, t["input_ids"], t["attention_mask"], scored, temperature)
    with torch.no_grad(), model.disable_adapter():
        want_ref, _ = full_logits(model, t["input_ids"], t["attention_mask"], t["response"], temperature)
    want = loss_of(want_logp, want_ent * t["response"], want_ref)
    want.backward()
    assert_rel(logp, want_logp)
    assert_rel(ref, want_ref)
    assert_rel(loss, want)
    assert_same_grads(new, lora_grads(model))


# --- the reference scorer and the held-out evaluation ----------------------------------------------------------


def test_reference_scorer_matches_full_logits(tmp_path):
    from uft_ray.reference.scorer import ReferenceScorer

    tiny_lora().get_base_model().save_pretrained(tmp_path / "m", safe_serialization=True)
    scorer = ReferenceScorer(str(tmp_path / "m"), dtype="float32", attn_implementation="eager",
                             max_tokens_per_forward=20)  # fmt: skip
    batch = rows(pairs=True)
    seqs = list(batch["input_ids"]) + list(batch["rejected_input_ids"])
    starts = [int(s) for s in batch["response_start"]] * 2
    got, forwards = scorer.score(seqs, starts)
    assert forwards > 1  # several length groups, each padded on its own
    for seq, start, value in zip(seqs, starts, got, strict=True):
        ids = torch.as_tensor(np.asarray(seq, dtype=np.int64))[None]
        mask = torch.zeros_like(ids)
        mask[0, start:] = 1
        with torch.no_grad():
            want, _ = full_sums(scorer.model, ids, torch.ones_like(ids), mask)
        assert_rel(torch.tensor([value]), want)


class Shard:
    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, batch_size, batch_format):
        return iter(self.batches)


def test_heldout_evaluation_matches_full_logits(monkeypatch):
    from uft_ray.evaluation import heldout

    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op=None: None)
    monkeypatch.setattr(collectives.dist, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    monkeypatch.setattr(collectives.ray.train.torch, "get_device", lambda: torch.device("cpu"))
    seen = []  # the per-row records the metrics are computed from (rewards are differences: compare their inputs)
    monkeypatch.setattr(heldout, "metrics", lambda records, cfg: seen.extend(records) or {})
    model = tiny_lora()
    cfg = loss_cfg("uft", mode="actor")
    cfg.needs_reference = False  # an sft-like run: the reference is the adapter-off policy
    cfg.reference_from_cache = False
    cfg.train = SimpleNamespace(micro_batch_size=3, packing=False)
    single, pairs = rows(), rows(pairs=True, seed=4)
    train_loop.evaluate_collective(Engine(model), cfg, Shard([single, pairs]), PAD, world=1)
    assert model.training  # back in train mode

    assert len(seen) == 6
    with torch.no_grad():
        for batch, is_pair, records in ((single, False, seen[:3]), (pairs, True, seen[3:])):
            t = train_loop.collate(batch, PAD, torch.device("cpu"), pairs=is_pair)
            policy, n = full_sums(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
            ref = full_reference(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
            k = len(batch["row_id"])
            got = [
                [r["policy"], r["ref"]] + ([r["policy_rejected"], r["ref_rejected"]] if is_pair else [])
                for r in records
            ]
            want = [[policy[j], ref[j]] + ([policy[k + j], ref[k + j]] if is_pair else []) for j in range(k)]
            assert_rel(torch.tensor(got), torch.tensor(want))
            assert [r["n_tokens"] for r in records] == n[:k].tolist()


class SoftcappedLM(torch.nn.Module):
    """Embedding -> causal running mean -> head -> tanh: the last op keeps its output for its own backward."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, 8)
        self.head = torch.nn.Linear(8, V)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return SimpleNamespace(logits=torch.tanh(self.head(h)))


def test_logits_that_autograd_still_needs_are_refused_not_overwritten():
    """The backward writes the gradient into the logits' own buffer: where something else saved them (tanh keeps
    its output), autograd's version check raises instead of computing a wrong gradient; likewise a second
    backward through the same graph."""
    torch.manual_seed(0)
    ids = torch.randint(1, V, (2, 6))
    mask = torch.zeros_like(ids)
    mask[:, 3:] = 1
    capped = SoftcappedLM()
    logp, _ = model_sequence_logprobs(capped, ids, torch.ones_like(ids), mask)
    with pytest.raises(RuntimeError, match="inplace"):
        logp.sum().backward()

    model = tiny_lora()
    t = train_loop.collate(rows(), PAD, torch.device("cpu"), pairs=False)
    logp, _ = model_sequence_logprobs(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        logp.sum().backward()
