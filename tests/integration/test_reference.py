"""The reference service on a real local Ray with the tiny model.

The base rows come from the real data plane (`prepare` on the sample UltraChat, HelpSteer2 and
HelpSteer2-Preference shards: sft, score and pair rows); the fault-tolerance test builds more rows directly from
the tiny tokenizer in schema.TOKENIZED. Run: `pytest tests/integration/test_reference.py -q` (about 2 minutes
on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray import schema
from uft_ray.config import Config, load_config

pytestmark = pytest.mark.integration

WORDS = "the a cat dog sat on mat river stone light tree house runs jumps quickly slowly red blue green".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_rows(model_dir: str, n_sft: int = 6, n_score: int = 6, n_pair: int = 6, seed: int = 0) -> pa.Table:
    """Tokenized rows of every scored kind, lengths spread so that length grouping matters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    rows = []
    for kind, n in (("sft", n_sft), ("score", n_score), ("pair", n_pair)):
        for i in range(n):
            prompt = [{"role": "user", "content": _text(rng, rng.randint(2, 30))}]
            p_ids = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
            response = _text(rng, rng.randint(1, 40))
            ids = p_ids + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            row = {
                "row_id": f"{kind}-{seed}-{i}",
                "source": "src",
                "kind": kind,
                "prompt": prompt,
                "response": response,
                "rejected": None,
                "score": 1.0 if kind == "sft" else rng.random(),
                "input_ids": ids,
                "response_start": len(p_ids),
                "length": len(ids),
                "rejected_input_ids": None,
                "rejected_response_start": None,
                "rejected_length": None,
            }
            if kind == "pair":
                rejected = _text(rng, rng.randint(1, 40))
                r_ids = p_ids + tok(rejected, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                row.update(rejected=rejected, rejected_input_ids=r_ids, rejected_response_start=len(p_ids))
                row["rejected_length"] = len(r_ids)
            rows.append(row)
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=schema.TOKENIZED)


def write_prepared(out: Path, rows: pa.Table, n_files: int = 2) -> Path:
    (out / "rows").mkdir(parents=True, exist_ok=True)
    step = -(-rows.num_rows // n_files)
    for k in range(n_files):
        pq.write_table(rows.slice(k * step, step), out / "rows" / f"part-{k:05d}.parquet")
    (out / "summary.json").write_text(json.dumps({"rows_out": rows.num_rows}))
    return out


TOKENIZE = {"max_prompt_len": 96, "max_len": 128}


def make_cfg(model_dir: str, cache_dir: Path, **reference) -> Config:
    ref = {"actors": 1, "batch_size": 4, "cpus_per_actor": 1, "cache_dir": str(cache_dir), **reference}
    return load_config(
        {
            "model": {"path": model_dir},
            "data": {"sources": [{"name": "src", "format": "messages", "path": "unused"}]},
            "mixture": {"counts": {"src": 1}},
            "tokenize": dict(TOKENIZE),
            "train": {"use_gpu": False, "num_workers": 1},
            "reference": ref,
        },
        check_paths=False,
    )


def prepare_rows(assets: dict[str, str], out: Path) -> pa.Table:
    """8 sft + 6 score + 6 pair rows through the real data plane (loss sft: the one that takes every kind)."""
    from uft_ray.data.pipeline import prepare
    from uft_ray.data.prepared import read_rows

    cfg = load_config(
        {
            "model": {"path": assets["model"]},
            "data": {
                "sources": [
                    {"name": "ultrachat", "format": "ultrachat_200k", "path": assets["ultrachat_200k_train"]},
                    {"name": "helpsteer2", "format": "helpsteer2", "path": assets["helpsteer2_train"]},
                    {"name": "pairs", "format": "helpsteer2_preference", "path": assets["helpsteer2_preference"]},
                ]
            },
            "mixture": {"counts": {"ultrachat": 8, "helpsteer2": 6, "pairs": 6}},
            "tokenize": dict(TOKENIZE),
            "loss": {"type": "sft"},
            "train": {"use_gpu": False},
        }
    )
    prepare(cfg, str(out))
    return read_rows(str(out))


def direct_logprobs(model_dir: str, rows: pa.Table) -> dict[str, tuple[float, float | None]]:
    """One sequence at a time, no padding, full fp32 log_softmax + gather: independent of uft_ray.logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def one(ids: list[int], start: int) -> float:
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].float(), dim=-1)  # [T, V]
        targets = x[0, start:]
        return float(logp[start - 1 : len(ids) - 1].gather(1, targets[:, None]).double().sum())

    out = {}
    for r in rows.to_pylist():
        rejected = r["rejected_input_ids"]
        out[r["row_id"]] = (
            one(r["input_ids"], r["response_start"]),
            one(rejected, r["rejected_response_start"]) if rejected is not None else None,
        )
    return out


def ref_columns(entry: dict, prepared: Path) -> dict[str, tuple[float, float | None]]:
    """The values `attach_reference` published for the rows of `prepared`, as the trainer's feed reads them."""
    from uft_ray.data.prepared import read_rows
    from uft_ray.reference import read_reference

    ids = read_rows(str(prepared), ["row_id"]).column("row_id").to_pylist()
    t = read_reference(entry, ids)
    assert t.column("row_id").to_pylist() == ids  # in prepared row order
    return {r["row_id"]: (r[schema.REF_LOGP], r[schema.REF_LOGP_REJECTED]) for r in t.to_pylist()}


def copy_prepared(src: Path, dst: Path, rows: pa.Table | None = None) -> Path:
    if rows is not None:
        return write_prepared(dst, rows)
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def env(tiny_assets, ray_local, tmp_path_factory):
    """The tiny model, prepared rows of every scored kind, and one precompute of them (1 actor)."""
    from uft_ray.reference import attach_reference

    root = tmp_path_factory.mktemp("reference")
    model = tiny_assets["model"]
    prepared = root / "prepared"
    rows = prepare_rows(tiny_assets, prepared)
    pristine = copy_prepared(prepared, root / "pristine")
    cfg = make_cfg(model, root / "cache")
    entry = attach_reference(cfg, prepared)
    return {
        "root": root,
        "model": model,
        "rows": rows,
        "prepared": prepared,
        "pristine": pristine,
        "cfg": cfg,
        "entry": entry,
        "values": ref_columns(entry, prepared),
        "direct": direct_logprobs(model, rows),
    }


def test_ref_logp_matches_a_direct_transformers_computation(env):
    entry = env["entry"]
    assert entry["cache"] == "miss" and entry["rows_scored"] == env["rows"].num_rows
    assert entry["model_forwards"] > 0
    summary = json.loads((env["prepared"] / "summary.json").read_text())
    assert summary["reference"] == entry  # merged into what the data plane wrote, which stays
    assert summary["rows_out"] == env["rows"].num_rows and set(summary["sources"]) == {
        "ultrachat",
        "helpsteer2",
        "pairs",
    }

    table = pq.read_table(env["prepared"] / "rows")
    # The prepared rows are never rewritten: the values live in the cache, joined into the trainer's feed.
    assert table.column_names == env["rows"].column_names and table.equals(env["rows"])
    cached = pq.read_table(sorted(Path(entry["path"]).glob("part-*.parquet")))
    assert cached.schema.field(schema.REF_LOGP).type == pa.float64()
    assert cached.schema.field(schema.REF_LOGP_REJECTED).type == pa.float64()
    got, want = env["values"], env["direct"]
    kinds = dict(zip(table.column("row_id").to_pylist(), table.column("kind").to_pylist(), strict=True))
    assert set(kinds.values()) == {"sft", "score", "pair"}
    for rid, (logp, logp_rej) in want.items():
        assert got[rid][0] == pytest.approx(logp, abs=1e-4), rid
        if kinds[rid] == "pair":
            assert got[rid][1] == pytest.approx(logp_rej, abs=1e-4), rid
        else:
            assert got[rid][1] is None, rid


def test_precompute_frees_its_actors(env):
    import time

    import ray

    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_second_attach_is_a_cache_hit_without_a_forward(env, monkeypatch):
    from uft_ray.reference import service

    def no_scoring(*args, **kwargs):
        raise AssertionError("a cache hit must not start the scorer")

    monkeypatch.setattr(service, "_precompute", no_scoring)
    again = copy_prepared(env["pristine"], env["root"] / "again")
    entry = service.attach_reference(env["cfg"], again)
    assert entry["cache"] == "hit" and entry["model_forwards"] == 0 and entry["rows_scored"] == 0
    assert entry["fingerprint"] == env["entry"]["fingerprint"]
    assert ref_columns(entry, again) == env["values"]


def test_one_and_two_actors_give_identical_columns(env):
    import ray

    from uft_ray.reference import attach_reference, cache_root

    prepared = copy_prepared(env["pristine"], env["root"] / "two-actors")
    cfg = make_cfg(env["model"], env["root"] / "cache-two-actors", actors=2)
    context = ray.data.DataContext.get_current()
    wait = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = 300  # both actors up before the first block: both get one
    try:
        entry = attach_reference(cfg, prepared)
    finally:
        context.wait_for_min_actors_s = wait
    assert entry["cache"] == "miss" and entry["actors"] == 2
    manifest = json.loads((Path(cache_root(cfg)) / entry["fingerprint"] / "manifest.json").read_text())
    assert [a["batches"] > 0 for a in manifest["actors"]] == [True, True]  # both actors scored
    assert entry["fingerprint"] == env["entry"]["fingerprint"]  # the pool size is not part of the key
    assert ref_columns(entry, prepared) == env["values"]


def test_adapter_off_on_an_untrained_lora_equals_the_actor(env):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from uft_ray.logprobs import model_sequence_logprobs
    from uft_ray.reference import adapter_off_logprobs

    base = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    rows = env["rows"].to_pylist()
    width = max(r["length"] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : r["length"]] = torch.tensor(r["input_ids"])
        attn[i, : r["length"]] = 1
        loss[i, r["response_start"] : r["length"]] = 1
    off, _ = adapter_off_logprobs(model, ids, attn, loss)
    assert not off.requires_grad
    actor = torch.tensor([env["values"][r["row_id"]][0] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(off.double(), actor, atol=1e-4, rtol=0)
    with torch.no_grad():
        on, _ = model_sequence_logprobs(model, ids, attn, loss)  # B == 0: the adapter changes nothing yet
    torch.testing.assert_close(on.double(), actor, atol=1e-4, rtol=0)

    # A trained adapter moves the policy; adapter_off still gives the reference.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        on, _ = model_sequence_logprobs(model, ids, attn, loss)
    off, _ = adapter_off_logprobs(model, ids, attn, loss)
    assert (on.double() - actor).abs().max() > 1e-2
    torch.testing.assert_close(off.double(), actor, atol=1e-4, rtol=0)


def _change_weights(env, cfg):
    from uft_ray.demo.tiny_model import make_tiny_model

    cfg.model.path = make_tiny_model(env["root"] / "weights-changed", seed=1)


@pytest.mark.parametrize("change", ["weights", "rows"])
def test_a_changed_input_changes_the_fingerprint_and_scores_the_changed_rows(env, change):
    """New weights or a new row set: a new key, and a real pass that scores exactly the rows now prepared.

    That every other fingerprint input (tokenizer files, chat template, length limits, adapter, dtype) moves the
    key is the unit tier's job (tests/unit/test_reference_cache.py), without a scorer to start.
    """
    from uft_ray.reference import attach_reference, cache_root

    cfg = make_cfg(env["model"], env["root"] / "cache")  # the same cache dir as the first run
    name = f"changed-{change}"
    if change == "rows":
        prepared = copy_prepared(env["pristine"], env["root"] / name, rows=env["rows"].slice(1))
    else:
        prepared = copy_prepared(env["pristine"], env["root"] / name)
        _change_weights(env, cfg)
    entry = attach_reference(cfg, prepared)
    assert entry["fingerprint"] != env["entry"]["fingerprint"]
    expected = pq.read_table(prepared / "rows", columns=["row_id"]).column("row_id").to_pylist()
    assert entry["cache"] == "miss" and entry["model_forwards"] > 0 and entry["rows_scored"] == len(expected)
    manifest = json.loads((Path(cache_root(cfg)) / entry["fingerprint"] / "manifest.json").read_text())
    assert manifest["model_forwards"] == entry["model_forwards"] and manifest["rows"] == len(expected)
    values = ref_columns(entry, prepared)
    assert sorted(values) == sorted(expected)  # the pass scored the changed rows, each once
    if change == "weights":
        assert all(abs(values[k][0] - env["values"][k][0]) > 1e-3 for k in values)
    else:  # other batch compositions: the same numbers up to fp32 rounding
        assert len(values) == env["rows"].num_rows - 1
        for k, (logp, logp_rej) in values.items():
            assert logp == pytest.approx(env["values"][k][0], abs=1e-4)
            assert logp_rej == pytest.approx(env["values"][k][1], abs=1e-4)
    assert attach_reference(cfg, prepared)["cache"] == "hit"  # and the new key was published


@pytest.fixture(scope="module")
def split_cache(env):
    """A published cache of the base rows in 4 part files (5 rows each)."""
    from uft_ray.reference import attach_reference

    cache_dir = env["root"] / "cache-split"
    entry = attach_reference(
        make_cfg(env["model"], cache_dir), copy_prepared(env["pristine"], env["root"] / "split"), rows_per_file=5
    )
    return cache_dir, entry["fingerprint"]


@pytest.mark.parametrize("damage", ["manifest_removed", "part_deleted"])
def test_a_damaged_cache_is_recomputed(env, split_cache, damage):
    from uft_ray.reference import attach_reference, cache_root

    cache_dir = env["root"] / f"cache-{damage}"
    shutil.copytree(split_cache[0], cache_dir)
    cfg = make_cfg(env["model"], cache_dir)
    cache = Path(cache_root(cfg)) / split_cache[1]
    parts = sorted(cache.glob("part-*.parquet"))
    assert len(parts) == 4 and (cache / "manifest.json").is_file()
    if damage == "manifest_removed":
        (cache / "manifest.json").unlink()
    else:
        parts[1].unlink()
    prepared = copy_prepared(env["pristine"], env["root"] / damage)
    entry = attach_reference(cfg, prepared, rows_per_file=5)
    assert entry["cache"] == "miss" and entry["model_forwards"] > 0 and entry["fingerprint"] == split_cache[1]
    assert ref_columns(entry, prepared) == env["values"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["rows"] == env["rows"].num_rows and len(manifest["files"]) == 4
    assert all((cache / f["name"]).is_file() for f in manifest["files"])
    assert attach_reference(cfg, prepared, rows_per_file=5)["cache"] == "hit"


def test_stream_stage_scores_lazily_and_fills_the_cache(env):
    import ray

    from uft_ray.reference import attach_reference, new_collector, publish_stream_cache, stream_stage

    cfg = make_cfg(env["model"], env["root"] / "cache-stream", run="stream")
    prepared = copy_prepared(env["prepared"], env["root"] / "stream")
    deferred = attach_reference(cfg, prepared)
    assert deferred["cache"] == "miss" and deferred["deferred"] and deferred["model_forwards"] == 0
    assert schema.REF_LOGP not in pq.read_table(prepared / "rows").column_names

    collector = new_collector()
    ds = stream_stage(ray.data.from_arrow(pq.read_table(prepared / "rows")), cfg, collector=collector)
    seen = {}
    for batch in ds.iter_batches(batch_size=5, batch_format="pyarrow"):
        assert "input_ids" in batch.column_names  # the trainer's columns pass through
        for r in batch.select(["row_id", schema.REF_LOGP, schema.REF_LOGP_REJECTED]).to_pylist():
            seen[r["row_id"]] = (r[schema.REF_LOGP], r[schema.REF_LOGP_REJECTED])
    assert seen == env["values"]
    published = publish_stream_cache(cfg, prepared, collector)
    ray.kill(collector)
    assert published["complete"] and published["fingerprint"] == env["entry"]["fingerprint"]
    hit = attach_reference(cfg, prepared)
    assert hit["cache"] == "hit" and hit["model_forwards"] == 0
    assert ref_columns(hit, prepared) == env["values"]


def test_killing_a_scorer_actor_mid_run_still_scores_every_row_once(env):
    import signal
    import threading
    import time

    import ray

    from uft_ray.reference import COLLECTOR_PREFIX, attach_reference, cache_root

    rows = make_rows(env["model"], n_sft=40, n_score=40, n_pair=40, seed=7)
    prepared = write_prepared(env["root"] / "kill", rows)
    cfg = make_cfg(env["model"], env["root"] / "cache-kill", batch_size=2)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(attach_reference(cfg, prepared)))
    worker.start()

    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and worker.is_alive():
        names = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)]
        collectors = [n for n in names if n.startswith(COLLECTOR_PREFIX)]
        if collectors:
            try:
                stats = ray.get(ray.get_actor(collectors[0]).stats.remote())
            except (ValueError, ray.exceptions.RayActorError):
                break  # the run already ended and took its collector with it
            working = [a for a in stats["actors"] if a["batches"] >= 1]
            if working:
                killed = working[0]
                os.kill(killed["pid"], signal.SIGKILL)
                break
        time.sleep(0.02)
    worker.join(timeout=300)
    assert killed is not None, "no scorer actor was seen working"
    assert result["cache"] == "miss" and result["rows_scored"] == rows.num_rows

    manifest = json.loads((Path(cache_root(cfg)) / result["fingerprint"] / "manifest.json").read_text())
    actors = {a["pid"]: a for a in manifest["actors"]}
    assert killed["pid"] in actors and len(actors) >= 2, actors  # the killed one, then its restart
    total_batches = sum(a["batches"] for a in actors.values())
    assert actors[killed["pid"]]["batches"] < total_batches  # it died with work left

    ids = pq.read_table(prepared / "rows").column("row_id").to_pylist()
    cached = pq.read_table(sorted((Path(cache_root(cfg)) / result["fingerprint"]).glob("part-*.parquet")))
    assert len(ids) == len(set(ids)) == rows.num_rows and cached.column(schema.REF_LOGP).null_count == 0
    assert sorted(cached.column("row_id").to_pylist()) == sorted(ids)  # each row exactly once in the cache
    # Each row got its own value (rows differ by tens of nats); precision is test_ref_logp_matches_...'s job.
    direct = direct_logprobs(env["model"], rows)
    got = ref_columns(result, prepared)
    for rid, (logp, logp_rej) in direct.items():
        assert got[rid][0] == pytest.approx(logp, abs=1e-3)
        if logp_rej is not None:
            assert got[rid][1] == pytest.approx(logp_rej, abs=1e-3)


def test_scorer_reports_asynchronously_and_every_report_lands(env):
    """A scorer actor with at most one report in flight, called on 4 batches of 5 rows: after each call at most one
    report is outstanding, after `flush` none, and the collector holds every row once, with the forwards
    `length_groups` gives each batch (chosen and rejected sequences cut at 16384 tokens: one forward per batch of
    these short rows) and the values of the precompute pass."""
    import ray

    from uft_ray.reference.collector import collected, new_collector
    from uft_ray.reference.scorer import ReferenceScorer, length_groups

    rows = env["rows"].select(["row_id", "input_ids", "response_start", "rejected_input_ids",
                               "rejected_response_start"])  # fmt: skip
    batches = [rows.slice(s, 5) for s in range(0, rows.num_rows, 5)]
    collector = new_collector()
    scorer = ray.remote(num_cpus=1)(ReferenceScorer).remote(env["model"], collector=collector, reports_in_flight=1)
    try:
        for batch in batches:
            out = ray.get(scorer.__call__.remote(batch))
            assert out.num_rows == batch.num_rows
            assert ray.get(scorer.pending_reports.remote()) <= 1
        ray.get(scorer.flush.remote())
        assert ray.get(scorer.pending_reports.remote()) == 0
        table, stats = collected(collector)
    finally:
        ray.kill(scorer)
        ray.kill(collector)
    expected_forwards = 0
    for batch in batches:
        lengths = [len(x) for x in batch.column("input_ids").to_pylist()]
        lengths += [len(x) for x in batch.column("rejected_input_ids").to_pylist() if x is not None]
        expected_forwards += len(length_groups(lengths, 16384))
    assert stats["rows"] == rows.num_rows and stats["duplicates"] == 0
    assert stats["forwards"] == expected_forwards == len(batches)
    got = {r["row_id"]: (r[schema.REF_LOGP], r[schema.REF_LOGP_REJECTED]) for r in table.to_pylist()}
    assert got.keys() == env["values"].keys()
    for rid, (logp, logp_rej) in env["values"].items():
        assert got[rid][0] == pytest.approx(logp, abs=1e-4)  # other batches: other padding
        assert (got[rid][1] is None) == (logp_rej is None)
