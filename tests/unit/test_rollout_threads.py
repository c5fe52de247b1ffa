"""How many torch threads a CPU rollout actor runs (`uft_ray.rft.driver.rollout_threads`): hint_rft is on-policy,
so the training workers wait while the actors generate and the actors may use the workers' cores too."""

from __future__ import annotations

from pathlib import Path

import pytest

from uft_ray.config import load_config
from uft_ray.rft.driver import rollout_threads


def _cfg(actors: int, cpus_per_actor: float, workers: int, cpus_per_worker: float | str, gpu: bool = False):
    return load_config(
        str(Path(__file__).resolve().parents[2] / "jobs/configs/demo_hint_rft_tiny.yaml"),
        [
            f"rft.rollout.actors={actors}",
            f"rft.rollout.cpus_per_actor={cpus_per_actor}",
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus_per_worker}",
            f"train.use_gpu={str(gpu).lower()}",
            f"rft.prompts_per_step={workers}",
            "rft.n=2",
            "train.micro_batch_size=2",
            "train.grad_accum=1",
        ],  # fmt: skip
        check_paths=False,
    )


@pytest.mark.parametrize(
    ("actors", "per_actor", "workers", "per_worker", "gpu", "threads"),
    [
        (1, 1, 1, 2, False, 3),  # a laptop: 1 + 2 (the actor caps it at the node's cores where it runs)
        (2, 1, 4, 4, False, 9),  # (2 x 1 + 4 x 4) / 2 actors
        (4, 2, 2, 1, False, 2),  # (4 x 2 + 2 x 1) / 4 = 2.5 -> 2
        (1, 1, 1, 8, True, 1),  # GPU: the actor's own CPUs only (it generates on its GPU)
        (1, 1, 1, "auto", False, 1),  # not yet sized: its own
    ],
)
def test_a_cpu_rollout_actor_takes_its_share_of_the_waiting_trainers_cores(
    actors, per_actor, workers, per_worker, gpu, threads
):
    assert rollout_threads(_cfg(actors, per_actor, workers, per_worker, gpu)) == threads
