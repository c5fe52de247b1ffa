"""The reference scorer's batches by token budget and its asynchronous reports' driver side.

- `length_groups`: a scorer's rows sorted by length and cut into forwards of at most `reference.batch_tokens`
  padded tokens (rows x the longest), worked by hand.
- The budget comes from the config (`scorer_kwargs`), and the scorer's forward count follows it.
- `wait_for_rows`: the driver waits for reports that land after their batch (a clock of its own, no sleeping).
- `unscored_rows`: what a precompute pass scores again when a report was lost with its actor.

The reports themselves (fire-and-forget, bounded, flushed) need Ray: tests/integration/test_reference.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.demo import TINY_CONFIGS
from uft_ray.reference.collector import wait_for_rows
from uft_ray.reference.scorer import DEFAULT_MAX_TOKENS_PER_FORWARD, ReferenceScorer, length_groups, scorer_kwargs
from uft_ray.reference.service import unscored_rows


def _cost(lengths: list[int], group: list[int]) -> int:
    return len(group) * max(lengths[i] for i in group)


def test_rows_are_cut_by_padded_cost_after_sorting_by_length():
    """Budget 400 over lengths [10, 200, 30, 190]: sorted 10 (0), 30 (2), 190 (3), 200 (1). [10, 30] costs 2 x 30 =
    60; adding 190 would cost 3 x 190 = 570 > 400: cut. [190, 200] costs 2 x 200 = 400 <= 400."""
    lengths = [10, 200, 30, 190]
    groups = length_groups(lengths, max_tokens=400)
    assert groups == [[0, 2], [3, 1]]
    assert [_cost(lengths, g) for g in groups] == [60, 400]
    # one token less: [190, 200] would cost 400 > 399, so 190 and 200 go alone
    assert length_groups(lengths, max_tokens=399) == [[0, 2], [3], [1]]
    assert length_groups(lengths, max_tokens=16384) == [[0, 2, 3, 1]]  # 4 x 200 = 800: one forward


def test_a_sequence_over_the_budget_goes_alone():
    assert length_groups([500, 10, 20], max_tokens=400) == [[1, 2], [0]]


def test_the_budget_is_reference_batch_tokens():
    cfg = load_config(str(TINY_CONFIGS["uft"]), check_paths=False)
    assert cfg.reference.batch_tokens == DEFAULT_MAX_TOKENS_PER_FORWARD == 16384
    assert scorer_kwargs(cfg)["max_tokens_per_forward"] == 16384
    cfg = load_config(str(TINY_CONFIGS["uft"]), ["reference.batch_tokens=4096"], check_paths=False)
    assert scorer_kwargs(cfg)["max_tokens_per_forward"] == 4096
    with pytest.raises(ConfigError, match="reference.batch_tokens: must be > 0"):
        load_config(str(TINY_CONFIGS["uft"]), ["reference.batch_tokens=0"], check_paths=False)


def test_the_scorer_makes_one_forward_per_group(tmp_path):
    """The tiny model scores token ids of lengths [10, 200, 30, 190]: 2 forwards at 400 tokens, 3 at 399, the same
    values either way (and as one sequence per forward)."""
    from uft_ray.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, 200, size=n) for n in (10, 200, 30, 190)]
    starts = [3, 50, 5, 60]
    at_400, n_400 = ReferenceScorer(model, max_tokens_per_forward=400).score(seqs, starts)
    at_399, n_399 = ReferenceScorer(model, max_tokens_per_forward=399).score(seqs, starts)
    alone, n_alone = ReferenceScorer(model, max_tokens_per_forward=1).score(seqs, starts)
    assert (n_400, n_399, n_alone) == (2, 3, 4)
    np.testing.assert_allclose(at_400, alone, atol=1e-4)
    np.testing.assert_allclose(at_399, alone, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# the driver's side of asynchronous reports


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def _counts(*rows: int):
    """The collector's counters as a reader sees them at each poll: these row counts, the last one repeated."""
    seq = list(rows)

    def stats() -> dict:
        return {"rows": seq.pop(0) if len(seq) > 1 else seq[0]}

    return stats


def test_wait_for_rows_returns_once_every_row_landed():
    """3, 5, then 8 of 8 rows: two polls of 0.05 s."""
    clock = _Clock()
    out = wait_for_rows(_counts(3, 5, 8), 8, quiet_s=5.0, poll_s=0.05, clock=clock, sleep=clock.sleep)
    assert out == {"rows": 8} and clock.now == pytest.approx(0.10)
    assert wait_for_rows(_counts(8), 8, clock=clock, sleep=clock.sleep) == {"rows": 8}  # no poll at all


def test_wait_for_rows_gives_up_after_a_quiet_spell():
    """Stuck at 6 of 8: the count last moved at the start, so after quiet_s = 1.0 (4 polls of 0.25 s) it returns 6.
    A count that moves at the third poll, 0.75 s (6 -> 7), restarts the spell: it returns 7 at 0.75 + 1.0 s."""
    clock = _Clock()
    assert wait_for_rows(_counts(6), 8, quiet_s=1.0, poll_s=0.25, clock=clock, sleep=clock.sleep) == {"rows": 6}
    assert clock.now == pytest.approx(1.0)
    clock = _Clock()
    out = wait_for_rows(_counts(6, 6, 6, 7), 8, quiet_s=1.0, poll_s=0.25, clock=clock, sleep=clock.sleep)
    assert out == {"rows": 7} and clock.now == pytest.approx(0.75 + 1.0)


def test_unscored_rows_are_the_rows_the_collector_lacks_in_order():
    rows = pa.table({"row_id": ["a", "b", "c", "d"], "input_ids": [[1], [2], [3], [4]]})
    scored = pa.table({"row_id": ["d", "b"]})
    assert unscored_rows(rows, scored).to_pydict() == {"row_id": ["a", "c"], "input_ids": [[1], [3]]}
    assert unscored_rows(rows, rows.select(["row_id"])).num_rows == 0
    assert unscored_rows(rows, pa.table({"row_id": pa.array([], pa.string())})).num_rows == 4
