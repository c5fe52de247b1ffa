"""The run report: `report.html` with PNG plots, built from a run directory's files alone.

Inputs (docs/internals.md): `metrics.jsonl` (one object per optimizer step), `config.yaml`, and the data
plane's `summary.json` (per-source counts and quarantine counts by reason) with `quarantine/*.parquet` when
they are there. Output: `{run_dir}/report.html`, self-contained (plots embedded as PNG data URIs, so the file
can be mailed or opened from object storage), and the same PNGs under `{run_dir}/plots/`.

`uft-ray report RUN_DIR` rebuilds it; the driver calls `write_report` at the end of a run. The modules:
`plots` (one function per figure), `page` (the run's inputs, the tables, the page, and the shared plots alone:
`write_shared_report`), and one writer per built-in method, `uft` (PLOTS) and `rft` (RFT_PLOTS), each making
only the plots its method has. The run's method picks its writer (`Method.write_report`, uft_ray.methods).
"""

from __future__ import annotations

import os

from uft_ray import methods
from uft_ray.report.page import RunInputs, load_run, sources_in, write_shared_report
from uft_ray.report.rft import RFT_PLOTS, write_rft_report
from uft_ray.report.uft import PLOTS, write_uft_report

__all__ = ["PLOTS", "RFT_PLOTS", "RunInputs", "load_run", "sources_in", "write_report", "write_rft_report",
           "write_shared_report", "write_uft_report"]  # fmt: skip


def write_report(run_dir: str | os.PathLike) -> str:
    """Build `{run_dir}/report.html` (and `plots/*.png`) from the run's files; returns the HTML path.

    The run's `method` (config.yaml) picks the writer; a run without a config gets the UFT report, and one of a
    method this process does not know (registered in another) the shared plots alone.
    """
    inp = load_run(run_dir)
    method = methods.find(inp.method)
    written = method.write_report(inp) if method is not None else None
    return written if written is not None else write_shared_report(inp)
