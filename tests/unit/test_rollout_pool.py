"""Each trainer rank sends its rollout requests to its own actors, and vLLM's memory share
follows the GPU share an actor holds."""

from __future__ import annotations

import pytest

from uft_ray.config import Config
from uft_ray.config.validation import validate
from uft_ray.rft.rollout import RolloutPool, actors_of_rank, rollout_memory_fraction


def test_ranks_get_disjoint_contiguous_shares_that_cover_every_actor():
    shares = [actors_of_rank(8, r, 4) for r in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [actors_of_rank(5, r, 2) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert sorted(i for r in range(3) for i in actors_of_rank(7, r, 3)) == list(range(7))


def test_fewer_actors_than_ranks_share_one_actor_each():
    assert [actors_of_rank(2, r, 4) for r in range(4)] == [[0], [1], [0], [1]]
    assert actors_of_rank(1, 3, 4) == [0]
    with pytest.raises(ValueError):
        actors_of_rank(0, 0, 1)
    with pytest.raises(ValueError):
        actors_of_rank(2, 4, 4)


def test_the_pool_of_a_rank_holds_its_own_actors_and_still_knows_all_for_the_adapter():
    actors = [f"actor{i}" for i in range(4)]  # handles; the pool only keeps and slices them here
    pool = RolloutPool(actors, rank=1, world=2)
    assert pool.own == ["actor2", "actor3"] and pool.actors == actors
    assert RolloutPool(actors).own == actors  # one rank: every actor


def test_vllm_memory_share_follows_the_gpu_share():
    assert rollout_memory_fraction(None, 1.0) == 0.9
    assert rollout_memory_fraction(None, 0.5) == 0.45
    assert rollout_memory_fraction(None, 2.0) == 0.9  # tensor parallel: each device its own
    assert rollout_memory_fraction(0.6, 0.5) == 0.6  # the config's value wins
    cfg = Config()
    assert cfg.rft.rollout.gpu_memory_utilization is None
    cfg.method, cfg.rft.rollout.gpu_memory_utilization = "hint_rft", 1.5
    assert any(p.startswith("rft.rollout.gpu_memory_utilization:") for p in validate(cfg, check_paths=False))
