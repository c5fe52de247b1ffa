"""Experiment trackers (uft_ray.trackers) fed by a metrics.jsonl this test writes, read back through each tracker's
own files or server: W&B offline (its transaction log, decoded with W&B's protobuf), a real `mlflow server` on
127.0.0.1, TensorBoard event files (EventAccumulator). No Ray.

What must hold: every row's keys and values arrive under its step, written before the block (a resumed run's
history) or while it runs (the thread); the resolved config as parameters; the adapter as an artifact; a resumed
run ignores the rows a failed attempt left after its checkpoint until they are rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uft_ray import tracker_names, trackers
from uft_ray.config import Config, ConfigError, LoggingConfig, OutputConfig, load_config, validate
from uft_ray.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def make_cfg(tmp_path: Path, **logging: object) -> Config:
    cfg = Config()
    cfg.output = OutputConfig(storage_path=str(tmp_path / "runs"), run_name="tracked")
    cfg.logging = LoggingConfig(**logging)
    os.makedirs(cfg.output.run_dir, exist_ok=True)
    return cfg


def row(step: int, scale: float = 1.0) -> dict:
    """A metrics.jsonl line in the offline method's shape (a few of its keys)."""
    return {
        "step": step,
        "epoch": 0,
        "time": 1_800_000_000.0 + step + scale / 10,
        "loss": 0.5 * scale / step,
        "loss/ultrachat": 0.25 * scale / step,
        "reward/helpsteer2": -0.125 * scale * step,
        "mixture/ultrachat/cumulative": 0.5,
        "tokens_per_s": 1000.0 + step,
        "lr": 1e-4 * step,
    }


def values(r: dict) -> dict:
    return {k: float(v) for k, v in r.items() if k != "step"}


def adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt" / "adapter"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return d


def run_tracked(cfg: Config, before: list[dict], during: list[dict], adapter: Path | None) -> None:
    """`before` is in metrics.jsonl when the trackers open (the history of a run resumed after its last row);
    `during` is appended while the thread follows the file."""
    run = RunDir(cfg.output.run_dir)
    for r in before:
        run.append_metrics(r)
    start = before[-1]["step"] if before else 0
    with trackers.open_trackers(cfg, run, start, poll_s=0.05) as tracked:
        for r in during:
            run.append_metrics(r)
        deadline = time.monotonic() + 30
        while during and tracked.last < during[-1]["step"]:  # the thread logs them, not the final flush
            assert time.monotonic() < deadline, f"thread logged through step {tracked.last} only"
            time.sleep(0.05)
        tracked.adapter = str(adapter) if adapter else None


# ---------------------------------------------------------------------------------------------------------
# W&B offline


def wandb_records(path: Path) -> Iterator[object]:
    """The records of a `.wandb` transaction log: W&B's LevelDB-style framing (a 7-byte file header ':W&B',
    magic, version; 32 KiB blocks of records, each a 7-byte header crc32 / length / type 1 full, 2 first,
    3 middle, 4 last), payloads decoded with W&B's own `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under ~
        monkeypatch.setenv(k, str(tmp_path / k.lower()))


def test_wandb_offline_run_holds_the_rows_the_config_and_the_adapter(tmp_path: Path, wandb_env: None) -> None:
    pytest.importorskip("wandb")
    cfg = make_cfg(tmp_path, trackers=["wandb"], wandb_mode="offline", project="uft-test")
    rows = [row(s) for s in range(1, 7)]
    run_tracked(cfg, rows[:2], rows[2:], adapter_dir(tmp_path))
    import wandb

    # run.finish() returns before wandb-core has written the log out (a driver's exit waits for it): wait here.
    wandb.teardown()
    (log,) = (Path(cfg.output.run_dir) / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, artifacts = {}, {}, []
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            assert rec.run.project == "uft-test" and rec.run.display_name == "tracked"
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "artifact":
            artifacts.append(
                (rec.artifact.name, rec.artifact.type, sorted(e.path for e in rec.artifact.manifest.contents))
            )
    assert history == {r["step"]: values(r) for r in rows}
    assert config["loss"]["type"] == cfg.loss.type and config["output"]["run_name"] == "tracked"
    assert config["logging"]["trackers"] == ["wandb"]
    assert artifacts == [("tracked-adapter", "model", ["adapter_config.json", "adapter_model.safetensors"])]


# ---------------------------------------------------------------------------------------------------------
# MLflow against a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (sqlite store, artifacts served by the server), stopped by its group id."""
    pytest.importorskip("mlflow")
    import urllib.request

    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")]  # fmt: skip
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield uri
    finally:
        with_group = [signal.SIGTERM, signal.SIGKILL]
        for sig in with_group:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()


def test_mlflow_run_holds_the_params_the_metric_histories_and_the_adapter(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path, trackers=["mlflow"], mlflow_tracking_uri=mlflow_server, project="uft-test")
    rows = [row(s) for s in range(1, 6)]
    run_tracked(cfg, rows[:1], rows[1:], adapter_dir(tmp_path))

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("uft-test").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.tags["uft_ray.run_dir"] == cfg.output.run_dir
    assert run.data.params == trackers.flat_params(cfg)
    assert run.data.params["loss.type"] == cfg.loss.type and run.data.params["logging.trackers"] == '["mlflow"]'
    assert set(run.data.metrics) == set(values(rows[0]))
    for key in values(rows[0]):
        history = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["step"], pytest.approx(float(r[key])), int(r["time"] * 1000)) for r in rows], key
    listed = [f.path for f in client.list_artifacts(run.info.run_id, "adapter")]
    assert sorted(listed) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    got = client.download_artifacts(run.info.run_id, "adapter/adapter_config.json", str(tmp_path / "dl"))
    assert Path(got).read_text() == '{"r": 8}'


# ---------------------------------------------------------------------------------------------------------
# TensorBoard


def scalars(logdir: str) -> dict[str, list[tuple[int, float, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_are_the_rows_with_their_wall_times(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, trackers=["tensorboard"])
    rows = [row(s) for s in range(1, 5)]
    rows.insert(0, {**row(1), "step": 0})  # a baseline evaluation before the first step
    run_tracked(cfg, rows[:2], rows[2:], None)
    logdir = os.path.join(cfg.output.run_dir, "tensorboard")
    got = scalars(logdir)
    assert set(got) == set(values(rows[0])) - {"time"}  # each event's wall time instead
    for key in got:
        assert got[key] == [
            (r["step"], pytest.approx(float(r[key]), rel=1e-6), pytest.approx(r["time"])) for r in rows
        ]
    acc = EventAccumulator(logdir)
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_a_resumed_run_logs_the_history_and_the_rewritten_rows_not_the_failed_attempts(tmp_path: Path) -> None:
    """Steps 1-4 were logged by a first attempt that failed after its checkpoint at step 2. The rerun resumes at
    2: while the workers load, metrics.jsonl still holds the failed attempt's steps 3-4; they truncate it and
    write 3-5 again. TensorBoard must end with the history 1-2 and the new 3-5, nothing of the old 3-4."""
    pytest.importorskip("tensorboard")
    cfg = make_cfg(tmp_path, trackers=["tensorboard"], tensorboard_dir=str(tmp_path / "tb"))
    run = RunDir(cfg.output.run_dir)
    first = [row(s) for s in range(1, 5)]
    run_tracked(cfg, first, [], None)
    time.sleep(1.1)  # event file names carry the second they were opened in
    with trackers.open_trackers(cfg, run, 2, poll_s=0.05) as tracked:
        time.sleep(0.3)  # the thread sees the failed attempt's rows and must skip them
        assert tracked.last == 2
        run.truncate_metrics(keep_through=2)  # what the workers do when they restore step 2
        for s in range(3, 6):
            run.append_metrics(row(s, scale=2.0))
    expected = first[:2] + [row(s, scale=2.0) for s in range(3, 6)]
    got = scalars(str(tmp_path / "tb" / "tracked"))  # tensorboard_dir/{run_name}
    assert [(s, v) for s, v, _ in got["loss"]] == [(r["step"], pytest.approx(r["loss"])) for r in expected]


def test_eval_results_are_logged_at_the_last_step(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = make_cfg(tmp_path, trackers=["tensorboard"])
    run = RunDir(cfg.output.run_dir)
    os.makedirs(run.eval)
    summary = {"tasks": {"gsm8k": {"exact_match,strict-match": 0.25, "alias": "gsm8k"}, "arc": {"acc,none": 0.5}},
               "derived": {"truthfulqa_mc": {"value": 0.4, "mean_of": ["mc1", "mc2"]}}}  # fmt: skip
    Path(run.eval_summary).write_text(json.dumps(summary))
    run_tracked(cfg, [row(1), row(2)], [], None)
    got = scalars(os.path.join(run.path, "tensorboard"))
    assert got["eval/arc/acc"][0][:2] == (2, 0.5)
    assert got["eval/gsm8k/exact_match_strict-match"][0][:2] == (2, 0.25)
    assert got["eval/truthfulqa_mc"][0][:2] == (2, pytest.approx(0.4))


# ---------------------------------------------------------------------------------------------------------
# Config


def test_params_are_the_flattened_resolved_config() -> None:
    cfg = load_config(ROOT / "jobs/configs/demo_tiny.yaml", ["logging.trackers=[wandb, mlflow]"], check_paths=False)
    params = trackers.flat_params(cfg)
    assert params["train.lr"] == json.dumps(cfg.train.lr) and params["output.run_name"] == cfg.output.run_name
    assert params["data.sources.1.name"] == cfg.data.sources[1].name  # lists of mappings by index
    assert params["logging.trackers"] == '["wandb", "mlflow"]'
    assert all(len(v) <= trackers.MLFLOW_PARAM_MAX for v in params.values())


def test_bad_logging_config_fails_validation_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = ROOT / "jobs/configs/demo_tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(demo, ["logging.trackers=[wandb, neptune]", "logging.wandb_mode=cloud"], check_paths=False)
    assert e.value.messages == [
        "logging.trackers.1: 'neptune' is not allowed; use one of: wandb, mlflow, tensorboard",
        "logging.wandb_mode: 'cloud' is not allowed; use one of: online, offline, disabled",
    ]
    with pytest.raises(ConfigError, match="logging.trackers: expected list of str"):
        load_config(demo, ["logging.trackers=wandb"], check_paths=False)
    # A tracker whose package is missing fails where the run runs (with the path checks), not on a submitter.
    monkeypatch.setitem(tracker_names.PACKAGES, "mlflow", "surely_not_an_installed_module")
    cfg = load_config(demo, ["logging.trackers=[mlflow, tensorboard]"], check_paths=False)
    assert [m for m in validate(cfg, check_paths=True) if m.startswith("logging")] == [
        "logging.trackers: mlflow not installed here; pip install 'uft-ray[trackers]'"
    ]


def test_no_trackers_is_a_no_op(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    run_tracked(cfg, [row(1)], [], None)
    assert sorted(os.listdir(cfg.output.run_dir)) == ["metrics.jsonl"]
