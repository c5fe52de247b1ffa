"""The job's driver: one run of any method, or the paper's two-stage sequential baselines.

`run(cfg)` is what `uft-ray train`, `uft_ray.run(...)` and `jobs/train.py` call. It asks the method registry
(uft_ray.methods) for the config's method and runs its driver: uft_ray.uft.driver for `method: uft` (the offline
losses over prepared rows), uft_ray.rft.driver for `method: hint_rft`, or a method registered from outside the
package. Every method's driver opens the run, plans, trains with Ray Train and writes the run directory through
the shared parts in uft_ray.runner.
"""

from __future__ import annotations

import copy
from typing import Any

from uft_ray import methods
from uft_ray.config import Config, ConfigError, validate
from uft_ray.runner import RunResult
from uft_ray.train.hooks import TrainHooks

__all__ = ["RunResult", "run", "run_sequential"]


def run(cfg: Config, *, hooks: TrainHooks | None = None, **options: Any) -> RunResult:
    """Train one run end to end and write its run directory; rerun the same config to resume.

    `hooks`: callbacks every worker makes (uft_ray.train.hooks; the tests record and steer runs with them).
    `options`: the method's own (`method: uft` takes `prepared_dir`, rows already prepared for this config by
    `uft-ray prepare CONFIG --out DIR`).
    """
    return methods.of(cfg).run(cfg, hooks=hooks, **options)


def run_sequential(stage1: Config, stage2: Config, *, hooks: TrainHooks | None = None) -> tuple[RunResult, RunResult]:
    """The paper's sequential baselines: stage 1 (e.g. `sft` on UltraChat), then stage 2 (`dpo` / `kto` / `uft`
    on HelpSteer2) continuing stage 1's adapter, against the reference base + stage-1 adapter.
    """
    if stage2.reference.mode != "actor" and stage2.needs_reference:
        raise ConfigError(
            ["reference.mode: stage 2's reference is base + stage-1 adapter; use actor (adapter_off is the bare base)"]
        )
    first = run(stage1, hooks=hooks)
    stage2 = copy.deepcopy(stage2)
    stage2.model.adapter = first.adapter_dir
    stage2.reference.adapter = first.adapter_dir
    problems = validate(stage2, check_paths=False)
    if problems:
        raise ConfigError(problems)
    return first, run(stage2, hooks=hooks)
