"""`method: hint_rft` end to end on a local Ray cluster: the tiny model, generated Countdown, 2 DeepSpeed workers,
one transformers rollout actor (tests/fixtures/recorder.py records rollouts and adapter syncs).

Two runs of one config (6 steps, hints on a cosine schedule over 4 steps, checkpoints every 2): uninterrupted,
and an interrupted one: a worker SIGKILLed after step 3 (FailureConfig restarts the group from step 2), then
stopped after step 5 and rerun under the same name (it continues at step 4). It must end with the same hints,
rollouts and losses as the uninterrupted run. One more run reveals the full hint at every step (p = 1): its hint
NLL must fall. Three 1-step runs of 2 prompts x 2 rollouts differ only in layout (1 worker x micro-batch 4,
2 workers x micro-batch 2, 1 worker x micro-batch 2 x accumulation 2): the same rollouts, loss and gradient.
A 2-step run takes 2 optimizer steps a step on a linear schedule at sampling temperature 0.7. Every run records
a held-out evaluation before the first update (step 0).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.recorder import RftRecorder
from safetensors.torch import load_file

from uft_ray import driver
from uft_ray.config import Config, load_config
from uft_ray.rft.rollout import adapter_digest
from uft_ray.run_dir import RunDir, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]

STEPS = 6


def rft_config(assets: dict[str, str], root: Path, name: str, *overrides: str) -> Config:
    return load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        [
            f"model.path={assets['model']}",
            f"output.storage_path={root}",
            f"output.run_name={name}",
            "rft.n_train=64",
            "rft.max_response_len=12",
            "rft.hint.t_hint=4",
            "eval.every=3",
            "eval.max_rows=4",
            f"train.max_steps={STEPS}",
            "train.checkpoint_every=2",
            "train.lr=2e-2",
            "train.cpus_per_worker=1",  # leave CPUs for the rollout actor and the data tasks
            *overrides,
        ],
    )


def trained(metrics_path: str) -> list[dict[str, Any]]:
    """The rows of the training steps (step 0 holds the evaluation before the first update)."""
    return [r for r in read_metrics(metrics_path) if r["step"] > 0]


def rollouts(run_dir: str, ranks: int = 2) -> dict[int, list[dict[str, Any]]]:
    """step -> every rank's rollouts, rank 0 first."""
    out: dict[int, list[dict[str, Any]]] = {}
    for rank in range(ranks):
        for line in (Path(run_dir) / "debug" / f"rollouts_rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], []).extend(row["rollouts"])
    return out


def attempts(run_dir: str, rank: int) -> list[int]:
    path = Path(run_dir) / "debug" / f"attempts_rank{rank}.jsonl"
    return [json.loads(line)["start_step"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hint-rft")


@pytest.fixture(scope="module")
def straight(tiny_assets, root) -> Any:
    cfg = rft_config(tiny_assets, root, "straight")
    return driver.run(cfg, hooks=RftRecorder(cfg.output.run_dir))


@pytest.fixture(scope="module")
def interrupted(tiny_assets, root) -> tuple[Any, dict[str, Any]]:
    """Both ways a run is interrupted, in one run (each costs a fit): rank 1 parks after step 3 and this test
    kills it once the step-2 checkpoint is registered (FailureConfig's one retry restarts from step 2); the
    restarted run stops after step 5 (a second failure: fit fails), and a rerun under the same name continues
    from the step-4 checkpoint."""
    cfg = rft_config(tiny_assets, root, "interrupted", "train.max_failures=1")
    run = Path(cfg.output.run_dir)
    seen: dict[str, Any] = {}

    def kill_when_paused() -> None:
        deadline = time.time() + 600
        snapshot = run / "checkpoints" / "checkpoint_manager_snapshot.json"
        while time.time() < deadline:
            paused = run / "debug" / "paused_rank1.json"
            if paused.exists() and snapshot.exists() and "checkpoint_000002" in snapshot.read_text():
                seen.update(json.loads(paused.read_text()))
                os.kill(seen["pid"], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    hooks = RftRecorder(cfg.output.run_dir, pause={"rank": 1, "step": 3}, stop_after_step=5)
    with pytest.raises(Exception, match="stopping after step 5"):
        driver.run(cfg, hooks=hooks)
    killer.join(timeout=5)
    return driver.run(cfg, hooks=RftRecorder(cfg.output.run_dir)), seen


def test_run_writes_every_metric_and_the_run_directory(straight):
    base, *rows = read_metrics(straight.metrics_path)
    # veRL's val_before_train: greedy, hint-free accuracy of the untrained policy, before any update
    assert base["step"] == 0 and set(base) == {"step", "time", "eval/accuracy"} and 0 <= base["eval/accuracy"] <= 1
    assert base["time"] < rows[0]["time"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    names = {"reward/mean", "reward/accuracy", "reward/format", "hint/share", "response/length", "kl", "entropy",
             "clip_frac", "time/generate_frac", "sync/adapter_s", "sync/adapter_bytes", "loss", "lr", "grad_norm"}  # fmt: skip
    for r in rows:
        assert names <= set(r), names - set(r)
        assert 0 <= r["reward/accuracy"] <= r["reward/format"] <= 1
        assert 0 < r["time/generate_frac"] < 1 and 1 <= r["response/length"] <= 12
    assert [r["step"] for r in [base, *rows] if "eval/accuracy" in r] == [0, 3, 6]  # before, eval.every, the end
    # Only the LoRA tensors travel: r 8 on the tiny model's 7 projections x 2 layers, fp32.
    state = load_file(os.path.join(straight.adapter_dir, "adapter_model.safetensors"))
    assert rows[0]["sync/adapter_bytes"] == sum(t.numel() * 4 for t in state.values())
    assert os.path.isfile(RunDir(straight.run_dir).report)
    assert (Path(straight.run_dir) / "prompts" / "train.parquet").is_file()


def test_hints_follow_the_schedule_and_vanish_after_t_hint(straight):
    rows = trained(straight.metrics_path)
    shares = [r["hint/share"] for r in rows]
    assert shares[0] > 0.5 and all(s == 0.0 for s in shares[4:])  # t_hint 4: no hint from step 5
    # No hint token anywhere: no hint term. The loss is pg - 0.001 entropy + 0.001 kl (fp32 terms; a hint term
    # would add 0.001 * hint_nll, about 7e-3 here).
    for r in rows[4:]:
        assert "hint_nll" not in r
        assert r["loss"] == pytest.approx(r["pg_loss"] - 0.001 * r["entropy"] + 0.001 * r["kl"], rel=1e-6)
    assert "hint_nll" in rows[0]
    # Every rollout of a prompt shares its hint; prompt + hint is the rollout's input.
    for step_rollouts in rollouts(straight.run_dir).values():
        by_row: dict[str, set] = {}
        for x in step_rollouts:
            by_row.setdefault(x["row_id"], set()).add((x["revealed"], tuple(x["input"])))
        assert all(len(v) == 1 for v in by_row.values())


def test_actors_generate_with_exactly_the_trainers_adapter(straight):
    syncs = [json.loads(line) for line in (Path(straight.run_dir) / "debug" / "sync.jsonl").read_text().splitlines()]
    assert [s["step"] for s in syncs] == list(range(STEPS + 1))  # the initial adapter, then one per step
    for s in syncs:
        assert s["actors"] == [s["trainer"]]
    # A step changes the adapter exactly when its learning rate is not 0 (the first is warmup's 0).
    lrs = [r["lr"] for r in trained(straight.metrics_path)]
    changed = [syncs[i + 1]["trainer"] != syncs[i]["trainer"] for i in range(STEPS)]
    assert changed == [lr > 0 for lr in lrs] and sum(changed) >= STEPS - 1
    # The digest of what the checkpoint saved at step 4 is what the actors held for step 5's rollouts.
    saved = load_file(os.path.join(straight.run_dir, "checkpoints", "checkpoint_000004", "adapter",
                                   "adapter_model.safetensors"))  # fmt: skip
    assert adapter_digest(saved) == syncs[4]["trainer"]


def test_killed_worker_resumes_at_its_checkpoint_with_the_same_hints_and_rollouts(straight, interrupted):
    result, seen = interrupted
    assert seen, "the paused worker was never killed"
    # the kill restarted both ranks from the step-2 checkpoint; the rerun started at step 4
    assert attempts(result.run_dir, 0) == attempts(result.run_dir, 1) == [0, 2, 4]
    assert rollouts(result.run_dir) == rollouts(straight.run_dir)
    # the step-0 evaluation ran once (the restarts began at steps 2 and 4) and was kept through both
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[0]["eval/accuracy"] == read_metrics(straight.metrics_path)[0]["eval/accuracy"]


def test_rerun_of_the_same_run_name_continues_with_the_same_rollouts(straight, interrupted):
    result, _ = interrupted
    assert attempts(result.run_dir, 0)[-1] == 4  # the rerun resumed from the step-4 checkpoint, not from scratch
    assert rollouts(result.run_dir) == rollouts(straight.run_dir)
    a, b = trained(straight.metrics_path), trained(result.metrics_path)
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6, abs=1e-9)


def test_full_hints_hint_nll_falls(tiny_assets, root):
    """p = 1 at every step (the whole reference solution in the prompt): the hint term is SFT on it."""
    cfg = rft_config(tiny_assets, root, "full-hints", "rft.hint.p_low=1.0", "rft.hint.p_high=1.0",
                     "rft.hint.t_hint=100", "rft.hint_coef=1.0", "train.max_steps=5", "eval.every=null")  # fmt: skip
    rows = trained(driver.run(cfg).metrics_path)
    assert all(r["hint/share"] == 1.0 for r in rows)
    nll = [r["hint_nll"] for r in rows]
    assert nll[-1] < nll[0] - 0.05, nll


def test_sft_then_rft_continues_from_the_sft_adapter(tiny_assets, root):
    """Stage 1 `rft.objective: sft` (the NLL of whole reference answers, no rollouts), stage 2 RFT from its adapter."""
    common = ("eval.every=null", "train.lr=5e-2")
    sft = rft_config(tiny_assets, root, "sft", "rft.objective=sft", "train.grad_accum=1", "train.micro_batch_size=2",
                     "train.max_steps=4", *common)  # fmt: skip
    rl = rft_config(tiny_assets, root, "sft-rft", "rft.hint.mode=rft", "train.max_steps=2", *common)
    first, second = driver.run_sequential(sft, rl, hooks=RftRecorder(rl.output.run_dir))
    rows = trained(first.metrics_path)
    assert all("reward/mean" not in r and r["hint/share"] == 1.0 for r in rows)  # nothing sampled in SFT
    assert rows[-1]["hint_nll"] < rows[0]["hint_nll"] - 0.05
    assert rows[0]["loss"] == pytest.approx(rows[0]["hint_nll"], rel=1e-6)  # SFT's loss is the answer's NLL
    # Stage 2's actors start with exactly the SFT adapter, and its rollouts never see a hint. (The hooks go to
    # both stages and write into one file: stage 2's initial sync is the last one at step 0.)
    syncs = [json.loads(line) for line in (Path(second.run_dir) / "debug" / "sync.jsonl").read_text().splitlines()]
    assert [s["step"] for s in syncs] == [0, 1, 2, 3, 4, 0, 1, 2]
    sync0 = syncs[5]
    assert sync0["trainer"] == adapter_digest(load_file(os.path.join(first.adapter_dir, "adapter_model.safetensors")))
    assert all(r["hint/share"] == 0.0 and "hint_nll" not in r for r in trained(second.metrics_path))
    # Stage 2's KL reference is the model it starts from, base + the SFT adapter (the authors' reference is the
    # initial actor), not the bare base: before its first update the policy is its reference, so step 1's kl is
    # 0 (one update a step: step 1's kl is taken before any update); step 1's update moves the policy away.
    kl = [r["kl"] for r in trained(second.metrics_path)]
    assert kl[0] == pytest.approx(0.0, abs=1e-9) and kl[1] > 1e-6, kl
    assert yaml.safe_load((Path(second.run_dir) / "config.yaml").read_text())["reference"]["adapter"] == (
        first.adapter_dir
    )
    # What stage 2 saves is its own adapter over the untouched base, as stage 1's: the frozen reference copy
    # is not in it (users load base + this adapter; the actors got exactly it).
    weights = "adapter_model.safetensors"
    saved, sft_saved = (load_file(os.path.join(r.adapter_dir, weights)) for r in (second, first))
    assert saved.keys() == sft_saved.keys() and all(v.dtype == sft_saved[k].dtype for k, v in saved.items())


# ---------------------------------------------------------------------------------------------------------
# Batch-shape invariance of the first step: 2 prompts x 2 rollouts = 4 sequences, trained as 1 worker x
# micro-batch 4 (packed: each prompt computed once for its 2 rollouts) and as 2 workers x micro-batch 1 x
# accumulation 2 (one rollout a micro-batch): the split over ranks, over micro-batches and the layout all change.

LAYOUTS = {"w1-mb4": (1, 4, 1), "w2-mb1-ga2": (2, 1, 2)}


def _first_step(tiny_assets: dict[str, str], root: Path, name: str) -> Any:
    workers, micro, accum = LAYOUTS[name]
    cfg = rft_config(tiny_assets, root, name, "rft.prompts_per_step=2", "rft.n=2", "train.max_steps=1",
                     "eval.every=null", "eval.max_rows=2", f"train.num_workers={workers}",
                     f"train.micro_batch_size={micro}", f"train.grad_accum={accum}")  # fmt: skip
    return driver.run(cfg, hooks=RftRecorder(cfg.output.run_dir))


@pytest.fixture(scope="module")
def w1_mb4(tiny_assets, root) -> Any:
    return _first_step(tiny_assets, root, "w1-mb4")


@pytest.fixture(scope="module")
def w2_mb1_ga2(tiny_assets, root) -> Any:
    return _first_step(tiny_assets, root, "w2-mb1-ga2")


def _same_first_step(a: Any, ranks_a: int, b: Any, ranks_b: int) -> tuple[dict[str, Any], dict[str, Any]]:
    # The precondition: the same prompts, hints, rollouts and rewards whatever the layout (each rollout is
    # seeded by (seed, step, row_id, k), not by where it runs).
    key = lambda x: (x["row_id"], x["k"])  # noqa: E731
    ra, rb = rollouts(a.run_dir, ranks_a), rollouts(b.run_dir, ranks_b)
    assert list(ra) == list(rb) == [1]
    assert sorted(ra[1], key=key) == sorted(rb[1], key=key) and len(ra[1]) == 4
    (ma,), (mb,) = trained(a.metrics_path), trained(b.metrics_path)
    return ma, mb


def _assert_same_update(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in ("pg_loss", "kl", "entropy", "hint_nll", "hint/share", "reward/mean", "response/length"):
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    # Here loss = 0.001 (hint_nll - entropy) (pg and kl are 0: no reward above 0, policy == reference): the two
    # nearly cancel (~3e-5), so fp32 summation order shows at ~1e-9 absolute; a term normalized over the wrong
    # token count moves it by ~1e-4.
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-8)
    # The same gradient: the loss terms are global token means, whatever the split over ranks and micro-batches.
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_first_step_is_the_same_on_one_worker_and_on_two_with_accumulation(w1_mb4, w2_mb1_ga2):
    one, two = _same_first_step(w1_mb4, 1, w2_mb1_ga2, 2)
    # Each rank holds one prompt's group. Every response runs to max_response_len (the random tiny model never
    # ends early) and no reward is above 0, so the hint term is the one that can tell a global token mean from a
    # per-rank or per-micro-batch one: the ranks' hints must differ in length (revealed chunks).
    debug = Path(w2_mb1_ga2.run_dir) / "debug"
    shares = [json.loads((debug / f"rollouts_rank{r}.jsonl").read_text())["rollouts"] for r in (0, 1)]
    assert [len({x["row_id"] for x in s}) for s in shares] == [1, 1] and [len(s) for s in shares] == [2, 2]
    assert shares[0][0]["revealed"] != shares[1][0]["revealed"]
    assert len({x["revealed"] for x in rollouts(w1_mb4.run_dir, 1)[1]}) == 2
    _assert_same_update(one, two)


# ---------------------------------------------------------------------------------------------------------
# Several optimizer steps a step, the learning-rate schedule, and the sampling temperature in the trainer.


def test_two_updates_a_step_follow_the_schedule_at_the_sampling_temperature(tiny_assets, root):
    """2 steps x 2 updates = 4 optimizer steps, linear after round(0.25 x 4) = 1 warmup step: the updates' rates
    are lr x (0, 1, 2/3, 1/3), and a step logs its first update's (0, then 2/3 lr). Each rank's 8 rollouts are 2
    mini-batches of one whole group. At temperature 0.7 the policy, old and reference log-probs all come from
    logits / 0.7: in step 1 the first update has rate 0, so the second one's old log-probs (taken before it) are
    its own (no clipping) and the policy is still the reference: kl exactly 0, which a reference scored at
    temperature 1 against a policy at 0.7 would not give (the scaling itself: tests/unit/test_rft_updates.py)."""
    cfg = rft_config(tiny_assets, root, "updates-2-t07", "rft.updates_per_step=2", "train.grad_accum=1",
                     "train.lr_schedule=linear", "train.warmup_ratio=0.25", "train.weight_decay=0.01",
                     "rft.temperature=0.7", "train.max_steps=2", "eval.every=null")  # fmt: skip
    assert cfg.train.lr == 2e-2
    rows = read_metrics(driver.run(cfg, hooks=RftRecorder(cfg.output.run_dir)).metrics_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
    one, two = rows[1], rows[2]
    assert [one["lr"], two["lr"]] == pytest.approx([0.0, 2e-2 * 2 / 3], rel=1e-6, abs=1e-12)
    assert one["clip_frac"] == 0.0 and one["kl"] == pytest.approx(0.0, abs=1e-9)
    assert two["kl"] > 1e-6  # step 1's second update (rate lr) moved the adapter away from the reference
    syncs = [json.loads(line) for line in (Path(cfg.output.run_dir) / "debug" / "sync.jsonl").read_text().splitlines()]
    assert [s["step"] for s in syncs] == [0, 1, 2] and len({s["trainer"] for s in syncs}) == 3


def test_a_rollout_actor_that_cannot_load_fails_the_first_adapter_sync_with_its_error(tiny_assets, root):
    """The driver does not wait for the actors to load (the trainer starts meanwhile): the loop's first call to
    them, the adapter sync before any rollout, is where a failed load surfaces, with the actor's own error."""
    from transformers import AutoTokenizer

    from uft_ray.rft.driver import start_rollout_actors, stop_rollout_actors
    from uft_ray.rft.rollout import RolloutPool

    cfg = rft_config(tiny_assets, root, "bad-actor")
    cfg.model.path = str(root / "no-such-model")
    actors: list[Any] = []
    try:
        start_rollout_actors(cfg, AutoTokenizer.from_pretrained(tiny_assets["model"]), into=actors)
        assert len(actors) == cfg.rft.rollout.actors
        with pytest.raises(Exception, match="no-such-model"):
            RolloutPool(actors).load_adapter({}, 0)
    finally:
        stop_rollout_actors(actors, close_timeout_s=5.0)
