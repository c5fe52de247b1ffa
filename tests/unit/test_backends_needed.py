"""The backend pre-check's pure parts: which package each backend imports, on nodes with which resources,
which nodes can run it, what one probe finds, and the message that names the package, the field and the image.

tests/integration/test_preflight.py runs the probes on a local Ray.
"""

from __future__ import annotations

import importlib.metadata

import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.demo import TINY_CONFIGS
from uft_ray.preflight import (
    VLLM_BUILD,
    VLLM_IMAGE,
    BackendMissing,
    BackendNeed,
    backends_needed,
    missing_line,
    nodes_that_hold,
    probe,
)


def _rft(*overrides: str):
    """The demo's hint_rft config: 1 hf rollout actor of 1 CPU, no benchmarks."""
    return load_config(str(TINY_CONFIGS["hint_rft"]), list(overrides), check_paths=False)


def _uft(*overrides: str):
    return load_config(str(TINY_CONFIGS["uft"]), list(overrides), check_paths=False)


GPU_VLLM = ("train.use_gpu=true", "rft.rollout.backend=vllm", "rft.rollout.cpus_per_actor=4")


# ---------------------------------------------------------------------------------------------------------
# backends_needed


def test_a_vllm_rollout_needs_vllm_where_a_rollout_actor_fits():
    """rollout.backend vllm on GPU: each actor asks for 4 CPUs (cpus_per_actor) and 1 GPU (gpus_per_actor's
    default), so vllm must import on nodes that hold {CPU: 4, GPU: 1}."""
    assert backends_needed(_rft(*GPU_VLLM)) == [
        BackendNeed("vllm", "rft.rollout.backend: vllm", "rollout actors", {"num_cpus": 4.0, "num_gpus": 1.0})
    ]


def test_an_hf_rollout_and_no_benchmarks_need_nothing():
    assert backends_needed(_rft()) == []
    assert backends_needed(_rft("train.use_gpu=true", "rft.rollout.backend=hf")) == []
    assert backends_needed(_uft()) == []  # no rollouts (rft.* is not read by uft), no eval.tasks


def test_a_cpu_only_vllm_rollout_asks_for_cpus_only():
    """gpus_per_actor 0: the actor asks for no GPU, so neither does its probe (what the CPU-only local test uses)."""
    cfg = _rft(*GPU_VLLM, "rft.rollout.gpus_per_actor=0")
    assert [n.resources for n in backends_needed(cfg)] == [{"num_cpus": 4.0, "num_gpus": 0.0}]


def test_benchmarks_need_lm_eval_where_an_eval_worker_fits():
    """eval.tasks on GPU: one eval worker per eval.tensor_parallel_size (2) GPUs and 1 CPU
    (evaluation.worker.worker_layout); on CPU one worker of 1 CPU. A run's eval backend is auto: lm_eval only."""
    gpu = backends_needed(_uft("train.use_gpu=true", "eval.tasks=[arc_easy]", "eval.tensor_parallel_size=2"))
    assert gpu == [BackendNeed("lm_eval", "eval.tasks", "eval workers", {"num_cpus": 1.0, "num_gpus": 2.0})]
    cpu = backends_needed(_uft("eval.tasks=[arc_easy]"))
    assert cpu == [BackendNeed("lm_eval", "eval.tasks", "eval workers", {"num_cpus": 1.0, "num_gpus": 0.0})]
    preset = backends_needed(_uft("eval.preset=uft-paper"))
    assert [(n.package, n.field) for n in preset] == [("lm_eval", "eval.preset: uft-paper")]


def test_the_vllm_eval_backend_needs_vllm_too():
    needs = backends_needed(_uft("train.use_gpu=true", "eval.tasks=[arc_easy]"), eval_backend="vllm")
    assert [(n.package, n.field) for n in needs] == [("lm_eval", "eval.tasks"), ("vllm", "eval backend: vllm")]
    assert {tuple(sorted(n.resources.items())) for n in needs} == {(("num_cpus", 1.0), ("num_gpus", 1.0))}
    assert backends_needed(_uft("eval.tasks=[arc_easy]"), eval_backend="hf")[0].package == "lm_eval"


def test_rollouts_then_benchmarks():
    needs = backends_needed(_rft(*GPU_VLLM, "eval.tasks=[arc_easy]"))
    assert [(n.package, n.what) for n in needs] == [("vllm", "rollout actors"), ("lm_eval", "eval workers")]


# ---------------------------------------------------------------------------------------------------------
# nodes_that_hold, probe, the message

NODES = [
    {"NodeID": "head", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}},
    {"NodeID": "big", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 16.0, "GPU": 8.0}},
    {"NodeID": "gone", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 16.0, "GPU": 8.0}},
    {"NodeID": "small", "Alive": True, "NodeManagerAddress": "10.0.0.4", "Resources": {"CPU": 2.0, "GPU": 1.0}},
]


def test_nodes_that_hold_one_actor():
    """{CPU: 4, GPU: 1}: the head has no GPU, `small` 2 CPUs, `gone` is dead: only `big`."""
    assert [n["NodeID"] for n in nodes_that_hold(NODES, {"num_cpus": 4, "num_gpus": 1})] == ["big"]
    assert [n["NodeID"] for n in nodes_that_hold(NODES, {"num_cpus": 1, "num_gpus": 0})] == ["head", "big", "small"]
    assert [n["NodeID"] for n in nodes_that_hold(NODES, {"num_cpus": 0, "num_gpus": 0})] == ["head", "big", "small"]
    assert nodes_that_hold(NODES, {"num_cpus": 32, "num_gpus": 1}) == []


def test_probe_finds_installed_packages_and_their_versions():
    assert probe("lm_eval")["found"] is True
    assert probe("lm_eval")["version"] == importlib.metadata.version("lm_eval")
    assert probe("vllm")["found"] is False and probe("vllm")["version"] is None  # never installed here
    assert probe("json") | {"node": None} == {"package": "json", "found": True, "version": None, "node": None}


def test_the_message_names_the_package_the_field_and_the_image():
    need = BackendNeed("vllm", "rft.rollout.backend: vllm", "rollout actors", {"num_cpus": 4.0, "num_gpus": 1.0})
    line = missing_line(need, ["10.0.0.2", "10.0.0.5"])
    assert line.startswith("rft.rollout.backend: vllm: the rollout actors import vllm, not installed on 2 nodes")
    assert "10.0.0.2, 10.0.0.5" in line and "{CPU: 4, GPU: 1}" in line
    assert VLLM_IMAGE in line and VLLM_BUILD in line and "rft.rollout.backend hf" in line
    assert VLLM_BUILD == "docker build --target vllm -t uft-ray:0.1.0-vllm -f infra/Dockerfile ."
    err = BackendMissing([line])
    assert isinstance(err, ConfigError) and err.messages == [line]
    assert str(err).startswith("a backend's package is not installed where it runs:\n  - rft.rollout.backend")


def test_lm_eval_missing_names_the_plain_image():
    need = BackendNeed("lm_eval", "eval.tasks", "eval workers", {"num_cpus": 1.0, "num_gpus": 0.0})
    line = missing_line(need, ["10.0.0.4"])
    assert line.startswith("eval.tasks: the eval workers import lm_eval, not installed on node 10.0.0.4")
    assert "uft-ray:0.1.0 " in line and "docker build -t uft-ray:0.1.0 -f infra/Dockerfile ." in line


def test_a_rollout_actor_without_vllm_names_the_image():
    """What an actor that starts on a node the pre-check could not see yet (autoscaling) says."""
    from uft_ray.rft.rollout import RolloutActor

    with pytest.raises(ImportError, match="uft-ray:0.1.0-vllm") as e:
        RolloutActor(
            "some/model",
            lora={"r": 8, "alpha": 16, "target_modules": ["q_proj"]},
            backend="vllm",
            dtype="bfloat16",
            max_new_tokens=4,
            temperature=1.0,
            top_p=1.0,
            eos_token_ids=[0],
            pad_token_id=0,
            vocab_limit=10,
        )
    assert "rft.rollout.backend: vllm" in str(e.value)
