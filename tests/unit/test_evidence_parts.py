"""The evidence pieces that need no run: the toy task (rows, held-out split, verifier) and the experiment's outputs
(the final table, the plot, the docs section). The runs themselves: tests/integration/test_evidence.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from uft_ray import evidence
from uft_ray.tasks import toy


def test_toy_rows_split_the_prompts_and_their_answers_score_one():
    train, held = toy.generate(140, 60, seed=0)
    assert len(train) == 140 and len(held) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held-out prompts are new
    assert {r["digits"] for r in train} == {str(d) for d in range(10)}  # every digit is trained, in other prompts
    row = train[0]
    assert row["answer"] == "".join(row["hint"]) == f"<answer> {row['digits']} </answer>"
    assert row["prompt"].split()[1:] == [row["digits"], ":"] and row["prompt"].split()[0] in toy.VERBS
    assert toy.verify(row, row["answer"]) == 1.0
    assert toy.verify(row, f"<answer>{row['digits']}</answer> trailing") == 1.0
    assert toy.verify(row, "<answer> 12 </answer>") == 0.1
    assert toy.verify(row, row["digits"]) == 0.0  # no answer tags: nothing
    assert toy.generate(140, 60, seed=0) == (train, held) and toy.generate(140, 60, seed=1)[0] != train
    with pytest.raises(ValueError, match="need more"):
        toy.generate(150, 60)


def test_the_toy_file_reads_as_a_generic_task(tmp_path):
    from uft_ray.tasks.files import read_rows

    train, _ = toy.generate(5, 1)
    rows = read_rows(toy.write(train, tmp_path / "t.jsonl"), toy.VERIFIER)
    assert [r["row_id"] for r in rows] == [r["row_id"] for r in train]
    assert [r["hint"] for r in rows] == [r["hint"] for r in train]


RESULT = {
    "name": "hints",
    "seeds": [0, 1],
    "metrics": {
        "eval/accuracy": {
            "uft": {"0": [[0, 0.0], [5, 0.5], [10, 0.75]], "1": [[0, 0.0], [5, 0.25], [10, 0.25]]},
            "rft": {"0": [[0, 0.0], [5, 0.0], [10, 0.0]], "1": [[0, 0.0], [5, 0.0], [10, 0.0]]},
        }
    },
}
LABELS = {"eval/accuracy": "held-out accuracy"}


def test_the_table_gives_each_arms_final_mean_spread_and_seeds():
    table = evidence.final_table(RESULT, "eval/accuracy", "held-out accuracy")
    assert table.startswith("| arm | final held-out accuracy: mean | min - max | seed 0 | seed 1 |")
    assert "| uft | 0.500 | 0.250 - 0.750 | 0.750 | 0.250 |" in table
    assert "| rft | 0.000 | 0.000 - 0.000 | 0.000 | 0.000 |" in table


def test_the_plot_is_a_png_and_the_section_is_replaced_in_place(tmp_path):
    evidence.plot(RESULT, tmp_path / "hints.png", LABELS)
    assert (tmp_path / "hints.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = tmp_path / "results.md"
    md.write_text("# Results\n\nbefore\n")
    evidence.write_section(md, "hints", "first")
    evidence.write_section(md, "hints", "second")
    text = md.read_text()
    assert text.count("<!-- evidence:hints -->") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\nbefore\n")


def test_every_arm_has_its_configs_and_sft_then_rft_splits_the_steps(tmp_path):
    from uft_ray.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    train, held = toy.generate(4, 2)
    files = {"train": toy.write(train, tmp_path / "a.jsonl"), "eval": toy.write(held, tmp_path / "b.jsonl")}
    arms = evidence.hint_configs(
        str(evidence.ROOT / evidence.RECIPES["hints"]), Path(tmp_path), 3, 9, str(model), files
    )
    assert list(arms) == ["uft", "rft", "sft", "sft_then_rft"]
    # sft_then_rft branches from the sft run (the same config: one run), checkpointed at half the steps
    sft, rft_half = arms["sft_then_rft"]
    assert sft is arms["sft"][0] and sft.train.max_steps == 9 and sft.train.checkpoint_every == 4
    assert rft_half.train.max_steps == 5 and arms["uft"][0].train.max_steps == 9
    adapter = str(tmp_path / "runs" / "hints-sft-s3" / "checkpoints" / "checkpoint_000004" / "adapter")
    assert rft_half.model.adapter == rft_half.reference.adapter == adapter
    assert [c.rft.objective for c in arms["sft_then_rft"]] == ["sft", "grpo"] and rft_half.rft.hint.mode == "rft"
    assert arms["rft"][0].rft.hint.mode == "rft" and arms["uft"][0].rft.hint.mode == "cosine"
    assert {c.train.seed for cs in arms.values() for c in cs} == {3} and arms["uft"][0].data.seed == 3
    assert len({c.output.run_name for cs in arms.values() for c in cs}) == 4
    assert arms["uft"][0].train.checkpoint_every == arms["rft"][0].train.checkpoint_every == 1000  # the recipe's
    assert {c.train.lr for cs in arms.values() for c in cs} == {3e-3}  # the recipe's rate for every stage

    # --rl-lr: the RL stages (uft, rft, sft_then_rft's second) at that rate, the SFT stages at the recipe's
    slow = evidence.hint_configs(
        str(evidence.ROOT / evidence.RECIPES["hints"]), Path(tmp_path), 3, 9, str(model), files, rl_lr=3e-4
    )
    assert [c.train.lr for c in slow["sft_then_rft"]] == [3e-3, 3e-4] and slow["sft"][0].train.lr == 3e-3
    assert slow["uft"][0].train.lr == 3e-4 and slow["rft"][0].train.lr == 3e-4


def test_a_two_stage_curve_counts_stage_two_on_from_stage_one(tmp_path):
    from uft_ray.run_dir import RunDir

    for name, rows in (("a", [(0, 3.0), (2, 2.0), (4, 1.0)]), ("b", [(0, 1.0), (3, 1.5)])):
        run = RunDir(tmp_path / name)
        for step, v in rows:
            run.append_metrics({"step": step, "eval/nll/skill": v, "loss": 0.0})
    curve = evidence.stage_curve([(str(tmp_path / "a"), 4), (str(tmp_path / "b"), 3)], "eval/nll/skill")
    assert curve == [(0, 3.0), (2, 2.0), (4, 1.0), (7, 1.5)]  # stage 2's step 0 is stage 1's last model
    # a branch: stage 1 is a longer run, counted up to the branch point (step 2), stage 2 on from there
    curve = evidence.stage_curve([(str(tmp_path / "a"), 2), (str(tmp_path / "b"), 3)], "eval/nll/skill")
    assert curve == [(0, 3.0), (2, 2.0), (5, 1.5)]


def test_the_forgetting_data_is_written_in_the_datasets_layouts(tmp_path):
    import gzip
    import json

    import pyarrow.parquet as pq

    from uft_ray.demo.samples import ULTRACHAT_SCHEMA

    paths = toy.write_forgetting_data(tmp_path, n_skill=8, n_skill_eval=2, n_align=3, n_align_eval=1)
    train = pq.read_table(paths["skill_train"])
    assert train.schema.equals(ULTRACHAT_SCHEMA) and train.num_rows == 8
    row = train.to_pylist()[0]
    digits = row["prompt"].removeprefix("copy ").removesuffix(" :")
    assert row["messages"][1] == {"content": f"<answer> {digits} </answer>", "role": "assistant"}
    test = {r["prompt"] for r in pq.read_table(paths["skill_test"]).to_pylist()}
    assert len(test) == 2 and not test & {r["prompt"] for r in train.to_pylist()}
    with gzip.open(paths["align_train"], "rt") as f:
        hs2 = [json.loads(line) for line in f]
    assert len(hs2) == 6 and hs2[0]["prompt"] == hs2[1]["prompt"]  # two rated responses per prompt
    assert hs2[0]["helpfulness"] == 4 and hs2[1]["helpfulness"] == 0
    d = hs2[0]["prompt"].removeprefix("next ").removesuffix(" :").split()
    assert hs2[1]["response"] == f"<answer> {' '.join(d)} </answer>"  # the copy is the rejected answer
    assert hs2[0]["response"].split()[-2] == str((int(d[-1]) + 1) % 10)


def test_seeds_run_apart_merge_into_one_result():
    """--jobs: each seed's process leaves its own result; merged, the curves of every arm hold every seed."""
    a = {"name": "hints", "seeds": [0], "n_eval": 60, "seconds": {"uft/s0": 3.0},
         "metrics": {"eval/accuracy": {"uft": {"0": [[0, 0.0], [2, 0.5]]}, "rft": {"0": [[0, 0.0]]}}}}  # fmt: skip
    b = {"name": "hints", "seeds": [1], "n_eval": 60, "seconds": {"uft/s1": 4.0},
         "metrics": {"eval/accuracy": {"uft": {"1": [[0, 0.1]]}, "rft": {"1": [[0, 0.2]]}}}}  # fmt: skip
    merged = evidence.merge([a, b], [0, 1])
    assert merged["seeds"] == [0, 1] and merged["n_eval"] == 60 and merged["name"] == "hints"
    assert merged["seconds"] == {"uft/s0": 3.0, "uft/s1": 4.0}
    assert merged["metrics"]["eval/accuracy"]["uft"] == {"0": [[0, 0.0], [2, 0.5]], "1": [[0, 0.1]]}
    assert set(merged["metrics"]["eval/accuracy"]["rft"]) == {"0", "1"}
    assert a["seconds"] == {"uft/s0": 3.0}  # the parts are not changed


def test_a_seed_process_that_fails_fails_the_experiment_naming_its_log(tmp_path):
    with pytest.raises(SystemExit, match=r"evidence hints: failed: seed 0 \(.*seed0\.log\), seed 1 \(.*seed1\.log\)"):
        evidence.fan_out("hints", [0, 1], 2, tmp_path, ["--recipe=/nonexistent/recipe.yaml"])
    assert "nonexistent" in (tmp_path / "logs" / "seed0.log").read_text()


def test_set_overrides_every_stage_of_every_forgetting_arm(tmp_path):
    """`--set loss.beta=0.01`: the paper's beta in every stage of every arm, the recipe's 0.1 without it."""
    from uft_ray.demo.tiny_model import make_tiny_model

    model = str(make_tiny_model(tmp_path / "model"))
    data = tmp_path / "data"
    toy.write_forgetting_data(data, n_skill=8, n_skill_eval=2, n_align=3, n_align_eval=1)
    recipe = str(evidence.ROOT / evidence.RECIPES["forgetting"])
    plain = evidence.forgetting_recipe(tmp_path / "a", 0, recipe, data, model, 3)
    assert {c.loss.beta for arm in plain.arms for c in arm.stages} == {0.1}
    sets = ["loss.beta=0.01", "train.lr=1e-3"]
    rec = evidence.forgetting_recipe(tmp_path / "b", 2, recipe, data, model, 3, sets)
    stages = {(arm.name, c.output.run_name): c for arm in rec.arms for c in arm.stages}
    assert len(stages) == 6  # sft; sft-dpo and sft-uft in two stages each; uft-mix
    assert len({run for _, run in stages}) == 4  # the two-stage arms' stage 1 is the sft run
    assert {c.loss.beta for c in stages.values()} == {0.01} and {c.train.lr for c in stages.values()} == {1e-3}
    # the arms' own values and the seed's are kept
    assert [c.loss.type for c in next(a for a in rec.arms if a.name == "sft-dpo").stages] == ["sft", "dpo"]
    assert {c.train.seed for c in stages.values()} == {2} and {c.train.max_steps for c in stages.values()} == {3}


def test_set_overrides_every_hints_stage_after_the_arms_own_values(tmp_path):
    from uft_ray.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    train, held = toy.generate(4, 2)
    files = {"train": toy.write(train, tmp_path / "a.jsonl"), "eval": toy.write(held, tmp_path / "b.jsonl")}
    arms = evidence.hint_configs(
        str(evidence.ROOT / evidence.RECIPES["hints"]), Path(tmp_path), 0, 8, str(model), files,
        rl_lr=3e-4, sets=["train.lr=1e-3", "rft.kl_coef=0.01"],
    )  # fmt: skip
    stages = [c for cs in arms.values() for c in cs]
    assert len(stages) == 5 and {c.train.lr for c in stages} == {1e-3}  # over --rl-lr and the recipe's 3e-3
    assert {c.rft.kl_coef for c in stages} == {0.01}
    assert arms["uft"][0].rft.hint.mode == "cosine" and arms["sft_then_rft"][1].train.max_steps == 4


def test_a_set_variant_has_its_own_folder_and_section_and_a_bad_set_exits_2_before_any_work(tmp_path, capsys):
    assert evidence.variant("forgetting", []) == "forgetting"
    assert evidence.variant("forgetting", ["loss.beta=0.01"]) == "forgetting@loss.beta=0.01"
    assert evidence.variant("hints", ["a.b=x y", "c=1/2"]) == "hints@a.b=x_y,c=1_2"
    out = tmp_path / "never"
    for bad in (["--set", "loss.betta=0.01"], ["--set", "loss.beta=-1"], ["--set", "loss.beta"]):
        with pytest.raises(SystemExit) as e:
            evidence.main(["forgetting", "--out", str(out), *bad])
        assert e.value.code == 2
        assert "--set" in capsys.readouterr().err
    assert not out.exists()
