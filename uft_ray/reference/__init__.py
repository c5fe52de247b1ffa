"""The reference service: frozen-model log-probs from a Ray actor pool, cached on disk (docs/design.md "The reference cache").

One file per job:
- `fingerprint.py`: the cache key (what the log-probs depend on);
- `cache.py`: the cache on disk (`{cache_dir}/ref_logp/{fingerprint}/`), its validity rules and atomic publish;
- `scorer.py`: `ReferenceScorer`, the frozen model in a Ray actor;
- `collector.py`: the actor every scorer reports to (exactly once per row, forward counts);
- `service.py`: the driver's entry points (`attach_reference`, `stream_stage`, `publish_stream_cache`,
  `read_reference`);
- `adapter_off.py`: `reference.mode: adapter_off`, the policy with LoRA disabled.

Names are imported from their modules on first use, so `import uft_ray.reference` loads neither Ray nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "attach_reference": "service",
    "read_reference": "service",
    "stream_stage": "service",
    "publish_stream_cache": "service",
    "new_collector": "collector",
    "COLLECTOR_PREFIX": "collector",
    "ReferenceScorer": "scorer",
    "cache_root": "cache",
    "adapter_off_logprobs": "adapter_off",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"uft_ray.reference.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'uft_ray.reference' has no attribute {name!r}")
