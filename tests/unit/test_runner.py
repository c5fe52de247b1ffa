"""The run's shared parts (uft_ray/runner.py): where a rerun resumes and the plan-reuse rule, for both methods."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.demo import TINY_CONFIGS
from uft_ray.run_dir import CHECKPOINT_SNAPSHOT, RunDir
from uft_ray.runner import Run, config_changes, keep_plan, last_checkpoint
from uft_ray.train.plan import make_plan


def _plan(cfg, n_rows: int = 16):
    tr = cfg.train
    return make_plan(
        [f"r{i}" for i in range(n_rows)],
        ["a"] * n_rows,
        np.full(n_rows, 10),
        num_workers=tr.num_workers,
        micro_batch_size=tr.micro_batch_size,
        grad_accum=tr.grad_accum,
        seed=tr.seed,
        epochs=1,
        max_steps=tr.max_steps,
        group_by_length=tr.group_by_length,
    )


def test_no_snapshot_means_step_0(tmp_path):
    run = RunDir(tmp_path / "run")
    assert last_checkpoint(run) is None  # no run directory at all
    (tmp_path / "run" / "checkpoints" / "checkpoint_000003").mkdir(parents=True)
    assert last_checkpoint(run) is None  # a checkpoint folder Ray Train never committed


def test_an_unreadable_snapshot_fails_naming_the_run_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / CHECKPOINT_SNAPSHOT).write_text("{not json")
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'run'}: its checkpoints cannot be read"):
        last_checkpoint(run)


def test_a_changed_plan_is_refused_naming_what_changed(tmp_path):
    cfg = load_config(
        str(TINY_CONFIGS["uft"]), [f"output.storage_path={tmp_path}", "train.max_steps=4"], check_paths=False
    )
    run = Run(cfg, RunDir(cfg.output.run_dir), tokenizer=None)
    keep_plan(run, _plan(cfg), checkpoint=None)  # a first run: plan and config saved
    assert (tmp_path / cfg.output.run_name / "config.yaml").is_file()

    other = load_config(
        str(TINY_CONFIGS["uft"]),
        [f"output.storage_path={tmp_path}", "train.max_steps=4", "train.grad_accum=2"],
        check_paths=False,
    )
    rerun = Run(other, run.dir, tokenizer=None, previous=cfg.to_dict())
    before = (tmp_path / cfg.output.run_name / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"changed: train\.grad_accum 1 -> 2"):
        keep_plan(rerun, _plan(other), checkpoint="some/checkpoint_000004")
    assert (tmp_path / cfg.output.run_name / "config.yaml").read_text() == before  # left as it was
    # without a committed checkpoint the new plan simply replaces the old one
    keep_plan(rerun, _plan(other), checkpoint=None)
    assert "grad_accum: 2" in (tmp_path / cfg.output.run_name / "config.yaml").read_text()


def test_config_changes_lists_only_what_differs():
    cfg = load_config(str(TINY_CONFIGS["uft"]), check_paths=False).to_dict()
    other = copy.deepcopy(cfg)
    other["train"]["micro_batch_size"] = cfg["train"]["micro_batch_size"] + 1
    other["output"]["run_name"] = "elsewhere"  # not part of the plan
    assert config_changes(cfg, other) == [
        f"train.micro_batch_size {cfg['train']['micro_batch_size']} -> {cfg['train']['micro_batch_size'] + 1}"
    ]
    assert config_changes(cfg, copy.deepcopy(cfg)) == []
