"""uft_ray.run_dir names every file of a run directory: each path is inside it, for local paths and URIs alike."""

from __future__ import annotations

import pytest

from uft_ray.run_dir import RunDir


@pytest.mark.parametrize("root", ["/tmp/runs/a", "s3://bucket/runs/a/"])
def test_every_path_is_inside_the_run_directory(root: str) -> None:
    rd = RunDir(root)
    base = root.rstrip("/")
    names = {
        rd.tensorboard: "tensorboard",
        rd.quarantine_counts: "quarantine/counts.json",
        rd.quarantine_prompts: "quarantine/prompts.jsonl",
        rd.checkpoint_snapshot: "checkpoints/checkpoint_manager_snapshot.json",
        rd.data_summary: "summary.json",
        rd.plot("loss"): "plots/loss.png",
        rd.prompts_file("train"): "prompts/train.parquet",
        rd.prompts_file("eval"): "prompts/eval.parquet",
        rd.eval_summary: "eval/summary.json",
    }
    assert names == {f"{base}/{v}": v for v in names.values()}


def test_prompts_file_names_only_the_two_splits() -> None:
    with pytest.raises(ValueError, match="'test'"):
        RunDir("/r").prompts_file("test")
