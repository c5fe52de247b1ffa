"""Fixtures for the training tests: one config builder, one prepared directory shared by the UFT runs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from uft_ray.config import Config, load_config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_config(assets: dict[str, str], root: Path, run_name: str, **sections: dict[str, Any]) -> Config:
    """UFT on UltraChat + HelpSteer2 samples, 20 + 20 rows, 2 CPU workers (ZeRO-3), global batch 4, 2 epochs =
    20 steps.

    Tiny sequences (max_len 128) and LoRA dropout 0, so that runs that should agree agree exactly. `sections`
    are merged into these defaults, except `data` and `mixture`, which replace them.
    """
    base = {
        "model": {"path": assets["model"]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "seed": 0,
            "sources": [
                {"name": "ultrachat", "format": "ultrachat_200k", "path": assets["ultrachat_200k_train"]},
                {"name": "helpsteer2", "format": "helpsteer2", "path": assets["helpsteer2_train"]},
            ],
        },
        "mixture": {"counts": {"ultrachat": 20, "helpsteer2": 20}},
        "tokenize": {"max_prompt_len": 96, "max_len": 128},
        "loss": {"type": "uft", "beta": 0.1},
        "reference": {
            "actors": 1,
            "gpus_per_actor": 0,
            "cpus_per_actor": 1,
            "batch_size": 8,
            "cache_dir": str(root / "ref-cache"),
        },
        "train": {
            "num_workers": 2,
            "use_gpu": False,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "lr": 1.0e-2,
            "warmup_ratio": 0.1,
            "epochs": 2,
            "checkpoint_every": 5,
            "max_failures": 0,
            "seed": 0,
            # Explicit, not auto: these runs test the sharded (ZeRO-3) path, and their workers must leave CPUs
            # to the data tasks when two runs share the 4 logical CPUs (the sweep test).
            "cpus_per_worker": 1,
            "deepspeed": {"zero_stage": 3},
        },
        "output": {"storage_path": str(root / "runs"), "run_name": run_name},
    }
    # data and mixture name the sources: a run that overrides them gives them whole
    whole = {k: sections.pop(k) for k in ("data", "mixture") if k in sections}
    return load_config(_merge(base, sections) | whole)


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def make_config(tiny_assets: dict[str, str], train_root: Path) -> Callable[..., Config]:
    """`make_config(run_name, **sections)`: `train_config` with this module's assets and root."""
    return lambda run_name, **sections: train_config(tiny_assets, train_root, run_name, **sections)


@pytest.fixture(scope="module")
def uft_prepared(make_config: Callable[..., Config], train_root: Path, ray_local: None) -> str:
    """The UFT mixture prepared once by the real data plane; every UFT run here trains from it."""
    from uft_ray.data.pipeline import prepare

    out = str(train_root / "prepared-uft")
    prepare(make_config("prepare"), out)
    return out


@pytest.fixture(autouse=True)
def _fresh_ray_after_a_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test (or its fixture) that ran out of time may have left a trainer running in the session's local Ray:
    the next tests would share the 2 cores with it. Restart that Ray (its work dies with it)."""
    yield
    if getattr(request.node, "timed_out", False) and "ray_local" in request.fixturenames:
        import ray

        from uft_ray.config import RayConfig
        from uft_ray.ray_utils import init_ray

        if ray.is_initialized():
            ray.shutdown()
        init_ray(RayConfig(), num_cpus=4)
