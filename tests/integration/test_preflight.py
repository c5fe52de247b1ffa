"""The backend pre-check on a real local Ray: a run whose rollout actors would import vllm on nodes
without it fails at once, naming the package, the field and the image, instead of minutes into the run; a probe
no node can take yet is deferred, not failed; an installed package passes.

CPU only: `rft.rollout.gpus_per_actor: 0` makes the rollout actor, and so its probe, ask for CPUs only (vllm is
never installed on the test machines). A few seconds: one probe task per check.
"""

from __future__ import annotations

import time

import pytest

from uft_ray.config import load_config
from uft_ray.demo import TINY_CONFIGS
from uft_ray.preflight import VLLM_BUILD, VLLM_IMAGE, BackendMissing, check_backends

pytestmark = pytest.mark.integration


def _vllm_rollouts(*overrides: str):
    return load_config(
        str(TINY_CONFIGS["hint_rft"]),
        ["train.use_gpu=true", "rft.rollout.backend=vllm", "rft.rollout.gpus_per_actor=0", *overrides],
        check_paths=False,
    )


def test_vllm_rollouts_on_a_node_without_vllm_fail_at_once_naming_the_package_and_the_image(ray_local):
    t0 = time.monotonic()
    with pytest.raises(BackendMissing) as e:
        check_backends(_vllm_rollouts(), timeout_s=60)
    took = time.monotonic() - t0
    assert took < 30, took
    [line] = e.value.messages
    assert line.startswith("rft.rollout.backend: vllm: the rollout actors import vllm, not installed on node ")
    assert VLLM_IMAGE in line and VLLM_BUILD in line and "{CPU: 1}" in line


def test_a_probe_no_node_can_take_is_deferred_not_failed(ray_local, capsys):
    """64 CPUs per rollout actor: no node of the 4-CPU local Ray holds one, so the probe asks for 64 CPUs, is
    never scheduled, and after the timeout is cancelled with one line saying so."""
    t0 = time.monotonic()
    assert check_backends(_vllm_rollouts("rft.rollout.cpus_per_actor=64"), timeout_s=3) == []
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert "[uft-ray] backend check deferred: vllm for the rollout actors (rft.rollout.backend: vllm)" in out


def test_benchmarks_with_lm_eval_installed_pass(ray_local, capsys):
    import importlib.metadata

    cfg = load_config(str(TINY_CONFIGS["uft"]), ["eval.tasks=[arc_easy]"], check_paths=False)
    answers = check_backends(cfg, timeout_s=60)
    assert [(a["package"], a["found"]) for a in answers] == [("lm_eval", True)]
    version = importlib.metadata.version("lm_eval")
    assert f"[uft-ray] backends: lm_eval {version} for the eval workers on 1 node(s)" in capsys.readouterr().out
