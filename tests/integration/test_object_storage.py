"""A run that lives in a bucket: the real S3 API server of tests/fixtures/s3_server.py (moto) on 127.0.0.1.

One shortened run, through the code paths users hit (`driver.run` with `output.storage_path`,
`reference.cache_dir` and `model.path` all `s3://`): the model is read from the bucket (downloaded once per
node, checked), the rows are prepared into the bucket, the reference cache is published there (parts, then the
manifest), Ray Train writes its checkpoints there, rank 0 its metrics. The run is stopped after step 4 (its
last checkpoint is step 3) and rerun from another working directory: it continues from the bucket exactly
(the rows of every step once, in plan order; the rerun's step 4 has the first attempt's loss to the bit).
The benchmark (eval.tasks) runs on the adapter in the bucket and TensorBoard's events are uploaded there too.
Nothing is written to the driver's working directories.

A second, 2-step `method: hint_rft` run with `output.storage_path` in the bucket: its prompts, plan, metrics,
checkpoints, final adapter and report land there, the RunResult names them by `s3://` URI, and the adapter loads
from the bucket.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fixtures.eval_tasks import MC, write_local_tasks
from fixtures.recorder import Recorder

from uft_ray import driver, model_store, storage
from uft_ray.run_dir import RunDir

pytestmark = pytest.mark.integration

STEPS, EVERY = 6, 3


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bucket_run(make_config, tiny_assets, s3_server, ray_local, tmp_path_factory):
    bucket = s3_server.new_bucket("run")
    model_uri = f"{bucket}/models/tiny"
    storage.copy_tree(tiny_assets["model"], model_uri)
    root = tmp_path_factory.mktemp("bucket")
    cfg = make_config(
        "in-bucket",
        model={"path": model_uri},
        reference={"cache_dir": f"{bucket}/cache"},
        train={"max_steps": STEPS, "checkpoint_every": EVERY},
        output={"storage_path": f"{bucket}/runs"},
        # a benchmark on the final adapter (a local lm_eval task, 4 docs) and TensorBoard: their files go there too
        eval={"tasks": [MC], "limit": 4, "include_path": str(write_local_tasks(root / "lm-eval-tasks"))},
        logging={"trackers": ["tensorboard"]},
    )
    debug = root / "debug-run"  # the test hooks' own records stay local (tests/fixtures/recorder.py)
    cwd = os.getcwd()
    first_dir, second_dir = root / "first-cwd", root / "second-cwd"
    first_dir.mkdir(), second_dir.mkdir()
    try:
        os.chdir(first_dir)
        with pytest.raises(Exception, match="stopping after step 4"):
            driver.run(cfg, hooks=Recorder(str(debug), stop_after_step=4))
        first_metrics = RunDir(cfg.output.run_dir).read_metrics()
        os.chdir(second_dir)  # another working directory: all it shares with the first is the bucket
        result = driver.run(cfg, hooks=Recorder(str(debug)))
    finally:
        os.chdir(cwd)
    return {
        "cfg": cfg,
        "result": result,
        "first": first_metrics,
        "debug": debug / "debug",
        "bucket": bucket,
        "model": model_uri,
        "cwds": (first_dir, second_dir),
    }


def test_everything_the_run_writes_is_in_the_bucket(bucket_run):
    run = RunDir(bucket_run["cfg"].output.run_dir)
    assert run.path.startswith("s3://") and bucket_run["result"].run_dir == run.path
    _, files = storage.list_files(run.path)
    names = {f.split("/in-bucket/", 1)[1] for f in files}
    for expected in (
        "config.yaml",
        "plan.parquet",
        "metrics.jsonl",
        "report.html",
        "prepared/summary.json",
        "quarantine/counts.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer_config.json",
        "checkpoints/checkpoint_000003/state.json",
        "checkpoints/checkpoint_000006/adapter/adapter_model.safetensors",
        "eval/summary.json",
    ):
        assert expected in names, expected
    assert any(n.startswith("prepared/rows/") and n.endswith(".parquet") for n in names)
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    summary = storage.read_json(run.eval_summary)
    assert 0.0 <= summary["tasks"][MC]["acc,none"] <= 1.0 and summary["adapter"] == run.adapter
    assert bucket_run["result"].checkpoint_dir == run.checkpoint(STEPS)
    # the reference cache: parts and a complete manifest, in the bucket
    _, cache_files = storage.list_files(f"{bucket_run['bucket']}/cache/ref_logp")
    manifests = [f for f in cache_files if f.endswith("/manifest.json")]
    assert len(manifests) == 1
    manifest = storage.read_json(storage.as_uri(bucket_run["bucket"], manifests[0]))
    assert manifest["rows"] == 40 and manifest["inputs"]["model"]["uri"] == bucket_run["model"]
    for cwd in bucket_run["cwds"]:  # the driver wrote nothing where it ran
        assert list(cwd.iterdir()) == []


def test_the_rerun_continues_from_the_bucket_exactly(bucket_run):
    run = RunDir(bucket_run["cfg"].output.run_dir)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = {r["step"]: r for r in bucket_run["first"]}
    assert sorted(first) == [1, 2, 3, 4]  # the first attempt trained step 4 after its last checkpoint (3)
    for step in (1, 2, 3):  # kept as written: the rerun did not redo them
        assert rows[step - 1]["time"] == first[step]["time"]
    assert rows[3]["time"] != first[4]["time"]  # step 4 was trained again from the checkpoint...
    assert rows[3]["loss"] == first[4]["loss"]  # ...to the same number
    plan = pq.read_table(run.plan).to_pandas()
    for rank in (0, 1):
        attempts = _jsonl(bucket_run["debug"] / f"attempts_rank{rank}.jsonl")
        assert [a["start_step"] for a in attempts] == [0, EVERY]
        got = [(r["step"], r["row_ids"]) for r in _jsonl(bucket_run["debug"] / f"consumed_rank{rank}.jsonl")]
        mine = plan[plan["rank"] == rank].sort_values(["step", "micro", "slot"])
        want = [(int(s) + 1, list(g.row_id)) for s, g in mine.groupby("step", sort=True)]
        assert got == want  # every step once, in plan order: nothing trained twice or skipped


def test_the_model_came_from_the_bucket_once_checked(bucket_run):
    local = model_store.local_dir_for(bucket_run["model"])
    record = json.loads((Path(local) / model_store.RECORD).read_text())
    listed = model_store.remote_files(bucket_run["model"])
    assert set(record) == set(listed) and any(n.endswith(".safetensors") for n in record)
    for name, entry in record.items():
        assert entry["remote_size"] == listed[name][0] == os.path.getsize(os.path.join(local, name))
        assert entry["sha256"] == model_store._sha256(os.path.join(local, name))


def test_the_final_adapter_loads_from_the_bucket(bucket_run, tiny_assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = RunDir(bucket_run["cfg"].output.run_dir)
    with storage.local_copy(run.adapter) as d:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), d)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init


# ---------------------------------------------------------------------------------------------------------
# `method: hint_rft` in a bucket: 2 steps, 2 workers, one rollout actor; prompts, plan, metrics, checkpoints,
# the final adapter and the report all go to `output.storage_path`.

RFT_STEPS = 2


@pytest.fixture(scope="module")
def rft_bucket_run(tiny_assets, s3_server, ray_local, tmp_path_factory):
    from uft_ray.config import load_config

    bucket = s3_server.new_bucket("rft")
    cfg = load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        [
            f"model.path={tiny_assets['model']}",
            f"output.storage_path={bucket}/runs",
            "output.run_name=rft-in-bucket",
            "rft.n_train=16",
            "rft.prompts_per_step=2",
            "rft.n=2",
            "rft.max_response_len=8",
            "eval.every=null",
            "eval.max_rows=2",
            "train.micro_batch_size=2",
            "train.grad_accum=1",
            f"train.max_steps={RFT_STEPS}",
            "train.checkpoint_every=1",
            "train.lr=2e-2",
            "train.cpus_per_worker=1",
        ],
    )
    cwd, here = os.getcwd(), tmp_path_factory.mktemp("rft-cwd")
    try:
        os.chdir(here)
        result = driver.run(cfg)
    finally:
        os.chdir(cwd)
    return {"cfg": cfg, "result": result, "cwd": here}


def test_a_hint_rft_run_writes_everything_to_the_bucket(rft_bucket_run):
    run, result = RunDir(rft_bucket_run["cfg"].output.run_dir), rft_bucket_run["result"]
    assert run.path.startswith("s3://") and result.run_dir == run.path
    assert result.adapter_dir == run.adapter and result.metrics_path == run.metrics and result.plan_path == run.plan
    assert result.report_path == run.report and result.checkpoint_dir == run.checkpoint(RFT_STEPS)
    for path in (result.adapter_dir, result.metrics_path, result.plan_path, result.report_path, result.checkpoint_dir):
        assert path.startswith("s3://"), path
    _, files = storage.list_files(run.path)
    names = {f.split("/rft-in-bucket/", 1)[1] for f in files}
    for expected in (
        "config.yaml",
        "plan.parquet",
        "metrics.jsonl",
        "report.html",
        "prompts/train.parquet",
        "prompts/eval.parquet",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer_config.json",
        "checkpoints/checkpoint_000001/state.json",
        "checkpoints/checkpoint_000002/state.json",
        "checkpoints/checkpoint_000002/adapter/adapter_model.safetensors",
    ):
        assert expected in names, expected
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert result.metrics == rows[-1] and result.steps == RFT_STEPS
    assert storage.read_json(f"{run.checkpoint(RFT_STEPS)}/state.json")["step"] == RFT_STEPS
    # the final adapter is the last checkpoint's, byte for byte
    last = storage.read_bytes(f"{run.checkpoint(RFT_STEPS)}/adapter/adapter_model.safetensors")
    assert storage.read_bytes(f"{run.adapter}/adapter_model.safetensors") == last
    assert list(rft_bucket_run["cwd"].iterdir()) == []  # the driver wrote nothing where it ran


def test_the_hint_rft_adapter_loads_from_the_bucket(rft_bucket_run, tiny_assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with storage.local_copy(rft_bucket_run["result"].adapter_dir) as d:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), d)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init
