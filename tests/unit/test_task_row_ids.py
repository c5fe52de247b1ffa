"""hint_rft task rows are keyed by their content, not their position: a reshuffled file keeps every prompt's id, an
edited record gets a new one, so a rerun over a changed task file can never "resume exactly" on other prompts (its
plan, made of these ids, no longer matches the checkpoints')."""

from __future__ import annotations

import json
from pathlib import Path

from uft_ray.tasks import read_rows

TASK = "my_tasks:verify"  # a generic task: read_rows never imports its verifier


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _records() -> list[dict]:
    return [{"prompt": f"echo {i} :", "answer": str(i), "solution": f"It is {i}."} for i in range(5)]


def _ids(path: str) -> dict[str, str]:
    return {r["row_id"]: r["prompt"] for r in read_rows(path, TASK, split="train")}


def test_a_reshuffled_file_keeps_each_prompts_id(tmp_path: Path) -> None:
    first = _ids(_write(tmp_path / "a.jsonl", _records()))
    shuffled = _ids(_write(tmp_path / "b.jsonl", _records()[::-1]))
    assert shuffled == first and len(first) == 5


def test_an_edited_record_gets_a_new_id_and_the_others_keep_theirs(tmp_path: Path) -> None:
    first = _ids(_write(tmp_path / "a.jsonl", _records()))
    records = _records()
    records[2]["prompt"] = "echo 22 :"
    edited = _ids(_write(tmp_path / "b.jsonl", records))
    assert set(first) - set(edited) == {next(k for k, p in first.items() if p == "echo 2 :")}
    assert len(set(edited) - set(first)) == 1


def test_the_split_keeps_train_and_eval_ids_apart_and_a_records_own_id_wins(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", _records())
    train = {r["row_id"] for r in read_rows(path, TASK, split="train")}
    held = {r["row_id"] for r in read_rows(path, TASK, split="eval")}
    assert not train & held
    own = _write(tmp_path / "own.jsonl", [{**_records()[0], "row_id": "mine-1"}])
    assert [r["row_id"] for r in read_rows(own, TASK, split="train")] == ["mine-1"]
