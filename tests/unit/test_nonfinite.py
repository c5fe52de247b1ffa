"""Numbers that are not numbers never train: the reference cache refuses them when written and when read, and a
step whose loss or gradient norm is not finite stops every rank (uft_ray/train/nonfinite.py), agreed through real
gloo collectives between two processes."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from uft_ray import schema
from uft_ray.reference.cache import load_cache, write_cache
from uft_ray.train.nonfinite import NonFiniteError, StepWatch


def _ref(ids: list[str], logp: list[float], rejected: list[float | None] | None = None) -> pa.Table:
    return pa.table(
        {
            "row_id": ids,
            schema.REF_LOGP: pa.array(logp, pa.float64()),
            schema.REF_LOGP_REJECTED: pa.array(rejected or [None] * len(ids), pa.float64()),
        }
    ).cast(schema.REFERENCE)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_reference_cache_refuses_to_publish_a_value_that_is_not_a_number(tmp_path: Path, bad: float) -> None:
    table = _ref(["a", "b", "c"], [-1.0, bad, -3.0])
    with pytest.raises(ValueError, match=r"ref_logp of 1 rows \(b = "):
        write_cache(str(tmp_path), "fp0", table, {})
    assert not (tmp_path / "fp0" / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"ref_logp_rejected of 1 rows \(c = nan\)"):
        write_cache(str(tmp_path), "fp1", _ref(["a", "b", "c"], [-1.0, -2.0, -3.0], [None, -1.0, math.nan]), {})


def test_a_published_cache_holding_a_non_finite_value_is_not_trusted(tmp_path: Path) -> None:
    """A part rewritten under the manifest (a bad scorer's leftovers, a damaged file) is a miss: rescored."""
    ids = ["a", "b", "c"]
    path = write_cache(str(tmp_path), "fp", _ref(ids, [-1.0, -2.0, -3.0]), {})
    table, why = load_cache(path, ids)
    assert table is not None and why == "ok"
    (part,) = Path(path).glob("part-*.parquet")
    pq.write_table(_ref(ids, [-1.0, math.nan, -3.0]), part)
    table, why = load_cache(path, ids)
    assert table is None and "not numbers" in why and "b = nan" in why


def test_a_finite_step_passes_and_the_watch_starts_over() -> None:
    watch = StepWatch()
    watch.loss(0, torch.tensor(0.5), {"rows/loss": torch.tensor([0.4, 0.6])}, ["uc", "hs"])
    watch.check(0, rank=0, world=1, grad_norm=0.25, device="cpu")
    assert watch.found == []


def test_a_nan_term_names_the_step_rank_micro_batch_sources_and_term() -> None:
    watch = StepWatch()
    watch.loss(0, torch.tensor(0.5), {"rows/loss": torch.tensor([0.4])}, ["ultrachat"])
    watch.loss(1, torch.tensor(math.nan), {"rows/loss": torch.tensor([math.nan, 1.0]), "rows/kl": torch.tensor(
        [math.nan, 0.0]), "rows/logp": torch.tensor([-3.0, -2.0])}, ["helpsteer2", "helpsteer2"])  # fmt: skip
    with pytest.raises(NonFiniteError) as e:
        watch.check(6, rank=0, world=1, grad_norm=math.nan, device="cpu")
    msg = str(e.value)
    assert msg.startswith(
        "step 7: the loss is not a number on rank 0, micro-batch 1, sources helpsteer2, term loss, kl"
    )
    assert "gradient norm nan" in msg and "last checkpoint holds the last finite adapter" in msg


def test_a_non_finite_gradient_norm_alone_stops_the_step() -> None:
    watch = StepWatch()
    watch.loss(0, torch.tensor(0.5), {"rows/loss": torch.tensor([0.5])}, ["uc"])
    with pytest.raises(NonFiniteError, match="step 1: the loss is finite on every rank; gradient norm inf"):
        watch.check(0, rank=0, world=1, grad_norm=math.inf, device="cpu")


def _rank(rank: int, world: int, init: str, out: mp.Queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        watch = StepWatch()
        loss = torch.tensor(math.nan if rank == 1 else 0.5)
        watch.loss(0, loss, {"rows/reward": torch.tensor([float(loss)])}, [f"source{rank}"])
        try:
            watch.check(2, rank=rank, world=world, grad_norm=0.1, device="cpu")
            out.put((rank, None))
        except NonFiniteError as e:
            out.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_one_ranks_nan_stops_every_rank_with_the_same_message(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    init = f"file://{os.path.join(tmp_path, 'rendezvous')}"
    procs = [ctx.Process(target=_rank, args=(r, 2, init, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got[0] is not None and got[0] == got[1], got  # rank 0's loss was finite: it stops all the same
    assert "step 3: the loss is not a number on rank 1, micro-batch 0, sources source1, term reward" in got[0]
