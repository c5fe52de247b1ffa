"""What a run needs from the cluster (uft_ray.resources.needs), and the verdict on a cluster (assess), without Ray.

Every expected number is worked out by hand in the test's docstring from the config's fields. The clusters are
`ClusterView`s written out here: what `cluster_view()` reads from a real cluster (tests/integration/
test_cluster_resources.py checks that part against real Ray heads).
"""

from __future__ import annotations

import os

import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.demo import TINY_CONFIGS
from uft_ray.resources import (
    ClusterTooSmall,
    ClusterView,
    NodeType,
    assess,
    auto_worker_cpus,
    local_cluster_cpus,
    needs,
    reference_pass_needs,
    with_worker_cpus,
)


def _uft(*overrides: str):
    """The demo's UFT config: 2 CPU workers, reference.run precompute with 1 actor of 1 CPU."""
    return load_config(str(TINY_CONFIGS["uft"]), ["train.cpus_per_worker=1", *overrides], check_paths=False)


def _rft(*overrides: str):
    """The demo's hint_rft config: 2 CPU workers, 1 hf rollout actor of 1 CPU."""
    return load_config(str(TINY_CONFIGS["hint_rft"]), ["train.cpus_per_worker=1", *overrides], check_paths=False)


def _phases(cfg):
    ref = reference_pass_needs(cfg)
    return [needs(cfg)] + ([ref] if ref is not None else [])


# ---------------------------------------------------------------------------------------------------------
# needs


def test_uft_precompute_needs_the_workers_and_one_data_cpu_while_training():
    """2 workers x 1 CPU + 1 data CPU = 3 CPUs while training (the reference actors end before it starts);
    the reference pass before it: 1 actor x 1 CPU + 1 data CPU = 2."""
    cfg = _uft()
    n = needs(cfg)
    assert n.total() == {"CPU": 3.0}
    assert [(d.what, d.count, d.bundle) for d in n.demands] == [
        ("training workers", 2, {"CPU": 1.0}),
        ("data tasks", 1, {"CPU": 1.0}),
    ]
    ref = reference_pass_needs(cfg)
    assert ref is not None and ref.total() == {"CPU": 2.0}
    assert [(d.what, d.count) for d in ref.demands] == [("reference actors", 1), ("data tasks", 1)]


def test_uft_stream_needs_every_ranks_reference_pool_beside_the_workers():
    """Each rank's dataset has its own scorer pool: 3 workers x 2 actors = 6 actors. CPU: 3 x 2 (workers)
    + 6 x 0.5 (actors) + 1 (data) = 10. No reference pass before training."""
    cfg = _uft(
        "reference.run=stream",
        "reference.actors=2",
        "reference.cpus_per_actor=0.5",
        "train.num_workers=3",
        "train.cpus_per_worker=2",
        "train.micro_batch_size=1",
    )
    n = needs(cfg)
    assert n.total() == {"CPU": 10.0}
    assert [(d.what, d.count, d.bundle) for d in n.demands][1] == ("reference actors", 6, {"CPU": 0.5})
    assert reference_pass_needs(cfg) is None
    assert n.explain("CPU") == (
        "10 CPUs: 3 training workers x 2 CPUs (train.num_workers, train.cpus_per_worker) + 6 reference actors "
        "x 0.5 CPUs (train.num_workers x reference.actors, reference.cpus_per_actor) + 1 for data tasks"
    )


def test_a_reference_pool_range_counts_its_minimum():
    """reference.actors [1, 3] starts with 1 actor per rank: 2 workers x 1 = 2 actors; CPU 2 + 2 + 1 = 5."""
    n = needs(_uft("reference.run=stream", "reference.actors=[1, 3]"))
    assert n.total() == {"CPU": 5.0}


def test_gpu_workers_and_gpu_reference_actors():
    """use_gpu: 4 workers x {CPU 1, GPU 1} + stream 4 x 1 actors x {CPU 1, GPU 0.5}: GPU 4 + 2 = 6, CPU 4 + 4 + 1 = 9.
    The precompute pass of the same config: 1 actor {CPU 1, GPU 0.5} + 1 data CPU."""
    gpu = ("train.use_gpu=true", "train.num_workers=4", "train.micro_batch_size=1", "reference.gpus_per_actor=0.5")
    n = needs(_uft(*gpu, "reference.run=stream"))
    assert n.total() == {"CPU": 9.0, "GPU": 6.0}
    assert n.explain("GPU") == (
        "6 GPUs: 4 training workers x 1 GPU (train.num_workers, train.gpus_per_worker) + 4 reference actors x 0.5 GPUs "
        "(train.num_workers x reference.actors, reference.gpus_per_actor)"
    )
    ref = reference_pass_needs(_uft(*gpu))
    assert ref is not None and ref.total() == {"CPU": 2.0, "GPU": 0.5}


def test_cpu_runs_ask_for_no_gpu_whatever_the_per_actor_gpus_say():
    """use_gpu false: reference.gpus_per_actor 1 and train.gpus_per_worker 1 are not asked for (as the scorer and
    the trainer do)."""
    cfg = _uft("reference.gpus_per_actor=1", "train.gpus_per_worker=1", "reference.run=stream")
    assert "GPU" not in needs(cfg).total()


def test_adapter_off_and_sft_need_no_reference_actors():
    for cfg in (_uft("reference.mode=adapter_off", "reference.run=stream"), _uft("loss.type=sft")):
        assert needs(cfg).total() == {"CPU": 3.0}
        assert reference_pass_needs(cfg) is None


def test_hint_rft_needs_its_rollout_actors_while_training():
    """2 workers x 1 CPU + 3 rollout actors x 2 CPUs + 1 data = 9 CPUs; on GPU 2 x 1 + 3 x 1 = 5 GPUs."""
    cfg = _rft("rft.rollout.actors=3", "rft.rollout.cpus_per_actor=2")
    assert needs(cfg).total() == {"CPU": 9.0}
    assert reference_pass_needs(cfg) is None
    gpu = _rft("rft.rollout.actors=3", "rft.rollout.cpus_per_actor=2", "train.use_gpu=true")
    assert needs(gpu).total() == {"CPU": 9.0, "GPU": 5.0}
    assert "rft.rollout.actors, rft.rollout.gpus_per_actor" in needs(gpu).explain("GPU")


def test_an_unresolved_auto_worker_cpus_is_refused():
    cfg = load_config(str(TINY_CONFIGS["uft"]), check_paths=False)
    assert cfg.train.cpus_per_worker == "auto"
    with pytest.raises(ValueError, match="resolve_worker_cpus"):
        needs(cfg)


# ---------------------------------------------------------------------------------------------------------
# assess: fixed clusters


def test_the_reported_two_cpu_cluster_fails_naming_the_numbers_and_keys():
    """The issue's cluster (`ray start --head --num-cpus=2`, no autoscaler): the demo needs 3 CPUs."""
    view = ClusterView(nodes=[{"CPU": 2.0}], free={"CPU": 2.0})
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(_uft()), view)
    assert isinstance(e.value, ConfigError)  # the CLI's exit 2 with one line per problem
    (msg,) = e.value.messages
    assert msg.startswith("cluster: while training the run needs 3 CPUs: ")
    assert "2 training workers x 1 CPU (train.num_workers, train.cpus_per_worker) + 1 for data tasks" in msg
    assert "the cluster has 2 CPUs and no autoscaler" in msg
    assert "Lower train.num_workers or train.cpus_per_worker" in msg and "ray start --num-cpus" in msg
    assert "can never hold this run" in str(e.value)


def test_three_cpus_fit_the_demo_exactly():
    fit = assess(_phases(_uft()), ClusterView(nodes=[{"CPU": 3.0}], free={"CPU": 3.0}))
    assert fit.status == "ok"
    assert fit.line == (
        "cluster: the run needs 2 x {CPU: 1} for training workers + 1 CPU for data tasks while training; "
        "3 of 3 CPUs free"
    )


def test_gpu_shortfall_names_the_gpu_keys():
    """8 workers x 1 GPU on one node of 4 GPUs: 8 > 4."""
    cfg = _uft("train.use_gpu=true", "train.num_workers=8", "train.micro_batch_size=1", "reference.mode=adapter_off")
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(cfg), ClusterView(nodes=[{"CPU": 64.0, "GPU": 4.0}], free={"CPU": 64.0, "GPU": 4.0}))
    (msg,) = e.value.messages
    assert "needs 8 GPUs: 8 training workers x 1 GPU (train.num_workers, train.gpus_per_worker)" in msg
    assert "the cluster has 4 GPUs" in msg and "train.gpus_per_worker" in msg


def test_workers_that_fit_in_total_but_not_on_the_nodes():
    """3 workers x 2 CPUs + 1 = 7 CPUs = the cluster's 3 + 3 + 1, but a 3-CPU node holds one 2-CPU worker and the
    1-CPU node none: at most 2 of the 3."""
    cfg = _uft("train.num_workers=3", "train.cpus_per_worker=2", "train.micro_batch_size=1")
    view = ClusterView(nodes=[{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}], free={"CPU": 7.0})
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(cfg), view)
    (msg,) = e.value.messages
    assert msg.startswith("cluster: at most 2 of the 3 training workers of {CPU: 2}")
    assert "(train.num_workers, train.cpus_per_worker)" in msg


def test_a_reference_actor_no_node_can_hold_fails_before_the_reference_pass():
    """Training fits (2 workers x 1 GPU on two 1-GPU nodes), but a precompute actor of 2 GPUs fits on no node."""
    cfg = _uft("train.use_gpu=true", "reference.gpus_per_actor=2")
    view = ClusterView(nodes=[{"CPU": 8.0, "GPU": 1.0}] * 2, free={"CPU": 16.0, "GPU": 2.0})
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(cfg), view)
    (msg,) = e.value.messages
    assert "no node can ever hold one of the reference actors during the reference pass" in msg
    assert "{CPU: 1, GPU: 2} (reference.actors, reference.cpus_per_actor, reference.gpus_per_actor)" in msg


def test_a_fixed_cluster_busy_with_other_work_waits_and_says_so():
    fit = assess(_phases(_uft()), ClusterView(nodes=[{"CPU": 4.0}], free={"CPU": 1.0}))
    assert fit.status == "waiting"
    assert fit.line.startswith("waiting for other work on the cluster to free resources: need 2 x {CPU: 1}")
    assert "the cluster has 1 of 4 CPUs free" in fit.line


# ---------------------------------------------------------------------------------------------------------
# assess: autoscaling clusters


def test_an_autoscaler_that_can_add_the_cpus_is_waited_for():
    """A head of 0 CPUs and a node type of 1 CPU, up to 4: 4 >= 3, and nothing is free yet."""
    view = ClusterView(nodes=[{}], free={}, node_types=[NodeType("cpu1", {"CPU": 1.0}, 4)], autoscaler="gcs")
    fit = assess(_phases(_uft()), view)
    assert fit.status == "waiting"
    assert fit.line == (
        "waiting for the autoscaler: need 2 x {CPU: 1} for training workers + 1 CPU for data tasks; "
        "the cluster has 0 of 0 CPUs free (it can add: cpu1 {CPU: 1} x up to 4)"
    )


def test_an_autoscaler_that_can_never_add_enough_fails():
    """Up to 2 nodes of 1 CPU: at most 2 < 3 CPUs."""
    view = ClusterView(nodes=[{}], free={}, node_types=[NodeType("cpu1", {"CPU": 1.0}, 2)], autoscaler="gcs")
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(_uft()), view)
    (msg,) = e.value.messages
    assert "needs 3 CPUs" in msg and "the cluster has 0 CPUs and its autoscaler can grow it to at most 2" in msg
    assert "raise max_workers of a node type with CPUs" in msg


def test_node_types_too_small_for_one_worker_fail_even_when_unlimited():
    """1 worker of 2 CPUs; the only type has 1 CPU (any number of them): no node can ever hold it."""
    cfg = _uft("train.num_workers=1", "train.cpus_per_worker=2")
    view = ClusterView(nodes=[{}], free={}, node_types=[NodeType("cpu1", {"CPU": 1.0}, None)], autoscaler="gcs")
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(cfg), view)
    assert [m for m in e.value.messages if "no node can ever hold one of the training workers" in m]


def test_cluster_wide_caps_bound_an_unlimited_type():
    """An unlimited 2-CPU type under max_workers 1 adds at most 2 CPUs (< 3); under a GCS max_resources of 2 CPUs
    ten 8-CPU nodes still give 2."""
    unlimited = [NodeType("cpu2", {"CPU": 2.0}, None)]
    for view in (
        ClusterView(nodes=[{}], free={}, node_types=unlimited, max_workers=1, autoscaler="config x"),
        ClusterView(nodes=[{}], free={}, node_types=[NodeType("big", {"CPU": 8.0}, 10)], max_resources={"CPU": 2.0}),
    ):
        with pytest.raises(ClusterTooSmall, match="can grow it to at most 2"):
            assess(_phases(_uft()), view)
    fit = assess(_phases(_uft()), ClusterView(nodes=[{}], free={}, node_types=unlimited, autoscaler="config x"))
    assert fit.status == "waiting"


def test_an_unseen_autoscaler_is_never_a_reason_to_fail():
    """No GCS config and no monitor on this node: a 1-CPU cluster may still grow, so wait, naming the keys."""
    view = ClusterView(nodes=[{"CPU": 1.0}], free={"CPU": 1.0}, autoscaler="unknown")
    fit = assess(_phases(_uft()), view)
    assert fit.status == "waiting"
    assert "cannot see whether this cluster autoscales" in fit.line
    assert fit.line.endswith("lower train.num_workers, train.cpus_per_worker")


def test_a_stream_run_too_big_for_the_cluster_is_told_about_precompute():
    """stream: 2 workers x 1 + 2 x 1 actors x 1 + 1 = 5 CPUs on a 4-CPU cluster; precompute would need 3."""
    cfg = _uft("reference.run=stream")
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(cfg), ClusterView(nodes=[{"CPU": 4.0}], free={"CPU": 4.0}))
    (msg,) = e.value.messages
    assert "needs 5 CPUs: 2 training workers x 1 CPU" in msg and "+ 2 reference actors x 1 CPU" in msg
    assert "Lower train.num_workers or train.cpus_per_worker or reference.actors or reference.cpus_per_actor" in msg
    assert "or set reference.run precompute" in msg
    assert assess(_phases(_uft()), ClusterView(nodes=[{"CPU": 4.0}], free={"CPU": 4.0})).status == "ok"


# `train.cpus_per_worker: auto`: the largest value for which everything the run holds fits the node.


def test_auto_cpus_leave_room_for_streaming_scorers():
    # The reported case: an 8-CPU node, 2 workers, `reference.run: stream` with 1 actor per rank. The workers'
    # share alone would be 8 // 2 = 3 each, and 2 x 3 + 2 scorers + 1 data CPU = 9 > 8; 2 each makes 7 <= 8.
    cfg = load_config(str(TINY_CONFIGS["uft"]), ["reference.run=stream", "reference.actors=1"], check_paths=False)
    assert cfg.train.cpus_per_worker == "auto" and cfg.train.num_workers == 2
    assert auto_worker_cpus(cfg, node_cpus=8, cores=8) == 2
    assert needs(with_worker_cpus(cfg, 2)).total()["CPU"] == 7
    assert auto_worker_cpus(cfg, node_cpus=9, cores=8) == 3  # exactly enough for the cores' share
    # precompute: the scorers end before training, so only the workers and the data CPU count
    pre = load_config(str(TINY_CONFIGS["uft"]), ["reference.run=precompute"], check_paths=False)
    assert auto_worker_cpus(pre, node_cpus=8, cores=8) == 3
    assert auto_worker_cpus(pre, node_cpus=4, cores=8) == 1  # 2 x 1 + 1 = 3 <= 4; 2 x 2 + 1 = 5 > 4


def test_auto_cpus_count_rollout_actors_and_fall_back_to_one():
    over = ["train.num_workers=2", "rft.rollout.actors=2", "rft.rollout.cpus_per_actor=1"]
    cfg = load_config(str(TINY_CONFIGS["hint_rft"]), over, check_paths=False)
    # 2 rollout CPUs + 1 data CPU beside the workers: 7 CPUs hold 2 workers x 2, 6 only 2 x 1
    assert auto_worker_cpus(cfg, node_cpus=7, cores=16) == 2
    assert auto_worker_cpus(cfg, node_cpus=6, cores=16) == 1
    assert auto_worker_cpus(cfg, node_cpus=2, cores=16) == 1  # nothing fits: 1, and the pre-check says why


def test_a_local_cluster_holds_what_the_run_needs():
    cfg = load_config(str(TINY_CONFIGS["uft"]), ["reference.run=stream", "reference.actors=4"], check_paths=False)
    # 2 workers x 1 (auto at its least) + 2 x 4 scorers + 1 data = 11, more than this machine's cores
    assert local_cluster_cpus(cfg) == max(os.cpu_count() or 1, 11)
