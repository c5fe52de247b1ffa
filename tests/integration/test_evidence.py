"""The evidence recipes keep working, each shortened to 2 steps a stage and one seed, and `uft-ray compare`
end to end (the forgetting evidence is a compare recipe run per seed).

- hints: the `sft_then_rft` arm, two runs: the `sft` arm's run, checkpointed at half its steps, and RFT from that
  checkpoint's adapter (rollouts, the verifier, held-out accuracy); the `uft` and `rft` arms are the recipe with
  another hint mode (tests/unit/test_evidence_parts.py), hint-guided runs in tests/integration/test_hint_rft.py.
- forgetting: the `sft` and `sft-dpo` arms, sharing the SFT run: the curves, the evidence table and plot, and the
  compare table of the seed (the same held-out rows for every arm, the best per column), the sequential recipe
  itself (stage 2 continues stage 1's adapter against base + that adapter: r == 0 at its first step), and resume
  per arm through `uft-ray compare` (nothing runs again). A one-stage arm is a plain run (test_train's runs).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from uft_ray import cli, evidence
from uft_ray.run_dir import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]


def test_the_hints_evidence_runs_and_writes_curves_table_plot_and_section(tiny_assets, tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    argv = ["hints", "--seeds", "0", "--steps", "2", "--arms", "sft_then_rft", "--out", str(tmp_path / "ev"),
            "--assets", tiny_assets["root"], "--results", str(results)]  # fmt: skip
    assert evidence.main(argv) == 0
    runs = tmp_path / "ev" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["hints-sft-s0", "hints-sft_then_rft-s0"]  # no stage-1 run
    assert sorted(p.name for p in (runs / "hints-sft-s0" / "checkpoints").glob("checkpoint_0*")) == [
        "checkpoint_000001", "checkpoint_000002"]  # fmt: skip
    stage2 = yaml.safe_load((runs / "hints-sft_then_rft-s0" / "config.yaml").read_text())
    assert stage2["model"]["adapter"] == str(runs / "hints-sft-s0" / "checkpoints" / "checkpoint_000001" / "adapter")
    assert stage2["rft"]["objective"] == "grpo" and stage2["train"]["max_steps"] == 1
    rl = [r for r in read_metrics(str(runs / "hints-sft_then_rft-s0" / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rl] == [1] and "reward/mean" in rl[0]  # rollouts scored by the verifier
    data = json.loads((tmp_path / "ev" / "hints.json").read_text())
    curve = data["metrics"]["eval/accuracy"]["sft_then_rft"]["0"]
    # held out: the start, the branch point (stage 2's first evaluation), the end
    assert [s for s, _ in curve] == [0, 1, 2] and all(0.0 <= a <= 1.0 for _, a in curve)
    assert "| sft_then_rft |" in (tmp_path / "ev" / "hints.md").read_text()
    text = results.read_text()
    assert "<!-- evidence:hints -->" in text and "![hints](evidence_hints.png)" in text
    assert (tmp_path / "evidence_hints.png").read_bytes()[:4] == b"\x89PNG"


def test_the_forgetting_evidence_runs_the_compare_recipe_and_tables_it(tiny_assets, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["forgetting", "--seeds", "0", "--steps", "2", "--arms", "sft,sft-dpo", "--out", str(out),
            "--assets", tiny_assets["root"]]  # fmt: skip
    assert evidence.main(argv) == 0
    data = json.loads((out / "forgetting.json").read_text())
    nll = data["metrics"]["eval/nll/skill"]
    assert [s for s, _ in nll["sft"]["0"]] == [0, 2] and [s for s, _ in nll["sft-dpo"]["0"]] == [0, 2, 4]
    assert nll["sft-dpo"]["0"][:2] == nll["sft"]["0"]  # the DPO arm continues the one SFT run
    assert set(data["metrics"]["eval/pair_accuracy/align_pairs"]) == {"sft", "sft-dpo"}
    assert "final skill: held-out NLL per token" in (out / "forgetting.md").read_text()

    # the seed's compare table: every arm measured on the same held-out rows
    runs = out / "runs" / "seed0"
    table = json.loads((runs / "compare.json").read_text())
    assert list(table["arms"]) == ["sft", "sft-dpo"]
    assert len(set(table["heldout_rows"].values())) == 1 and None not in table["heldout_rows"].values()
    for arm in table["arms"].values():
        assert {"eval/nll/skill", "eval/pair_accuracy/align_pairs", "delta eval/nll/skill"} <= set(arm)
    assert table["best"]["eval/nll/skill"] in table["arms"]
    md = (runs / "compare.md").read_text()
    assert "| arm |" in md and "**" in md and "the same for every arm" in md
    assert (runs / "compare.html").is_file() and (runs / "compare.png").is_file()

    # the sequential recipe: one SFT run for both arms; stage 2 starts from its adapter, which is also its
    # reference (r == 0 at its first step: DPO's loss is log 2), and trains it on
    assert not (runs / "sft-dpo-stage1").exists()
    stage2 = yaml.safe_load((runs / "sft-dpo-stage2" / "config.yaml").read_text())
    assert stage2["model"]["adapter"] == stage2["reference"]["adapter"] == str(runs / "sft" / "adapter")
    step1 = [r for r in read_metrics(str(runs / "sft-dpo-stage2" / "metrics.jsonl")) if "loss" in r][0]
    assert abs(step1["reward/align"]) < 1e-4 and step1["loss"] == pytest.approx(math.log(2), rel=1e-4)
    weights = "adapter/adapter_model.safetensors"
    sft, dpo = load_file(str(runs / "sft" / weights)), load_file(str(runs / "sft-dpo-stage2" / weights))
    assert any((v != 0).any() for k, v in sft.items() if "lora_B" in k)  # stage 1 trained something
    assert sft.keys() == dpo.keys() and any(not torch.equal(sft[k], dpo[k]) for k in sft)

    # resume per arm through the compare command: nothing runs again
    before = [len(read_metrics(str(runs / n / "metrics.jsonl"))) for n in ("sft", "sft-dpo-stage2")]
    capsys.readouterr()
    recipe = out / "recipe-s0" / "forgetting.yaml"
    overrides = [f"model.path={tiny_assets['model']}", "train.seed=0", "data.seed=0", "train.max_steps=2"]
    assert cli.main(["compare", str(recipe), "--only", "sft,sft-dpo", *overrides]) == 0
    assert capsys.readouterr().out.count("already finished; not rerun") == 2
    assert [len(read_metrics(str(runs / n / "metrics.jsonl"))) for n in ("sft", "sft-dpo-stage2")] == before
