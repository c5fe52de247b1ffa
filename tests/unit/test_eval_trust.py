"""`uft-ray eval RUN_DIR` never takes trust_remote_code from the run directory's config.yaml: a config found on
storage cannot switch remote code on; only the command line (or the user's own config, after training) can."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uft_ray import cli
from uft_ray.evaluation import harness
from uft_ray.evaluation.harness import EvalError


def _run_dir(tmp_path: Path, trust: bool) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": str(base)}))
    (run / "config.yaml").write_text(f"model: {{path: {base}, trust_remote_code: {str(trust).lower()}}}\n")
    return run


def test_a_run_dirs_config_cannot_switch_remote_code_on(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, trust=True)
    with pytest.raises(EvalError, match="--trust-remote-code") as e:
        harness.resolve_target(str(run))
    assert "config.yaml" in str(e.value)
    t = harness.resolve_target(str(run), trust_remote_code=True)  # the user said so, on the command line
    assert t.trust_remote_code and harness.model_args(t, "hf", "cpu")["trust_remote_code"] is True


def test_remote_code_stays_off_unless_the_command_line_asks(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, trust=False)
    t = harness.resolve_target(str(run))
    assert not t.trust_remote_code and "trust_remote_code" not in harness.model_args(t, "hf", "cpu")
    assert harness.resolve_target(str(run), trust_remote_code=True).trust_remote_code


def test_uft_ray_eval_exits_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path, trust=True)
    assert cli.main(["eval", str(run), "--tasks", "arc_easy"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["eval", str(run), "--tasks", "arc_easy", "--trust-remote-code"])
    assert args.trust_remote_code is True
