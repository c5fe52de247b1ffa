"""uft-ray: unified fine-tuning (UFT: SFT + alignment in one stage, one implicit-reward loss) on Ray.

    import uft_ray
    uft_ray.run("jobs/configs/demo.yaml")                                   # in this process
    job = uft_ray.submit("jobs/configs/demo.yaml", address="http://127.0.0.1:8265")
    job.wait(); print(job.logs())
    cfg = uft_ray.load_config("jobs/configs/mistral7b_uft.yaml", ["train.lr=1e-5"], check_paths=False)

The names are imported on first use, so `import uft_ray` stays light (no Ray, torch or DeepSpeed import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["run", "submit", "load_config", "Config", "ConfigError", "JobHandle"]

_LAZY = {
    "run": "uft_ray.api",
    "submit": "uft_ray.api",
    "JobHandle": "uft_ray.api",
    "load_config": "uft_ray.config",
    "Config": "uft_ray.config",
    "ConfigError": "uft_ray.config",
}

if TYPE_CHECKING:
    from uft_ray.api import JobHandle, run, submit
    from uft_ray.config import Config, ConfigError, load_config


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'uft_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
