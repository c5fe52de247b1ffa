"""`prepare` end to end on a real local Ray (4 logical CPUs) with the project's samples and the tiny tokenizer.

Checks the prepared directory against docs/internals.md: summary.json numbers against the rows and quarantine on
disk, exact quotas, identical selection for one seed and another for another seed, decoded response tokens, the
malformed samples each quarantined with their reason, and the errors that name a file or the mixture fix.
Run: `pytest tests/integration/test_prepare.py -q` (about a minute and a half on 2 cores).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray import schema
from uft_ray.config import Config, load_config
from uft_ray.data import quarantine as q
from uft_ray.data.mixture import MixtureError
from uft_ray.data.normalize import make_row_id
from uft_ray.data.pipeline import prepare
from uft_ray.data.prepared import read_rows as read_prepared
from uft_ray.data.prepared import read_summary
from uft_ray.data.prepared import rows_dataset as prepared_dataset
from uft_ray.data.sources import SourceError, list_files
from uft_ray.data.tokenize import TokenizerError

pytestmark = pytest.mark.integration

# (name, format, sample key, kind, quota)
SOURCES = [
    ("ultrachat", "ultrachat_200k", "ultrachat_200k_train", None, 20),
    ("ultrachat_raw", "ultrachat_raw", "ultrachat_raw", None, 10),
    ("helpsteer2", "helpsteer2", "helpsteer2_train", "score", 30),
    ("hs_binary", "helpsteer2", "helpsteer2_validation", "binary", 4),
    ("hs_pair", "helpsteer2", "helpsteer2_train", "pair", 10),
    ("hs_pref", "helpsteer2_preference", "helpsteer2_preference", None, 8),
    ("trl_messages", "messages", "trl_messages", None, 8),
    ("trl_pc", "prompt_completion", "trl_prompt_completion", None, 8),
    ("trl_unpaired", "unpaired", "trl_unpaired", None, 8),
    ("trl_pref", "preference", "trl_preference", None, 8),
    ("trl_scored", "scored", "trl_scored", None, 8),
]
LIMITS = {"max_prompt_len": 128, "max_len": 192}  # small enough that some sample rows are too long


def make_cfg(assets: dict, seed: int = 0, **mixture: object) -> Config:
    sources = []
    for name, fmt, key, kind, _ in SOURCES:
        s = {"name": name, "format": fmt, "path": assets[key]}
        if kind:
            s["kind"] = kind
        sources.append(s)
    return load_config(
        {
            "model": {"path": assets["model"]},
            "data": {"seed": seed, "sources": sources},
            "mixture": mixture or {"counts": {name: quota for name, *_, quota in SOURCES}},
            "tokenize": LIMITS,
            "loss": {"type": "sft"},  # trains every kind
        }
    )


@pytest.fixture(scope="module")
def run(tiny_assets: dict, ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare(make_cfg(tiny_assets), str(out / "a"))
    return {"dir": out, "a": out / "a", "summary": summary}


def rows_of(d: Path) -> pa.Table:
    return read_prepared(str(d))


def test_rows_have_the_tokenized_schema_and_exact_quotas(run: dict) -> None:
    files = sorted((run["a"] / "rows").glob("*.parquet"))
    assert files
    for f in files:
        assert pq.read_schema(f).remove_metadata().equals(schema.TOKENIZED), f  # lists are int32
    t = rows_of(run["a"])
    assert t.num_rows == sum(quota for *_, quota in SOURCES) == run["summary"]["rows_out"]
    assert len(set(t.column("row_id").to_pylist())) == t.num_rows
    per_source = Counter(t.column("source").to_pylist())
    assert per_source == {name: quota for name, *_, quota in SOURCES}
    kinds = {(s, k) for s, k in zip(t.column("source").to_pylist(), t.column("kind").to_pylist(), strict=True)}
    expected = {"ultrachat": "sft", "helpsteer2": "score", "hs_binary": "binary", "hs_pair": "pair",
                "hs_pref": "pair", "trl_unpaired": "binary", "trl_pref": "pair", "trl_scored": "score"}  # fmt: skip
    assert kinds == {(name, expected.get(name, "sft")) for name, *_ in SOURCES}


def test_summary_matches_what_is_on_disk(run: dict, tiny_assets: dict) -> None:
    s = run["summary"]
    assert read_summary(str(run["a"])) == s
    qt = q.read_quarantine(str(run["a"] / "quarantine"))
    on_disk = Counter(zip(qt.column("source").to_pylist(), qt.column("reason").to_pylist(), strict=True))
    assert s["quarantine"] == dict(Counter(qt.column("reason").to_pylist()))
    stamp = json.loads(Path(tiny_assets["samples"], "uft_samples.json").read_text())["rows"]
    t = rows_of(run["a"])
    for name, _, key, _, quota in SOURCES:
        src = s["sources"][name]
        reasons = {r: n for (sn, r), n in on_disk.items() if sn == name}
        assert src["quarantine"] == reasons and src["quarantined"] == sum(reasons.values())
        assert src["dropped_for_length"] == reasons.get(q.TOO_LONG, 0)
        assert src["rows_out"] == quota == src["quota"] == s["mixture"][name]["realized_rows"]
        assert src["upsampled"] == 0
        files = list_files(tiny_assets[key])[0]
        assert src["rows_read"] == sum(stamp[os.path.relpath(f, tiny_assets["samples"])] for f in files)
        assert src["rows_out"] <= src["rows_tokenized"] <= src["rows_normalized"]
        assert s["mixture"][name]["target"] == pytest.approx(quota / s["rows_out"])
        assert s["mixture"][name]["realized"] == pytest.approx(t.column("source").to_pylist().count(name) / t.num_rows)
    assert sum(src["dropped_for_length"] for src in s["sources"].values()) > 0  # the limits did bite
    assert s["quarantine"].get(q.TIE, 0) > 0 and s["quarantine"].get(q.ZERO_PREFERENCE, 0) > 0


def test_only_a_band_of_a_big_source_is_tokenized(run: dict) -> None:
    uc = run["summary"]["sources"]["ultrachat"]
    assert uc["rows_tokenized"] < 0.6 * uc["rows_normalized"], uc  # lazy: 20 of ~110 rows needed


def test_decoded_response_tokens_are_the_response_plus_eos(run: dict, tiny_assets: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["model"])
    t = rows_of(run["a"])
    for r in t.to_pylist():
        ids, start = r["input_ids"], r["response_start"]
        assert tok.decode(ids[start:]) == r["response"] + tok.eos_token
        assert r["length"] == len(ids) <= LIMITS["max_len"] and start <= LIMITS["max_prompt_len"]
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        if r["kind"] == "pair":
            rej = r["rejected_input_ids"]
            assert rej[:start] == ids[:start] and r["rejected_response_start"] == start
            assert tok.decode(rej[start:]) == r["rejected"] + tok.eos_token
        else:
            assert r["rejected_input_ids"] is None and r["rejected"] is None


def test_too_long_quarantine_records_keep_the_row(run: dict) -> None:
    qt = q.read_quarantine(str(run["a"] / "quarantine")).to_pylist()
    long = [r for r in qt if r["reason"] == q.TOO_LONG]
    assert long
    for r in long:
        raw = json.loads(r["raw"])
        assert raw["source"] == r["source"] and raw["row_id"] and raw["response"]
        assert "max_len 192" in r["detail"]


def test_same_seed_same_rows_other_seed_other_rows(run: dict, tiny_assets: dict) -> None:
    b = run["dir"] / "b"
    prepare(make_cfg(tiny_assets), str(b))
    ta, tb = rows_of(run["a"]).sort_by("row_id"), rows_of(b).sort_by("row_id")
    assert ta.equals(tb)  # identical rows, token ids included
    qa, qb = (q.read_quarantine(str(d / "quarantine")).sort_by([("detail", "ascending")]) for d in (run["a"], b))
    assert qa.equals(qb)

    c = run["dir"] / "c"
    summary = prepare(make_cfg(tiny_assets, seed=1), str(c))
    tc = rows_of(c)
    assert Counter(tc.column("source").to_pylist()) == Counter(ta.column("source").to_pylist())  # exact again
    ids_a = {r for r, s in zip(ta.column("row_id").to_pylist(), ta.column("source").to_pylist(), strict=True)
             if s == "ultrachat"}  # fmt: skip
    ids_c = {r for r, s in zip(tc.column("row_id").to_pylist(), tc.column("source").to_pylist(), strict=True)
             if s == "ultrachat"}  # fmt: skip
    assert len(ids_a) == len(ids_c) == 20 and ids_a != ids_c
    assert summary["seed"] == 1


def test_prepared_dataset_and_ratio_mixture_with_upsampling(run: dict, tiny_assets: dict) -> None:
    assert prepared_dataset(str(run["a"])).count() == run["summary"]["rows_out"]
    from uft_ray.data.pipeline import read_source

    uc = make_cfg(tiny_assets).source("ultrachat")
    unified = read_source(uc).take_all()
    assert len(unified) == run["summary"]["sources"]["ultrachat"]["rows_normalized"]
    assert set(unified[0]) == set(schema.UNIFIED.names)
    assert read_prepared(str(run["a"]), ["row_id", "source", "length"]).column_names == ["row_id", "source", "length"]
    # ratios + total, largest remainder; hs_binary (at most 10 rows) needs copies
    d = run["dir"] / "ratios"
    ratios = {name: 1 for name, *_ in SOURCES}
    cfg = make_cfg(tiny_assets, ratios=ratios, total=250, allow_upsample=True)
    s = prepare(cfg, str(d))
    assert s["rows_out"] == 250
    # 250 / 11 = 22.7: every source 22, the 8 rows left go to the first 8 sources (equal remainders)
    assert [v["quota"] for v in s["sources"].values()] == [23] * 8 + [22] * 3
    hb = s["sources"]["hs_binary"]
    assert hb["upsampled"] == hb["quota"] - (hb["rows_tokenized"] - hb["dropped_for_length"]) > 0
    ids = read_prepared(str(d), ["row_id"]).column("row_id").to_pylist()
    assert len(set(ids)) == 250 and sum("#" in i for i in ids) == sum(v["upsampled"] for v in s["sources"].values())


# --- malformed rows ----------------------------------------------------------------------------------------


def test_every_bad_row_is_quarantined_with_its_reason_and_every_good_row_comes_out(
    tiny_assets: dict, ray_local: None, tmp_path: Path
) -> None:
    bad = Path(tiny_assets["bad"])
    manifest = json.loads(Path(tiny_assets["bad_manifest"]).read_text())
    files: dict[str, tuple[str, str | None]] = {}
    for e in manifest["entries"]:
        files[e["source_file"]] = (e["format"], (e["kinds"] or [None])[0])
    sources, names = [], {}
    for rel, (fmt, kind) in sorted(files.items()):
        if rel.startswith("ultrachat_200k/"):  # both parquet shards (one with a mistyped column) as one source
            rel, name = "ultrachat_200k/data", "uc200k"
        else:
            name = rel.replace("/", "_").split(".")[0]
        names[name] = rel
        sources.append({"name": name, "format": fmt, "path": str(bad / rel), **({"kind": kind} if kind else {})})
    sources = list({s["name"]: s for s in sources}.values())
    cfg = load_config(
        {
            "model": {"path": tiny_assets["model"]},
            "data": {"sources": sources},
            # every row is visited: quotas above what the sources hold, with upsampling
            "mixture": {"counts": {s["name"]: 40 for s in sources}, "allow_upsample": True},
            "loss": {"type": "sft"},
        }
    )
    out = tmp_path / "bad"
    summary = prepare(cfg, str(out))

    got: dict[str, str] = {}
    for r in q.read_quarantine(str(out / "quarantine")).to_pylist():
        if r["reason"] == q.TOO_LONG:  # a unified row: keyed back to the prompt_id through its row_id
            rid = json.loads(r["raw"])["row_id"]
            key = next(k for k in manifest["expected"] if make_row_id(r["source"], k, 0) == rid)
        elif r["detail"].split(": ", 1)[0].endswith("]"):  # a parquet row
            key = json.loads(r["raw"])["prompt_id"]
        else:
            path, line = r["detail"].split(": ", 1)[0].rsplit(":", 1)
            key = f"{os.path.basename(path)}:{line}"
        assert key not in got, key
        got[key] = r["reason"]
    assert got == manifest["expected"]
    assert len(set(got.values())) >= 10

    # every good raw row came out (upsampled copies aside): as many distinct rows as good rows unfold into
    t = read_prepared(str(out), ["row_id", "source"])
    base = {(s, r.split("#")[0]) for r, s in zip(t.column("row_id").to_pylist(), t.column("source").to_pylist(), strict=True)}  # fmt: skip
    for name, src in summary["sources"].items():
        assert len({r for s, r in base if s == name}) == src["rows_normalized"] - src["dropped_for_length"], name
        assert src["rows_out"] == 40
    for name, rel in names.items():
        if rel.endswith(".jsonl") or rel.endswith(".gz"):
            fmt = files[rel][0]
            if fmt in ("helpsteer2", "helpsteer2_preference", "prompt_completion", "unpaired", "preference", "scored"):
                # one unified row per good raw row (binary: one per response)
                assert summary["sources"][name]["rows_normalized"] == manifest["good_rows"][rel], name


# --- errors ------------------------------------------------------------------------------------------------


def test_a_file_that_cannot_be_read_fails_the_run_naming_it(
    tiny_assets: dict, ray_local: None, tmp_path: Path
) -> None:
    broken = tmp_path / "helpsteer2" / "train.jsonl.gz"
    broken.parent.mkdir()
    broken.write_text('{"prompt": "not gzip"}\n')
    cfg = load_config(
        {
            "model": {"path": tiny_assets["model"]},
            "data": {"sources": [{"name": "hs", "format": "helpsteer2", "path": str(broken.parent)}]},
            "mixture": {"counts": {"hs": 1}},
        }
    )
    with pytest.raises(SourceError, match=f"cannot read {broken}"):
        prepare(cfg, str(tmp_path / "out"))


def test_a_source_smaller_than_its_quota_names_the_fix(tiny_assets: dict, ray_local: None, tmp_path: Path) -> None:
    cfg = make_cfg(tiny_assets)
    cfg.mixture.counts["trl_pc"] = 1000
    with pytest.raises(MixtureError) as e:
        prepare(cfg, str(tmp_path / "out"))
    msg = str(e.value)
    assert "'trl_pc'" in msg and "32 trainable rows" in msg and "1000 requested" in msg
    assert "mixture.allow_upsample=true" in msg


def test_a_tokenizer_without_chat_template_fails_before_any_work(tiny_assets: dict, tmp_path: Path) -> None:
    from uft_ray.demo.tiny_model import make_tokenizer_without_template

    cfg = make_cfg(tiny_assets)
    cfg.model.path = make_tokenizer_without_template(tmp_path / "tok")
    with pytest.raises(TokenizerError, match="has no chat_template"):
        prepare(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_duplicate_row_ids_are_kept_once(tiny_assets: dict, ray_local: None, tmp_path: Path) -> None:
    """The same prompt_id in two shards (train_sft and train_gen share prompts upstream): one row kept, one
    quarantined as `duplicate`, so row ids stay unique for the reference cache and the plan."""
    import shutil

    (src,) = list_files(tiny_assets["ultrachat_200k_train"])[0]
    d = tmp_path / "uc"
    d.mkdir()
    shutil.copy(src, d / "train_sft-00000-of-00001.parquet")
    shutil.copy(src, d / "train_gen-00000-of-00001.parquet")
    cfg = load_config(
        {
            "model": {"path": tiny_assets["model"]},
            "data": {"sources": [{"name": "uc", "format": "ultrachat_200k", "path": str(d)}]},
            "mixture": {"counts": {"uc": 30}},
        }
    )
    s = prepare(cfg, str(tmp_path / "out"))
    ids = read_prepared(str(tmp_path / "out"), ["row_id"]).column("row_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30
    dup = [
        r for r in q.read_quarantine(str(tmp_path / "out" / "quarantine")).to_pylist() if r["reason"] == q.DUPLICATE
    ]
    assert {json.loads(r["raw"])["row_id"] for r in dup} == set(ids)  # each kept row's twin was reported
    assert all("train_gen" in r["detail"] and "train_sft" in r["detail"] for r in dup)
    assert s["sources"]["uc"]["quarantine"] == {q.DUPLICATE: 30}
