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
    worker_threads,
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


def test_uft_precompute_needs_the_workers_and_a_quarter_data_cpu_while_training():
    """2 workers x 1 CPU + 0.25 data CPU = 2.25 CPUs while training (the reference actors end before it starts, and
    the reference join is the only data task left); the reference pass before it: 1 actor x 1 CPU + 1 data CPU = 2."""
    cfg = _uft()
    n = needs(cfg)
    assert n.total() == {"CPU": 2.25}
    assert [(d.what, d.count, d.bundle) for d in n.demands] == [
        ("training workers", 2, {"CPU": 1.0}),
        ("data tasks", 1, {"CPU": 0.25}),
    ]
    ref = reference_pass_needs(cfg)
    assert ref is not None and ref.total() == {"CPU": 2.0}
    assert [(d.what, d.count) for d in ref.demands] == [("reference actors", 1), ("data tasks", 1)]


def test_uft_stream_needs_every_ranks_reference_pool_beside_the_workers():
    """Each rank's dataset has its own scorer pool: 3 workers x 2 actors = 6 actors. CPU: 3 x 2 (workers)
    + 6 x 0.5 (actors) + 0.25 (data) = 9.25. No reference pass before training."""
    cfg = _uft(
        "reference.run=stream",
        "reference.actors=2",
        "reference.cpus_per_actor=0.5",
        "train.num_workers=3",
        "train.cpus_per_worker=2",
        "train.micro_batch_size=1",
    )
    n = needs(cfg)
    assert n.total() == {"CPU": 9.25}
    assert [(d.what, d.count, d.bundle) for d in n.demands][1] == ("reference actors", 6, {"CPU": 0.5})
    assert reference_pass_needs(cfg) is None
    assert n.explain("CPU") == (
        "9.25 CPUs: 3 training workers x 2 CPUs (train.num_workers, train.cpus_per_worker) + 6 reference actors "
        "x 0.5 CPUs (train.num_workers x reference.actors, reference.cpus_per_actor) + 0.25 for data tasks"
    )


def test_a_reference_pool_range_counts_its_minimum():
    """reference.actors [1, 3] starts with 1 actor per rank: 2 workers x 1 = 2 actors; CPU 2 + 2 + 0.25 = 4.25."""
    n = needs(_uft("reference.run=stream", "reference.actors=[1, 3]"))
    assert n.total() == {"CPU": 4.25}


def test_gpu_workers_and_gpu_reference_actors():
    """use_gpu: 4 workers x {CPU 1, GPU 1} + stream 4 x 1 actors x {CPU 1, GPU 0.5}: GPU 4 + 2 = 6, CPU 4 + 4 + .25.
    The precompute pass of the same config: 1 actor {CPU 1, GPU 0.5} + 1 data CPU."""
    gpu = ("train.use_gpu=true", "train.num_workers=4", "train.micro_batch_size=1", "reference.gpus_per_actor=0.5")
    n = needs(_uft(*gpu, "reference.run=stream"))
    assert n.total() == {"CPU": 8.25, "GPU": 6.0}
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
        assert needs(cfg).total() == {"CPU": 2.25}
        assert reference_pass_needs(cfg) is None


def test_hint_rft_needs_its_rollout_actors_while_training():
    """2 workers x 1 CPU + 3 rollout actors x 2 CPUs + 0.25 data = 8.25 CPUs; on GPU 2 x 1 + 3 x 1 = 5 GPUs."""
    cfg = _rft("rft.rollout.actors=3", "rft.rollout.cpus_per_actor=2")
    assert needs(cfg).total() == {"CPU": 8.25}
    assert reference_pass_needs(cfg) is None
    gpu = _rft("rft.rollout.actors=3", "rft.rollout.cpus_per_actor=2", "train.use_gpu=true")
    assert needs(gpu).total() == {"CPU": 8.25, "GPU": 5.0}
    assert "rft.rollout.actors, rft.rollout.gpus_per_actor" in needs(gpu).explain("GPU")


def test_an_unresolved_auto_worker_cpus_is_refused():
    cfg = load_config(str(TINY_CONFIGS["uft"]), check_paths=False)
    assert cfg.train.cpus_per_worker == "auto"
    with pytest.raises(ValueError, match="resolve_worker_cpus"):
        needs(cfg)


# ---------------------------------------------------------------------------------------------------------
# assess: fixed clusters


def test_the_reported_two_cpu_cluster_fails_naming_the_numbers_and_keys():
    """The issue's cluster (`ray start --head --num-cpus=2`, no autoscaler): the demo at 1 CPU per worker
    needs 2 x 1 + 0.25 = 2.25 CPUs."""
    view = ClusterView(nodes=[{"CPU": 2.0}], free={"CPU": 2.0})
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(_uft()), view)
    assert isinstance(e.value, ConfigError)  # the CLI's exit 2 with one line per problem
    (msg,) = e.value.messages
    assert msg.startswith("cluster: while training the run needs 2.25 CPUs: ")
    assert "2 training workers x 1 CPU (train.num_workers, train.cpus_per_worker) + 0.25 for data tasks" in msg
    assert "the cluster has 2 CPUs and no autoscaler" in msg
    assert "Lower train.num_workers or train.cpus_per_worker" in msg and "ray start --num-cpus" in msg
    assert "can never hold this run" in str(e.value)


def test_three_cpus_fit_the_demo():
    fit = assess(_phases(_uft()), ClusterView(nodes=[{"CPU": 3.0}], free={"CPU": 3.0}))
    assert fit.status == "ok"
    assert fit.line == (
        "cluster: the run needs 2 x {CPU: 1} for training workers + 0.25 CPUs for data tasks while training; "
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
    """A head of 0 CPUs and a node type of 1 CPU, up to 4: 4 >= 2.25, and nothing is free yet."""
    view = ClusterView(nodes=[{}], free={}, node_types=[NodeType("cpu1", {"CPU": 1.0}, 4)], autoscaler="gcs")
    fit = assess(_phases(_uft()), view)
    assert fit.status == "waiting"
    assert fit.line == (
        "waiting for the autoscaler: need 2 x {CPU: 1} for training workers + 0.25 CPUs for data tasks; "
        "the cluster has 0 of 0 CPUs free (it can add: cpu1 {CPU: 1} x up to 4)"
    )


def test_an_autoscaler_that_can_never_add_enough_fails():
    """Up to 2 nodes of 1 CPU: at most 2 < 2.25 CPUs."""
    view = ClusterView(nodes=[{}], free={}, node_types=[NodeType("cpu1", {"CPU": 1.0}, 2)], autoscaler="gcs")
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(_uft()), view)
    (msg,) = e.value.messages
    assert "needs 2.25 CPUs" in msg and "the cluster has 0 CPUs and its autoscaler can grow it to at most 2" in msg
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
    """stream: 2 workers x 1 + 2 x 1 actors x 1 + 0.25 = 4.25 CPUs on a 4-CPU cluster; precompute would need 2.25."""
    cfg = _uft("reference.run=stream")
    with pytest.raises(ClusterTooSmall) as e:
        assess(_phases(cfg), ClusterView(nodes=[{"CPU": 4.0}], free={"CPU": 4.0}))
    (msg,) = e.value.messages
    assert "needs 4.25 CPUs: 2 training workers x 1 CPU" in msg and "+ 2 reference actors x 1 CPU" in msg
    assert "Lower train.num_workers or train.cpus_per_worker or reference.actors or reference.cpus_per_actor" in msg
    assert "or set reference.run precompute" in msg
    assert assess(_phases(_uft()), ClusterView(nodes=[{"CPU": 4.0}], free={"CPU": 4.0})).status == "ok"


# `train.cpus_per_worker: auto`: the largest share (in quarter CPUs) for which everything the run holds while training
# fits, at most the machine's cores / workers on a one-node cluster. While training, data tasks hold 0.25 CPU.


def _auto(workers: int, run: str, *over: str):
    """The demo's UFT config with `workers` CPU workers, cpus_per_worker auto, the reference in `run` mode with
    1 actor of 1 CPU (per rank when it streams)."""
    over = (f"train.num_workers={workers}", f"reference.run={run}", "reference.actors=1",
            "reference.cpus_per_actor=1", *over)  # fmt: skip
    cfg = load_config(str(TINY_CONFIGS["uft"]), list(over), check_paths=False)
    assert cfg.train.cpus_per_worker == "auto"
    return cfg


def _one_node(cpus: float) -> ClusterView:
    return ClusterView(nodes=[{"CPU": float(cpus)}], free={"CPU": float(cpus)})


@pytest.mark.parametrize(
    ("workers", "cores", "run", "cpus", "threads"),
    [
        # precompute: only 0.25 for data tasks beside the workers while training
        (1, 2, "precompute", 1.75, 2),  # 2 - 0.25: the whole laptop to one worker
        (2, 2, "precompute", 0.75, 1),  # (2 - 0.25) / 2 = 0.875 -> 0.75 in quarters
        (1, 4, "precompute", 3.75, 4),
        (2, 4, "precompute", 1.75, 2),  # (4 - 0.25) / 2 = 1.875 -> 1.75
        (1, 16, "precompute", 15.75, 16),
        (2, 16, "precompute", 7.75, 8),  # (16 - 0.25) / 2 = 7.875 -> 7.75
        # stream: 1 scorer of 1 CPU per rank lives beside the workers too
        (1, 2, "stream", 0.75, 1),  # 2 - 1 - 0.25
        (1, 4, "stream", 2.75, 3),  # 4 - 1 - 0.25
        (2, 4, "stream", 0.75, 1),  # (4 - 2 - 0.25) / 2 = 0.875 -> 0.75
        (1, 16, "stream", 14.75, 15),
        (2, 16, "stream", 6.75, 7),  # (16 - 2 - 0.25) / 2 = 6.875 -> 6.75
    ],
)
def test_auto_cpus_give_the_workers_what_the_rest_of_training_leaves(workers, cores, run, cpus, threads):
    cfg = _auto(workers, run)
    auto = auto_worker_cpus(cfg, _one_node(cores), cores)
    assert (auto.cpus, worker_threads(auto.cpus)) == (cpus, threads)
    held = needs(with_worker_cpus(cfg, auto.cpus)).total()["CPU"]
    assert held <= cores and held + 0.25 * workers > cores  # fits, and a quarter more per worker would not
    assert f"auto: {cpus:g} CPU" in auto.why and f"({threads} torch thread" in auto.why
    assert ("reference.run precompute" in auto.why) == (run == "precompute")


def test_auto_cpus_when_nothing_fits_and_on_the_local_cluster_the_driver_declares():
    # 2 streaming workers on 2 CPUs: 2 scorers + 0.25 already exceed the node; 1, and the pre-check says why
    cfg = _auto(2, "stream")
    auto = auto_worker_cpus(cfg, _one_node(2), 2)
    assert auto.cpus == 1.0 and "no larger share fits" in auto.why
    # a local Ray the driver starts declares what the run needs at 1 per worker: ceil(2 + 2 + 0.25) = 5 on 2 cores;
    # the cores cap (2 / 2 workers) keeps each worker at 1
    assert local_cluster_cpus(cfg) == max(os.cpu_count() or 1, 5)
    assert auto_worker_cpus(cfg, _one_node(5), 2).cpus == 1.0


def test_auto_cpus_on_a_cluster_use_the_same_rule_without_a_cores_cap():
    # two 16-CPU nodes, 2 precompute workers: one per node, 16 - 0.25 (the data share may land on either)
    two = ClusterView(nodes=[{"CPU": 16.0}, {"CPU": 16.0}], free={})
    assert auto_worker_cpus(_auto(2, "precompute"), two).cpus == 15.75
    # one GPU node of 8 GPUs and 16 CPUs, 8 GPU workers: they share its CPUs, (16 - 0.25) / 8 = 1.97 -> 1.75
    gpu = _auto(8, "precompute", "train.use_gpu=true", "train.gpus_per_worker=1")
    view = ClusterView(nodes=[{"CPU": 16.0, "GPU": 8.0}], free={})
    auto = auto_worker_cpus(gpu, view)
    assert auto.cpus == 1.75 and "torch thread" not in auto.why
    # an autoscaler's 4-CPU node type behind a 0-CPU head: up to 4 nodes, a whole node per worker (the data share
    # on a third); up to 2 nodes, 2 x 4 + 0.25 > 8, so 4 - 0.25 each
    for most, cpus in ((4, 4.0), (2, 3.75)):
        scaling = ClusterView(nodes=[{}], free={}, node_types=[NodeType("cpu", {"CPU": 4.0}, most)], autoscaler="gcs")
        assert auto_worker_cpus(_auto(2, "precompute"), scaling).cpus == cpus


def test_auto_cpus_count_rollout_actors_and_fall_back_to_one():
    over = ["train.num_workers=2", "rft.rollout.actors=2", "rft.rollout.cpus_per_actor=1"]
    cfg = load_config(str(TINY_CONFIGS["hint_rft"]), over, check_paths=False)
    # 2 rollout CPUs + 0.25 for data tasks beside the workers: (7 - 2.25) / 2 = 2.375 -> 2.25 on 7 CPUs
    assert auto_worker_cpus(cfg, _one_node(7), 16).cpus == 2.25
    assert auto_worker_cpus(cfg, _one_node(6), 16).cpus == 1.75  # (6 - 2.25) / 2 = 1.875
    assert auto_worker_cpus(cfg, _one_node(2), 16).cpus == 1.0  # nothing fits: 1, and the pre-check says why


def test_worker_threads_round_a_share_to_the_nearest_core():
    assert [worker_threads(c) for c in (0.25, 0.75, 1.0, 1.25, 1.5, 1.75, 7.75)] == [1, 1, 1, 1, 2, 2, 8]


def test_a_local_cluster_holds_what_the_run_needs():
    cfg = load_config(str(TINY_CONFIGS["uft"]), ["reference.run=stream", "reference.actors=4"], check_paths=False)
    # 2 workers x 1 (auto at its least) + 2 x 4 scorers + 0.25 data = 10.25 -> 11, more than this machine's cores
    assert local_cluster_cpus(cfg) == max(os.cpu_count() or 1, 11)
