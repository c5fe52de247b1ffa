"""hint_rft's optimizer steps per step: mini-batches of whole GRPO groups, the config checks that guard them (group
cuts, LoRA dropout), the recipes' optimizer against the authors' veRL settings, and log-probs at the sampling
temperature."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from uft_ray.config import ConfigError, load_config
from uft_ray.rft.update import check_adapter_dropout, scaled_token_logprobs, update_minibatches

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides: str):
    """The demo: 2 workers, 4 prompts x 4 rollouts a step: 8 rollouts a rank, micro-batch 4 x accumulation 2."""
    return load_config("jobs/configs/demo_hint_rft_tiny.yaml", ["model.path=/tmp", *overrides], check_paths=False)


def _rollouts(groups: list[int]) -> list[dict]:
    return [{"group": g, "i": i} for i, g in enumerate(groups)]


# --- the split of a step's rollouts into mini-batches ------------------------------------------------------


def test_minibatches_are_whole_groups_in_order():
    rollouts = _rollouts([0, 0, 1, 1, 2, 2, 3, 3])  # 4 prompts x n 2, group by group
    two = update_minibatches(rollouts, 2, 2)
    assert [[x["i"] for x in c] for c in two] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    four = update_minibatches(rollouts, 4, 2)
    assert [[x["group"] for x in c] for c in four] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert update_minibatches(rollouts, 8, 1)[5] == [rollouts[5]]  # sft: one sequence per "group"
    with pytest.raises(ValueError, match="whole groups of 2"):
        update_minibatches(rollouts, 8, 2)  # 1 rollout a mini-batch: every group cut
    with pytest.raises(ValueError, match="whole groups"):
        update_minibatches(rollouts, 3, 2)  # 8 does not split in 3
    with pytest.raises(ValueError, match="part of a GRPO group"):
        update_minibatches(_rollouts([0, 1, 0, 1]), 2, 2)  # out of group order: each half holds half of two groups


def test_the_recipe_takes_four_steps_of_64_prompts_like_the_authors():
    """veRL (scripts/train.sh, run.py): train_batch_size 256 prompts, ppo_mini_batch_size 64, ppo_epochs 1: 4
    optimizer steps a batch. Here each of 4 ranks holds 64 prompts x 4 rollouts = 256 sequences, cut into 4
    mini-batches of 64 sequences = 16 whole groups; 4 ranks x 16 = 64 prompts an optimizer step."""
    cfg = load_config(ROOT / "jobs/configs/hint_rft_countdown_qwen25_0_5b.yaml", check_paths=False)
    r, tr = cfg.rft, cfg.train
    per_rank = r.prompts_per_step // tr.num_workers
    rollouts = _rollouts([g for g in range(per_rank) for _ in range(r.n)])
    chunks = update_minibatches(rollouts, r.updates_per_step, r.n)
    assert [len(c) for c in chunks] == [64, 64, 64, 64] == [tr.grad_accum * tr.micro_batch_size] * 4
    assert [sorted({x["group"] for x in c}) for c in chunks] == [list(range(16 * u, 16 * u + 16)) for u in range(4)]
    assert len({x["group"] for x in chunks[0]}) * tr.num_workers == 64


# --- config validation ---------------------------------------------------------------------------------------


def test_a_split_that_cuts_a_group_is_refused_naming_the_fields():
    # 8 rollouts a rank = 4 updates x 1 x 2, but a mini-batch of 2 sequences holds half a group of 4
    with pytest.raises(ConfigError) as e:
        _cfg("rft.updates_per_step=4", "train.grad_accum=1", "train.micro_batch_size=2")
    assert ("rft.updates_per_step: 4 mini-batches of train.grad_accum * train.micro_batch_size = 2 sequences cut "
            "the GRPO groups of rft.n = 4") in str(e.value)  # fmt: skip
    ok = _cfg("rft.updates_per_step=2", "train.grad_accum=1")  # 2 x (1 x 4): one whole group a mini-batch
    assert ok.rft.updates_per_step == 2
    # sft trains one sequence per prompt: any split is whole "groups"
    assert _cfg("rft.objective=sft", "rft.updates_per_step=2", "train.grad_accum=1", "train.micro_batch_size=1")


def test_lora_dropout_with_several_updates_is_refused_naming_both_fields():
    with pytest.raises(ConfigError) as e:
        _cfg("rft.updates_per_step=2", "train.grad_accum=1", "lora.dropout=0.05")
    text = str(e.value)
    assert "lora.dropout: must be 0 with rft.updates_per_step > 1" in text
    assert "lora.dropout=0.05, rft.updates_per_step=2" in text
    assert _cfg("lora.dropout=0.05").lora.dropout == 0.05  # one update: old log-probs are the forward's own


def test_a_continued_adapter_with_dropout_is_refused_at_start():
    def engine(dropout):
        return SimpleNamespace(
            peft_model=SimpleNamespace(peft_config={"default": SimpleNamespace(lora_dropout=dropout)})
        )

    cfg = _cfg("rft.updates_per_step=2", "train.grad_accum=1")
    with pytest.raises(ValueError, match="lora_dropout is 0.1 with rft.updates_per_step 2"):
        check_adapter_dropout(engine(0.1), cfg)
    check_adapter_dropout(engine(0.0), cfg)
    check_adapter_dropout(engine(0.1), _cfg())  # one update


# --- the recipes ---------------------------------------------------------------------------------------------


def _rl_recipes() -> list[Path]:
    paths = [p for p in sorted((ROOT / "jobs/configs").glob("*.yaml")) if "method: hint_rft" in p.read_text()]
    demos = (
        "demo_hint_rft.yaml",
        "demo_hint_rft_tiny.yaml",
    )  # CPU demos: rates for a dozen steps, said in each header
    return [p for p in paths if p.name not in demos and "objective: sft" not in p.read_text()]


def test_rl_recipes_use_the_authors_optimizer_and_say_how_the_lora_rate_was_derived():
    """veRL's actor: AdamW(weight_decay 1e-2) (verl/workers/fsdp_workers.py), constant schedule, warmup ratio 0
    (ppo_trainer.yaml), lr 1e-6 for all weights (scripts/train.sh); here LoRA r 64, alpha 128 at 2.5e-6."""
    recipes = _rl_recipes()
    assert len(recipes) == 6
    for path in recipes:
        cfg = load_config(path, check_paths=False)
        tr = cfg.train
        assert (tr.lr_schedule, tr.warmup_ratio, tr.weight_decay, tr.max_grad_norm) == ("constant", 0.0, 0.01, 1.0)
        assert (cfg.rft.updates_per_step, cfg.rft.temperature, cfg.lora.dropout) == (4, 1.0, 0.0), path.name
        assert (cfg.lora.r, cfg.lora.alpha, tr.lr) == (64, 128, 2.5e-6), path.name
        head = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert "1e-6" in head and "2.5e-6" in head and "alpha 128" in head, path.name
    # 10 x the full-model rate at scale 32/64, carried to scale 128/64 (x 1/4)
    assert 10 * 1e-6 * (32 / 64) / (128 / 64) == pytest.approx(2.5e-6)


def test_the_sweep_runs_four_rates_on_qwen_0_5b():
    path = ROOT / "jobs/configs/hint_rft_countdown_qwen25_0_5b_lr_sweep.yaml"
    text = path.read_text()
    points = re.search(r"for lr in ([\d.e\- ]+); do", text).group(1).split()
    assert [float(p) for p in points] == [2.5e-6, 5e-6, 1e-5, 2e-5]
    for p in points:
        cfg = load_config(path, [f"train.lr={p}", f"output.run_name=hint-rft-countdown-qwen25-0.5b-lr{p}"],
                          check_paths=False)  # fmt: skip
        assert cfg.train.lr == float(p) and cfg.model.path.endswith("Qwen2.5-0.5B") and cfg.train.max_steps == 100
    full = load_config(ROOT / "jobs/configs/hint_rft_countdown_qwen25_0_5b.yaml", check_paths=False)
    sweep = load_config(path, check_paths=False)
    same = ("rft", "lora", "model", "data")  # only the length and the name differ: the same first 100 steps
    assert all(getattr(full, k) == getattr(sweep, k) for k in same)
    assert {**vars(full.train), "max_steps": 100} == vars(sweep.train)


# --- log-probs at the sampling temperature --------------------------------------------------------------------


def test_logprobs_divide_the_logits_by_the_temperature():
    """Two tokens; the position before token 1 has logits (0, ln 4). At T = 2: (0, ln 2), p = (1/3, 2/3), so
    logp(1) = ln(2/3), entropy ln 3 - (2/3) ln 2, and d logp / d z = (onehot - p) / T = (-1/6, 1/6). At T = 1:
    p = (1/5, 4/5)."""
    z = torch.tensor([[[0.0, math.log(4.0)], [5.0, -5.0]]], dtype=torch.float64, requires_grad=True)
    ids, mask, attention = torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.long)

    def model(input_ids, attention_mask):
        return SimpleNamespace(logits=z * 1.0)  # a fresh non-leaf, as a model's output is

    logp, ent = scaled_token_logprobs(model, ids, attention, mask, temperature=2.0, with_entropy=True)
    assert float(logp.detach()[0, 1]) == pytest.approx(math.log(2 / 3), abs=1e-12)
    assert float(logp.detach()[0, 0]) == 0.0  # not scored
    assert float(ent.detach()[0, 1]) == pytest.approx(math.log(3) - 2 / 3 * math.log(2), abs=1e-12)
    logp[0, 1].backward()
    assert z.grad[0, 0].tolist() == pytest.approx([-1 / 6, 1 / 6], abs=1e-12)
    assert z.grad[0, 1].tolist() == [0.0, 0.0]
    # the old and the reference log-probs take the same path, without entropy
    with torch.no_grad():  # as the loop computes them
        old, none = scaled_token_logprobs(model, ids, attention, mask, temperature=2.0, with_entropy=False)
        one, _ = scaled_token_logprobs(model, ids, attention, mask, temperature=1.0, with_entropy=False)
    assert none is None and float(old[0, 1]) == pytest.approx(math.log(2 / 3), abs=1e-12)
    assert float(one[0, 1]) == pytest.approx(math.log(4 / 5), abs=1e-12)
    assert z.detach()[0, 0, 1] == pytest.approx(math.log(4.0))  # the model's own weights are untouched


# --- the direction of a GRPO update through the loop -------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_one_grpo_step_through_the_loop_raises_each_groups_rewarded_rollout(monkeypatch, packing):
    """The loop's own update (`grpo_update`: advantages, mini-batches, padding or packing, the loss, backward) on the
    tiny LoRA model, with an SGD step: in each group the rewarded rollout's sequence log-prob rises more than any
    unrewarded one's, and the advantage-weighted sum of the changes is positive (the surrogate rose). A sign error
    or rewards matched to the wrong rows (sorting, packing's order) fails it."""
    from fixtures.tiny_lora import PAD, Engine, quiet_collectives, tiny_lora

    from uft_ray.rft import update
    from uft_ray.train import collectives

    quiet_collectives(monkeypatch, collectives)
    cfg = _cfg(
        "train.grad_accum=1", "train.micro_batch_size=8", "rft.kl_coef=0.0", "rft.entropy_coef=0.0",
        f"train.packing={str(packing).lower()}",
    )  # fmt: skip
    model = tiny_lora(seed=3)
    params = [p for p in model.parameters() if p.requires_grad]

    class SGD(Engine):
        def step(self) -> bool:
            with torch.no_grad():
                for p in params:
                    p -= 0.05 * p.grad
                    p.grad = None
            return True

    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(8):  # 2 groups of 4, lengths differ so the padded path reorders them
        prompt = torch.randint(1, 100, (5,), generator=g).tolist()
        rollouts.append(
            {"group": i // 4, "prompt_ids": prompt if i % 4 == 0 else rollouts[-1]["prompt_ids"], "hint_ids": [],
             "response_ids": torch.randint(1, 100, (2 + (5 * i) % 7,), generator=g).tolist(),
             "reward": float(i in (2, 5))}
        )  # fmt: skip

    def seq_logp() -> torch.Tensor:
        t = update.pad_rollouts(rollouts, PAD, torch.device("cpu"))
        with torch.no_grad():
            logp, _ = update.scaled_token_logprobs(
                model, t["input_ids"], t["attention_mask"], t["response"], temperature=1.0, with_entropy=False
            )
        return (logp * t["response"]).sum(1)

    before = seq_logp()
    update.grpo_update(SGD(model), cfg, [dict(r) for r in rollouts], PAD, world=1)
    gain = seq_logp() - before
    adv = torch.tensor([0.0] * 8)
    for x in (2, 5):
        adv[x] = 1.0
    assert float(((adv - 0.25) * gain).sum()) > 0
    for rewarded, group in ((2, range(0, 4)), (5, range(4, 8))):
        assert all(gain[rewarded] > gain[j] for j in group if j != rewarded), (rewarded, gain.tolist())


# --- rft.objective: sft trains on whole reference answers, no rollouts ------------------------------------


def test_sft_update_is_the_targets_token_mean_nll_and_its_row_has_no_rollout_metrics(monkeypatch):
    """`sft_update` on prompts with their reference answers: its loss is the NLL of the answer tokens as one token
    mean over the update (computed here from the model's log-probs by hand), only the answer tokens are scored,
    the step's row logs it as loss and hint_nll with none of the rollout metrics, and a GRPO row has them all."""
    from types import SimpleNamespace

    from fixtures.tiny_lora import PAD, Engine, quiet_collectives, tiny_lora

    from uft_ray.rft import metrics, update
    from uft_ray.train import collectives

    quiet_collectives(monkeypatch, collectives)
    cfg = _cfg("rft.objective=sft", "rft.n=1", "train.num_workers=1", "rft.prompts_per_step=4",
               "train.grad_accum=2", "train.micro_batch_size=2", "rft.temperature=1.0")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    targets = [
        {"row_id": str(i), "prompt_ids": torch.randint(1, 100, (4,), generator=g).tolist(),
         "target_ids": torch.randint(1, 100, (2 + i,), generator=g).tolist(), "revealed": 2, "n_chunks": 2}
        for i in range(4)
    ]  # fmt: skip
    model = tiny_lora(seed=2)
    with torch.no_grad():  # by hand: every answer token's NLL under the untouched model, one mean over all 14
        nll = []
        for x in targets:
            ids = torch.tensor([x["prompt_ids"] + x["target_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll += [-float(logp[p - 1, ids[0, p]]) for p in range(len(x["prompt_ids"]), ids.shape[1])]
    seen = []

    class Recorder(Engine):
        def step(self) -> bool:  # no update: both micro-batches see the same weights as the hand computation
            seen.append(True)
            return True

    out = update.sft_update(Recorder(model), cfg, [dict(x) for x in targets], PAD, world=1)
    assert len(nll) == 14 and len(seen) == 2
    assert out["loss"] == pytest.approx(sum(nll) / 14, rel=1e-5) and out["hint_nll"] == out["loss"]

    times = {"generate": 0.0, "train": 1.0, "wait": 0.0}
    row = metrics.metrics_row_collective(0, targets, None, out, times, 1.0, 0.1, 10, None,
                                         SimpleNamespace(grad_norm=1.0), Counter(), world=1)  # fmt: skip
    assert row["loss"] == row["hint_nll"] == out["loss"] and row["hint/share"] == 1.0
    assert not set(row) & set(metrics.ROLLOUT_ONLY)
    rollouts = [{"reward": 1.0, "hint_ids": [1], "response_ids": [1, 2]}] * 2
    train = {"train_tokens": 8, "loss": 0.5, "pg_loss": 0.1, "kl": 0.0, "entropy": 1.0, "hint_nll": 2.0,
             "clip_frac": 0.0, "lr": 1e-5, "with_kl": True}  # fmt: skip
    grpo = metrics.metrics_row_collective(0, targets[:2], rollouts, train, times, 1.0, 0.1, 10, None,
                                          SimpleNamespace(grad_norm=1.0), Counter(), world=1)  # fmt: skip
    assert set(metrics.ROLLOUT_ONLY) <= set(grpo)
