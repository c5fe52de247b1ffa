"""Hostile rows through the real readers (no Ray): the data plane's read task (`read_part`, which reads, normalizes,
writes quarantine parquet and builds Arrow blocks) and hint_rft's task-file reader (`read_rows` + the prompt table).
No single record may raise out of them: each bad record is quarantined with its reason, every good one comes out."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray.config import SourceConfig
from uft_ray.data import quarantine as q
from uft_ray.data import sources
from uft_ray.data.mixture import RANK_SPACE
from uft_ray.data.pipeline import read_part
from uft_ray.data.sources import iter_jsonl, plan_parts
from uft_ray.rft.prompts import _table
from uft_ray.tasks import countdown, read_rows

BIG = "9" * 400  # a 400-digit integer: float() of it overflows
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than the interpreter's recursion limit
MIDDLE = "[" * 900 + "1" + "]" * 900  # parses, but deep enough to break code that recurses over it later
SHALLOW = "[" * 99 + "1" + "]" * 99  # just within the nesting limit: its own row's reason, no recursion
SURROGATE = '"\\ud800 lone"'  # valid JSON, but a string no UTF-8 encoder takes


def _run(tmp_path: Path, fmt: str, path: Path, kind: str | None = None) -> tuple[list[dict], list[dict]]:
    """One read task in both modes, as the data plane runs it: (rows out, quarantine records written)."""
    src = SourceConfig(name="s", format=fmt, path=str(path), kind=kind)
    qdir = str(tmp_path / "quarantine")
    rows: list[dict] = []
    for part_index, part in enumerate(plan_parts(str(path))):
        list(read_part(src, part_index, part, 0, "stats", (0, RANK_SPACE), qdir))
        for table in read_part(src, part_index, part, 0, "rows", (0, RANK_SPACE), qdir):
            rows += table.to_pylist()
    return rows, q.read_quarantine(qdir).to_pylist() if Path(qdir).exists() else []


def _pc(completion: str = '"an answer"', prompt: str = '"a question"', extra: str = "") -> str:
    return f'{{"prompt": {prompt}, "completion": {completion}{extra}}}'


HS2 = '{{"prompt": "q", "response": "r", "helpfulness": {h}, "correctness": 2, "coherence": 3}}'
GOOD = {
    "prompt_completion": _pc(),
    "scored": _pc(extra=', "score": 0.5'),
    "helpsteer2": HS2.format(h=2),
    "helpsteer2_preference": '{"prompt": "q", "response_1": "a", "response_2": "b", "preference_strength": 1}',
    "messages": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
    "ultrachat_raw": '{"id": 1, "data": ["q", "a"]}',
}
HOSTILE = [
    # (format, line, reason)
    ("prompt_completion", _pc(completion=DEEP), q.JSON_PARSE_ERROR),
    ("prompt_completion", _pc(completion=MIDDLE), q.JSON_PARSE_ERROR),
    ("ultrachat_raw", f'{{"id": {MIDDLE}, "data": ["q", "a"]}}', q.JSON_PARSE_ERROR),
    ("scored", _pc(extra=f', "score": {SHALLOW}'), q.WRONG_TYPE),
    ("ultrachat_raw", f'{{"id": {SHALLOW}, "data": ["q", "a"]}}', q.WRONG_TYPE),
    ("scored", _pc(extra=f', "score": {BIG}'), q.RATING_OUT_OF_RANGE),
    ("scored", _pc(extra=f', "score": -{BIG}'), q.RATING_OUT_OF_RANGE),
    ("helpsteer2", HS2.format(h=BIG), q.RATING_OUT_OF_RANGE),
    (
        "helpsteer2_preference",
        f'{{"prompt": "q", "response_1": "a", "response_2": "b", "preference_strength": {BIG}}}',
        q.RATING_OUT_OF_RANGE,
    ),
    ("prompt_completion", _pc(completion=SURROGATE), q.INVALID_TEXT),
    ("prompt_completion", _pc(prompt=SURROGATE), q.INVALID_TEXT),
    ("prompt_completion", _pc(extra=f', "note": {SURROGATE}'), q.INVALID_TEXT),  # a field no format reads
    (
        "messages",
        f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}, {{"role": "assistant", "content": "a"}}]}}',
        q.INVALID_TEXT,
    ),  # fmt: skip
    ("ultrachat_raw", f'{{"id": {SURROGATE}, "data": ["q", "a"]}}', q.INVALID_TEXT),
]


@pytest.mark.parametrize(("fmt", "line", "reason"), HOSTILE, ids=[f"{i}-{h[0]}" for i, h in enumerate(HOSTILE)])
def test_a_hostile_json_line_is_quarantined_and_its_neighbours_come_out(
    tmp_path: Path, fmt: str, line: str, reason: str | None
) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join([GOOD[fmt], line, GOOD[fmt]]) + "\n")
    kind = "score" if fmt == "helpsteer2" else None
    rows, bad = _run(tmp_path, fmt, path, kind)
    assert len(rows) == 2 and {r["_origin"] for r in rows} == {"x.jsonl:1", "x.jsonl:3"}
    assert len(bad) == 1 and bad[0]["detail"].startswith(f"{path}:2: ")
    if reason is not None:
        assert bad[0]["reason"] == reason
    assert bad[0]["reason"] in q.REASONS
    assert len(bad[0]["raw"]) <= len(line) + 16


def test_invalid_utf8_in_a_parquet_string_column_costs_one_row(tmp_path: Path) -> None:
    good = pa.array([b"a question", b"\xff\xfe not utf-8", b"another question"], pa.binary())
    prompt = pa.Array.from_buffers(pa.string(), 3, good.buffers())  # the bytes as a string column, unchecked
    table = pa.table({"prompt": prompt, "completion": ["a", "b", "c"]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    rows, bad = _run(tmp_path, "prompt_completion", path)
    assert [r["response"] for r in rows] == ["a", "c"]
    assert [b["reason"] for b in bad] == [q.INVALID_TEXT] and bad[0]["detail"].startswith(f"{path}[row 1]: ")
    assert "not utf-8" in bad[0]["raw"] and '"completion": "b"' in bad[0]["raw"]


# --- one huge line -----------------------------------------------------------------------------------------


def test_a_huge_line_reads_in_linear_time_and_is_quarantined_as_too_long(tmp_path: Path) -> None:
    """A minified .json array (one 64 MB line): read in about the time of its bytes, never held whole."""
    row = json.dumps({"prompt": "q" * 200, "completion": "a" * 200})
    n = 64_000_000 // len(row)
    path = tmp_path / "minified.json"
    with path.open("w") as f:
        f.write(GOOD["prompt_completion"] + "\n[")
        f.write(",".join([row] * n))
        f.write("]\n" + GOOD["prompt_completion"] + "\n")
    t0 = time.perf_counter()
    recs = list(iter_jsonl(str(path)))
    seconds = time.perf_counter() - t0
    assert [(r.pos, r.kind) for r in recs] == [(1, "ok"), (2, q.TOO_LONG), (3, "ok")]
    assert str(sources.MAX_RECORD_BYTES) in recs[1].error and "JSON lines" in recs[1].error
    assert len(recs[1].raw()) < 10_000  # a prefix of the line, not the line
    # linear: ~0.1 s here; re-splitting the growing line at every chunk took 2.3 s for 32 MB and ~9 s for 64 MB
    assert seconds < 3, f"{seconds:.1f}s to read 64 MB"


def test_the_record_limit_is_exact_and_applies_across_chunks(tmp_path: Path) -> None:
    limit = 3 * sources._READ_CHUNK + 5
    fits = json.dumps({"x": "y" * (limit - 10)})
    fits = fits[:-2] + "y" * (limit - len(fits)) + fits[-2:]
    assert len(fits) == limit
    over = fits[:-2] + "y" + fits[-2:]
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join([fits, over, over[:-1] + "}\r", '{"z": 1}']).encode()))
    recs = list(iter_jsonl(str(path), "gzip", max_record_bytes=limit))
    assert [(r.pos, r.kind) for r in recs] == [(1, "ok"), (2, q.TOO_LONG), (3, q.TOO_LONG), (4, "ok")]
    assert recs[0].value == json.loads(fits) and recs[3].value == {"z": 1}


# --- a file that breaks during a band pass -----------------------------------------------------------------


def test_a_file_that_breaks_in_a_band_pass_is_recorded_once(tmp_path: Path) -> None:
    lines = [_pc(completion=json.dumps(f"answer {i} " + "x" * 300)) for i in range(3000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    path = tmp_path / "pc.jsonl.gz"
    path.write_bytes(data)
    src = SourceConfig(name="s", format="prompt_completion", path=str(path))
    (part,) = plan_parts(str(path))
    qdir = str(tmp_path / "quarantine")
    list(read_part(src, 0, part, 0, "stats", (0, RANK_SPACE), qdir))  # the clean normalize pass
    assert not Path(qdir).exists()
    path.write_bytes(data[: len(data) // 2])  # then the file breaks (a truncated re-upload, a flaky mount)
    rows = [r for t in read_part(src, 0, part, 0, "rows", (0, RANK_SPACE), qdir) for r in t.to_pylist()]
    assert 10 < len(rows) < 3000
    (rec,) = q.read_quarantine(qdir).to_pylist()
    assert rec["reason"] == q.UNREADABLE_FILE and str(path) in rec["detail"] and f"line {len(rows)}" in rec["detail"]
    # a file broken in both passes at the same place is one record, not two
    list(read_part(src, 0, part, 0, "stats", (0, RANK_SPACE), qdir))
    list(read_part(src, 0, part, 0, "rows", (0, RANK_SPACE), qdir))
    assert q.read_quarantine(qdir).column("reason").to_pylist() == [q.UNREADABLE_FILE]


# --- hint_rft task files -----------------------------------------------------------------------------------


class CharTokenizer:
    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _task_table(path: Path, task: str = "countdown") -> tuple[list[dict[str, Any]], list[dict[str, Any]], pa.Table]:
    quarantined: list[dict[str, Any]] = []
    rows = read_rows(str(path), task, quarantined=quarantined)
    table = _table(rows, CharTokenizer(), 100_000, quarantined)  # the prompt table hint_rft writes
    json.dumps(quarantined)  # the quarantine file's lines
    return rows, quarantined, table


def _countdown(**kw: Any) -> str:
    row = countdown.generate(1, seed=3)[0]
    return json.dumps({**row, **kw})


def _verl(target: str) -> str:
    prompt = json.dumps([{"role": "user", "content": "make 24"}])
    return f'{{"prompt": {prompt}, "reward_model": {{"ground_truth": {{"numbers": [1, 2], "target": {target}}}}}}}'


TASK_HOSTILE = [
    (f'{{"prompt": {DEEP}}}', "malformed"),
    (_countdown()[:-1] + f', "extra": {MIDDLE}}}', None),
    (_countdown()[:-1] + f', "note": {SURROGATE}}}', q.INVALID_TEXT),
    (_countdown(prompt="\ud800 lone"), q.INVALID_TEXT),
    (_countdown(hint=["\udfff"]), q.INVALID_TEXT),
    (_countdown(target=float("inf")).replace("Infinity", "1e400"), "wrong_type"),
    (_countdown(target=float("nan")), "wrong_type"),
    (_countdown(target=int(BIG)), None),
    (_verl("1e400"), "wrong_type"),  # veRL's layout: an infinite target
    (_verl("NaN"), "wrong_type"),
    (_verl(BIG), None),
]


@pytest.mark.parametrize(("line", "reason"), TASK_HOSTILE, ids=[str(i) for i in range(len(TASK_HOSTILE))])
def test_a_hostile_task_line_is_quarantined_and_the_prompt_table_builds(
    tmp_path: Path, line: str, reason: str | None
) -> None:
    good = countdown.generate(2, seed=5)
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), line, json.dumps(good[1])]) + "\n")
    rows, quarantined, table = _task_table(path)
    if reason is None:  # a row the task may keep or refuse, but never crash on
        assert len(rows) + len(quarantined) == 3
    else:
        assert [r["row_id"] for r in rows] == [good[0]["row_id"], good[1]["row_id"]]
        assert [x["reason"] for x in quarantined] == [reason]
    assert table.num_rows == len(rows)


def test_a_huge_task_line_is_quarantined_as_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 1 << 20)
    good = countdown.generate(2, seed=5)
    path = tmp_path / "tasks.jsonl"
    huge = json.dumps([good[0]] * 20_000)  # a minified array, 4 MB
    path.write_text("\n".join([json.dumps(good[0]), huge, json.dumps(good[1])]) + "\n")
    rows, quarantined, _ = _task_table(path)
    assert len(rows) == 2 and [(x["reason"], x["line"]) for x in quarantined] == [(q.TOO_LONG, 2)]


def test_invalid_utf8_in_a_task_parquet_costs_one_row(tmp_path: Path) -> None:
    good = countdown.generate(3, seed=5)
    table = pa.Table.from_pylist(good)
    prompts = pa.array([r["prompt"].encode() for r in good[:1]] + [b"\xc3\x28 bad"] + [good[2]["prompt"].encode()])
    bad = pa.Array.from_buffers(pa.string(), 3, prompts.buffers())
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", bad)
    path = tmp_path / "tasks.parquet"
    pq.write_table(table, path)
    rows, quarantined, _ = _task_table(path)
    assert [r["prompt"] for r in rows] == [good[0]["prompt"], good[2]["prompt"]]
    assert [(x["reason"], x["index"]) for x in quarantined] == [(q.INVALID_TEXT, 1)]
