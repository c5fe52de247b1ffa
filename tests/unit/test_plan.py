"""uft_ray.train.plan: equal steps per rank, determinism, mixture at every step, length grouping, resume."""

import numpy as np
import pyarrow.compute as pc
import pytest

from uft_ray.train.plan import load_plan, make_plan, padding_frac, rank_assignment


def rows(n=203, seed=0, ratio=3):
    """n rows, two sources in ratio (ratio-1):1, lengths 10..600 with source b longer on average."""
    rng = np.random.default_rng(seed)
    ids = [f"row{i:04d}" for i in range(n)]
    src = ["a" if i % ratio else "b" for i in range(n)]
    lengths = rng.integers(10, 400, n) + np.where(np.array(src) == "b", 200, 0)
    return ids, src, lengths


SHAPE = dict(num_workers=2, micro_batch_size=2, grad_accum=3)  # global batch 12


def test_equal_steps_per_rank_and_full_micro_batches():
    p = make_plan(*rows(), **SHAPE, seed=1)
    t = p.table.to_pandas()
    assert p.summary.steps == 203 // 12 == p.summary.steps_per_epoch
    per_rank = t.groupby("rank").step.agg(["nunique", "count"])
    assert list(per_rank["nunique"]) == [p.summary.steps] * 2
    assert list(per_rank["count"]) == [p.summary.steps * 2 * 3] * 2
    sizes = t.groupby(["step", "rank", "micro"]).size()
    assert (sizes == 2).all() and len(sizes) == p.summary.steps * 2 * 3


def test_tail_dropped_and_counted_no_row_twice():
    p = make_plan(*rows(), **SHAPE, seed=1)
    ids = p.table["row_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 16 * 12
    assert p.summary.tail_dropped == 203 - 16 * 12 == sum(p.summary.tail_dropped_by_source.values())
    assert p.summary.rows_planned + p.summary.tail_dropped == 203


def test_deterministic_and_independent_of_input_order():
    ids, src, lengths = rows()
    a = make_plan(ids, src, lengths, **SHAPE, seed=5)
    perm = np.random.default_rng(9).permutation(len(ids))
    b = make_plan(np.array(ids)[perm], np.array(src)[perm], np.array(lengths)[perm], **SHAPE, seed=5)
    assert a.table.equals(b.table)
    assert a.summary.fingerprint == b.summary.fingerprint


def test_different_seed_differs():
    a = make_plan(*rows(), **SHAPE, seed=0)
    b = make_plan(*rows(), **SHAPE, seed=1)
    assert a.table["row_id"].to_pylist() != b.table["row_id"].to_pylist()
    assert a.summary.fingerprint != b.summary.fingerprint


@pytest.mark.parametrize("group", [True, False])
def test_mixture_within_one_batch_at_every_step(group):
    """Cumulative rows per source track the target share to within one global batch at every step."""
    p = make_plan(*rows(ratio=4), **SHAPE, seed=3, group_by_length=group)
    t = p.table.to_pandas()
    target = p.summary.target_fraction
    counts = t.groupby(["step", "source"]).size().unstack(fill_value=0).cumsum()
    done = counts.sum(axis=1)
    for s in target:
        assert (abs(counts[s] - target[s] * done) <= p.summary.global_batch_size).all()
        # The even interleave actually keeps it within a couple of rows.
        assert (abs(counts[s] - target[s] * done) <= 2).all()


def test_length_grouping_reduces_padding():
    on = make_plan(*rows(n=2000), **SHAPE, seed=0, group_by_length=True)
    off = make_plan(*rows(n=2000), **SHAPE, seed=0, group_by_length=False)
    assert on.summary.padding_frac < 0.5 * off.summary.padding_frac
    assert on.summary.padding_frac == pytest.approx(padding_frac(on.table))
    # Same rows trained, only placed differently.
    assert sorted(on.table["row_id"].to_pylist()) != on.table["row_id"].to_pylist()
    assert set(on.table["row_id"].to_pylist()) == set(off.table["row_id"].to_pylist())


def test_global_batch_independent_of_split():
    """Same global batch size -> same rows at each step, however it is split into ranks and micro-batches."""
    data = rows()
    shapes = [
        dict(num_workers=1, micro_batch_size=4, grad_accum=1),
        dict(num_workers=2, micro_batch_size=2, grad_accum=1),
        dict(num_workers=1, micro_batch_size=1, grad_accum=4),
    ]
    per_step = []
    for shape in shapes:
        t = make_plan(*data, **shape, seed=2).table.to_pandas()
        per_step.append(t.groupby("step").row_id.apply(frozenset).to_dict())
    assert per_step[0] == per_step[1] == per_step[2]


def test_epochs_and_max_steps():
    data = rows(n=50)
    two = make_plan(*data, **SHAPE, epochs=2, seed=0)
    assert two.summary.steps == 2 * (50 // 12)
    t = two.table.to_pandas()
    assert set(t.epoch) == {0, 1}
    e0, e1 = (t[t.epoch == e].row_id.tolist() for e in (0, 1))
    assert len(set(e0)) == len(e0) and e0 != e1  # reshuffled each epoch
    assert two.summary.tail_dropped == 2 * (50 % 12)
    # max_steps overrides epochs (Hugging Face Trainer semantics), repeating epochs as needed.
    capped = make_plan(*data, **SHAPE, epochs=1, max_steps=6, seed=0)
    assert capped.summary.steps == 6 and capped.summary.epochs == 2
    assert capped.table.num_rows == 6 * 12
    assert capped.summary.tail_dropped == 50 % 12  # the cut epoch's unreached rows are not a tail
    # A prefix of the longer plan: max_steps only truncates.
    assert capped.table.slice(0, 4 * 12).equals(two.table.slice(0, 4 * 12))


def test_resume_filter_gives_remaining_rows_exactly():
    p = make_plan(*rows(), **SHAPE, seed=0)
    t = p.table
    for rank in (0, 1):
        full = rank_assignment(t, rank)
        resumed = rank_assignment(t, rank, start_step=5)
        mine = t.filter(pc.equal(t["rank"], rank))
        assert sum(len(v) for v in full.values()) == mine.num_rows
        expect = mine.filter(pc.greater_equal(mine["step"], 5))
        got = sorted((step, micro, slot, rid) for rid, v in resumed.items() for _, step, micro, slot in v)
        want = sorted(zip(*(expect[c].to_pylist() for c in ("step", "micro", "slot", "row_id")), strict=True))
        assert got == want
        assert all(s >= 5 for v in resumed.values() for _, s, _, _ in v)


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        make_plan(*rows(n=5), **SHAPE)


def test_save_load_roundtrip(tmp_path):
    p = make_plan(*rows(), **SHAPE, seed=0)
    p.save(str(tmp_path / "plan.parquet"))
    q = load_plan(str(tmp_path / "plan.parquet"))
    assert q.table.equals(p.table) and q.summary == p.summary
