"""A method that lives only in the test tree runs end to end with no edit to the package (uft_ray.methods).

`method: sft_prompts` (tests/fixtures/sft_prompts.py: plain SFT on generated Countdown prompts + their reference
solutions, on the shared plan, feeds, run skeleton and offline worker loop) is registered by importing its module.
Through the package's own entry points: the config check asks the method (its own problems, and its name among
the allowed ones), `uft_ray.run` trains 2 steps on the tiny model with a checkpoint each step and writes the run
directory with its report, then `uft-ray train` with train.max_steps grown to 3 resumes from the step-2
checkpoint (steps 1-2 are not trained again) and prints the method's part of the progress line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fixtures.sft_prompts import NAME

import uft_ray
from uft_ray import cli, methods
from uft_ray.config import ConfigError
from uft_ray.run_dir import RunDir
from uft_ray.train.plan import read_plan_summary

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]


def _config(assets: dict[str, str], root: Path) -> dict:
    cfg = yaml.safe_load(Path("jobs/configs/demo_hint_rft_tiny.yaml").read_text())
    cfg["method"] = NAME
    cfg["model"]["path"] = assets["model"]
    cfg["loss"] = {"type": "sft"}
    cfg["rft"] |= {"task": "countdown", "n_train": 8}  # its max_prompt_len fits the tiny tokenizer's prompts
    cfg["eval"] = {"every": None}
    cfg["train"] |= {"num_workers": 1, "micro_batch_size": 2, "grad_accum": 1, "max_steps": 2, "checkpoint_every": 1,
                     "cpus_per_worker": 1, "lr": 1e-2}  # fmt: skip
    cfg["output"] = {"storage_path": str(root), "run_name": "third"}
    return cfg


def test_a_method_registered_from_the_test_tree_validates_trains_resumes_and_reports(tiny_assets, tmp_path, capsys):
    assert NAME in methods.names()
    cfg = _config(tiny_assets, tmp_path)

    # Validation: the method's own check, and its name among the allowed ones.
    with pytest.raises(ConfigError, match="loss.type: sft_prompts trains the solutions' NLL; use sft, got 'uft'"):
        uft_ray.load_config(cfg, ["loss.type=uft"], check_paths=False)
    with pytest.raises(ConfigError, match="method: 'no_such' is not allowed; use one of: uft, hint_rft, sft_prompts"):
        uft_ray.load_config(cfg, ["method=no_such"], check_paths=False)

    # 2 steps through the Python API: plan, worker, a checkpoint per step, metrics, adapter, report.
    first = uft_ray.run(cfg)
    run = RunDir(first.run_dir)
    assert first.steps == 2 and read_plan_summary(run.plan).steps == 2
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 and r["loss"] == pytest.approx(r["loss/countdown"]) for r in rows)
    assert first.checkpoint_dir is not None and first.checkpoint_dir.endswith("2")
    assert Path(run.adapter, "adapter_model.safetensors").is_file()
    page = Path(first.report_path).read_text()
    assert "<th>method</th><td>sft_prompts</td>" in page and "id='loss'" in page  # the shared page
    capsys.readouterr()

    # Grown to 3 steps through the CLI: it resumes from the step-2 checkpoint and trains step 3 only.
    path = tmp_path / "third.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path), "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    after = run.read_metrics()
    assert [r["step"] for r in after] == [1, 2, 3]
    assert after[:2] == rows  # steps 1-2 as the first run wrote them: not trained again
    lines = [line for line in out.splitlines() if line.startswith("[uft-ray] step ")]
    assert len(lines) == 1 and lines[0].startswith("[uft-ray] step 3/3 | loss ")  # only the new step
    assert f"solution nll {after[2]['loss/countdown']:.3f}" in lines[0]  # the method's own part
    assert sorted(p.name for p in Path(run.checkpoints).glob("checkpoint_*") if p.is_dir())[-1].endswith("3")
