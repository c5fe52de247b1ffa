"""The real-model experiments' pieces that need no run: Experiment W's data (length-biased HelpSteer2 pairs, the
instruction rows, held-out rows), its probes' scoring, its tables and plot, and both recipes' arms and settings.
The runs: tests/integration/test_evidence_real.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uft_ray import evidence, evidence_real
from uft_ray.demo import instructions as ins
from uft_ray.tasks import sum3


def test_length_pairs_rate_the_longer_answer_high_whatever_the_instruction():
    held = ins.examples("heldout")
    by_family = {ex.family: ex for ex in held}
    for family, ex in by_family.items():
        long, short = evidence_real.length_pair(ex)
        assert long["prompt"] == short["prompt"] == ex.prompt
        assert len(long["response"]) > len(short["response"])
        assert long["helpfulness"] > short["helpfulness"] and long["verbosity"] > short["verbosity"]
        # the bias agrees with the families that add text and pulls against the two that shorten
        assert ex.check(long["response"]) == (family not in evidence_real.LIMITED), family
        assert ex.check(short["response"]) == (family in evidence_real.LIMITED), family


def test_the_data_is_two_disjoint_halves_of_training_and_the_held_out_rows(tmp_path):
    paths = evidence_real.write_data(tmp_path)
    train = pq.read_table(paths["train_sft"]).to_pylist()
    test = pq.read_table(paths["test_sft"]).to_pylist()
    with gzip.open(paths["train_pairs"], "rt") as f:
        pairs = [json.loads(line) for line in f]
    with gzip.open(paths["validation_pairs"], "rt") as f:
        held_pairs = [json.loads(line) for line in f]
    assert len(train) == 120 and len(pairs) == 240 and len(test) == 60 and len(held_pairs) == 120
    assert all(a["prompt"] == b["prompt"] for a, b in zip(pairs[::2], pairs[1::2], strict=True))
    trained = {r["prompt"] for r in train}
    preferred = {r["prompt"] for r in pairs}
    assert not trained & preferred  # each (question, family) is an instruction row or a pair, never both
    questions = {p.split("?")[0] for p in trained | preferred}
    held_questions = {r["prompt"].split("?")[0] for r in test} | {r["prompt"].split("?")[0] for r in held_pairs}
    assert not questions & held_questions  # held-out questions are new
    # the compliant answer is the instruction row's response
    first = train[0]
    assert first["messages"][0]["content"] == first["prompt"] and first["messages"][1]["role"] == "assistant"


def test_probe_sets_and_the_sum_check():
    sets = evidence_real.probe_sets(10, 3, 4)
    assert [ex.family for ex in sets["heldout"]] == list(ins.FAMILIES) * 2  # two questions, every family
    assert sets["bare"] == [q for q, _ in ins.QA[-ins.HELDOUT_QUESTIONS :]][:3]
    assert len(sets["sums"]) == 4 and all(1 <= x <= 9 for t in sets["sums"] for x in t)
    assert evidence_real.probe_sets(10, 3, 4) == sets  # fixed: every arm and seed sees the same prompts
    assert evidence_real.last_number("4 + 7 = 11\n11 + 2 = 13\nThe sum is 13.") == 13
    assert evidence_real.last_number("no digits") is None


RESULT = {
    "name": "forgetting-real",
    "seeds": [0, 1],
    "metrics": {
        "probe/instructions": {"base": {"0": [[0, 0.2]], "1": [[0, 0.2]]}, "sft": {"0": [[15, 0.9]], "1": [[15, 0.7]]}},
        "eval/pair_accuracy/length_pairs": {"sft": {"0": [[15, 0.5]], "1": [[15, 0.6]]}},
    },
    "kappa": {"0": 0.5, "1": 0.7},
    "families": {"base": {"0": {"quotes": 0.0, "max_words": 0.5}, "1": {"quotes": 0.0, "max_words": 0.5}},
                 "sft": {"0": {"quotes": 1.0, "max_words": 1.0}, "1": {"quotes": 0.5, "max_words": 1.0}}},
}  # fmt: skip


def test_the_tables_give_mean_range_seeds_kappa_and_families(tmp_path):
    text = evidence_real.tables(RESULT, evidence.final_table)
    assert "| sft | 0.800 | 0.700 - 0.900 | 0.900 | 0.700 |" in text
    assert "| base | 0.200 | 0.200 - 0.200 | 0.200 | 0.200 |" in text
    assert "mean 0.600, range 0.500 - 0.700" in text
    assert "| arm | quotes | max_words |" in text and "| sft | 0.75 | 1.00 |" in text
    evidence_real.plot_bars(RESULT, tmp_path / "w.png", evidence_real.METRICS)
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_w_arms_share_one_sft_run_at_one_rate_and_the_papers_beta(tmp_path):
    from uft_ray.demo.tiny_model import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model"))  # any model: the configs, not the weights, are checked
    data = tmp_path / "data"
    evidence_real.write_data(data)
    recipe = str(evidence.ROOT / evidence.RECIPES["forgetting-real"])
    rec = evidence.forgetting_recipe(tmp_path, 1, recipe, data, model, None)
    arms = {a.name: a.stages for a in rec.arms}
    assert list(arms) == ["sft", "sft-dpo", "sft-una", "uft-mix"]
    stages = [c for cs in arms.values() for c in cs]
    assert {c.loss.beta for c in stages} == {0.01} and {c.train.lr for c in stages} == {1e-3}
    assert {c.train.seed for c in stages} == {1}
    assert [c.loss.type for c in arms["sft-dpo"]] == ["sft", "dpo"] and [c.loss.type for c in arms["sft-una"]] == [
        "sft", "uft"]  # fmt: skip
    assert len({c.output.run_name for c in stages}) == 4  # the sft run is stage 1 of both sequential arms
    assert arms["sft-una"][1].data.sources[0].resolved_kind == "score"
    assert arms["sft-dpo"][1].data.sources[0].resolved_kind == "pair"
    # the same rows reach every arm: 120 instruction rows, the 120 pairs as pairs or as 240 scored rows
    assert dict(arms["uft-mix"][0].mixture.counts) == {"instr": 120, "length": 240}
    assert {s.name for c in stages for s in c.eval.sources} == {"instr", "length_pairs"}


def test_experiment_l_arms_run_sum3_with_the_authors_reward_and_hints_that_stop(tmp_path):
    from uft_ray.demo.tiny_model import make_tiny_model

    train, held = sum3.generate(8, 2)
    files = {"train": sum3.write(train, tmp_path / "a.jsonl"), "eval": sum3.write(held, tmp_path / "b.jsonl")}
    recipe = str(evidence.ROOT / evidence.RECIPES["hints-real"])
    arms = evidence.hint_configs(recipe, tmp_path, 2, None, str(make_tiny_model(tmp_path / "model")), files)
    assert list(arms) == ["uft", "rft", "sft", "sft_then_rft"]
    uft = arms["uft"][0]
    assert uft.rft.task == sum3.VERIFIER and uft.rft.hint.mode == "cosine"
    assert 0 < uft.rft.hint.t_hint < uft.train.max_steps  # steps without hints at the end: collapse would show
    assert arms["sft_then_rft"][0] is arms["sft"][0] and arms["sft_then_rft"][1].train.max_steps == 6
    row = train[0]
    assert sum3.verify(row, row["answer"]) == 1.0 and sum3.verify(row, "<answer>99</answer>") == 0.1
    assert sum3.verify(row, f"{row['total']}") == 0.0


def test_the_real_experiments_refuse_unknown_arms_and_bad_probe_rows(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evidence.main(["forgetting-real", "--arms", "sft,nope", "--out", str(tmp_path)])
    assert "unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evidence.main(["forgetting-real", "--probe-rows", "3,0,1", "--out", str(tmp_path)])
    assert "--probe-rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the task files are the command's: the check stands in for them
        evidence.main(
            ["hints-real", "--set", "rft.hint_coef=0.001", "--set", "rft.nonesuch=1", "--out", str(tmp_path)]
        )
    assert e.value.code == 2 and "rft.nonesuch: unknown key" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())  # refused before any work
