"""uft_ray.train.feeds on a real local Ray: every rank's feed holds exactly its plan rows in plan order (from
step 0 and from a resumed step), from one pass over the rows, and references only its own ~1/W of the blocks.

A small prepared directory (schema.TOKENIZED rows in three parquet files, token ids of 64-256 tokens) is
written by the test. Run: `pytest tests/integration/test_feeds.py -q` (about 20 s on 2 cores).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray import schema
from uft_ray.data import prepared as prep
from uft_ray.evaluation.heldout import heldout_plan, holdout_rows, rank_share
from uft_ray.rft.prompts import attach_hints
from uft_ray.tasks.hints import HintSchedule
from uft_ray.train.feeds import POSITION, Background, rank_feeds, table_feeds
from uft_ray.train.plan import make_plan, rank_assignment
from uft_ray.uft.driver import join_reference

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]

N_ROWS = 150
COLUMNS = ["row_id", "source", "kind", "input_ids", "response_start", "length"]


def write_prepared(root: Path, n: int = N_ROWS, files: int = 3) -> str:
    """DIR/rows/part-*.parquet in schema.TOKENIZED: sft rows of sources a and b, 64-256 token ids each."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 257, n)
    ids = [f"row{i:04d}" for i in range(n)]
    table = pa.table(
        {
            "row_id": ids,
            "source": ["a" if i % 3 else "b" for i in range(n)],
            "kind": ["sft"] * n,
            "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
            "response": [f"r{i}" for i in range(n)],
            "rejected": [None] * n,
            "score": [None] * n,
            "input_ids": [rng.integers(0, 32000, k).astype(np.int32) for k in lengths],
            "response_start": (lengths // 2).astype(np.int32),
            "length": lengths.astype(np.int32),
            "rejected_input_ids": [None] * n,
            "rejected_response_start": [None] * n,
            "rejected_length": [None] * n,
        },
        schema=schema.TOKENIZED,
    )
    rows = root / "prepared" / prep.ROWS
    rows.mkdir(parents=True)
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(table.take(part), rows / f"part-{k:05d}.parquet")
    return str(root / "prepared")


def feed_table(ds) -> pa.Table:
    """A feed's rows in its block order (the order the trainer reads with `preserve_order`)."""
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def expected_rows(plan, rank: int, start: int) -> list[tuple]:
    """(row_id, epoch, step, micro, slot) of `rank` from `start` on, in plan order, from the plan's own API."""
    got = [(rid, *tag) for rid, tags in rank_assignment(plan.table, rank, start).items() for tag in tags]
    return sorted(got, key=lambda r: (r[2], r[3], r[4]))


@pytest.mark.parametrize(
    ("num_workers", "epochs", "start", "partition_rows"),
    [
        (2, 1, 0, 4096),  # one partition per rank
        (2, 2, 5, 16),  # resumed in epoch 0: rows of both epochs, several partitions per rank
        (3, 1, 2, 16),  # resumed: a rank's 36 rows cut 16, 16, 4
    ],
)
def test_each_rank_gets_exactly_its_plan_rows_in_order(
    tmp_path: Path, num_workers: int, epochs: int, start: int, partition_rows: int
) -> None:
    prepared = write_prepared(tmp_path)
    source = prep.read_rows(prepared, ["row_id", "source", "length", "input_ids"])
    plan = make_plan(
        source["row_id"].to_pylist(),
        source["source"].to_pylist(),
        source["length"].to_numpy(),
        num_workers=num_workers,
        micro_batch_size=2,
        grad_accum=3,
        seed=1,
        epochs=epochs,
    )
    feeds = Background(
        rank_feeds, prep.rows_dataset(prepared, COLUMNS), plan, start, partition_rows=partition_rows
    ).result()
    assert sorted(feeds) == [f"train_{r}" for r in range(num_workers)]

    tokens = dict(zip(source["row_id"].to_pylist(), source["input_ids"].to_pylist(), strict=True))
    per_rank = (plan.summary.steps - start) * 2 * 3  # micro_batch_size x grad_accum rows per step
    for rank in range(num_workers):
        t = feed_table(feeds[f"train_{rank}"])
        got = list(zip(*(t[c].to_pylist() for c in ("row_id", "epoch", "step", "micro", "slot")), strict=True))
        want = expected_rows(plan, rank, start)
        assert len(got) == len(want) == per_rank
        assert got == want  # the rows of this rank only, in (step, micro, slot) order
        assert t["input_ids"].to_pylist() == [tokens[r[0]] for r in got]  # the prepared row itself
        positions = t[POSITION].to_numpy()
        assert (np.diff(positions) == 1).all()  # consecutive positions: nothing skipped or doubled
    if epochs == 2:  # resumed in epoch 0: rows of both epochs, some row trained twice on one rank or another
        all_ids = [r for rank in range(num_workers) for r in feed_table(feeds[f"train_{rank}"])["row_id"].to_pylist()]
        assert len(all_ids) > len(set(all_ids))

    # Each rank's dataset references only its own blocks: disjoint, about 1/W of the bytes, and exactly the
    # sort's partitions (cut at the rank offsets, so the split sliced no block and moved no data).
    for rank in range(num_workers):
        blocks = [m.num_rows for b in feeds[f"train_{rank}"].iter_internal_ref_bundles() for m in b.metadata]
        assert blocks == [min(partition_rows, per_rank - k) for k in range(0, per_rank, partition_rows)]
    refs = [set(feeds[f"train_{r}"].get_internal_block_refs()) for r in range(num_workers)]
    assert all(not (refs[a] & refs[b]) for a in range(num_workers) for b in range(a + 1, num_workers))
    sizes = [feeds[f"train_{r}"].size_bytes() for r in range(num_workers)]
    total = sum(sizes)
    assert total > 0
    for rank, size in enumerate(sizes):
        assert size <= 1.2 * total / num_workers, (rank, sizes)


def test_transform_runs_on_the_tagged_rows_like_the_hint_rft_feed(tmp_path: Path) -> None:
    """hint_rft's prompt feed is the same call with `attach_hints` as the transform (micro 0, slot per rank)."""
    n = 40
    prompts = pa.table({"row_id": [f"p{i:03d}" for i in range(n)], "hint": [[f"h{i}", "x", "y"] for i in range(n)]})
    import ray.data

    plan = make_plan(prompts["row_id"].to_pylist(), ["t"] * n, [10] * n, num_workers=2, micro_batch_size=4,
                     group_by_length=False)  # fmt: skip
    hints = HintSchedule("cosine", t_hint=20, seed=3)
    feeds = rank_feeds(
        ray.data.from_arrow(prompts), plan, 1, transform=functools.partial(attach_hints, schedule=hints)
    )
    for rank in range(2):
        t = feed_table(feeds[f"train_{rank}"])
        want = expected_rows(plan, rank, 1)
        assert list(zip(t["row_id"].to_pylist(), t["step"].to_pylist(), strict=True)) == [(r[0], r[2]) for r in want]
        ids, steps = t["row_id"].to_pylist(), t["step"].to_pylist()
        revealed = [hints.revealed(s + 1, rid, 3) for rid, s in zip(ids, steps, strict=True)]
        assert t["revealed"].to_pylist() == revealed and len(set(revealed)) > 1


def test_missing_planned_rows_fail_loudly(tmp_path: Path) -> None:
    prepared = write_prepared(tmp_path)
    ids = prep.read_rows(prepared, ["row_id"])["row_id"].to_pylist()[:-1] + ["not-prepared"]
    plan = make_plan(ids, ["a"] * len(ids), [100] * len(ids), num_workers=2, micro_batch_size=len(ids) // 2)
    assert plan.summary.rows_planned == len(ids)  # the missing row is planned, not in a dropped tail
    with pytest.raises(ValueError, match="rows found for its"):
        rank_feeds(prep.rows_dataset(prepared, COLUMNS), plan)


@pytest.mark.parametrize(("num_workers", "max_rows"), [(2, 7), (3, 1)])  # (3, 1): 2 rows, rank 2 gets none
def test_heldout_feeds_give_each_rank_its_rank_share_in_order(tmp_path: Path, num_workers: int, max_rows: int) -> None:
    prepared = write_prepared(tmp_path)
    rows = prep.read_rows(prepared, ["row_id", "source", "input_ids"])
    held = holdout_rows(rows["row_id"].to_pylist(), rows["source"].to_pylist(), 0.2, 0, max_rows)
    assert len(held) == 2 * max_rows  # max_rows of each of the sources a and b
    # the driver's reference join, only the held-out rows' values given (another row would be a KeyError)
    join = functools.partial(join_reference, values={rid: (-float(rid[3:]), None) for rid in held})
    feeds = table_feeds(prep.rows_dataset(prepared, COLUMNS), heldout_plan(held, num_workers), num_workers,
                        prefix="eval_", transform=join, partition_rows=4)  # fmt: skip
    assert sorted(feeds) == [f"eval_{r}" for r in range(num_workers)]
    assert max_rows > 1 or not rank_share(held, 2, num_workers)  # (3, 1) does exercise an empty rank

    tokens = dict(zip(rows["row_id"].to_pylist(), rows["input_ids"].to_pylist(), strict=True))
    for rank in range(num_workers):
        share = rank_share(held, rank, num_workers)
        if not share:  # a rank with no held-out row: an empty feed, which the loop reads as no batches
            assert feeds[f"eval_{rank}"].count() == 0
            assert list(feeds[f"eval_{rank}"].iter_batches(batch_size=2, batch_format="numpy")) == []
            continue
        t = feed_table(feeds[f"eval_{rank}"])
        assert t["row_id"].to_pylist() == share  # exactly this rank's share, in its order
        assert t["slot"].to_pylist() == list(range(len(share)))
        assert set(t["step"].to_pylist()) | set(t["micro"].to_pylist()) | set(t["epoch"].to_pylist()) <= {0}
        assert t["input_ids"].to_pylist() == [tokens[r] for r in share]
        assert t["ref_logp"].to_pylist() == [-float(r[3:]) for r in share]  # joined into these rows


def test_a_parquet_read_starts_one_footer_reader_not_ray_datas_pool_of_32(tmp_path):
    """init_ray (the ray_local fixture) sets Ray Data's footer-reader pool to one actor per read: the default
    registers 32 per `read_parquet` (counted: 130 actors for four reads of one small file)."""
    import ray
    import ray._private.state as ray_state

    def footer_readers() -> int:
        return sum(1 for a in ray_state.actors().values() if a.get("ActorClassName", "").endswith("FooterReader"))

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": list(range(140))}), path)
    before = footer_readers()
    for _ in range(2):
        assert ray.data.read_parquet(str(path)).materialize().count() == 140
    assert footer_readers() - before == 2
