"""Every kind of malformed row the project quarantines, one row of each, in each reader's format (JSON lines and
parquet for the data plane's read task; JSON lines and parquet for hint_rft's task files): the read completes, and
exactly those rows are quarantined, each with its reason; README lists every reason code. (The two kinds decided
after reading, a row over tokenize.max_len and a duplicate row id, are the select pass's: tests/integration/
test_prepare.py feeds them through a whole prepare.)"""

from __future__ import annotations

import gzip
import json
import re
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
from uft_ray.data.sources import plan_parts
from uft_ray.rft.prompts import _table
from uft_ray.tasks import countdown, files, read_rows

README = Path(__file__).resolve().parents[2] / "README.md"
LIMIT = 4096  # the record size limit for these tests (MAX_RECORD_BYTES is 16 MiB)


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def pc(prompt: Any = "a question", completion: Any = "an answer", **kw: Any) -> dict[str, Any]:
    return {"prompt": prompt, "completion": completion, **kw}


def hs2(h: float, prompt: str = "same prompt") -> dict[str, Any]:
    return {"prompt": prompt, "response": f"r{h}", "helpfulness": h, "correctness": 2, "coherence": 2}


PREF = {"prompt": "p", "response_1": "a", "response_2": "b", "preference_strength": 2}
GOOD_CONV = msgs(("user", "q"), ("assistant", "a"))

# format (kind) -> lines of a JSON-lines file: (text, reason or None for a good row)
JSONL: dict[tuple[str, str | None], list[tuple[str, str | None]]] = {
    ("prompt_completion", None): [
        (json.dumps(pc()), None),
        ('{"prompt": "q", "completion": ', q.JSON_PARSE_ERROR),  # not JSON
        ('{"prompt": "\xff"}', q.JSON_PARSE_ERROR),  # not UTF-8 (written as latin-1 below)
        ('{"prompt": ' + "[" * 150 + "]" * 150 + ', "completion": "a"}', q.JSON_PARSE_ERROR),  # nested too deep
        ('{"prompt": "\\ud800", "completion": "a"}', q.INVALID_TEXT),  # a lone surrogate
        (json.dumps(pc(completion="x" * LIMIT)), q.TOO_LONG),  # a record over the size limit
        (json.dumps({"prompt": "q"}), q.MISSING_FIELD),
        (json.dumps(pc(completion=7)), q.WRONG_TYPE),
        (json.dumps([1, 2]), q.WRONG_TYPE),  # not an object
        (json.dumps(pc(prompt=" ")), q.EMPTY_PROMPT),
        (json.dumps(pc(completion="")), q.EMPTY_RESPONSE),
        (json.dumps(pc()), None),
    ],
    ("messages", None): [
        (json.dumps({"messages": GOOD_CONV}), None),
        (json.dumps({"messages": msgs(("user", "q"), ("tool", "a"))}), q.BAD_ROLE),
        (json.dumps({"messages": msgs(("user", "q"), ("user", "q"), ("assistant", "a"))}), q.ROLES_NOT_ALTERNATING),
        (json.dumps({"messages": msgs(("user", "q"))}), q.NO_ASSISTANT_TURN),
        (json.dumps({"messages": ["hello"]}), q.WRONG_TYPE),
    ],
    ("scored", None): [
        (json.dumps(pc(score=0.5)), None),
        (json.dumps(pc(score=1.5)), q.RATING_OUT_OF_RANGE),
        (json.dumps(pc(score=float("nan"))), q.RATING_OUT_OF_RANGE),
        (json.dumps(pc())[:-1] + ', "score": ' + "9" * 400 + "}", q.RATING_OUT_OF_RANGE),
    ],
    ("helpsteer2_preference", None): [
        (json.dumps(PREF), None),
        (json.dumps({**PREF, "preference_strength": 0}), q.ZERO_PREFERENCE),
    ],
    ("helpsteer2", "pair"): [
        (json.dumps(hs2(1, "p1")), None),
        (json.dumps(hs2(3, "p1")), None),
        (json.dumps(hs2(2, "p2")), q.TIE),
        (json.dumps(hs2(2, "p2")), q.TIE),
        (json.dumps(hs2(2, "p3")), q.NO_PAIR),  # its partner is malformed
        (json.dumps({**hs2(3, "p3"), "helpfulness": 9}), q.RATING_OUT_OF_RANGE),
    ],
}

# format (kind) -> parquet files, each a list of (row, reason or None): one schema per file
PARQUET: dict[tuple[str, str | None], list[list[tuple[Any, str | None]]]] = {
    ("prompt_completion", None): [
        [
            (pc(), None),
            (pc(prompt=""), q.EMPTY_PROMPT),
            (pc(completion=" "), q.EMPTY_RESPONSE),
            (pc(completion=None), q.MISSING_FIELD),
            (pc(prompt=b"\xff\xfe"), q.INVALID_TEXT),
        ],
        [(pc(completion=3), q.WRONG_TYPE)],
    ],  # fmt: skip
    ("messages", None): [
        [
            ({"messages": GOOD_CONV}, None),
            ({"messages": msgs(("user", "q"), ("critic", "a"))}, q.BAD_ROLE),
            ({"messages": msgs(("assistant", "a"), ("user", "q"))}, q.ROLES_NOT_ALTERNATING),
            ({"messages": msgs(("system", "s"))}, q.NO_ASSISTANT_TURN),
        ],
    ],  # fmt: skip
    ("scored", None): [
        [
            (pc(score=0.5), None),
            (pc(score=-0.5), q.RATING_OUT_OF_RANGE),
            (pc(score=float("nan")), q.RATING_OUT_OF_RANGE),
        ],
    ],  # fmt: skip
    ("helpsteer2_preference", None): [[(PREF, None), ({**PREF, "preference_strength": 0}, q.ZERO_PREFERENCE)]],
    ("helpsteer2", "pair"): [
        [
            (hs2(1, "p1"), None),
            (hs2(3, "p1"), None),
            (hs2(2, "p2"), q.TIE),
            (hs2(2, "p2"), q.TIE),
            (hs2(1, "p3"), q.NO_PAIR),
            ({**hs2(3, "p3"), "response": ""}, q.EMPTY_RESPONSE),
        ],
    ],  # fmt: skip
}


def _parquet(path: Path, rows: list[Any]) -> None:
    """Rows to parquet; bytes values become a string column holding them unchecked (invalid UTF-8)."""
    table = pa.Table.from_pylist([{k: (v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in r.items()}
                                  for r in rows])  # fmt: skip
    for i, name in enumerate(table.column_names):
        raw = [r.get(name) for r in rows]
        if any(isinstance(v, bytes) for v in raw):
            data = pa.array([v if isinstance(v, bytes) else (v.encode() if v is not None else None) for v in raw])
            table = table.set_column(i, name, pa.Array.from_buffers(pa.string(), len(raw), data.buffers()))
    pq.write_table(table, path)


def _where(detail: str) -> str:
    """ "file:line" or "file[row n]" of a quarantine record's detail."""
    return re.match(r"(.*?(?::\d+|\[row \d+\])): ", detail).group(1)


def _read(tmp_path: Path, fmt: str, kind: str | None, path: Path) -> tuple[list[dict], dict[str, str]]:
    src = SourceConfig(name=fmt, format=fmt, path=str(path), kind=kind)
    qdir = tmp_path / "quarantine" / f"{fmt}-{path.name}"
    rows: list[dict] = []
    for i, part in enumerate(plan_parts(str(path))):
        list(read_part(src, i, part, 0, "stats", (0, RANK_SPACE), str(qdir)))
        rows += [r for t in read_part(src, i, part, 0, "rows", (0, RANK_SPACE), str(qdir)) for r in t.to_pylist()]
    got: dict[str, str] = {}
    for rec in q.read_quarantine(str(qdir)).to_pylist() if qdir.exists() else []:
        where = _where(rec["detail"])
        assert where not in got, f"{where} quarantined twice"
        got[where] = rec["reason"]
    return rows, got


def test_one_row_of_each_kind_in_each_data_plane_format_is_quarantined_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", LIMIT)
    seen: set[str] = set()
    for (fmt, kind), lines in JSONL.items():
        path = tmp_path / "jsonl" / f"{fmt}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\n".join(t.encode("latin-1" if "\xff" in t else "utf-8") for t, _ in lines) + b"\n")
        rows, got = _read(tmp_path, fmt, kind, path)
        want = {f"{path}:{i}": r for i, (_, r) in enumerate(lines, 1) if r is not None}
        assert got == want, fmt
        good = sum(1 for _, r in lines if r is None)
        assert len(rows) == (good // 2 if kind == "pair" else good), fmt  # every good row came out (a pair: one)
        seen |= set(want.values())
    for (fmt, kind), shards in PARQUET.items():
        d = tmp_path / "parquet" / fmt
        d.mkdir(parents=True)
        want = {}
        for j, shard in enumerate(shards):
            _parquet(d / f"part-{j}.parquet", [r for r, _ in shard])
            want |= {f"{d / f'part-{j}.parquet'}[row {i}]": r for i, (_, r) in enumerate(shard) if r is not None}
        rows, got = _read(tmp_path, fmt, kind, d)
        assert got == want, fmt
        good = sum(1 for shard in shards for _, r in shard if r is None)
        assert len(rows) == (good // 2 if kind == "pair" else good), fmt
        seen |= set(want.values())
    # a file that breaks part way: the rows before the break come out, the break is one record
    lines = [json.dumps(pc(completion=f"answer {i} " + "x" * 200)) for i in range(2000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    rows, got = _read(tmp_path, "prompt_completion", None, cut)
    assert list(got.values()) == [q.UNREADABLE_FILE] and len(rows) > 10
    seen.add(q.UNREADABLE_FILE)
    assert seen == set(q.REASONS) - {q.DUPLICATE}  # duplicate: the select pass (module docstring)


class CharTokenizer:
    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_one_record_of_each_kind_in_each_task_file_format_is_quarantined_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", LIMIT)
    good = countdown.generate(4, seed=9)
    lines: list[tuple[str, str | None]] = [
        (json.dumps(good[0]), None),
        ("{not json", files.MALFORMED),
        (json.dumps([good[1]]), files.MALFORMED),  # not an object
        ('{"prompt": ' + "[" * 150 + "]" * 150 + "}", files.MALFORMED),
        (json.dumps({k: v for k, v in good[1].items() if k != "nums"}), files.MISSING_FIELD),
        (json.dumps({**good[1], "target": "42"}), files.WRONG_TYPE),
        (json.dumps({**good[1], "prompt": "\ud800"}), files.INVALID_TEXT),
        (json.dumps({**good[1], "note": "x" * LIMIT}), files.TOO_LONG),
        (json.dumps(good[0]), files.DUPLICATE),
        (json.dumps({**good[2], "prompt": "p" * 1500}), "too_long"),  # past max_prompt_len tokens
        (json.dumps(good[3]), None),
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(t for t, _ in lines) + "\n")
    quarantined: list[dict[str, Any]] = []
    table = _table(read_rows(str(path), "countdown", quarantined=quarantined), CharTokenizer(), 1000, quarantined)
    assert sorted(table.column("row_id").to_pylist()) == sorted([good[0]["row_id"], good[3]["row_id"]])
    assert sorted(x["reason"] for x in quarantined) == sorted(r for _, r in lines if r is not None)

    # parquet: invalid UTF-8 costs its row; a file that is not parquet is unreadable; MATH levels 1-2 out of scope
    rows = [{**g, "prompt": g["prompt"].encode()} for g in good[:3]]
    rows[1]["prompt"] = b"\xc3\x28"
    d = tmp_path / "pq"
    d.mkdir()
    _parquet(d / "a.parquet", rows)
    (d / "b.parquet").write_bytes(b"PAR1 not parquet")
    quarantined = []
    kept = read_rows(str(d), "countdown", quarantined=quarantined)
    assert [r["row_id"] for r in kept] == [good[0]["row_id"], good[2]["row_id"]]
    assert [(x["reason"], x.get("index")) for x in quarantined] == [(files.INVALID_TEXT, 1), (files.UNREADABLE, None)]
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "1+1?", "level": "Level 1", "type": "A", "solution": "\\boxed{2}"}) + "\n")
    quarantined = []
    assert read_rows(str(math), "math", quarantined=quarantined) == []
    assert [x["reason"] for x in quarantined] == [files.OUT_OF_SCOPE]


def test_readme_lists_every_quarantine_reason() -> None:
    text = README.read_text()
    section = text[text.index("**Quarantine reasons.**") : text.index("**Model output.**")]
    codes = set(re.findall(r"`([a-z_]+)`", section))
    assert set(q.REASONS) <= codes, set(q.REASONS) - codes
    task = {files.MALFORMED, files.UNREADABLE, files.OUT_OF_SCOPE, files.MISSING_FIELD, files.WRONG_TYPE,
            files.DUPLICATE, files.TOO_LONG, files.INVALID_TEXT}  # fmt: skip
    assert task <= codes, task - codes
