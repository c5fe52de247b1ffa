"""metrics.jsonl on object storage (the moto S3 server): the bytes a step writes do not grow with the run, readers
read only what is new, and a failed write is a warning retried with the next step, never a lost step."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from uft_ray import storage
from uft_ray.run_dir import METRICS_CHUNK, RunDir


def _row(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, **{f"m/{i}": float(i) for i in range(20)}}


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every whole-object write through storage (uri, bytes), recorded around the real one."""
    seen: list[tuple[str, int]] = []
    real = storage.atomic_write

    def spy(uri, data):
        seen.append((uri, len(data) if isinstance(data, bytes) else -1))
        return real(uri, data)

    monkeypatch.setattr(storage, "atomic_write", spy)
    return seen


def test_the_bytes_a_step_writes_do_not_grow_with_the_run(s3_bucket: str, puts: list) -> None:
    run = RunDir(f"{s3_bucket}/run")
    per_step = []
    for step in range(1, 3 * METRICS_CHUNK + 11):
        n = len(puts)
        run.append_metrics(_row(step))
        per_step.append(sum(b for _, b in puts[n:]))
    line = len(storage.read_bytes(storage.join(run.metrics + ".parts", "00000000.jsonl"))) / METRICS_CHUNK
    assert max(per_step) <= (METRICS_CHUNK + 1) * line  # at most one chunk, wherever the run is
    assert per_step[-1] < per_step[METRICS_CHUNK - 1]  # the step after a full chunk starts small again
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 3 * METRICS_CHUNK + 11))


def test_a_reader_reads_only_what_is_new(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader = RunDir(f"{s3_bucket}/run"), RunDir(f"{s3_bucket}/run")
    for step in range(1, 2 * METRICS_CHUNK + 3):
        writer.append_metrics(_row(step))
    assert len(reader.read_metrics()) == 2 * METRICS_CHUNK + 2
    got: list[int] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: got.append(len(b := real(uri))) or b)
    assert len(reader.read_metrics()) == 2 * METRICS_CHUNK + 2
    assert got == []  # nothing new: nothing downloaded
    writer.append_metrics(_row(2 * METRICS_CHUNK + 3))
    rows = reader.read_metrics()
    assert rows[-1] == _row(2 * METRICS_CHUNK + 3) and len(rows) == 2 * METRICS_CHUNK + 3
    assert len(got) == 1 and got[0] < 4 * len(str(_row(1)))  # only the current chunk (3 lines)


def test_a_local_reader_reads_from_its_offset_and_waits_for_a_whole_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_metrics(_row(1))
    assert [r["step"] for r in run.read_metrics()] == [1]
    with open(run.metrics, "a") as f:
        f.write('{"step": 2, "lo')  # a line being written
    assert [r["step"] for r in run.read_metrics()] == [1]
    with open(run.metrics, "a") as f:
        f.write('ss": 0.5}\n')
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


def test_a_failed_metrics_write_is_a_warning_and_the_step_is_written_with_the_next(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(f"{s3_bucket}/run")
    real = storage.atomic_write
    down = {"on": False}

    def flaky(uri, data):
        if down["on"]:
            raise OSError("the store did not answer")
        return real(uri, data)

    monkeypatch.setattr(storage, "atomic_write", flaky)
    run.append_metrics(_row(1))
    down["on"] = True
    with caplog.at_level(logging.WARNING):
        run.append_metrics(_row(2))  # no exception: the training step goes on
    assert "could not write" in caplog.text
    down["on"] = False
    run.append_metrics(_row(3))
    assert [r["step"] for r in RunDir(run.path).read_metrics()] == [1, 2, 3]


def test_resume_truncates_the_parts_and_the_end_seals_one_file(s3_bucket: str) -> None:
    run = RunDir(f"{s3_bucket}/run")
    for step in range(1, METRICS_CHUNK + 20):
        run.append_metrics(_row(step))
    run.truncate_metrics(keep_through=METRICS_CHUNK - 5)  # a failed attempt's later lines go
    assert [r["step"] for r in RunDir(run.path).read_metrics()] == list(range(1, METRICS_CHUNK - 4))
    for step in range(METRICS_CHUNK - 4, METRICS_CHUNK + 3):
        run.append_metrics(_row(step) | {"again": True})
    run.seal_metrics()
    assert not storage.exists(run.metrics + ".parts")
    rows = RunDir(run.path).read_metrics()
    assert [r["step"] for r in rows] == list(range(1, METRICS_CHUNK + 3))
    assert all(r.get("again") for r in rows[METRICS_CHUNK - 5 :])
