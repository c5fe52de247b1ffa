"""`uft-ray eval` end to end on a local Ray: the tiny model + a LoRA adapter in one CPU actor, local lm_eval tasks
through --include-path, results in RUN_DIR/eval/; a task whose dataset lives on the hub only fails in one line
while the others report, and the command exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.eval_tasks import GEN, HUB, HUB_DATASET, MC, make_adapter, make_run_dir, write_local_tasks

from uft_ray import cli
from uft_ray.run_dir import RunDir

pytestmark = pytest.mark.integration


def test_eval_command_runs_tasks_in_a_ray_actor_and_writes_the_run_eval_folder(ray_local, tmp_path, capsys):
    from uft_ray.demo.tiny_model import make_tiny_model

    base = make_tiny_model(tmp_path / "tiny")
    run = make_run_dir(tmp_path / "runs" / "r1", base, make_adapter(base, tmp_path / "adapter"))
    tasks = write_local_tasks(tmp_path / "tasks")

    argv = ["eval", str(run), "--tasks", f"{MC},{HUB},{GEN}", "--include-path", str(tasks), "--offline"]
    rc = cli.main([*argv, "--limit", "4", "--log-samples"])
    out, err = capsys.readouterr()
    assert rc == 1, err  # one task failed, the others reported

    rd = RunDir(run)
    summary = json.loads(Path(rd.eval_summary).read_text())
    assert set(summary["tasks"]) == {MC, GEN} and list(summary["failed"]) == [HUB]
    assert (summary["workers"], summary["backend"], summary["device"]) == (1, "hf", "cpu")
    assert summary["adapter"] == rd.adapter and summary["base"] == base
    mc = json.loads((Path(rd.eval) / f"results_{MC}.json").read_text())
    assert mc["n-samples"][MC]["effective"] == 4
    assert summary["tasks"][MC]["acc,none"] == mc["results"][MC]["acc,none"]
    assert len((Path(rd.eval) / f"samples_{MC}.jsonl").read_text().splitlines()) == 4

    failures = [line for line in err.splitlines() if "eval failed" in line]
    assert len(failures) == 1 and HUB_DATASET in failures[0], err
    assert "Traceback" not in err
    assert f"[uft-ray] eval {MC}: acc,none" in out and "eval done: 2 of 3 task(s)" in out

    # a later run of one more task adds to the same summary
    assert cli.main(["eval", str(run), "--tasks", MC, "--include-path", str(tasks), "--offline", "--limit", "2"]) == 0
    summary = json.loads(Path(rd.eval_summary).read_text())
    assert set(summary["tasks"]) == {MC, GEN} and summary["failed"] == {}
