"""A rerun never silently trains the wrong thing: one finished 2-step UFT run (1 worker, the run's own prepared rows),
then reruns through `uft-ray train` that must be refused with exit 2 before any work, leaving the run directory
byte for byte as it was (uft_ray/rerun.py, uft_ray/lease.py: a second driver while the first lives). Before, a changed `loss.beta` resumed the old checkpoints, handed back
the old adapter and overwrote config.yaml; a missing Ray Train snapshot restarted at step 0 and truncated
metrics.jsonl."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uft_ray import cli, driver
from uft_ray.config import ConfigError
from uft_ray.run_dir import RunDir
from uft_ray.uft.driver import write_prepared_key

pytestmark = pytest.mark.integration

STEPS = {"num_workers": 1, "micro_batch_size": 4, "max_steps": 2, "checkpoint_every": 1, "warmup_ratio": 0.0}


def _digest(root: str) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(make_config, train_root, ray_local) -> tuple[str, Path]:
    """The run's directory and a config file that reruns it."""
    cfg = make_config("rerun", train=STEPS)
    result = driver.run(cfg)
    assert result.steps == 2
    path = train_root / "rerun.yaml"
    path.write_text(cfg.to_yaml())
    return result.run_dir, path


def test_a_rerun_with_another_loss_beta_exits_2_naming_it_and_changes_nothing(finished, capsys) -> None:
    run_dir, config = finished
    before = _digest(run_dir)
    assert cli.main(["train", str(config), "loss.beta=0.2"]) == 2
    err = capsys.readouterr().err
    assert "loss.beta: 0.1 -> 0.2" in err and "output.run_name=rerun-2" in err
    assert _digest(run_dir) == before


def test_a_rerun_with_several_changes_lists_them_all(finished, capsys) -> None:
    run_dir, config = finished
    before = _digest(run_dir)
    assert cli.main(["train", str(config), "train.lr=0.5", "tokenize.max_len=120", "lora.alpha=8"]) == 2
    err = capsys.readouterr().err
    for line in ("train.lr: 0.01 -> 0.5", "tokenize.max_len: 128 -> 120", "lora.alpha: 16 -> 8"):
        assert line in err, err
    assert _digest(run_dir) == before


def test_checkpoints_without_rays_snapshot_are_refused_not_restarted(finished, capsys, tmp_path) -> None:
    run_dir, config = finished
    snapshot = Path(RunDir(run_dir).checkpoint_snapshot)
    kept = tmp_path / snapshot.name
    shutil.move(snapshot, kept)
    try:
        before = _digest(run_dir)
        assert cli.main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert snapshot.name in err and "checkpoint_000002" in err
        assert _digest(run_dir) == before  # metrics.jsonl not truncated, nothing retrained
    finally:
        shutil.move(kept, snapshot)


def test_an_allowed_change_reruns_and_hands_back_the_finished_run(finished, capsys) -> None:
    """eval.every and train.max_failures do not change what is trained: the finished run is handed back (exit 0),
    its checkpoints and adapter untouched, and config.yaml says the new values."""
    run_dir, config = finished
    adapter = _digest(str(Path(run_dir) / "adapter"))
    assert cli.main(["train", str(config), "eval.every=1", "train.max_failures=2"]) == 0
    assert _digest(str(Path(run_dir) / "adapter")) == adapter
    saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    assert saved["eval"]["every"] == 1 and saved["train"]["max_failures"] == 2


def test_a_second_driver_on_a_live_run_directory_exits_2_naming_the_owner(finished, capsys) -> None:
    """Another process holds the run directory's lease (a driver still running): `uft-ray train` of the same
    config is refused before any work. Before, it started a second writer on the same checkpoints."""
    run_dir, config = finished
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom uft_ray import lease\nlease.acquire(sys.argv[1])\n"
         "print('held', flush=True)\ntime.sleep(300)", run_dir],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _digest(run_dir)
        assert cli.main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert "in use by another driver" in err and f"pid {holder.pid}" in err
        assert _digest(run_dir) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    (Path(run_dir) / "lease.json").unlink()  # the killed holder's lease (stale after the timeout)


def test_rows_prepared_for_another_config_are_refused_naming_the_fields(finished, make_config, tmp_path) -> None:
    """A sweep arm given a prepared directory made for another max_len: refused before training, naming it.
    Before, `prepared_dir` was trusted blindly and the arm trained on rows cut for another config."""
    run_dir, _ = finished
    rows = tmp_path / "prepared"
    shutil.copytree(Path(run_dir) / "prepared", rows)
    write_prepared_key(make_config("rerun", train=STEPS), str(rows))
    before = _digest(str(rows))
    other = make_config("other-max-len", train=STEPS, tokenize={"max_prompt_len": 96, "max_len": 120})
    with pytest.raises(ConfigError, match=r"tokenize\.max_len: the rows in .* were prepared with 128, this config "):
        driver.run(other, prepared_dir=str(rows))
    assert _digest(str(rows)) == before
    assert not (Path(other.output.run_dir) / "checkpoints").exists()
