"""`uft-ray compare`'s recipe loading and its table, on real files (run directories written by the test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uft_ray.compare import Arm, Recipe, arm_results, load_recipe, table, write_tables
from uft_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_best_per_column_knows_which_way_is_better():
    results = {
        "a": {"eval/nll/uc": 2.0, "eval/pair_accuracy/p": 0.5, "delta eval/nll/uc": 0.3, "bench/t/acc,none": 0.4},
        "b": {"eval/nll/uc": 1.5, "eval/pair_accuracy/p": 0.75, "delta eval/nll/uc": -0.1},
        "c": {"eval/nll/uc": 1.8, "eval/pair_accuracy/p": 0.25, "bench/t/acc,none": 0.6},
    }
    columns, best = table(results)
    assert columns == sorted(columns) and "bench/t/acc,none" in columns
    assert best == {"eval/nll/uc": "b", "eval/pair_accuracy/p": "b", "delta eval/nll/uc": "b", "bench/t/acc,none": "c"}


def _run(root: Path, name: str, rows: list[dict], summary: dict | None = None) -> str:
    d = root / name
    (d / "adapter").mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (d / "eval").mkdir()
        (d / "eval" / "summary.json").write_text(json.dumps(summary))
    return str(d)


def test_tables_from_run_directories(tmp_path):
    cfg = load_config(ROOT / "jobs/configs/demo_tiny.yaml", ["model.path=/tmp"], check_paths=False)

    def arm(name: str, *run_names: str) -> Arm:
        stages = []
        for rn in run_names:
            c = load_config(cfg.to_dict(), [f"output.storage_path={tmp_path}", f"output.run_name={rn}"],
                            check_paths=False)  # fmt: skip
            stages.append(c)
        return Arm(name, stages)

    _run(tmp_path, "sft", [{"step": 0, "eval/nll/uc": 5.0}, {"step": 8, "eval/nll/uc": 3.0}])
    _run(tmp_path, "sft-dpo-2", [{"step": 0, "eval/nll/uc": 3.0}, {"step": 1, "loss": 1.0},
                                 {"step": 4, "eval/nll/uc": 3.5, "eval/pair_accuracy/p": 0.75}],
         {"tasks": {"mc": {"acc,none": 0.5, "acc_stderr,none": "N/A"}}})  # fmt: skip
    recipe = Recipe("r", "recipe.yaml", str(tmp_path), [arm("sft", "sft"), arm("sft-dpo", "sft", "sft-dpo-2")])
    dpo = arm_results(recipe.arms[1])
    assert dpo["delta eval/nll/uc"] == pytest.approx(0.5)  # over its last stage only: 3.0 -> 3.5
    assert dpo["bench/mc/acc,none"] == 0.5 and "bench/mc/acc_stderr,none" not in dpo
    paths = write_tables(recipe)
    md = Path(paths["md"]).read_text().splitlines()
    header = md[4]
    assert header.startswith("| arm | ") and "eval/nll/uc" in header and "delta eval/nll/uc" in header
    rows = {line.split(" | ")[0][2:]: line for line in md[6:8]}
    assert set(rows) == {"sft", "sft-dpo"}
    assert "**3**" in rows["sft"] and "**0.75**" in rows["sft-dpo"]  # the best NLL, the only pair accuracy
    assert "NOT the same" in Path(paths["md"]).read_text()  # no prepared held-out split in these fake runs
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG" and "class='best'" in Path(paths["html"]).read_text()


def test_recipe_errors_name_the_field(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\narms: []\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert any(m.startswith("arms:") for m in e.value.messages)
    assert any(m.startswith("eval.sources: required") for m in e.value.messages)
    (tmp_path / "demo_tiny.yaml").write_text((ROOT / "jobs/configs/demo_tiny.yaml").read_text())
    (tmp_path / "r.yaml").write_text(
        "name: x\neval: {sources: [{name: u, format: ultrachat_200k, path: /nope}]}\n"
        "arms: [{name: a, config: demo_tiny.yaml, set: {loss: {type: bogus}}}]\n"
    )
    with pytest.raises(ConfigError, match=r"arms.0 \(demo_tiny.yaml\): loss.type: 'bogus'"):
        load_recipe(tmp_path / "r.yaml", check_paths=False)
