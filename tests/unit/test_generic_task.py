"""User tasks: verifiers named as module:function, built-in names, and records with a hint or a solution."""

from __future__ import annotations

import sys

import pytest

from uft_ray.tasks import countdown
from uft_ray.tasks.generic import load_verifier, task_row
from uft_ray.tasks.verifier import VerifierProcess


def test_verifiers_by_name_and_by_module_function(tmp_path, monkeypatch):
    assert load_verifier("countdown") is countdown.verify
    (tmp_path / "my_verifiers.py").write_text(
        "def exact(row, text):\n    return 1.0 if text.strip().endswith(row['answer']) else 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_verifier("my_verifiers:exact")
    v = VerifierProcess(fn)  # the trainer's form: the child imports my_verifiers by name, from the same sys.path
    try:
        assert v.score([{"answer": "42"}, {"answer": "42"}], ["... 42", "... 41"]) == [1.0, 0.0]
    finally:
        v.close()
    for bad in ("nope", "my_verifiers:missing", "no_such_module:f", ":f"):
        with pytest.raises(ValueError, match="verifier"):
            load_verifier(bad)
    sys.modules.pop("my_verifiers", None)


def test_records_become_task_rows():
    row = task_row({"prompt": "P", "solution": "First. Then.", "answer": "A"}, 3, name="mine")
    assert row["hint"] == ["First. ", "Then."] and row["row_id"] == "mine-3" and row["task"] == "mine"
    assert task_row({"prompt": "P", "hint": ["a", 2], "answer": "A", "row_id": 7}, 0)["hint"] == ["a", "2"]
    with pytest.raises(ValueError, match="record 5"):
        task_row({"prompt": "P", "answer": "A"}, 5)
