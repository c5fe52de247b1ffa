"""What a rerun of a run directory may change (uft_ray/rerun.py, uft_ray/runner.keep_plan), decided before it writes.

The run directories here are real folders laid out as a run leaves them (config.yaml, Ray Train's snapshot beside
checkpoint folders, plan.parquet); the full path through the driver and the CLI is in
tests/integration/test_rerun_refused.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from uft_ray.config import ConfigError, load_config
from uft_ray.rerun import ALLOWED, check_rerun, has_trained
from uft_ray.run_dir import RunDir, checkpoint_snapshot_name
from uft_ray.runner import Run, keep_plan
from uft_ray.train.plan import make_plan


def _base(tmp_path: Path) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "uc.parquet"
    data.write_bytes(b"")
    hs = tmp_path / "hs.jsonl.gz"
    hs.write_bytes(b"")
    return {
        "model": {"path": str(tmp_path)},
        "data": {
            "sources": [
                {"name": "ultrachat", "format": "ultrachat_200k", "path": str(data)},
                {"name": "helpsteer2", "format": "helpsteer2", "path": str(hs), "kind": "score"},
            ]
        },
        "mixture": {"counts": {"ultrachat": 20, "helpsteer2": 20}},
        "train": {"num_workers": 2, "micro_batch_size": 2, "use_gpu": False, "max_steps": 4},
        "output": {"storage_path": str(tmp_path / "runs"), "run_name": "r"},
    }


def _trained(tmp_path: Path, overrides: list[str] | None = None) -> tuple[RunDir, dict]:
    """A run directory as a finished 4-step run leaves it: config.yaml, the checkpoints with Ray's snapshot."""
    cfg = load_config(_base(tmp_path), overrides)
    run = RunDir(cfg.output.run_dir)
    Path(run.checkpoint(4)).mkdir(parents=True)
    Path(run.checkpoint(4), "state.json").write_text('{"step": 4}')
    Path(run.checkpoint_snapshot).write_text("{}")
    Path(run.config).write_text(cfg.to_yaml())
    Path(run.metrics).write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n')
    return run, yaml.safe_load(Path(run.config).read_text())


def _digest(root: str) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def test_the_snapshot_file_name_is_ray_trains_own() -> None:
    from ray.train.v2._internal.execution.storage import StorageContext

    ctx = StorageContext(storage_path="/tmp/x", experiment_dir_name="checkpoints")
    assert ctx.checkpoint_manager_snapshot_path.endswith("/" + checkpoint_snapshot_name())


def test_a_changed_trained_field_is_refused_listing_every_change(tmp_path: Path) -> None:
    run, previous = _trained(tmp_path)
    before = _digest(run.path)
    cfg = load_config(_base(tmp_path), ["loss.beta=0.2", "train.lr=1e-4", "lora.r=4", "tokenize.max_len=1536"])
    with pytest.raises(ConfigError) as e:
        check_rerun(run, cfg, previous)
    msgs = e.value.messages
    assert "loss.beta: 0.01 -> 0.2 (the run's checkpoints were trained with 0.01)" in msgs
    for field in ("train.lr: 3e-05 -> 0.0001", "lora.r: 16 -> 4", "tokenize.max_len: 2048 -> 1536"):
        assert any(m.startswith(field) for m in msgs), (field, msgs)
    assert "output.run_name=r-2" in msgs[-1] and "start a new run" in msgs[-1]
    assert _digest(run.path) == before  # it only read


@pytest.mark.parametrize(
    "override",
    [
        "model.path=/elsewhere",
        "model.dtype=float32",
        "reference.mode=adapter_off",
        "train.lr_schedule=linear",
        "loss.type=sft",
        "reference.model_path=/other",
        "train.max_steps=3",
        "train.seed=1",
        "data.seed=2",
        "model.trust_remote_code=true",
    ],  # fmt: skip
)
def test_each_field_that_changes_what_is_trained_is_refused(tmp_path: Path, override: str) -> None:
    run, previous = _trained(tmp_path)
    cfg = load_config(_base(tmp_path), [override], check_paths=False)
    with pytest.raises(ConfigError) as e:
        check_rerun(run, cfg, previous)
    assert e.value.messages[0].startswith(override.split("=")[0] + ":"), e.value.messages


def test_the_allow_list_and_a_longer_run_pass(tmp_path: Path) -> None:
    run, previous = _trained(tmp_path)
    changed = ["eval.every=2", "eval.tasks=[arc_easy]", "eval.limit=10", "train.max_failures=5",
               "train.checkpoint_every=1", "train.cpus_per_worker=2", "ray.num_cpus=8", "logging.project=p",
               "reference.actors=3", "reference.cache_dir=/tmp/c", "model.gradient_checkpointing=false",
               "train.max_steps=40", "train.packing=true", "train.share_prompts=false",
               f"output.storage_path={tmp_path / 'runs'}"]  # fmt: skip
    assert check_rerun(run, load_config(_base(tmp_path), changed), previous) is True


def test_max_steps_null_runs_the_epochs_and_counts_as_longer(tmp_path: Path) -> None:
    run, previous = _trained(tmp_path)
    assert check_rerun(run, load_config(_base(tmp_path), ["train.max_steps=null"]), previous)
    run2, previous2 = _trained(tmp_path / "b", ["train.max_steps=null"])
    with pytest.raises(ConfigError, match=r"train.max_steps: None -> 4"):
        check_rerun(run2, load_config(_base(tmp_path / "b"), ["train.max_steps=4"]), previous2)


def test_a_field_added_to_the_schema_since_counts_only_when_set(tmp_path: Path) -> None:
    run, previous = _trained(tmp_path)
    del previous["train"]["group_by_length"]  # a config.yaml from before the field existed
    assert check_rerun(run, load_config(_base(tmp_path)), previous)
    with pytest.raises(ConfigError, match=r"train.group_by_length: None -> False"):
        check_rerun(run, load_config(_base(tmp_path), ["train.group_by_length=false"]), previous)


def test_a_fresh_or_never_trained_run_directory_takes_any_config(tmp_path: Path) -> None:
    cfg = load_config(_base(tmp_path))
    run = RunDir(cfg.output.run_dir)
    assert check_rerun(run, cfg, None) is False and not has_trained(run)
    Path(run.path).mkdir(parents=True)
    Path(run.config).write_text(cfg.to_yaml())  # a run that failed before its first checkpoint
    other = load_config(_base(tmp_path), ["loss.beta=0.5"])
    assert check_rerun(run, other, yaml.safe_load(Path(run.config).read_text())) is False


def test_a_finished_run_without_checkpoints_but_with_its_adapter_is_still_trained_work(tmp_path: Path) -> None:
    import shutil

    run, previous = _trained(tmp_path)
    shutil.rmtree(run.checkpoints)
    Path(run.adapter).mkdir()
    Path(run.adapter, "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="loss.beta"):
        check_rerun(run, load_config(_base(tmp_path), ["loss.beta=0.3"]), previous)


def test_checkpoint_folders_without_rays_snapshot_are_refused(tmp_path: Path) -> None:
    """Ray Train starts a run over at step 0 without its snapshot (and the run truncated metrics.jsonl)."""
    run, previous = _trained(tmp_path)
    Path(run.checkpoint_snapshot).unlink()
    before = _digest(run.path)
    with pytest.raises(ConfigError) as e:
        check_rerun(run, load_config(_base(tmp_path)), previous)
    (msg,) = e.value.messages
    assert "checkpoint_000004" in msg and checkpoint_snapshot_name() in msg and "new output.run_name" in msg
    assert _digest(run.path) == before


def test_trained_work_without_a_config_is_refused(tmp_path: Path) -> None:
    run, _ = _trained(tmp_path)
    Path(run.config).unlink()
    with pytest.raises(ConfigError, match="no config.yaml"):
        check_rerun(run, load_config(_base(tmp_path)), None)


def _plan(cfg, n_rows: int = 16):
    tr = cfg.train
    return make_plan([f"r{i}" for i in range(n_rows)], ["a"] * n_rows, np.full(n_rows, 10),
                     num_workers=tr.num_workers, micro_batch_size=tr.micro_batch_size, grad_accum=tr.grad_accum,
                     seed=tr.seed, epochs=tr.epochs, max_steps=tr.max_steps)  # fmt: skip


def test_a_longer_plan_with_the_same_first_steps_goes_on(tmp_path: Path) -> None:
    """train.max_steps 4 -> 8 (and epochs 1 -> 3): the old plan is the new one's prefix, so the run continues."""
    cfg = load_config(_base(tmp_path))
    run = Run(cfg, RunDir(cfg.output.run_dir), tokenizer=None)
    keep_plan(run, _plan(cfg), checkpoint=None)
    for extra in (["train.max_steps=8"], ["train.max_steps=null", "train.epochs=3"]):
        longer = load_config(_base(tmp_path), extra)
        keep_plan(Run(longer, run.dir, tokenizer=None, previous=cfg.to_dict()), _plan(longer), "x/checkpoint_4")
        assert yaml.safe_load(Path(run.dir.config).read_text())["train"] == longer.to_dict()["train"]
        keep_plan(run, _plan(cfg), checkpoint=None)  # back to the 4-step plan for the next case


def test_a_plan_whose_first_steps_differ_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    cfg = load_config(_base(tmp_path))
    run = Run(cfg, RunDir(cfg.output.run_dir), tokenizer=None)
    keep_plan(run, _plan(cfg), checkpoint=None)
    before = _digest(run.dir.path)
    other = load_config(_base(tmp_path), ["train.max_steps=8"])
    with pytest.raises(ConfigError, match="follow another plan"):  # 17 rows: other rows in the first steps
        keep_plan(Run(other, run.dir, tokenizer=None, previous=cfg.to_dict()), _plan(other, 17), "x/checkpoint_4")
    assert _digest(run.dir.path) == before


def test_the_allow_list_names_fields_of_the_schema() -> None:
    from uft_ray.config import Config

    d = Config().to_dict()
    for key in ALLOWED:
        node = d
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, key
            node = node[part]
