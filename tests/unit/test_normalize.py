"""Normalization (no Ray): unfolding, HelpSteer2 scores / pairs / preference, TRL formats, quarantine reasons."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from uft_ray.config import SourceConfig
from uft_ray.data import quarantine as q
from uft_ray.data.normalize import (
    Normalizer,
    helpsteer2_score,
    make_row_id,
    normalize_records,
    parse_helpsteer2_prompt,
    score_range,
)
from uft_ray.data.pipeline import iter_part
from uft_ray.data.quarantine import Quarantined, Reject
from uft_ray.data.sources import RawRecord, plan_parts

A = "\n<extra_id_1>Assistant\n"
U = "\n<extra_id_1>User\n"


def src(fmt: str, kind: str | None = None, weights: dict | None = None, name: str = "s") -> SourceConfig:
    return SourceConfig(name=name, format=fmt, path="unused", kind=kind, score_weights=weights)


def run(source: SourceConfig, values: list) -> tuple[list[dict], list[Quarantined]]:
    recs = [RawRecord(i + 1, v, json.dumps(v)) for i, v in enumerate(values)]
    rows, bad = [], []
    for o in normalize_records(source, recs, "f.jsonl"):
        (bad if isinstance(o, Quarantined) else rows).append(o)
    return rows, bad


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# --- unfolding ---------------------------------------------------------------------------------------------


def test_ultrachat_unfolds_one_row_per_assistant_turn() -> None:
    conv = [msg("system", "Be kind."), msg("user", "u1"), msg("assistant", "a1"), msg("user", "u2"),
            msg("assistant", "a2"), msg("user", "u3"), msg("assistant", "a3"), msg("user", "trailing")]  # fmt: skip
    rows, bad = run(src("ultrachat_200k"), [{"prompt": "u1", "prompt_id": "p0", "messages": conv}])
    assert not bad
    assert [r["response"] for r in rows] == ["a1", "a2", "a3"]
    assert [len(r["prompt"]) for r in rows] == [2, 4, 6]  # system + every earlier turn
    assert rows[2]["prompt"] == conv[:6]
    assert {r["kind"] for r in rows} == {"sft"} and {r["score"] for r in rows} == {1.0}
    # stable ids: source + prompt_id + turn index, independent of the file position
    assert [r["row_id"] for r in rows] == [make_row_id("s", "p0", k) for k in range(3)]
    again, _ = run(src("ultrachat_200k"), [{"prompt_id": "x", "messages": []}, {"prompt_id": "p0", "messages": conv}])
    assert [r["row_id"] for r in again] == [r["row_id"] for r in rows]


def test_unfolding_counts_over_many_conversations() -> None:
    convs = []
    for n in (1, 2, 3, 5):
        turns = [msg("user" if i % 2 == 0 else "assistant", f"t{i}") for i in range(2 * n)]
        convs.append({"prompt_id": f"p{n}", "messages": turns})
    rows, _ = run(src("ultrachat_200k"), convs)
    assert len(rows) == 1 + 2 + 3 + 5
    assert len({r["row_id"] for r in rows}) == len(rows)


def test_ultrachat_raw_unfolds_and_keeps_ids_per_file() -> None:
    rows, bad = run(src("ultrachat_raw"), [{"id": "0", "data": ["q1", "a1", "q2", "a2", "q3"]}])
    assert not bad and [r["response"] for r in rows] == ["a1", "a2"]
    assert rows[1]["prompt"] == [msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")]
    assert rows[0]["row_id"] == make_row_id("s", "f.jsonl", "id=0", 0)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        (None, q.MISSING_FIELD),
        ("not a list", q.WRONG_TYPE),
        ([{"role": "user"}], q.MISSING_FIELD),
        ([{"role": "user", "content": 3}], q.WRONG_TYPE),
        ([msg("user", "q"), msg("tool", "a")], q.BAD_ROLE),
        ([msg("user", "q"), msg("user", "q"), msg("assistant", "a")], q.ROLES_NOT_ALTERNATING),
        ([msg("assistant", "a"), msg("user", "q")], q.ROLES_NOT_ALTERNATING),
        (
            [msg("user", "q"), msg("assistant", "a"), msg("system", "s"), msg("assistant", "b")],
            q.ROLES_NOT_ALTERNATING,
        ),
        ([msg("user", "q")], q.NO_ASSISTANT_TURN),
        ([msg("system", "s")], q.NO_ASSISTANT_TURN),
        ([], q.NO_ASSISTANT_TURN),
        ([msg("user", " "), msg("assistant", "a")], q.EMPTY_PROMPT),
        ([msg("user", "q"), msg("assistant", "")], q.EMPTY_RESPONSE),
    ],
)
def test_bad_conversations_are_quarantined_whole(messages: object, reason: str) -> None:
    rows, bad = run(src("ultrachat_200k"), [{"prompt_id": "p", "messages": messages}])
    assert rows == []
    assert [b.reason for b in bad] == [reason]
    assert bad[0].detail.startswith("f.jsonl:1: ") and bad[0].source == "s"
    assert json.loads(bad[0].raw)["prompt_id"] == "p"  # the raw row, as read


def test_a_row_that_is_not_an_object() -> None:
    _, bad = run(src("messages"), [[1, 2]])
    assert [b.reason for b in bad] == [q.WRONG_TYPE]


# --- HelpSteer2 ----------------------------------------------------------------------------------------------


def test_helpsteer2_score_hand_computed() -> None:
    assert helpsteer2_score({"helpfulness": 4, "correctness": 4, "coherence": 4}) == pytest.approx(1.0)
    assert helpsteer2_score({"helpfulness": 0, "correctness": 0, "coherence": 0}) == 0.0
    # 0.65*2 + 0.8*3 + 0.45*4 = 5.5, over 7.6 = 4 * (0.65 + 0.8 + 0.45)
    assert helpsteer2_score({"helpfulness": 2, "correctness": 3, "coherence": 4}) == pytest.approx(5.5 / 7.6)


def test_score_with_negative_weights_stays_in_unit_range() -> None:
    # NVIDIA's reward-model style weights: verbosity counts against
    w = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55, "verbosity": -0.4}
    assert score_range(w) == pytest.approx((-1.6, 9.8))
    best = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 4, "verbosity": 0}
    worst = {"helpfulness": 0, "correctness": 0, "coherence": 0, "complexity": 0, "verbosity": 4}
    assert helpsteer2_score(best, w) == pytest.approx(1.0)
    assert helpsteer2_score(worst, w) == pytest.approx(0.0)
    mid = {"helpfulness": 2, "correctness": 2, "coherence": 2, "complexity": 2, "verbosity": 2}
    assert helpsteer2_score(mid, w) == pytest.approx((2 * 2.45 - 0.8 + 1.6) / 11.4)


def hs(prompt: str, response: str, h: int, c: int, coh: int, **extra: object) -> dict:
    return {"prompt": prompt, "response": response, "helpfulness": h, "correctness": c, "coherence": coh,
            "complexity": 1, "verbosity": 1, **extra}  # fmt: skip


def test_helpsteer2_score_rows() -> None:
    rows, bad = run(src("helpsteer2"), [hs("p", "r1", 4, 4, 4), hs("p", "r2", 2, 3, 4)])
    assert not bad
    assert [r["kind"] for r in rows] == ["score", "score"]
    assert rows[0]["score"] == pytest.approx(1.0) and rows[1]["score"] == pytest.approx(5.5 / 7.6)
    assert rows[0]["prompt"] == [msg("user", "p")] and rows[0]["rejected"] is None
    rows_w, _ = run(src("helpsteer2", weights={"helpfulness": 1.0}), [hs("p", "r", 1, 4, 4)])
    assert rows_w[0]["score"] == pytest.approx(0.25)


def test_helpsteer2_multi_turn_prompt() -> None:
    text = f"first question{A}first answer{U}second question{A}second answer{U}third question"
    assert parse_helpsteer2_prompt(text) == [
        msg("user", "first question"), msg("assistant", "first answer"), msg("user", "second question"),
        msg("assistant", "second answer"), msg("user", "third question"),
    ]  # fmt: skip
    assert parse_helpsteer2_prompt("one line\nwith a newline") == [msg("user", "one line\nwith a newline")]
    for bad_text, reason in (
        (f"q{U}q2", q.ROLES_NOT_ALTERNATING),  # two user turns in a row
        (f"q{A}a", q.ROLES_NOT_ALTERNATING),  # ends with the assistant
        (f"q{A}{U}q2", q.EMPTY_RESPONSE),
        ("  ", q.EMPTY_PROMPT),
    ):
        with pytest.raises(Reject) as e:
            parse_helpsteer2_prompt(bad_text)
        assert e.value.reason == reason, bad_text


def test_helpsteer2_binary_pairs_ties_and_lone_rows() -> None:
    values = [
        hs("p1", "good", 4, 4, 4), hs("p1", "bad", 1, 1, 1),  # a pair: 1 / 0
        hs("p2", "x", 2, 2, 2), hs("p2", "y", 2, 2, 2),  # a tie: both dropped
        hs("p3", "lone", 3, 3, 3), hs("p3", "broken", 9, 3, 3),  # partner out of range: no pair
        hs("p4", "worse", 0, 1, 2), hs("p4", "better", 3, 3, 3),  # the better one second
    ]  # fmt: skip
    rows, bad = run(src("helpsteer2", kind="binary"), values)
    assert [(r["response"], r["score"]) for r in rows] == [
        ("good", 1.0),
        ("bad", 0.0),
        ("worse", 0.0),
        ("better", 1.0),
    ]
    assert {r["kind"] for r in rows} == {"binary"}
    assert sorted((b.reason, b.detail.split(":")[1]) for b in bad) == [
        (q.NO_PAIR, "5"), (q.RATING_OUT_OF_RANGE, "6"), (q.TIE, "3"), (q.TIE, "4"),
    ]  # fmt: skip
    assert json.loads([b for b in bad if b.reason == q.TIE][0].raw)["response"] == "x"


def test_helpsteer2_pair_kind() -> None:
    values = [hs("p1", "good", 4, 4, 4), hs("p1", "bad", 1, 1, 1), hs("p2", "x", 2, 2, 2), hs("p2", "y", 2, 2, 2),
              hs("p4", "worse", 0, 1, 2), hs("p4", "better", 3, 3, 3)]  # fmt: skip
    rows, bad = run(src("helpsteer2", kind="pair"), values)
    assert [(r["response"], r["rejected"], r["kind"]) for r in rows] == [
        ("good", "bad", "pair"), ("better", "worse", "pair"),
    ]  # fmt: skip
    assert [b.reason for b in bad] == [q.TIE, q.TIE]
    assert rows[0]["row_id"] == make_row_id("s", "f.jsonl", 1, 2)


def test_helpsteer2_pairs_survive_streaming_and_file_boundaries() -> None:
    # the same prompt in two files never pairs across the boundary
    n = Normalizer(src("helpsteer2", kind="pair"))
    out = n.add(RawRecord(1, hs("p", "a", 4, 4, 4)), "a.jsonl", "a.jsonl:1")
    out += n.add(RawRecord(1, hs("p", "b", 1, 1, 1)), "b.jsonl", "b.jsonl:1")
    out += n.finish()
    assert [o.reason for o in out] == [q.NO_PAIR, q.NO_PAIR]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"helpfulness": 5}, q.RATING_OUT_OF_RANGE),
        ({"coherence": -1}, q.RATING_OUT_OF_RANGE),
        ({"verbosity": 7}, q.RATING_OUT_OF_RANGE),  # unweighted attributes are still checked
        ({"correctness": "3"}, q.WRONG_TYPE),
        ({"helpfulness": True}, q.WRONG_TYPE),
        ({"helpfulness": None}, q.MISSING_FIELD),
        ({"response": None}, q.MISSING_FIELD),
        ({"response": ""}, q.EMPTY_RESPONSE),
        ({"prompt": ""}, q.EMPTY_PROMPT),
        ({"prompt": 5}, q.WRONG_TYPE),
    ],
)
def test_helpsteer2_bad_rows(change: dict, reason: str) -> None:
    row = {**hs("p", "r", 3, 3, 3), **change}
    _, bad = run(src("helpsteer2"), [{k: v for k, v in row.items() if v is not None}])
    assert [b.reason for b in bad] == [reason]


def test_helpsteer2_preference() -> None:
    base = {"split": "train", "prompt": "p", "response_1": "one", "response_2": "two"}
    rows, bad = run(
        src("helpsteer2_preference"),
        [{**base, "preference_strength": -2}, {**base, "preference_strength": 3}, {**base, "preference_strength": 0},
         {**base, "preference_strength": 4}, {**base, "preference_strength": "1"}],
    )  # fmt: skip
    assert [(r["response"], r["rejected"], r["kind"]) for r in rows] == [
        ("one", "two", "pair"),
        ("two", "one", "pair"),
    ]
    assert [b.reason for b in bad] == [q.ZERO_PREFERENCE, q.RATING_OUT_OF_RANGE, q.WRONG_TYPE]


# --- TRL formats ---------------------------------------------------------------------------------------------


def test_trl_prompts_as_string_or_messages() -> None:
    conv_prompt = [msg("system", "s"), msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")]
    rows, bad = run(
        src("prompt_completion"),
        [{"prompt": "hello", "completion": "hi"}, {"prompt": conv_prompt, "completion": [msg("assistant", "a2")]}],
    )
    assert not bad
    assert rows[0]["prompt"] == [msg("user", "hello")] and rows[0]["response"] == "hi"
    assert rows[1]["prompt"] == conv_prompt and rows[1]["response"] == "a2"
    _, bad = run(src("prompt_completion"), [{"prompt": [msg("user", "q"), msg("assistant", "a")], "completion": "x"}])
    assert [b.reason for b in bad] == [q.ROLES_NOT_ALTERNATING]


def test_trl_messages_unfold() -> None:
    conv = [msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2"), msg("assistant", "a2")]
    rows, _ = run(src("messages"), [{"messages": conv}])
    assert [(len(r["prompt"]), r["response"]) for r in rows] == [(1, "a1"), (3, "a2")]


def test_trl_unpaired_preference_scored() -> None:
    rows, bad = run(
        src("unpaired"),
        [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": False},
         {"prompt": "p", "completion": "c", "label": 1}],
    )  # fmt: skip
    assert [(r["kind"], r["score"]) for r in rows] == [("binary", 1.0), ("binary", 0.0)]
    assert [b.reason for b in bad] == [q.WRONG_TYPE]

    rows, bad = run(
        src("preference"), [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}]
    )
    assert [(r["kind"], r["response"], r["rejected"]) for r in rows] == [("pair", "c", "r")]
    assert [b.reason for b in bad] == [q.MISSING_FIELD]
    # implicit prompt: chosen/rejected are whole conversations sharing the prompt
    implicit = {
        "chosen": [msg("user", "p"), msg("assistant", "c")],
        "rejected": [msg("user", "p"), msg("assistant", "r")],
    }
    rows, _ = run(src("preference"), [implicit])
    assert rows[0]["prompt"] == [msg("user", "p")] and (rows[0]["response"], rows[0]["rejected"]) == ("c", "r")

    rows, bad = run(
        src("scored"),
        [{"prompt": "p", "completion": "c", "score": 0.25}, {"prompt": "p", "completion": "c", "score": 1.5},
         {"prompt": "p", "completion": "c", "score": float("nan")}, {"prompt": "p", "completion": "c", "score": "0.5"}],
    )  # fmt: skip
    assert [(r["kind"], r["score"]) for r in rows] == [("score", 0.25)]
    assert [b.reason for b in bad] == [q.RATING_OUT_OF_RANGE, q.RATING_OUT_OF_RANGE, q.WRONG_TYPE]


def test_parse_errors_and_unreadable_records_are_quarantined() -> None:
    n = Normalizer(src("prompt_completion"))
    out = n.add(RawRecord(3, text="{oops", error="invalid JSON", kind=q.JSON_PARSE_ERROR), "f.jsonl", "/d/f.jsonl:3")
    out += n.add(RawRecord(9, error="read failed after line 8", kind=q.UNREADABLE_FILE), "f.jsonl", "/d/f.jsonl:9")
    assert [(o.reason, o.detail, o.raw) for o in out] == [  # type: ignore[union-attr]
        (q.JSON_PARSE_ERROR, "/d/f.jsonl:3: invalid JSON", "{oops"),
        (q.UNREADABLE_FILE, "/d/f.jsonl:9: read failed after line 8", ""),
    ]


# --- the project's malformed samples ----------------------------------------------------------------------


def manifest_files(manifest: dict) -> dict[str, tuple[str, str | None]]:
    """source_file -> (format, kind) from the manifest entries."""
    out = {}
    for e in manifest["entries"]:
        out[e["source_file"]] = (e["format"], (e["kinds"] or [None])[0])
    return out


def quarantine_key(rec: Quarantined) -> str:
    """The manifest's row key of a normalization quarantine record."""
    loc = rec.detail.split(": ", 1)[0]
    if loc.endswith("]"):  # a parquet row: keyed by prompt_id
        return json.loads(rec.raw)["prompt_id"]
    path, line = loc.rsplit(":", 1)
    return f"{os.path.basename(path)}:{line}"


def test_bad_samples_get_their_reasons_and_good_rows_survive(tiny_assets: dict[str, str]) -> None:
    manifest = json.loads(Path(tiny_assets["bad_manifest"]).read_text())
    expected = {k: r for k, r in manifest["expected"].items() if r != q.TOO_LONG}  # too_long: at tokenization
    too_long = {k for k, r in manifest["expected"].items() if r == q.TOO_LONG}
    too_long |= {make_row_id("s", k, 0) for k in too_long}  # parquet keys are prompt_ids
    got: dict[str, str] = {}
    for rel, (fmt, kind) in manifest_files(manifest).items():
        source = src(fmt, kind)
        origins = set()
        for part in plan_parts(os.path.join(tiny_assets["bad"], rel)):
            for outs, _ in iter_part(source, part):
                for o in outs:
                    if isinstance(o, Quarantined):
                        assert quarantine_key(o) not in got
                        got[quarantine_key(o)] = o.reason
                    elif not {o["row_id"], o["_origin"]} & too_long:
                        origins.update(o["_origin"].split("+"))
        raw_positions = {o.split(":")[-1] for o in origins}
        assert len(raw_positions) == manifest["good_rows"][rel], rel  # every good raw row gave rows
    assert got == expected
    assert len(set(expected.values())) >= 10
