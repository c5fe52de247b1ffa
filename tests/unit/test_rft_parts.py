"""hint_rft's parts without a cluster: per-token log-probs and entropies, the GRPO update on a real tiny model,
the seeded rollout sampler, the verifier process, the prompt plan, and the config checks."""

from __future__ import annotations

import time

import pytest
import torch

from uft_ray.config import ConfigError, load_config
from uft_ray.logprobs import sequence_logprobs, token_logprobs
from uft_ray.losses import group_advantages, hint_rft_loss
from uft_ray.rft.rollout import RolloutActor, adapter_digest, request_seed
from uft_ray.tasks import countdown
from uft_ray.tasks.verifier import VerifierProcess

# --- per-token log-probs and entropies ------------------------------------------------------------------


def test_token_logprobs_and_entropy_match_a_full_log_softmax_and_their_gradients_check():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    logp, ent = token_logprobs(logits, labels, mask, chunk_size=2)
    full = torch.log_softmax(logits, -1)
    for b in range(2):
        for t in range(6):
            if mask[b, t]:
                assert logp[b, t].item() == pytest.approx(full[b, t - 1, labels[b, t]].item(), abs=1e-12)
                assert ent[b, t].item() == pytest.approx(-(full[b, t - 1].exp() * full[b, t - 1]).sum().item())
            else:
                assert logp[b, t] == 0 and ent[b, t] == 0
    assert torch.equal(logp.sum(1), sequence_logprobs(logits, labels, mask)[0])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, mask, chunk_size=3), (logits,))


def test_entropy_of_a_uniform_distribution_is_log_v_and_masked_vocab_is_ignored():
    logits = torch.zeros(1, 2, 8)
    logits[..., 6:] = -float("inf")  # the padded part of an embedding
    _, ent = token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]))
    assert ent[0, 1].item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=1e-6)


# --- the GRPO update on a real model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):

    from uft_ray.demo.tiny_model import make_tiny_model

    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path, seed=0)
    return str(path)


def _group_update(model_path: str, rewards: list[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One prompt, four different responses, one SGD step on hint_rft_loss (no KL, entropy or hint term)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompt = [5, 9, 14, 20]
    responses = [[30, 31, 32], [40, 41, 42], [50, 51, 52], [60, 61, 62]]
    ids = torch.tensor([prompt + r for r in responses])
    mask = torch.zeros_like(ids)
    mask[:, len(prompt) :] = 1
    attention = torch.ones_like(ids)

    def logps():
        out = model(input_ids=ids, attention_mask=attention).logits
        return token_logprobs(out, ids, mask)

    logp, ent = logps()
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4).to(logp.dtype)
    loss, m = hint_rft_loss(logp, logp.detach(), logp.detach(), adv, mask, ent, kl_coef=0.0, entropy_coef=0.0)
    model.zero_grad()
    loss.backward()
    grad = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
        after = logps()[0].sum(1)
    return logp.detach().sum(1), after, grad


def test_grpo_raises_the_rewarded_samples_logprob_relative_to_the_others(tiny):
    before, after, grad = _group_update(tiny, [1.0, 0.0, 0.0, 0.0])
    assert grad > 0
    gain = after - before
    assert gain[0] > 0 and gain[0] > gain[1:].max()  # the rewarded response rose, and more than the others
    assert (gain[1:] < 0).all()


def test_equal_rewards_give_no_policy_gradient(tiny):
    before, after, grad = _group_update(tiny, [0.1, 0.1, 0.1, 0.1])
    assert grad == 0.0
    assert torch.equal(before, after)


# --- rollouts --------------------------------------------------------------------------------------------


def _actor(model_path: str, **kw) -> RolloutActor:
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return RolloutActor(model_path, lora=lora, backend="hf", dtype="float32", max_new_tokens=8, temperature=1.0,
                        top_p=1.0, eos_token_ids=[2], pad_token_id=0, vocab_limit=300, **kw)  # fmt: skip


def test_rollouts_are_a_function_of_their_seeds_not_of_the_batch(tiny):
    actor = _actor(tiny)
    prompts = [[5, 9, 14, 20], [7, 8], [11, 12, 13]]
    reqs = [{"prompt_ids": p, "seed": request_seed(0, 1, f"row{i}", 0)} for i, p in enumerate(prompts)]
    together = actor.generate(reqs)["responses"]
    alone = [actor.generate([r])["responses"][0] for r in reqs]
    assert together == alone
    assert actor.generate(reqs)["responses"] == together  # the same seeds: the same rollouts
    other = [{**r, "seed": request_seed(0, 2, f"row{i}", 0)} for i, r in enumerate(reqs)]
    assert actor.generate(other)["responses"] != together
    assert all(t < 300 for resp in together for t in resp)  # nothing from the padded vocabulary
    assert request_seed(0, 1, "a", 0) != request_seed(0, 1, "a", 1)


def test_loading_an_adapter_changes_generation_and_the_digest_names_it(tiny):
    actor = _actor(tiny, batch_size=2)
    req = [{"prompt_ids": [5, 9, 14, 20], "seed": 0, "greedy": True}]
    before, digest0 = actor.generate(req)["responses"], actor.digest()
    state = {k: torch.randn_like(v) for k, v in _state(actor).items()}
    assert actor.load_adapter(state, version=3) == adapter_digest(state) != digest0
    out = actor.generate(req)
    assert out["version"] == 3 and out["responses"] != before


def _state(actor: RolloutActor) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(actor.model)


# --- the verifier process --------------------------------------------------------------------------------


def _sleepy(row, text):  # a user's verifier that hangs on some output
    if "hang" in text:
        time.sleep(30)
    return countdown.verify(row, text)


def test_verifier_process_scores_hostile_output_zero_and_survives_a_hang():
    rows = countdown.generate(2, seed=3)
    v = VerifierProcess(_sleepy, timeout_s=1.0)
    try:
        texts = [rows[0]["answer"], "hang", "<answer> 9**9**9**9 </answer>", "x" * (1 << 20), rows[1]["answer"]]
        t0 = time.perf_counter()
        assert v.score([rows[0], rows[0], rows[0], rows[0], rows[1]], texts) == [1.0, 0.0, 0.0, 0.0, 1.0]
        assert time.perf_counter() - t0 < 20 and v.timeouts == 1
    finally:
        v.close()


# --- the plan and the config -----------------------------------------------------------------------------


def _cfg(*overrides: str):
    return load_config("jobs/configs/demo_hint_rft_tiny.yaml", ["model.path=/tmp", *overrides], check_paths=False)


def test_plan_deals_whole_groups_to_ranks_and_reshuffles_each_epoch():
    import pyarrow as pa

    from uft_ray.rft.prompts import make_rft_plan

    table = pa.table({"row_id": [f"r{i}" for i in range(10)], "prompt_ids": [[1, 2]] * 10})
    plan = make_rft_plan(table, _cfg("train.max_steps=5"))  # 4 prompts a step: 2 steps an epoch, 2 left out
    t = plan.table.to_pylist()
    assert plan.summary.steps == 5 and plan.summary.steps_per_epoch == 2 and plan.summary.tail_dropped == 2
    for step in range(5):
        rows = [r for r in t if r["step"] == step]
        assert [r["rank"] for r in rows] == [0, 0, 1, 1] and [r["slot"] for r in rows] == [0, 1, 0, 1]
    epoch0 = [r["row_id"] for r in t if r["epoch"] == 0]
    assert len(set(epoch0)) == 8  # no prompt twice in an epoch
    assert epoch0 != [r["row_id"] for r in t if r["epoch"] == 1]
    assert make_rft_plan(table, _cfg("train.max_steps=5")).summary.fingerprint == plan.summary.fingerprint


def test_rft_config_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        _cfg("rft.prompts_per_step=3", "rft.task=sudoku", "rft.hint.mode=linear", "rft.rollout.backend=tgi")
    text = str(e.value)
    for field in ("rft.prompts_per_step: 3 must be a multiple of train.num_workers", "rft.task: 'sudoku'",
                  "rft.hint.mode: 'linear'", "rft.rollout.backend: 'tgi'"):  # fmt: skip
        assert field in text
    with pytest.raises(ConfigError, match="make them equal"):
        _cfg("rft.n=8")  # 16 rollouts a rank, 8 micro-batch slots
    with pytest.raises(ConfigError, match="rft.path: required for task 'math'"):
        _cfg("rft.task=math")
    assert _cfg().method == "hint_rft"
    with pytest.raises(ConfigError, match="rft.objective: 'dpo'"):
        _cfg("rft.objective=dpo")
    # sft trains one sequence per prompt: 2 prompts a rank fill 2 x 1 micro-batch slots, not 4 x 2
    with pytest.raises(ConfigError, match="sft: one sequence per prompt"):
        _cfg("rft.objective=sft")
    assert _cfg("rft.objective=sft", "train.micro_batch_size=2", "train.grad_accum=1").rft.objective == "sft"
