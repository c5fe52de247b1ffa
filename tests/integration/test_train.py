"""Distributed UFT training end to end: real local Ray, 2 CPU workers on gloo, DeepSpeed ZeRO-3, LoRA,
the tiny model, the project's UltraChat + HelpSteer2 samples through the real data plane and reference service.

Runs are shared between tests through module fixtures (each fit costs ~30 s on 2 cores); the workers record
what they did through test hooks (tests/fixtures/recorder.py):
- `uft20`: 20 steps (2 epochs of 40 rows, global batch 4), checkpoints every 5; tests 1, 2, 3 and 5 read it.
- `interrupted`: the same config, a worker killed by its pid after step 6 (FailureConfig restarts from
  checkpoint 5), then stopped after step 10 and rerun to the end (tests 3 and 4).
- `one_worker` / `adapter_off`: 2 steps with 1 worker x micro-batch 4, a checkpoint after each (test 5 reads its
  first step; it is also the sweep's beta-0.1 run in turn); one step with micro-batch 1 x accumulation 4 and
  `reference.mode: adapter_off` (test 5: two invariances in one run).
- The sequential recipe (stage 2 against base + stage-1 adapter) runs in tests/integration/test_evidence.py (the forgetting recipe's two-stage arms, through `uft-ray compare`).
- `dpo` / `dpo_accumulated`, `kto` / `kto_accumulated`: 2 steps on HelpSteer2 pairs / binary rows, 2 workers x
  micro-batch 2, and 2 workers x micro-batch 1 x accumulation 2 on the same prepared rows (recipes).
- `sweep`: two runs with different `loss.beta` sharing one prepared directory at the same time; `one_worker` is
  the first of them in turn (test 7).

Run: `pytest tests/integration/test_train.py -q` (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures.eval_tasks import MC, write_local_tasks
from fixtures.recorder import Recorder
from safetensors.torch import load_file

from uft_ray import driver
from uft_ray.config import SourceConfig
from uft_ray.data import prepared as prep
from uft_ray.driver import RunResult
from uft_ray.run_dir import read_metrics
from uft_ray.train.plan import load_plan

pytestmark = pytest.mark.integration

SOURCES = ("ultrachat", "helpsteer2")
DESIGN_METRICS = ["loss", "tokens_per_s", "samples_per_s", "padding_frac", "data_wait_frac", "step_time_s", "lr"]
DESIGN_METRICS += ["grad_norm"]
PER_SOURCE = ["loss/{}", "reward/{}", "score_pred/{}", "score_target/{}", "logp/{}", "kl/{}"]
PER_SOURCE += ["mixture/{}/target", "mixture/{}/step", "mixture/{}/cumulative"]


# ---------------------------------------------------------------------------------------------------------
# Reading a run directory


def metrics(run_dir: str) -> list[dict[str, Any]]:
    """The optimizer steps' rows (a run with held-out rows also logs its baseline evaluation as step 0)."""
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["step"] > 0]


def consumed(run_dir: str, rank: int) -> list[tuple[int, int, list[str]]]:
    with open(os.path.join(run_dir, "debug", f"consumed_rank{rank}.jsonl")) as f:
        return [(r["step"], r["micro"], r["row_ids"]) for r in map(json.loads, f)]


def attempts(run_dir: str, rank: int) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "debug", f"attempts_rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def checkpoint(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"checkpoint_{step:06d}")


def planned(run_dir: str, rank: int) -> list[tuple[int, int, list[str]]]:
    """The plan's micro-batches of `rank` as (1-based step, micro, row ids), in plan order."""
    t = pq.read_table(os.path.join(run_dir, "plan.parquet")).to_pandas()
    t = t[t["rank"] == rank].sort_values(["step", "micro", "slot"])
    return [(int(s) + 1, int(m), list(g.row_id)) for (s, m), g in t.groupby(["step", "micro"], sort=True)]


# ---------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def uft20(make_config, uft_prepared, tiny_assets) -> RunResult:
    # Held-out rows from each source's own split, evaluated before the first step and every 10 (ZeRO-3: the
    # evaluation's forwards are collectives too).
    held_out = [
        {"name": "ultrachat", "format": "ultrachat_200k", "path": tiny_assets["ultrachat_200k_test"]},
        {"name": "helpsteer2", "format": "helpsteer2", "path": tiny_assets["helpsteer2_validation"]},
    ]
    cfg = make_config("uft20", eval={"sources": held_out, "every": 10, "max_rows": 5})
    return driver.run(cfg, prepared_dir=uft_prepared, hooks=Recorder(cfg.output.run_dir))


@pytest.fixture(scope="module")
def interrupted(make_config, uft_prepared) -> tuple[RunResult, dict[str, Any]]:
    """The uft20 config interrupted both ways in one run (each fit costs ~30 s): rank 1 parks after step 6 and
    this test kills it by its pid; FailureConfig's one retry restarts from checkpoint 5; the restarted run stops
    after step 10 (a second failure: the fit fails), and a rerun with the same name continues from checkpoint 10
    to step 20."""
    cfg = make_config("interrupted", train={"max_failures": 1})
    run = Path(cfg.output.run_dir)
    seen: dict[str, Any] = {}

    def kill_when_paused() -> None:
        # Ray Train registers a reported checkpoint when its controller next polls the workers: wait for that
        # (the snapshot names it), else the restart would rightly begin from the previous checkpoint.
        deadline = time.time() + 600
        snapshot = run / "checkpoints" / "checkpoint_manager_snapshot.json"
        while time.time() < deadline:
            paused = run / "debug" / "paused_rank1.json"
            if paused.exists() and snapshot.exists() and "checkpoint_000005" in snapshot.read_text():
                seen.update(json.loads(paused.read_text()))
                os.kill(seen["pid"], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_paused, daemon=True)
    killer.start()
    hooks = Recorder(cfg.output.run_dir, pause={"rank": 1, "step": 6}, stop_after_step=10)
    with pytest.raises(Exception, match="stopping after step 10"):
        driver.run(cfg, prepared_dir=uft_prepared, hooks=hooks)
    killer.join(timeout=5)
    return driver.run(cfg, prepared_dir=uft_prepared, hooks=Recorder(cfg.output.run_dir)), seen


# 2 steps: the first for the batch-shape tests, the second for the sweep (beta shows after an update).
ONE_WORKER = {"num_workers": 1, "micro_batch_size": 4, "max_steps": 2, "checkpoint_every": 1, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def one_worker(make_config, uft_prepared) -> RunResult:
    return driver.run(make_config("w1-mb4", train=ONE_WORKER), prepared_dir=uft_prepared)


@pytest.fixture(scope="module")
def zero0(make_config, uft_prepared) -> RunResult:
    """uft20's first step with ZeRO-0 (no parameter sharding), what `zero_stage: auto` picks for a small base."""
    cfg = make_config("zero0", train={"max_steps": 1, "deepspeed": {"zero_stage": 0}})
    return driver.run(cfg, prepared_dir=uft_prepared, hooks=Recorder(cfg.output.run_dir))


@pytest.fixture(scope="module")
def adapter_off(make_config, uft_prepared) -> RunResult:
    """`one_worker`'s first step (micro-batch 4) as micro-batch 1 x accumulation 4, with the reference as the
    policy's own forward with LoRA disabled: one run for both invariances (each fit costs ~25 s)."""
    cfg = make_config(
        "w1-mb1-ga4-adapter-off",
        train={"num_workers": 1, "micro_batch_size": 1, "grad_accum": 4, "max_steps": 1, "warmup_ratio": 0.0},
        reference={"mode": "adapter_off"},
    )
    return driver.run(cfg, prepared_dir=uft_prepared)


def _helpsteer2_run(make_config, tiny_assets, name: str, loss: str, kind: str, **train: Any) -> Any:
    source = {"name": "helpsteer2", "format": "helpsteer2", "kind": kind, "path": tiny_assets["helpsteer2_train"]}
    return make_config(
        name,
        data={"sources": [source]},
        mixture={"counts": {"helpsteer2": 8}},
        tokenize={"max_prompt_len": 96, "max_len": 160},
        loss={"type": loss},
        train={"max_steps": 2, "epochs": 1, "warmup_ratio": 0.0, **train},
    )


@pytest.fixture(scope="module")
def dpo(make_config, tiny_assets) -> RunResult:
    cfg = _helpsteer2_run(make_config, tiny_assets, "dpo", "dpo", "pair", packing=True)
    cfg.eval.sources = [SourceConfig("helpsteer2", "helpsteer2", tiny_assets["helpsteer2_validation"], kind="pair")]
    cfg.eval.max_rows = 4
    # and a benchmark after training: a local lm_eval task (tests/fixtures/eval_tasks.py), 4 docs
    cfg.eval.tasks, cfg.eval.limit = [MC], 4
    cfg.eval.include_path = str(write_local_tasks(Path(cfg.output.run_dir).parent / "lm-eval-tasks"))
    return driver.run(cfg)


@pytest.fixture(scope="module")
def dpo_accumulated(make_config, tiny_assets, dpo) -> RunResult:
    # padded (the dpo and kto runs pack): accumulation and packing must each leave the numbers alone
    cfg = _helpsteer2_run(
        make_config, tiny_assets, "dpo-ga2", "dpo", "pair", micro_batch_size=1, grad_accum=2, packing=False
    )
    return driver.run(cfg, prepared_dir=os.path.join(dpo.run_dir, "prepared"))


@pytest.fixture(scope="module")
def una_bce(make_config, tiny_assets) -> RunResult:
    cfg = _helpsteer2_run(make_config, tiny_assets, "una_bce", "una_bce", "score")
    cfg.mixture.counts = {"helpsteer2": 12}
    cfg.eval.holdout, cfg.eval.every = 0.25, 1  # a seeded share of the training source, evaluated every step
    return driver.run(cfg)


@pytest.fixture(scope="module")
def kto(make_config, tiny_assets) -> RunResult:
    return driver.run(_helpsteer2_run(make_config, tiny_assets, "kto", "kto", "binary", packing=True))


@pytest.fixture(scope="module")
def kto_accumulated(make_config, tiny_assets, kto) -> RunResult:
    cfg = _helpsteer2_run(
        make_config, tiny_assets, "kto-ga2", "kto", "binary", micro_batch_size=1, grad_accum=2, packing=False
    )
    return driver.run(cfg, prepared_dir=os.path.join(kto.run_dir, "prepared"))


# ---------------------------------------------------------------------------------------------------------
# 1. UFT over UltraChat + HelpSteer2 for 20 steps


def test_uft_run_rewards_start_at_zero_and_loss_falls(uft20):
    rows = metrics(uft20.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for s in SOURCES:  # step 1's rewards come from the forward before the first update: policy == reference
        assert abs(rows[0][f"reward/{s}"]) < 1e-4
        assert abs(rows[0][f"kl/{s}"]) < 1e-5
    epoch1 = np.mean([r["loss"] for r in rows if r["epoch"] == 0])
    epoch2 = np.mean([r["loss"] for r in rows if r["epoch"] == 1])
    assert epoch2 < 0.85 * epoch1, (epoch1, epoch2)  # the same 40 rows, seen again after 10 updates
    assert rows[-1]["lr"] < rows[2]["lr"]  # cosine decay after warmup


def test_uft_run_trains_every_lora_parameter_and_no_base_parameter(uft20):
    debug = Path(uft20.run_dir) / "debug"
    start = json.loads((debug / "digests_start.json").read_text())
    end = json.loads((debug / "digests_end.json").read_text())["digests"]
    assert start["sharded_at_load"]  # ZeRO-3 partitioned every parameter as from_pretrained loaded it
    start = start["digests"]
    lora = [k for k in start if "lora_" in k]
    base = [k for k in start if "lora_" not in k]
    assert len(lora) == 2 * 7 * 2  # A and B, 7 target modules, 2 layers
    assert [k for k in lora if start[k] == end[k]] == []
    assert [k for k in base if start[k] != end[k]] == []


def test_uft_run_metrics_file_has_every_design_metric(uft20):
    names = DESIGN_METRICS + [p.format(s) for p in PER_SOURCE for s in SOURCES] + [f"rows/{s}" for s in SOURCES]
    for row in metrics(uft20.run_dir):
        missing = [n for n in names if n not in row]
        assert not missing, (row["step"], missing)
        assert all(np.isfinite(row[n]) for n in names)
        assert 0 <= row["padding_frac"] < 1 and 0 <= row["data_wait_frac"] <= 1 and row["tokens_per_s"] > 0


def test_uft_run_logs_the_saturated_share_of_sft_rows_and_kappa_on_its_first_step(uft20):
    from uft_ray.config import load_config

    beta = load_config(str(Path(uft20.run_dir) / "config.yaml"), check_paths=False).loss.beta
    rows = metrics(uft20.run_dir)
    assert all(0.0 <= r["saturated/ultrachat"] <= 1.0 for r in rows)
    assert rows[0]["saturated/ultrachat"] == 0.0  # r = 0 before the first update: sigmoid(r) = 0.5
    assert not any("saturated/helpsteer2" in r or "kappa/helpsteer2" in r for r in rows)  # scored rows only
    # step 1: the policy is the reference, so kappa = -beta * logp_ref = -beta * logp (means over the same rows)
    assert rows[0]["kappa/ultrachat"] == pytest.approx(-beta * rows[0]["logp/ultrachat"], rel=1e-3)
    assert not any("kappa/ultrachat" in r for r in rows[1:])


def test_uft_run_realized_mixture_matches_target_within_one_batch(uft20):
    batch = 4
    for row in metrics(uft20.run_dir):
        done = row["step"] * batch
        for s in SOURCES:
            assert row[f"mixture/{s}/target"] == pytest.approx(0.5)
            realized = row[f"mixture/{s}/cumulative"] * done
            assert abs(realized - 0.5 * done) <= batch, (row["step"], s, realized)
    assert sum(row["rows/ultrachat"] for row in metrics(uft20.run_dir)) == 40  # 20 rows x 2 epochs


def test_uft_run_each_rank_trains_exactly_its_plan_in_order(uft20):
    for rank in (0, 1):
        assert consumed(uft20.run_dir, rank) == planned(uft20.run_dir, rank)


def test_uft_run_directory_layout(uft20):
    run = Path(uft20.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "plan.parquet", "quarantine/counts.json", "adapter"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint_0*")) == [
        f"checkpoint_{s:06d}" for s in (5, 10, 15, 20)
    ]
    state = json.loads((Path(checkpoint(uft20.run_dir, 20)) / "state.json").read_text())
    assert state["step"] == 20 and state["consumed"] == {"ultrachat": 40, "helpsteer2": 40}
    assert uft20.metrics["step"] == 20 and uft20.checkpoint_dir == checkpoint(uft20.run_dir, 20)


# ---------------------------------------------------------------------------------------------------------
# 2. The saved adapter is the trained policy


def test_saved_adapter_loads_with_peft_and_gives_the_trained_policy_logprobs(uft20, uft_prepared, tiny_assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uft_ray.data.prepared import read_rows as read_prepared
    from uft_ray.logprobs import model_sequence_logprobs

    config = json.loads((Path(uft20.adapter_dir) / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    AutoTokenizer.from_pretrained(uft20.adapter_dir)  # the tokenizer is saved beside the adapter
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), uft20.adapter_dir)
    model.eval()
    rows = read_prepared(uft_prepared, ["row_id", "input_ids", "response_start"]).to_pylist()
    by_id = {r["row_id"]: r for r in rows}
    for rank in (0, 1):
        final = json.loads((Path(uft20.run_dir) / "debug" / f"final_logp_rank{rank}.json").read_text())
        batch = [by_id[i] for i in final["row_ids"]]
        longest = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            attention[i, : len(r["input_ids"])] = 1
            loss_mask[i, r["response_start"] : len(r["input_ids"])] = 1
        with torch.no_grad():
            logp, _ = model_sequence_logprobs(model, ids, attention, loss_mask)
        np.testing.assert_allclose(logp.double().numpy(), final["logp"], rtol=0, atol=1e-4)
    # ...and it is not the base model's
    with torch.no_grad(), model.disable_adapter():
        base_logp, _ = model_sequence_logprobs(model, ids, attention, loss_mask)
    assert np.abs(base_logp.double().numpy() - np.array(final["logp"])).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# 3. Exact resume


def test_resume_consumes_the_same_rows_in_order_and_ends_with_the_same_adapter(interrupted, uft20):
    result, _ = interrupted
    for rank in (0, 1):
        assert [a["start_step"] for a in attempts(result.run_dir, rank)] == [0, 5, 10]  # the kill, the rerun
        got = consumed(result.run_dir, rank)
        assert [(s, m) for s, m, _ in got] == [(s, 0) for s in range(1, 21)]  # nothing twice, nothing skipped
        assert got == consumed(uft20.run_dir, rank)
    for step in (10, 20):  # where the rerun began, and the end
        a, b = (
            adapter(checkpoint(result.run_dir, step) + "/adapter"),
            adapter(checkpoint(uft20.run_dir, step) + "/adapter"),
        )
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    ra, rb = metrics(result.run_dir), metrics(uft20.run_dir)
    assert [r["step"] for r in ra] == list(range(1, 21))
    np.testing.assert_allclose([r["loss"] for r in ra], [r["loss"] for r in rb], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 4. A worker killed by its pid


def test_killed_worker_run_completes_from_last_checkpoint(interrupted):
    result, seen = interrupted
    assert seen.get("step") == 6
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))  # lines after each restart's checkpoint rewritten once
    assert result.metrics["step"] == 20
    for rank in (0, 1):
        starts = [a["start_step"] for a in attempts(result.run_dir, rank)]
        assert starts == [0, 5, 10], starts
        assert consumed(result.run_dir, rank) == planned(result.run_dir, rank)
    assert attempts(result.run_dir, 1)[0]["pid"] == seen["pid"] != attempts(result.run_dir, 1)[1]["pid"]
    assert os.path.exists(os.path.join(result.adapter_dir, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# 5. Batch-shape invariance of the first step


def test_first_step_loss_same_for_one_and_two_workers(one_worker, uft20):
    w1, w2 = metrics(one_worker.run_dir)[0], metrics(uft20.run_dir)[0]
    assert w1["loss"] == pytest.approx(w2["loss"], rel=1e-6, abs=1e-7)
    # The same gradient too: DeepSpeed averages ranks' gradients into the global-batch gradient.
    assert w1["grad_norm"] == pytest.approx(w2["grad_norm"], rel=1e-4)


def test_zero3_is_exact_against_zero0_on_the_first_step(zero0, uft20):
    """The same 2 workers and rows: ZeRO-3 (sharded base, gathered per layer) and ZeRO-0 (every rank holds it)
    give the same loss and gradient; ZeRO-0 does not shard at load."""
    a, b = metrics(zero0.run_dir)[0], metrics(uft20.run_dir)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    start = json.loads((Path(zero0.run_dir) / "debug" / "digests_start.json").read_text())
    assert not start["sharded_at_load"]
    assert (
        start["digests"] == json.loads((Path(uft20.run_dir) / "debug" / "digests_start.json").read_text())["digests"]
    )


def test_adapter_off_reference_trains_the_same_first_step_as_the_actor_cache(adapter_off, one_worker):
    a, b = metrics(adapter_off.run_dir)[0], metrics(one_worker.run_dir)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert abs(a["reward/helpsteer2"]) < 1e-4  # policy == reference before the first update, by construction


def test_micro_batch_1_x_accumulation_4_equals_micro_batch_4_x_accumulation_1(adapter_off, one_worker):
    a, b = metrics(adapter_off.run_dir)[0], metrics(one_worker.run_dir)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert a["lr"] == b["lr"] > 0  # the first step's rate, whatever the schedule's length
    assert a["padding_frac"] == 0.0  # micro-batch 1 never pads
    # Adam's first step is lr * g / (|g| + eps): about lr * sign(g), so float noise in a near-zero g shows at
    # ~1e-4 * lr, while a dropped or double-counted micro-batch flips signs (2 * lr). Scale errors, which the
    # sign hides, show in grad_norm above.
    after_a, after_b = adapter(adapter_off.adapter_dir), adapter(checkpoint(one_worker.run_dir, 1) + "/adapter")
    changed = 0
    for k in after_a:
        torch.testing.assert_close(after_a[k], after_b[k], rtol=0, atol=1e-3 * 1e-2)
        changed += int((after_b[k] != 0).any()) if "lora_B" in k else 0
    assert changed == 14  # the first update moved every B matrix (A gets no gradient while B is 0)


# ---------------------------------------------------------------------------------------------------------
# Recipes: DPO on HelpSteer2 pairs


def test_dpo_first_step_loss_is_log_2(dpo):
    first, second = metrics(dpo.run_dir)
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)  # r_chosen == r_rejected == 0 before any update
    assert abs(first["reward/helpsteer2"]) < 1e-4 and abs(first["reward_margin/helpsteer2"]) < 1e-4
    assert second["loss"] != first["loss"] and "accuracy/helpsteer2" in second
    assert os.path.exists(os.path.join(dpo.adapter_dir, "adapter_model.safetensors"))


@pytest.mark.parametrize("loss_type", ["una_bce", "kto"])
def test_una_bce_and_kto_first_step_losses_at_zero_reward(loss_type, request):
    """At r = 0 (LoRA B = 0, policy == reference), worked by hand:

    una_bce: -[s log sigmoid(0) + (1 - s) log sigmoid(0)] = -log(1/2) = log 2 for every s.
    kto: z = max(0, mean log-ratio) = 0; desirable 1 - sigmoid(0 - 0) = 1/2, undesirable 1 - sigmoid(0 - 0) = 1/2.
    """
    result = request.getfixturevalue(loss_type)
    first, second = metrics(result.run_dir)
    expected = {"una_bce": np.log(2), "kto": 0.5}[loss_type]
    assert first["loss"] == pytest.approx(expected, abs=1e-6)
    assert abs(first["reward/helpsteer2"]) < 1e-4
    assert first["lr"] > 0 and abs(second["reward/helpsteer2"]) > 1e-6  # the first update moved the policy
    assert os.path.exists(os.path.join(result.adapter_dir, "adapter_model.safetensors"))


@pytest.mark.parametrize("loss_type", ["dpo", "kto"])
def test_accumulation_and_packing_do_not_change_dpo_or_kto(loss_type, request):
    """2 workers x micro-batch 2, packed (DPO: each pair's prompt computed once) == 2 workers x micro-batch 1 x
    accumulation 2, padded, on the same rows: only the split of each rank's rows into micro-batches and their
    layout change. Step 2 is the one that can tell: after the first update r != 0, and KTO's reference point z (the
    global batch's mean log-ratio, clamped at 0) must be one value per optimizer step, not one per micro-batch, or
    its loss and gradient move with `grad_accum`."""
    whole = metrics(request.getfixturevalue(loss_type).run_dir)
    split = metrics(request.getfixturevalue(f"{loss_type}_accumulated").run_dir)
    assert [r["step"] for r in split] == [1, 2]
    assert all(r["padding_frac"] == 0.0 for r in whole)  # one packed sequence per micro-batch: no padding
    for a, b in zip(split, whole, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    assert abs(whole[1]["reward/helpsteer2"]) > 1e-6  # step 2 sees a moved policy
    if loss_type == "kto":
        # r == 0 at step 1, up to the rounding of two layouts (the cache's packing and the step's): z clamps at 0
        assert whole[0]["kto_z"] == pytest.approx(0.0, abs=1e-6) and split[0]["kto_z"] == pytest.approx(0.0, abs=1e-6)
        assert split[1]["kto_z"] == pytest.approx(whole[1]["kto_z"], rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------
# 7. A sweep: runs share one prepared directory, at the same time


def _tree_digest(root: str) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and p.name != "summary.json"  # the reference service's entry is merged into it
    }


@pytest.fixture(scope="module")
def sweep(make_config, uft_prepared, train_root, one_worker) -> dict[str, Any]:
    """beta 0.1 and 0.5, `one_worker`'s 2 steps on 1 worker each, from `uft_prepared` with a fresh reference
    cache, both at once (both miss the cache and race to publish it); beta 0.1 again in turn is `one_worker`
    (the module's cache)."""
    cache = str(train_root / "sweep-cache")
    before = _tree_digest(uft_prepared)

    def cfg(name: str, beta: float):
        return make_config(name, loss={"type": "uft", "beta": beta}, reference={"cache_dir": cache}, train=ONE_WORKER)

    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def go(name: str, beta: float) -> None:
        try:
            results[name] = driver.run(cfg(name, beta), prepared_dir=uft_prepared)
        except BaseException as e:  # surfaced by the fixture, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=go, args=(f"sweep-{b}", b)) for b in (0.1, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    if errors:
        raise errors[0]
    results["after-0.1"] = one_worker  # the same config but its run name and reference cache
    return {"results": results, "before": before, "after": _tree_digest(uft_prepared), "cache": cache}


def test_sweep_runs_share_a_prepared_directory_at_once_with_the_numbers_of_runs_in_turn(sweep, uft_prepared):
    runs = sweep["results"]
    assert sweep["after"] == sweep["before"]  # no run rewrote the prepared rows or quarantine
    published = list(Path(sweep["cache"], "ref_logp").glob("*/manifest.json"))
    assert len(published) == 1  # both concurrent runs scored; one cache was kept
    together, in_turn = metrics(runs["sweep-0.1"].run_dir), metrics(runs["after-0.1"].run_dir)
    assert [r["step"] for r in together] == [r["step"] for r in in_turn] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in together], [r["loss"] for r in in_turn], rtol=1e-5)
    a, b = adapter(runs["sweep-0.1"].adapter_dir), adapter(runs["after-0.1"].adapter_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    low, high = metrics(runs["sweep-0.1"].run_dir), metrics(runs["sweep-0.5"].run_dir)
    assert low[0]["loss"] == pytest.approx(high[0]["loss"], rel=1e-6)  # r == 0 at step 1: beta does not matter
    assert abs(low[-1]["loss"] - high[-1]["loss"]) > 1e-4  # and then it does: two different runs


# ---------------------------------------------------------------------------------------------------------
# Held-out metrics (uft_ray.evaluation.heldout)


def test_heldout_metrics_start_at_zero_reward_and_the_sft_nll_falls(uft20):
    rows = read_metrics(uft20.metrics_path)
    evals = {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}
    assert sorted(evals) == [0, 10, 20]  # the baseline, every eval.every steps, the end
    base = evals[0]
    # policy == reference: r = 0 up to fp32 rounding between the cached reference forward and this one
    assert abs(base["eval/reward/ultrachat"]) < 1e-6 and abs(base["eval/reward/helpsteer2"]) < 1e-6
    # score_mse before the first update is mean((0.5 - s)^2) over the held-out HelpSteer2 rows (sigmoid(0) = 0.5)
    held = prep.read_rows(os.path.join(uft20.run_dir, "prepared_eval"), ["source", "score", "row_id"]).to_pylist()
    scores = [r["score"] for r in held if r["source"] == "helpsteer2"]
    assert 0 < len(scores) <= 5
    assert base["eval/score_mse/helpsteer2"] == pytest.approx(np.mean([(0.5 - s) ** 2 for s in scores]), rel=1e-5)
    assert "eval/score_spearman/helpsteer2" not in base  # every prediction is 0.5: undefined, not logged
    assert evals[20]["eval/nll/ultrachat"] < base["eval/nll/ultrachat"]
    assert evals[20]["eval/reward/ultrachat"] > 0  # instruction rows' reward climbs on held-out rows too
    assert {"eval/loss/ultrachat", "eval/loss/helpsteer2", "eval/score_spearman/helpsteer2"} <= set(evals[20])
    planned = set(load_plan(uft20.plan_path).table.column("row_id").to_pylist())
    assert not planned & {r["row_id"] for r in held}


def test_heldout_pairs_start_with_no_wins(dpo):
    base = read_metrics(dpo.metrics_path)[0]
    assert base["step"] == 0
    assert base["eval/pair_accuracy/helpsteer2"] == 0.0  # r_chosen == r_rejected == 0: a tie is not a win
    assert abs(base["eval/margin/helpsteer2"]) < 1e-6 and abs(base["eval/reward/helpsteer2"]) < 1e-6
    assert base["eval/loss/helpsteer2"] == pytest.approx(np.log(2), abs=1e-6)
    assert "eval/pair_accuracy/helpsteer2" in read_metrics(dpo.metrics_path)[-1]


def test_eval_tasks_run_on_the_final_adapter_and_reach_the_report(dpo):
    summary = json.loads(Path(dpo.run_dir, "eval", "summary.json").read_text())
    acc = summary["tasks"][MC]["acc,none"]
    assert 0.0 <= acc <= 1.0 and summary["adapter"].startswith(dpo.run_dir)
    report = Path(dpo.report_path).read_text()
    assert "Benchmarks (lm_eval)" in report and MC in report
    assert "alt='heldout'" in report  # the held-out plot


def test_holdout_rows_never_reach_the_plan(una_bce):
    from uft_ray.evaluation.heldout import holdout_rows

    rows = prep.read_rows(os.path.join(una_bce.run_dir, "prepared"), ["row_id", "source", "score"]).to_pylist()
    held = set(holdout_rows([r["row_id"] for r in rows], [r["source"] for r in rows], 0.25, 0, 256))
    planned = set(load_plan(una_bce.plan_path).table.column("row_id").to_pylist())
    assert held and planned and not held & planned
    base = read_metrics(una_bce.metrics_path)[0]
    scores = [r["score"] for r in rows if r["row_id"] in held]
    assert base["eval/score_mse/helpsteer2"] == pytest.approx(np.mean([(0.5 - s) ** 2 for s in scores]), rel=1e-5)
    assert [r["step"] for r in read_metrics(una_bce.metrics_path)] == [0, 1, 2]
