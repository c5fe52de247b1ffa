"""`uft-ray compare` shortened: two arms, SFT and SFT -> DPO sharing the SFT run, on the tiny model, 1 step a stage;
the table's structure, the same held-out rows for every arm, resume per arm. (A one-stage arm is a plain run, as
the SFT arm is: test_train's runs cover it.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from uft_ray import cli
from uft_ray.run_dir import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]


def _recipe(make_config, tiny_assets, root: Path) -> Path:
    # One worker holding the whole tiny base (ZeRO-0) with both cores: what is checked here is the table and the
    # arms' bookkeeping, and the sharded 2-worker path is test_train's; every fit costs ~30 s.
    base = make_config("base", mixture={"counts": {"ultrachat": 8, "helpsteer2": 8}},
                       train={"max_steps": 1, "warmup_ratio": 0.0, "num_workers": 1, "cpus_per_worker": 2,
                              "deepspeed": {"zero_stage": 0}})  # fmt: skip
    (root / "base.yaml").write_text(base.to_yaml())
    uc = {"name": "ultrachat", "format": "ultrachat_200k", "path": tiny_assets["ultrachat_200k_train"]}
    sft = {"data": {"sources": [uc]}, "mixture": {"counts": {"ultrachat": 8}}, "loss": {"type": "sft"}}
    hs_pairs = {"name": "helpsteer2", "format": "helpsteer2", "kind": "pair", "path": tiny_assets["helpsteer2_train"]}
    dpo = {"data": {"sources": [hs_pairs]}, "mixture": {"counts": {"helpsteer2": 8}}, "loss": {"type": "dpo"}}
    recipe = {
        "name": "cmp",
        "storage_path": str(root / "runs"),
        "eval": {
            "sources": [
                {"name": "ultrachat", "format": "ultrachat_200k", "path": tiny_assets["ultrachat_200k_test"]},
                {
                    "name": "hs2_pairs",
                    "format": "helpsteer2",
                    "kind": "pair",
                    "path": tiny_assets["helpsteer2_validation"],
                },
            ],
            "max_rows": 8,  # more than the 5 validation pairs: a split smaller than its cap gives all it has
        },
        "arms": [
            {"name": "sft", "config": "base.yaml", "set": sft},
            {"name": "sft-dpo", "stages": [{"config": "base.yaml", "set": sft}, {"config": "base.yaml", "set": dpo}]},
        ],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


def test_compare_runs_every_arm_once_on_the_same_heldout_rows_and_tables_them(make_config, tiny_assets, tmp_path,
                                                                             capsys):  # fmt: skip
    recipe = _recipe(make_config, tiny_assets, tmp_path)
    assert cli.main(["compare", str(recipe)]) == 0
    out = tmp_path / "runs"
    data = json.loads((out / "compare.json").read_text())
    assert list(data["arms"]) == ["sft", "sft-dpo"]
    assert len(set(data["heldout_rows"].values())) == 1 and None not in data["heldout_rows"].values()
    for arm in data["arms"].values():  # every arm measured the same way
        assert {"eval/nll/ultrachat", "eval/pair_accuracy/hs2_pairs", "delta eval/nll/ultrachat"} <= set(arm)
    assert data["best"]["eval/nll/ultrachat"] in data["arms"]
    md = (out / "compare.md").read_text()
    assert "| arm |" in md and "**" in md and "the same for every arm" in md
    assert (out / "compare.html").is_file() and (out / "compare.png").is_file()
    # one SFT run for the SFT arm and the DPO arm's stage 1; stage 2 started from its adapter
    assert not (out / "sft-dpo-stage1").exists()
    stage2 = yaml.safe_load((out / "sft-dpo-stage2" / "config.yaml").read_text())
    assert stage2["model"]["adapter"] == str(out / "sft" / "adapter")
    # resume per arm: nothing runs again
    before = [len(read_metrics(str(out / n / "metrics.jsonl"))) for n in ("sft", "sft-dpo-stage2")]
    capsys.readouterr()
    assert cli.main(["compare", str(recipe)]) == 0
    assert capsys.readouterr().out.count("already finished; not rerun") == 2
    assert [len(read_metrics(str(out / n / "metrics.jsonl"))) for n in ("sft", "sft-dpo-stage2")] == before
