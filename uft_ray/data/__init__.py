"""The data plane: source files -> unified rows -> mixture -> tokenized rows (docs/design.md "The data flow").

`pipeline.prepare(cfg, out_dir)` runs it on Ray Data and writes a prepared directory; `prepared` owns that
directory (its file names, reading rows and the summary, attaching columns). The parts, each importable
without starting Ray: `sources` (paths, raw readers), `normalize` (raw row -> unified rows), `mixture`
(quotas and the seeded selection), `tokenize` (chat template, response mask, length policy), `quarantine`
(rejected rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uft_ray.data.pipeline import prepare, read_source

__all__ = ["prepare", "read_source"]


def __getattr__(name: str) -> Any:
    # the pipeline imports Ray: load it on first use so `uft_ray.data.normalize` etc. stay light
    if name in __all__:
        from uft_ray.data import pipeline  # Ray (see above)

        return getattr(pipeline, name)
    raise AttributeError(name)
