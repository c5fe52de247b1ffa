"""The reference cache without Ray: fingerprint inputs, cache validation, publishing, joining into the feed."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray import schema, storage
from uft_ray.config import Config, load_config
from uft_ray.data.prepared import join_columns, merge_summary
from uft_ray.reference import fingerprint as fp_module
from uft_ray.reference import service
from uft_ray.reference.cache import REFERENCE_FIELDS, as_lookup, cache_root, load_cache, write_cache
from uft_ray.reference.fingerprint import fingerprint, fingerprint_inputs
from uft_ray.reference.scorer import SCORER_INPUT_COLUMNS, ReferenceScorer, length_groups, scorer_kwargs

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def fake_model(path: Path, weights: bytes = b"weights-0") -> Path:
    """Only what the fingerprint reads: weight, config and tokenizer files (never loaded here)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def rows_table(n: int = 6, pairs: bool = True) -> pa.Table:
    rows = []
    for i in range(n):
        pair = pairs and i % 3 == 2
        rows.append(
            {
                "row_id": f"r{i}",
                "input_ids": list(range(1, 5 + i)),
                "response_start": 2,
                "rejected_input_ids": list(range(7, 10 + i)) if pair else None,
                "rejected_response_start": 2 if pair else None,
            }
        )
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema([schema.TOKENIZED.field(c) for c in SCORER_INPUT_COLUMNS]),
    )


def make_cfg(model: Path, cache: Path, **over) -> Config:
    data = {
        "model": {"path": str(model)},
        "data": {"sources": [{"name": "s", "format": "messages", "path": "unused"}]},
        "mixture": {"counts": {"s": 1}},
        "train": {"use_gpu": False},
        "reference": {"cache_dir": str(cache)},
    }
    for key, value in over.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    return load_config(data, check_paths=False)


@pytest.fixture
def base(tmp_path):
    model = fake_model(tmp_path / "model")
    return model, make_cfg(model, tmp_path / "cache"), rows_table()


def fp_of(cfg: Config, rows: pa.Table) -> str:
    return fingerprint(fingerprint_inputs(cfg, rows))


def test_fingerprint_is_stable_and_ignores_row_order(base):
    _, cfg, rows = base
    assert fp_of(cfg, rows) != fp_of(cfg, rows.slice(0, rows.num_rows - 1))  # it does see the rows
    assert fp_of(cfg, rows) == fp_of(cfg, rows.take(pa.array([5, 4, 3, 2, 1, 0])))
    assert len(fp_of(cfg, rows)) == 32


@pytest.mark.parametrize(
    "change",
    [
        "tokenizer",
        "template",
        "max_len",
        "max_prompt_len",
        "overflow",
        "weights",
        "model_config",
        "rows",
        "token_ids",
        "response_start",
        "rejected_ids",
        "adapter",
        "dtype",
    ],
)
def test_every_input_moves_the_fingerprint(base, tmp_path, change):
    model, cfg, rows = base
    before = fp_of(cfg, rows)
    if change == "tokenizer":
        (model / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1, "c": 2}}}))
    elif change == "template":
        (model / "chat_template.jinja").write_text(TEMPLATE.replace("im_end", "end"))
    elif change in ("max_len", "max_prompt_len", "overflow"):
        value = {"max_len": 1024, "max_prompt_len": 512, "overflow": "truncate_prompt_left"}[change]
        setattr(cfg.tokenize, change, value)
    elif change == "weights":
        (model / "model.safetensors").write_bytes(b"weights-1")
    elif change == "model_config":
        (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 128}))
    elif change == "rows":
        rows = rows.slice(1)
    elif change in ("token_ids", "response_start", "rejected_ids"):
        table = rows.to_pylist()
        if change == "token_ids":
            table[0]["input_ids"] = table[0]["input_ids"][:-1] + [99]
        elif change == "response_start":
            table[0]["response_start"] = 3
        else:
            table[2]["rejected_input_ids"] = table[2]["rejected_input_ids"] + [5]
        rows = pa.Table.from_pylist(table, schema=rows.schema)
    elif change == "adapter":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        (adapter / "adapter_model.safetensors").write_bytes(b"lora")
        cfg.reference.adapter = str(adapter)
        with_adapter = fp_of(cfg, rows)
        assert with_adapter != before
        (adapter / "adapter_model.safetensors").write_bytes(b"lora trained further")
    elif change == "dtype":
        cfg.train.use_gpu = True  # actors get GPUs: bf16, other numbers
    assert fp_of(cfg, rows) != before


def test_template_in_tokenizer_config_counts_too(base):
    model, cfg, rows = base
    (model / "chat_template.jinja").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    before = fp_of(cfg, rows)
    inputs = fingerprint_inputs(cfg, rows)
    assert inputs["chat_template"] is not None
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE + " "}))
    assert fp_of(cfg, rows) != before


def test_pool_size_batch_size_and_cache_dir_are_not_in_the_key(base, tmp_path):
    _, cfg, rows = base
    before = fp_of(cfg, rows)
    cfg.reference.actors = [1, 4]
    cfg.reference.batch_size = 3
    cfg.reference.cache_dir = str(tmp_path / "elsewhere")
    assert fp_of(cfg, rows) == before


def test_hub_ids_are_keyed_by_revision(tmp_path):
    cfg = make_cfg(Path("org/some-model"), tmp_path / "cache")
    rows = rows_table()
    unpinned = fp_of(cfg, rows)
    cfg.model.revision = "abc123"
    assert fp_of(cfg, rows) != unpinned
    assert fingerprint_inputs(cfg, rows)["model"] == {"id": "org/some-model", "revision": "abc123"}


def test_weights_without_safetensors_are_refused(base):
    model, cfg, rows = base
    (model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        fingerprint_inputs(cfg, rows)


def test_duplicate_row_ids_are_refused(base):
    _, cfg, rows = base
    with pytest.raises(ValueError, match="duplicate row_id"):
        fingerprint_inputs(cfg, pa.concat_tables([rows, rows.slice(0, 1)]))


def test_file_hashes_are_memoized_by_size_and_mtime(base, tmp_path, monkeypatch):
    model, cfg, rows = base
    calls = []
    real = fp_module._sha256_file
    monkeypatch.setattr(fp_module, "_sha256_file", lambda p: calls.append(p.name) or real(p))
    memo = tmp_path / "memo.json"
    fingerprint_inputs(cfg, rows, memo_path=memo)
    assert "model.safetensors" in calls and memo.is_file()
    calls.clear()
    fingerprint_inputs(cfg, rows, memo_path=memo)
    assert calls == []
    weights = model / "model.safetensors"
    weights.write_bytes(b"weights-2")
    os.utime(weights, ns=(1, 1))  # a rewrite is seen even if the mtime went backwards
    fingerprint_inputs(cfg, rows, memo_path=memo)
    assert calls == ["model.safetensors"]


def test_cache_dir_expands_user(base, tmp_path, monkeypatch):
    _, cfg, _ = base
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg.reference.cache_dir = "~/.cache/uft-ray"
    assert cache_root(cfg) == str(tmp_path / "home" / ".cache" / "uft-ray" / "ref_logp")


def ref_table(ids: list[str]) -> pa.Table:
    return pa.table(
        {
            "row_id": ids,
            schema.REF_LOGP: [-float(i) - 0.5 for i in range(len(ids))],
            schema.REF_LOGP_REJECTED: [None if i % 3 != 2 else -100.25 - i for i in range(len(ids))],
        },
        schema=schema.REFERENCE,
    )


@pytest.fixture(params=["local", "s3"])
def cache_home(request, tmp_path) -> str:
    """Where a cache is published: a local directory, or a bucket on the real S3 API server (no rename there)."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket") + "/ref"


def _names(directory: str) -> list[str]:
    return [f.rsplit("/", 1)[-1] for f in storage.list_files(directory)[1]]


def _delete(uri: str) -> None:
    fs, path = storage.filesystem_for(uri)
    fs.delete_file(path)


def test_write_then_load_cache(cache_home):
    ids = [f"r{i}" for i in range(7)]
    final = write_cache(cache_home, "f" * 32, ref_table(ids), {"x": 1}, rows_per_file=3)
    assert final == storage.join(cache_home, "f" * 32)
    manifest = storage.read_json(storage.join(final, "manifest.json"))
    parts = [f["name"] for f in manifest["files"]]
    # the parts carry their writer's id, so two publishers never write one name; nothing else is left behind
    assert [p.rsplit("-", 1)[0] for p in parts] == ["part-00000", "part-00001", "part-00002"]
    assert {p.rsplit("-", 1)[1] for p in parts} == {manifest["writer"] + ".parquet"}
    assert sorted(_names(final)) == sorted(["manifest.json", *parts])
    assert manifest["rows"] == 7 and [f["rows"] for f in manifest["files"]] == [3, 3, 1]
    assert manifest["inputs"] == {"x": 1} and manifest["fingerprint"] == "f" * 32
    table, why = load_cache(final, reversed(ids))
    assert why == "ok" and table.equals(ref_table(ids))


@pytest.mark.parametrize("damage", ["manifest", "part", "extra_expected", "fewer_expected", "truncated", "other_fp"])
def test_an_untrustworthy_cache_is_a_miss(cache_home, damage):
    ids = [f"r{i}" for i in range(7)]
    final = write_cache(cache_home, "a" * 32, ref_table(ids), {}, rows_per_file=3)
    parts = [f["name"] for f in storage.read_json(storage.join(final, "manifest.json"))["files"]]
    expected = ids
    if damage == "manifest":  # a writer killed before its last write
        _delete(storage.join(final, "manifest.json"))
    elif damage == "part":
        _delete(storage.join(final, parts[1]))
    elif damage == "extra_expected":
        expected = ids + ["r7"]
    elif damage == "fewer_expected":
        expected = ids[:-1]
    elif damage == "truncated":
        storage.atomic_write(storage.join(final, parts[0]), lambda out: pq.write_table(ref_table(ids[:2]), out))
    elif damage == "other_fp":  # copied under another fingerprint's name
        other = storage.join(cache_home, "b" * 32)
        storage.copy_tree(final, other)
        final = other
    table, why = load_cache(final, expected)
    assert table is None and why != "ok"


def test_a_damaged_cache_is_replaced_and_a_valid_one_kept(cache_home):
    ids = [f"r{i}" for i in range(4)]
    final = write_cache(cache_home, "c" * 32, ref_table(ids), {}, rows_per_file=2)
    _delete(storage.join(final, "manifest.json"))
    assert load_cache(final, ids)[0] is None
    write_cache(cache_home, "c" * 32, ref_table(ids), {"second": True}, rows_per_file=2)
    assert load_cache(final, ids)[1] == "ok"
    second = storage.read_json(storage.join(final, "manifest.json"))
    assert second["inputs"] == {"second": True}
    write_cache(cache_home, "c" * 32, ref_table(ids), {"third": True}, rows_per_file=2)  # a racer: first one wins
    assert storage.read_json(storage.join(final, "manifest.json")) == second


def test_unlisted_parts_are_removed_only_when_stale(tmp_path):
    ids = [f"r{i}" for i in range(4)]
    final = write_cache(str(tmp_path), "d" * 32, ref_table(ids), {}, rows_per_file=2)
    os.unlink(os.path.join(final, "manifest.json"))  # the first writer's parts are now unlisted
    old = sorted(n for n in os.listdir(final) if n.endswith(".parquet"))
    os.utime(os.path.join(final, old[0]), (1, 1))  # an hour old and more: a dead writer's leftover
    write_cache(str(tmp_path), "d" * 32, ref_table(ids), {"again": True}, rows_per_file=2)
    left = set(os.listdir(final))
    assert old[0] not in left and old[1] in left  # the young one may belong to a live writer: kept
    assert load_cache(final, ids)[1] == "ok"


def test_ref_columns_join_by_row_id_and_keep_row_order():
    rows = rows_table(6).append_column("score", pa.array(np.linspace(0, 1, 6), pa.float32()))
    ids = rows.column("row_id").to_pylist()
    lookup = as_lookup(ref_table(ids).take(pa.array([3, 1, 5, 0, 2, 4])))  # the cache's order is not the rows'
    out = join_columns(rows.slice(1, 4), lookup, REFERENCE_FIELDS)
    assert out.column("row_id").to_pylist() == ids[1:5]
    assert out.drop_columns([schema.REF_LOGP, schema.REF_LOGP_REJECTED]).equals(rows.slice(1, 4))
    assert out.column(schema.REF_LOGP).to_pylist() == [-i - 0.5 for i in range(1, 5)]
    assert out.schema.field(schema.REF_LOGP_REJECTED).type == pa.float64()
    assert out.column(schema.REF_LOGP_REJECTED).null_count == 3
    again = join_columns(out, lookup, REFERENCE_FIELDS)  # replaces, never duplicates, the columns
    assert again.equals(out)
    with pytest.raises(KeyError, match="r5"):
        join_columns(rows, as_lookup(ref_table(ids[:5])), REFERENCE_FIELDS)


def test_summary_entry_is_merged(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"rows_out": 6, "sources": {"s": {}}}))
    merge_summary(str(tmp_path), "reference", {"cache": "hit"})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "rows_out": 6,
        "sources": {"s": {}},
        "reference": {"cache": "hit"},
    }


def test_length_groups_sort_and_respect_the_token_budget():
    lengths = [5, 50, 7, 30, 6, 100, 8]
    groups = length_groups(lengths, max_tokens=60)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths)
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 60
    assert [len(g) for g in length_groups([10] * 5, max_tokens=1000, max_rows=2)] == [2, 2, 1]
    assert length_groups([], max_tokens=10) == []


def test_hit_reads_the_cache_without_ray_or_a_model(base, tmp_path, monkeypatch):
    _, cfg, rows = base
    cfg.model.revision = None
    prepared = tmp_path / "prepared"
    (prepared / "rows").mkdir(parents=True)
    pq.write_table(rows, prepared / "rows" / "part-00000.parquet")
    fp = fingerprint(fingerprint_inputs(cfg, rows))
    ids = rows.column("row_id").to_pylist()
    write_cache(cache_root(cfg), fp, ref_table(ids), {})

    def no_scoring(*a, **k):
        raise AssertionError("scored on a hit")

    monkeypatch.setattr(service, "_precompute", no_scoring)
    entry = service.attach_reference(cfg, prepared)
    assert entry["cache"] == "hit" and entry["model_forwards"] == 0 and entry["fingerprint"] == fp
    assert json.loads((prepared / "summary.json").read_text())["reference"] == entry
    assert pq.read_table(prepared / "rows").equals(rows)  # the rows are not rewritten
    got = service.read_reference(entry, ids)
    assert got.column(schema.REF_LOGP).to_pylist() == [-i - 0.5 for i in range(6)]


def test_no_reference_needed_is_skipped(base, tmp_path):
    _, cfg, _ = base
    cfg.loss.type = "sft"
    (tmp_path / "p").mkdir()
    assert service.attach_reference(cfg, tmp_path / "p")["cache"] == "skipped"
    cfg.loss.type = "uft"
    cfg.reference.mode = "adapter_off"
    assert service.attach_reference(cfg, tmp_path / "p")["cache"] == "skipped"


def test_scorer_batches_formats_and_sub_batches_agree(tmp_path):
    """The scorer without Ray: arrow and numpy batches, one forward or many, give the same numbers."""
    from transformers import AutoTokenizer

    from uft_ray.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for i, text in enumerate(["the cat sat", "a dog runs quickly on the mat today", "red"]):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        rows.append(
            {
                "row_id": f"r{i}",
                "input_ids": ids,
                "response_start": 1,
                "rejected_input_ids": ids[:-2] + [tok.eos_token_id] if i == 1 else None,
                "rejected_response_start": 1 if i == 1 else None,
            }
        )
    batch = pa.Table.from_pylist(rows, schema=rows_table().schema)
    one = ReferenceScorer(model)
    many = ReferenceScorer(model, max_tokens_per_forward=1)  # one sequence per forward
    a = one(batch)
    b = many(batch)
    assert a.column_names == [*batch.column_names, schema.REF_LOGP, schema.REF_LOGP_REJECTED]
    np.testing.assert_allclose(a.column(schema.REF_LOGP).to_numpy(), b.column(schema.REF_LOGP).to_numpy(), atol=1e-4)
    assert a.column(schema.REF_LOGP_REJECTED).to_pylist()[0] is None
    assert a.column(schema.REF_LOGP_REJECTED).to_pylist()[1] == pytest.approx(
        b.column(schema.REF_LOGP_REJECTED).to_pylist()[1], abs=1e-4
    )
    assert one.score([np.array(r["input_ids"]) for r in rows], [1, 1, 1])[1] == 1
    assert many.score([np.array(r["input_ids"]) for r in rows], [1, 1, 1])[1] == 3
    numpy_batch = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in batch.column_names}
    c = one(numpy_batch)
    np.testing.assert_array_equal(c[schema.REF_LOGP], a.column(schema.REF_LOGP).to_numpy())
    assert np.isnan(c[schema.REF_LOGP_REJECTED][0])
    assert (
        one(batch.select(["row_id", "input_ids", "response_start"])).column(schema.REF_LOGP_REJECTED).null_count == 3
    )


def test_a_stream_miss_defers_and_leaves_the_rows_alone(base, tmp_path):
    _, cfg, rows = base
    prepared = tmp_path / "prepared"
    (prepared / "rows").mkdir(parents=True)
    pq.write_table(rows, prepared / "rows" / "part-00000.parquet")
    entry = service.attach_reference(cfg, prepared, run="stream")
    assert entry["cache"] == "miss" and entry["deferred"] and entry["model_forwards"] == 0
    assert pq.read_table(prepared / "rows").equals(rows)


def test_a_long_response_keeps_1e4_absolute(tmp_path):
    """ref_logp is float64 because summed log-probs over long responses need the mantissa (schema.REF_LOGP)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uft_ray.demo.tiny_model import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(model_dir)
    words = "the a cat dog sat on mat river stone light tree house runs jumps quickly red blue green".split()
    ids = tok(" ".join(words[(i * 7) % len(words)] for i in range(300)))["input_ids"]
    assert len(ids) > 600
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0], dim=-1)
    direct = float(logp[4 : len(ids) - 1].gather(1, x[0, 5:, None]).double().sum())
    got, _ = ReferenceScorer(model_dir).score([np.array(ids)], [5])
    assert got[0] == pytest.approx(direct, abs=1e-4)


# The key covers what moves the reference numbers beyond the weights and tokens: the versions of torch and
# transformers that compute them, a remote-code model's own .py files (its forward is that code), and a separate
# reference model's pinned revision (`reference.revision`), which the scorer then loads.


def test_the_key_names_the_torch_and_transformers_versions(tmp_path: Path) -> None:
    cfg = make_cfg(fake_model(tmp_path / "model"), tmp_path / "cache")
    inputs = fingerprint_inputs(cfg, rows_table())
    assert inputs["versions"] == {"torch": md.version("torch"), "transformers": md.version("transformers")}


def test_a_remote_code_models_python_files_are_in_the_key(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model")
    (model / "modeling_odd.py").write_text("def forward(x):\n    return x\n")
    cfg = make_cfg(model, tmp_path / "cache", model__trust_remote_code=True)
    rows = rows_table()
    before = fp_of(cfg, rows)
    assert list(fingerprint_inputs(cfg, rows)["remote_code"]) == ["modeling_odd.py"]
    (model / "modeling_odd.py").write_text("def forward(x):\n    return 2 * x\n")
    assert fp_of(cfg, rows) != before
    plain = make_cfg(model, tmp_path / "cache")  # no remote code runs: the .py files are not read
    assert fingerprint_inputs(plain, rows)["remote_code"] is None


def test_a_separate_reference_model_can_be_pinned_and_the_scorer_loads_that_revision(tmp_path: Path) -> None:
    model = fake_model(tmp_path / "model")
    cfg = make_cfg(model, tmp_path / "cache", reference__model_path="org/ref-model", reference__revision="r1")
    rows = rows_table()
    assert fingerprint_inputs(cfg, rows)["model"] == {"id": "org/ref-model", "revision": "r1"}
    assert scorer_kwargs(cfg)["revision"] == "r1"
    pinned = fp_of(cfg, rows)
    cfg.reference.revision = "r2"
    assert fp_of(cfg, rows) != pinned
    own = make_cfg(model, tmp_path / "cache", model__revision="m1")  # the policy's own base: model.revision
    assert scorer_kwargs(own)["revision"] == "m1"
