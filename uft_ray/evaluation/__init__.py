"""Benchmarks with lm-evaluation-harness (docs/design.md "Evaluation"): `uft-ray eval RUN_DIR|ADAPTER --tasks ...`.

One file per job:
- `harness.py`: the target (run or adapter -> base + adapter + results folder), lm_eval's model arguments
  (`hf` with `peft=`, `vllm` with `lora_local_path`), one `simple_evaluate` per task with one-line failures,
  the files (lm_eval's JSON per task, summary.json);
- `presets.py`: named protocols (`uft-paper`: the paper's tasks and shots) and the derived means;
- `worker.py`: `EvalWorker`, the Ray actor (one per GPU) that runs the tasks it is handed, and `run_eval`.

Names are imported from their modules on first use, so `import uft_ray.evaluation` loads neither Ray nor lm_eval.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EvalError": "harness",
    "EvalTarget": "harness",
    "TaskSpec": "harness",
    "resolve_target": "harness",
    "model_args": "harness",
    "write_summary": "harness",
    "PRESETS": "presets",
    "UFT_PAPER": "presets",
    "EvalWorker": "worker",
    "EvalReport": "worker",
    "run_eval": "worker",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"uft_ray.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'uft_ray.evaluation' has no attribute {name!r}")
