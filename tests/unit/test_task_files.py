"""The UFT authors' data files read as they are (tests/fixtures/uft_authors: a few of their rows, in their veRL
layout): prompts and hint chunks byte for byte, every row's own answer worth 1.0 under their rules, `uft-ray tasks
check` on them, malformed rows quarantined with their reasons, and their rows as training prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import uft_ray.tasks
from uft_ray import cli, storage
from uft_ray.config import ConfigError, load_config
from uft_ray.rft.prompts import _table, task_rows
from uft_ray.tasks import countdown, knights_knaves, read_rows, verify
from uft_ray.tasks.files import content_id

AUTHORS = Path(__file__).resolve().parents[1] / "fixtures" / "uft_authors"
FILES = [
    ("countdown_train.parquet", "countdown", 4),
    ("kk_logic_train.parquet", "knights_knaves", 3),
    ("math_test.parquet", "math", 4),
]


def _raw(name: str) -> list[dict[str, Any]]:
    return pq.read_table(AUTHORS / name).to_pylist()


@pytest.mark.parametrize(("name", "task", "n"), FILES)
def test_rows_keep_the_authors_prompt_and_hint_chunks_byte_for_byte(name: str, task: str, n: int) -> None:
    raw, rows = _raw(name), read_rows(str(AUTHORS / name), task)
    assert len(rows) == len(raw) == n
    for rec, row in zip(raw, rows, strict=True):
        assert row["prompt"].encode() == rec["prompt"][0]["content"].encode()
        assert [c.encode() for c in row["hint"]] == [c.encode() for c in rec["hint"]]
        assert row["answer"] == rec["answer"] and row["task"] == task
        assert row["prompt"].endswith("<think> ")  # their template: the space after the tag
        assert row["answer"].startswith("".join(row["hint"]) + " </think>\n<answer> ")


def test_the_ground_truth_becomes_the_tasks_fields() -> None:
    cd = read_rows(str(AUTHORS / "countdown_train.parquet"), "countdown")[0]
    assert cd["nums"] == [44, 19, 35] and cd["target"] == 98
    assert cd["row_id"] == "countdown-" + content_id(_raw("countdown_train.parquet")[0])  # by content
    assert cd["extra_info"] == {"index": 0, "split": "train"} and cd["data_source"] == "countdown"
    kk = read_rows(str(AUTHORS / "kk_logic_train.parquet"), "knights_knaves", split="train")[0]
    assert kk["names"] == ["Michael", "Zoey", "Ethan"] and kk["roles"] == ["knight"] * 3
    assert kk["row_id"] == "knights_knaves-train-" + content_id(_raw("kk_logic_train.parquet")[0])
    math = read_rows(str(AUTHORS / "math_test.parquet"), "math")[0]
    assert math["truth"] == "8000" and math["level"] == 5 and math["type"] == "Number Theory"


@pytest.mark.parametrize(("name", "task", "n"), FILES)
@pytest.mark.parametrize("rules", ["paper", "strict"])
def test_every_rows_own_answer_scores_1(name: str, task: str, n: int, rules: str) -> None:
    rows = read_rows(str(AUTHORS / name), task)
    assert [verify(row, row["answer"], rules) for row in rows] == [1.0] * n
    assert [uft_ray.tasks.verify(row, row["answer"]) for row in rows] == [1.0] * n  # paper by default


def test_verify_dispatches_on_the_rows_task_and_rules() -> None:
    cd = read_rows(str(AUTHORS / "countdown_train.parquet"), "countdown")[0]
    assert verify(cd, "<answer> 44 + 19 + 35 </answer>") == 1.0
    assert verify(cd, "<answer> 44 + 19 - 35 </answer>") == 0.1
    assert verify(cd, "<answer> 44 + 19 + 35 </answer>\n") == 0.0  # paper: the last line holds no answer
    assert verify(cd, "<answer> 44 + 19 + 35 </answer>\n", "strict") == 1.0
    with pytest.raises(ValueError, match="no built-in verifier"):
        verify({"task": "sudoku"}, "<answer> 1 </answer>")


@pytest.mark.parametrize(("name", "task", "n"), FILES)
def test_tasks_check_prints_the_counts_and_exits_0(name: str, task: str, n: int, capsys) -> None:
    assert cli.main(["tasks", "check", str(AUTHORS / name), "--task", task]) == 0
    out = capsys.readouterr().out
    assert f"{n} rows of task {task}" in out and f"reward 1.0: {n}\n" in out and "quarantined: 0" in out


def _broken(tmp_path: Path) -> Path:
    """The countdown file with row 1 missing its numbers, row 2 a two-message prompt, row 3 a wrong answer."""
    rows = _raw("countdown_train.parquet")
    rows[1]["reward_model"]["ground_truth"]["numbers"] = None
    rows[2]["prompt"] = rows[2]["prompt"] * 2
    rows[3]["answer"] = rows[3]["answer"].replace("<answer> ", "<answer> 1 + ")
    schema = pq.read_schema(AUTHORS / "countdown_train.parquet")
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_malformed_rows_are_quarantined_with_their_reasons(tmp_path: Path, capsys) -> None:
    path = _broken(tmp_path)
    quarantined: list[dict[str, Any]] = []
    rows = read_rows(str(path), "countdown", quarantined=quarantined)
    raw = pq.read_table(path).to_pylist()
    assert [r["row_id"] for r in rows] == [f"countdown-{content_id(raw[i])}" for i in (0, 3)]
    assert [(q["index"], q["reason"], q["detail"]) for q in quarantined] == [
        (1, "missing_field", "reward_model.ground_truth.numbers: missing"),
        (2, "wrong_type", "prompt: a one-message list [{'role': 'user', 'content': TEXT}]"),
    ]
    assert cli.main(["tasks", "check", str(path), "--task", "countdown"]) == 1  # row 3's own answer is wrong
    out = capsys.readouterr().out
    assert "reward 1.0: 1\n" in out and "reward 0.1: 1\n" in out
    assert f"countdown-{content_id(raw[3])}: reward 0.1" in out
    assert "quarantined: 2" in out and "missing_field: 1" in out and "wrong_type: 1" in out
    assert "reward_model.ground_truth.numbers: missing" in out


def test_json_lines_in_our_layout_with_a_broken_line_and_a_duplicate_id(tmp_path: Path, capsys) -> None:
    rows = countdown.generate(3, seed=1)
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps(rows[0])]
    path = tmp_path / "ours.jsonl"
    path.write_text("\n".join(lines) + "\n")
    quarantined: list[dict[str, Any]] = []
    assert read_rows(str(path), "countdown", quarantined=quarantined) == rows
    assert [(q["reason"], q.get("line"), q.get("index")) for q in quarantined] == [
        ("malformed", 4, None),
        ("duplicate", None, 4),
    ]
    assert cli.main(["tasks", "check", str(path), "--task", "countdown", "--rules", "strict"]) == 0
    assert "duplicate: 1" in capsys.readouterr().out


def test_tasks_check_bad_usage_exits_2(tmp_path: Path) -> None:
    assert cli.main(["tasks", "check", str(tmp_path / "none.parquet"), "--task", "math"]) == 2
    for argv in (["tasks"], ["tasks", "check", "x.parquet"], ["tasks", "check", "x.parquet", "--task", "sudoku"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


def test_the_authors_rows_from_a_bucket(s3_bucket: str) -> None:
    storage.copy_tree(str(AUTHORS), f"{s3_bucket}/uft")
    local = read_rows(str(AUTHORS / "kk_logic_train.parquet"), knights_knaves.NAME)
    assert read_rows(f"{s3_bucket}/uft/kk_logic_train.parquet", knights_knaves.NAME) == local


class CharTokenizer:
    """One id per character: the ids give the text back exactly."""

    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _cfg(*overrides: str):
    return load_config("jobs/configs/demo_hint_rft_tiny.yaml", ["model.path=/tmp", *overrides], check_paths=False)


def test_a_path_gives_a_generated_task_the_files_rows_and_the_prompt_ids_are_its_text() -> None:
    cfg = _cfg(f"rft.path={AUTHORS / 'countdown_train.parquet'}")
    quarantined: list[dict[str, Any]] = []
    rows = task_rows(cfg, "train", quarantined)
    raw = _raw("countdown_train.parquet")
    assert [r["row_id"] for r in rows] == [f"countdown-train-{content_id(rec)}" for rec in raw] and not quarantined
    table = _table(rows, CharTokenizer(), 10_000, quarantined)
    raw = _raw("countdown_train.parquet")
    assert ["".join(map(chr, ids)) for ids in table.column("prompt_ids").to_pylist()] == [
        r["prompt"][0]["content"] for r in raw
    ]  # the text as given, no chat template
    assert table.column("hint").to_pylist() == [r["hint"] for r in raw]
    held_out = task_rows(cfg, "eval", quarantined)  # no eval_path: generated with another seed
    assert len(held_out) == 8 and held_out[0]["prompt"].endswith("<think> ")


def test_n_train_null_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="rft.n_train: null takes every row of rft.path"):
        _cfg("rft.n_train=null")
    assert _cfg("rft.n_train=null", "rft.task=math", "rft.path=/data/x.parquet").rft.n_train is None
    assert _cfg().rft.path is None and _cfg("rft.path=/data/cd.parquet").rft.task == "countdown"
