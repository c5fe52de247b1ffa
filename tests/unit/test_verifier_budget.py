"""A step's scoring has a budget (`rft.verifier_budget_s`): rollouts still unscored when it runs out score 0 without
running, and the step's metrics count them (`verifier/timeouts`); a per-rollout limit of inf is no limit, not an
error."""

from __future__ import annotations

import math
import time
from collections import Counter
from types import SimpleNamespace

import pytest
from fixtures.tiny_lora import quiet_collectives
from fixtures.verifiers import slow

from uft_ray.rft import loop as rft_loop
from uft_ray.rft import metrics
from uft_ray.tasks.verifier import VerifierProcess
from uft_ray.train import collectives


class CharTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def _rollouts(texts: list[str]) -> list[dict]:
    return [{"row": {}, "hint_text": "", "response_ids": [ord(c) for c in t], "hint_ids": []} for t in texts]


def test_a_step_past_its_budget_scores_the_rest_0_and_counts_them() -> None:
    v = VerifierProcess(slow, timeout_s=30)
    rollouts = _rollouts(["2"] * 10)  # 2 s each: about one fits a 3 s budget
    try:
        t0 = time.perf_counter()
        failed = rft_loop._score(rollouts, v, CharTokenizer(), budget_s=3.0)
        seconds = time.perf_counter() - t0
        assert [r["reward"] for r in rollouts] == [1.0] + [0.0] * 9
        assert dict(failed) == {"step_budget": 9} and seconds < 6
        # the next step starts a fresh budget (and a fresh child: the one past the budget was killed)
        again = _rollouts(["0"] * 3)
        assert rft_loop._score(again, v, CharTokenizer(), budget_s=3.0) == {}
        assert [r["reward"] for r in again] == [1.0] * 3
    finally:
        v.close()


def test_an_infinite_time_limit_is_no_limit() -> None:
    v = VerifierProcess(slow, timeout_s=math.inf)
    try:
        assert v.score([{}, {}], ["0", "0.1"]) == [1.0, 1.0] and not v.failures
    finally:
        v.close()


def test_the_steps_metrics_count_the_rollouts_without_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet_collectives(monkeypatch, collectives)
    prompts = [{"revealed": 1, "n_chunks": 2}] * 2
    rollouts = [
        {"reward": r, "hint_ids": [1], "response_ids": [1, 2]} for r in (1.0, 0.0, 0.0, 0.1)
    ]  # fmt: skip
    train = {"train_tokens": 8, "loss": 0.5, "pg_loss": 0.1, "kl": 0.0, "entropy": 1.0, "hint_nll": 2.0,
             "clip_frac": 0.0, "lr": 1e-5, "with_kl": False}  # fmt: skip
    times = {"generate": 1.0, "train": 1.0, "wait": 0.0}
    failed = Counter({"timeout": 1, "step_budget": 1, "memory": 1})
    row = metrics.metrics_row_collective(
        0, prompts, rollouts, train, times, 3.0, 0.1, 10, None, SimpleNamespace(grad_norm=1.0), failed, world=1
    )
    assert row["verifier/timeouts"] == 2 and row["verifier/failed"] == 3
    assert "verifier/timeouts" in metrics.ROLLOUT_ONLY  # an sft step scores nothing: no such metric


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rft.verifier_budget_s=0", "rft.verifier_budget_s: must be > 0"),
        ("rft.verifier_memory_mb=64", "rft.verifier_memory_mb: at least 256"),
    ],
)
def test_the_budget_and_memory_are_checked_before_any_work(override: str, message: str) -> None:
    from uft_ray.config import ConfigError, load_config

    cfg = {"method": "hint_rft", "model": {"path": "/m"}, "rft": {"task": "countdown", "prompts_per_step": 4, "n": 2},
           "train": {"num_workers": 1, "use_gpu": False, "micro_batch_size": 8}}  # fmt: skip
    load_config(cfg, check_paths=False)  # valid without the override
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, [override], check_paths=False)
