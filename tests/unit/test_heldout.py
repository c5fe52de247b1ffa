"""Held-out evaluation's pure parts (uft_ray.evaluation.heldout): which rows, and the metrics by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.evaluation import heldout

DEMO = "jobs/configs/demo_tiny.yaml"


def _cfg(*overrides: str):
    return load_config(DEMO, ["model.path=/tmp", *overrides], check_paths=False)


def test_spearman_by_hand():
    assert heldout.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert heldout.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = (1, 2, 3), y = (1.5, 1.5, 3) (a tie shares its mean rank): corr = 0.8660...
    assert heldout.spearman([0.1, 0.2, 0.9], [0.5, 0.5, 0.7]) == pytest.approx(math.sqrt(3) / 2)
    assert heldout.spearman([0.5, 0.5], [0.1, 0.9]) is None  # constant predictions: undefined
    assert heldout.spearman([0.5, 0.5 + 1e-9], [0.1, 0.9], tol=1e-7) is None


def test_holdout_is_seeded_by_row_and_keeps_copies_with_their_row():
    ids = [f"src:{i}" for i in range(2000)]
    held = [i for i in ids if heldout.is_heldout(i, 0.2, 0)]
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == [i for i in ids if heldout.is_heldout(i, 0.2, 0)]  # pure
    assert held != [i for i in ids if heldout.is_heldout(i, 0.2, 1)]  # the seed matters
    assert all(heldout.is_heldout(f"{i}#3", 0.2, 0) for i in held)  # an upsampled copy goes with its row
    assert not heldout.is_heldout("src:1", None, 0)
    rows = heldout.holdout_rows(ids + [f"{held[0]}#1"], ["a"] * 1000 + ["b"] * 1001, 0.2, 0, 5)
    assert len(rows) == 10 and set(rows) <= set(held)  # 5 per source, copies once


def test_metrics_by_hand():
    cfg = _cfg("loss.beta=0.5")
    recs = [  # r = 0.5 (policy - ref)
        {"source": "hs", "kind": "score", "score": 1.0, "policy": -10.0, "ref": -12.0, "n_tokens": 4},  # r = 1
        {"source": "hs", "kind": "score", "score": 0.0, "policy": -12.0, "ref": -10.0, "n_tokens": 4},  # r = -1
        {"source": "uc", "kind": "sft", "score": 1.0, "policy": -6.0, "ref": -6.0, "n_tokens": 3},
        {"source": "uc", "kind": "sft", "score": 1.0, "policy": -2.0, "ref": -4.0, "n_tokens": 1},
    ]
    m = heldout.metrics(recs, cfg)
    s1 = 1 / (1 + math.exp(-1))
    assert m["eval/reward/hs"] == pytest.approx(0.0)
    assert m["eval/score_mse/hs"] == pytest.approx(((s1 - 1) ** 2 + (1 - s1) ** 2) / 2)
    assert m["eval/loss/hs"] == pytest.approx(m["eval/score_mse/hs"])  # UFT: (sigmoid(r) - s)^2
    assert m["eval/score_spearman/hs"] == pytest.approx(1.0)
    assert m["eval/nll/uc"] == pytest.approx((6 + 2) / (3 + 1))  # per token, over the source's tokens
    assert m["eval/reward/uc"] == pytest.approx((0 + 1.0) / 2)
    assert "eval/pair_accuracy/hs" not in m


def test_pair_metrics_count_ties_as_losses():
    from types import SimpleNamespace

    cfg = SimpleNamespace(loss=SimpleNamespace(type="dpo", beta=0.5))  # what metrics reads of a config
    pair = {"source": "p", "kind": "pair", "score": 1.0, "n_tokens": 2, "n_tokens_rejected": 2}
    recs = [
        {**pair, "policy": -1.0, "ref": -1.0, "policy_rejected": -3.0, "ref_rejected": -3.0},  # tie: 0 = 0
        {**pair, "policy": -1.0, "ref": -2.0, "policy_rejected": -3.0, "ref_rejected": -3.0},  # win by 0.5
    ]
    m = heldout.metrics(recs, cfg)
    assert m["eval/pair_accuracy/p"] == 0.5 and m["eval/margin/p"] == pytest.approx(0.25)
    expected = (math.log(2) + math.log(1 + math.exp(-0.5))) / 2  # -log sigmoid(margin)
    assert m["eval/loss/p"] == pytest.approx(expected)


def test_eval_prepare_config_caps_each_source():
    cfg = _cfg("eval.sources.0.name=ultrachat", "eval.sources.0.format=ultrachat_200k", "eval.sources.0.path=/x",
               "eval.max_rows=7")  # fmt: skip
    e = heldout.eval_prepare_config(cfg)
    assert [s.name for s in e.data.sources] == ["ultrachat"] and e.mixture.counts == {"ultrachat": 7}
    assert e.mixture.at_most and not e.mixture.allow_upsample and e.tokenize == cfg.tokenize


def test_eval_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"eval.sources.1.name: 'uc' is used by more than one source"):
        _cfg(*(f"eval.sources.{i}.{k}={v}" for i in (0, 1) for k, v in (("name", "uc"), ("format", "ultrachat_200k"),
                                                                        ("path", "/x"))))  # fmt: skip
    with pytest.raises(ConfigError, match=r"eval.holdout: a fraction"):
        _cfg("eval.holdout=0.9")
    with pytest.raises(ConfigError, match="not both"):
        _cfg("eval.holdout=0.1", "eval.sources.0.name=ultrachat", "eval.sources.0.format=ultrachat_200k",
             "eval.sources.0.path=/x")  # fmt: skip
    with pytest.raises(ConfigError, match="reference.run precompute"):
        _cfg("eval.holdout=0.1", "reference.run=stream")
    assert _cfg("eval.holdout=0.1", "eval.every=4").eval.heldout


def test_at_most_takes_every_row_of_a_smaller_source():
    from uft_ray.data.mixture import plan_take

    take = plan_take("s", np.array([5, 9, 2], dtype=np.uint64), 10, complete=True, allow_upsample=False, at_most=True)
    assert [take.copies(r) for r in (2, 5, 9)] == [1, 1, 1]


def test_holdout_names_each_source_it_holds_nothing_out_of():
    ids = [f"big:{i}" for i in range(400)] + ["small:0", "small:1"]
    sources = ["big"] * 400 + ["small"] * 2
    small = [rid for rid in ids[400:] if heldout.is_heldout(rid, 0.05, 0)]
    assert not small  # the seed-0 hashes of both small rows lie above 0.05: the source gets no held-out row
    warnings = heldout.check_holdout(ids + ["small:0#1"], sources + ["small"], 0.05, 0)
    assert len(warnings) == 1  # the big source gets its share; the upsampled copy is not a row of its own
    assert "'small'" in warnings[0] and "2 rows" in warnings[0] and "0 held out" in warnings[0]
    assert "eval.holdout" in warnings[0]


def test_holdout_that_holds_out_no_row_at_all_is_refused():
    ids, sources = ["a:0", "a:1", "c:0"], ["a", "a", "c"]
    assert not any(heldout.is_heldout(rid, 0.05, 0) for rid in ids)  # their hashes lie above 0.27
    with pytest.raises(ConfigError, match=r"eval.holdout: 0.05 holds out no row of any source") as e:
        heldout.check_holdout(ids, sources, 0.05, 0)
    assert "'a' 2 rows" in str(e.value) and "'c' 1 row" in str(e.value)
    assert "raise eval.holdout" in str(e.value) and "eval.sources" in str(e.value)
    assert heldout.check_holdout(ids, sources, 0.5, 0) == []  # a fraction that reaches every source: no warning


def test_heldout_plan_puts_each_ranks_share_in_order_at_step_0():
    ids = [f"r{i}" for i in (5, 1, 4, 2, 3)]
    t = heldout.heldout_plan(ids, 2)
    got = list(zip(*(t[c].to_pylist() for c in ("row_id", "rank", "epoch", "step", "micro", "slot")), strict=True))
    share0, share1 = heldout.rank_share(ids, 0, 2), heldout.rank_share(ids, 1, 2)
    assert share0 == ["r1", "r3", "r5"] and share1 == ["r2", "r4"]
    want = [(r, rank, 0, 0, 0, k) for rank, share in enumerate((share0, share1)) for k, r in enumerate(share)]
    assert got == want
    assert heldout.heldout_plan(ids[:1], 3)["rank"].to_pylist() == [0]  # ranks 1 and 2: no rows
