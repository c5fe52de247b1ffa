"""What every report shares: the run's inputs read once, the page around the plots, and its tables.

`load_run` reads the run directory (metrics, config, the data plane's summary and quarantine counts);
`write_page` writes the plots under `plots/` and `report.html` around them. The method's own writer
(`uft_ray.report.uft`, `uft_ray.report.rft`) chooses the plots, their order and the configuration rows.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from uft_ray import storage
from uft_ray.data.prepared import summary_path
from uft_ray.report.plots import PALETTE, plot_loss, plot_optimization, plot_quarantine, plot_throughput
from uft_ray.run_dir import METRICS, RunDir

Row = tuple[str, str]  # (name, value) of a key-value table


def sources_in(rows: list[dict[str, Any]]) -> list[str]:
    """Source names found in per-source metric keys, in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            parts = k.split("/")
            if len(parts) >= 2 and parts[0] in ("loss", "reward", "mixture", "rows", "score_pred", "kl", "logp"):
                seen.setdefault(parts[1], None)
    return list(seen)


def _load_summary(run: RunDir) -> dict[str, Any] | None:
    """The data plane's summary: beside the run's files, else its own prepared directory's."""
    for path in (run.data_summary, summary_path(run.prepared)):
        summary = storage.read_json(path)
        if summary is not None:
            return summary
    return None


def _quarantine_counts(run: RunDir, summary: dict[str, Any] | None) -> dict[tuple[str, str], int]:
    """Counts by (reason, source): from the run's quarantine parquet files when present, else the summary."""
    files = [storage.as_uri(run.quarantine, f) for f in storage.list_files(run.quarantine, ".parquet")[1]]
    counts: dict[tuple[str, str], int] = defaultdict(int)
    if files:
        try:
            import pyarrow.parquet as pq

            for f in files:
                t = pq.read_table(f, columns=["reason", "source"])
                for reason, source in zip(t.column("reason").to_pylist(), t.column("source").to_pylist(), strict=True):
                    counts[(str(reason), str(source))] += 1
            return dict(counts)
        except Exception:  # an unreadable file must not cost the whole report
            counts.clear()
    for reason, n in ((summary or {}).get("quarantine") or {}).items():
        counts[(str(reason), "")] += int(n)
    return dict(counts)


def _load_config(run: RunDir) -> dict[str, Any]:
    try:
        return yaml.safe_load(storage.read_bytes(run.config)) or {}
    except (OSError, yaml.YAMLError):
        return {}


@dataclass
class RunInputs:
    """A run directory's files, as the report reads them."""

    run_dir: str
    run: RunDir
    rows: list[dict[str, Any]]  # metrics.jsonl, one record per step
    cfg: dict[str, Any]  # config.yaml as plain YAML ({} when missing)
    summary: dict[str, Any] | None  # the data plane's summary.json
    sources: list[str]  # the config's sources in its order, then names only the metrics have
    colors: dict[str, str]  # one fixed colour per source
    qcounts: dict[tuple[str, str], int]  # quarantined rows by (reason, source)

    @property
    def method(self) -> str:
        return self.cfg.get("method") or "uft"


def load_run(run_dir: str | os.PathLike) -> RunInputs:
    """Read what the report needs from `run_dir`; FileNotFoundError when the directory is not there."""
    run_dir = os.fspath(run_dir)
    run_dir = run_dir if storage.is_remote(run_dir) else os.path.abspath(run_dir)
    if not storage.is_dir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    run = RunDir(run_dir)
    rows = run.read_metrics()
    cfg = _load_config(run)
    summary = _load_summary(run)
    sources = sources_in(rows)
    cfg_sources = [s.get("name") for s in (cfg.get("data") or {}).get("sources") or [] if isinstance(s, dict)]
    for s in cfg_sources:  # keep the config's order; metrics-only names after
        if s and s not in sources:
            sources.append(s)
    sources.sort(key=lambda s: cfg_sources.index(s) if s in cfg_sources else len(cfg_sources))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sources)}
    qcounts = _quarantine_counts(run, summary)
    return RunInputs(run_dir, run, rows, cfg, summary, sources, colors, qcounts)


# ---------------------------------------------------------------------------------------------------------
# Tables


def fmt(v: Any, digits: int = 4) -> str:
    """A number for a table: thousands separators for ints, 4 significant digits, scientific when tiny or huge."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.{digits}g}"
    return str(v)


def _mean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def cfg_get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """`cfg[k1][k2]...` of the plain YAML, or `default` where a key is missing."""
    node: Any = cfg
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def shared_config_rows(cfg: dict[str, Any]) -> tuple[Row, Row, Row]:
    """The configuration rows every method has: model, LoRA, training."""
    tr = cfg_get(cfg, "train") or {}
    ds = tr.get("deepspeed") or {}
    lora = cfg_get(cfg, "lora") or {}
    adapter = cfg_get(cfg, "model", "adapter")
    return (
        ("model", f"{cfg_get(cfg, 'model', 'path', default='-')}" + (f" + adapter {adapter}" if adapter else "")),
        ("LoRA", f"r {lora.get('r', '-')}, alpha {lora.get('alpha', '-')}, dropout {lora.get('dropout', '-')}"),
        ("training", f"{tr.get('num_workers', '-')} workers ({'GPU' if tr.get('use_gpu') else 'CPU'}), ZeRO-{ds.get('zero_stage', '-')}, micro-batch {tr.get('micro_batch_size', '-')} x accum {tr.get('grad_accum', '-')}, lr {fmt(tr.get('lr'))}, epochs {tr.get('epochs', '-')}"
         + (f", max steps {tr.get('max_steps')}" if tr.get("max_steps") else "")),
    )  # fmt: skip


def final_rows(rows: list[dict[str, Any]], sources: list[str]) -> list[Row]:
    """The "Final numbers" table: steps, wall time, first step -> last 10% of each headline metric."""
    if not rows:
        return [("steps", "0 (no metrics.jsonl yet)")]
    last = rows[-1]
    out = [("steps", fmt(last.get("step", len(rows))))]
    skipped = [r for r in rows if r.get("nonfinite/skipped")]
    if skipped or "nonfinite/skipped_total" in last:  # train.on_nonfinite: skip
        at = ", ".join(str(r.get("step")) for r in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        total = last.get("nonfinite/skipped_total", len(skipped))
        out.append(("steps skipped (loss or gradient not a number)", f"{total}" + (f" (at {at})" if at else "")))
    if "epoch" in last:
        out.append(("epoch", fmt(last.get("epoch"))))
    times = [r.get("time") for r in rows if isinstance(r.get("time"), (int, float))]
    if len(times) >= 2:
        out.append(("wall time (first to last step)", f"{times[-1] - times[0]:.1f} s"))
    tail = rows[-max(1, len(rows) // 10) :]  # last 10% of steps: less noisy than the last step alone

    def span(key: str) -> str | None:
        first = _mean([rows[0].get(key)])
        end = _mean(r.get(key) for r in tail)
        if end is None:
            return None
        return f"{fmt(first)} \u2192 {fmt(end)}" if first is not None and len(rows) > 1 else fmt(end)

    out.append(("loss (first step \u2192 last 10%)", span("loss") or "-"))
    for key in ("reward/mean", "reward/accuracy", "hint_nll", "kl"):  # hint_rft
        if key in last:
            out.append((f"{key} (first step \u2192 last 10%)", span(key) or "-"))
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    if evals:
        out.append(("eval/accuracy (first \u2192 last evaluation)", f"{fmt(evals[0])} \u2192 {fmt(evals[-1])}"))
    for s in sources:
        parts = []
        for key, name in (("loss", "loss"), ("reward", "reward"), ("score_pred", "sigmoid(r)")):
            v = span(f"{key}/{s}")
            if v is not None:
                parts.append(f"{name} {v}")
        t = _mean(r.get(f"score_target/{s}") for r in rows)
        if t is not None:
            parts.append(f"target score {fmt(t, 3)}")
        c = last.get(f"mixture/{s}/cumulative")
        t = last.get(f"mixture/{s}/target")
        if c is not None:
            parts.append(f"share {fmt(c, 3)}" + (f" (target {fmt(t, 3)})" if t is not None else ""))
        if parts:
            out.append((s, "; ".join(parts)))
    for key, name in (("tokens_per_s", "tokens/s (mean)"), ("samples_per_s", "samples/s (mean)"),
                      ("padding_frac", "padding fraction (mean)"), ("data_wait_frac", "data-wait fraction (mean)")):  # fmt: skip
        v = _mean(r.get(key) for r in rows)
        if v is not None:
            out.append((name, fmt(v)))
    return out


def _table(rows: list[Row]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _data_table(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("sources"):
        return ""
    cols = ("rows_read", "rows_out", "quota", "quarantined", "dropped_for_length", "upsampled")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in ("source", *cols))
    body = ""
    for name, st in summary["sources"].items():
        cells = "".join(f"<td>{fmt(st.get(c))}</td>" for c in cols)
        body += f"<tr><td>{html.escape(name)}</td>{cells}</tr>"
    return f"<h2>Data</h2><table class='grid'><tr>{head}</tr>{body}</table>"


def _before_after_table(run: RunDir) -> str:
    """The demo's held-out check (before_after.json): pass rate per family and NLL, base against base + adapter."""
    found = storage.read_json(run.before_after)
    if not isinstance(found, dict) or not found.get("families"):
        return ""

    def row(name: str, before: float, after: float, pct: bool = True) -> str:
        # pass rates: higher is better; an NLL: lower is better
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")
        gain = (after - before) if pct else (before - after)
        change = "improved" if gain > 0 else "no change" if gain == 0 else "got worse"
        return f"<tr><td>{html.escape(name)}</td><td>{f(before)}</td><td>{f(after)}</td><td>{change}</td></tr>"

    body = "".join(row(f"{fam} (n={r['n']})", r["before"], r["after"]) for fam, r in found["families"].items())
    body += row("all families", found["overall"]["before"], found["overall"]["after"])
    body += row("held-out NLL per token", found["nll"]["before"], found["nll"]["after"], pct=False)
    shown = "".join(
        f"<tr><td>{html.escape(a['prompt'])}</td><td>{html.escape(a['before'])}</td><td>{html.escape(a['after'])}</td></tr>"
        for a in found.get("answers", [])[:: max(1, len(found.get("answers", [])) // 5)][:5]
    )
    return (
        "<h2 id='before-after'>Held-out check: base model against base + adapter</h2>"
        f"<p class='note'>{found.get('n')} held-out prompts (questions and instruction values no training row has), "
        "greedy answers scored by exact checkers; NLL of the compliant answers (lower is better).</p>"
        f"<table class='grid'><tr><th>check</th><th>before</th><th>after</th><th></th></tr>{body}</table>"
        f"<table class='grid'><tr><th>prompt</th><th>before</th><th>after</th></tr>{shown}</table>"
    )


def _benchmarks_table(run: RunDir) -> str:
    """lm_eval results of `uft-ray eval` / `eval.tasks` (eval/summary.json), metric names as lm_eval reports them."""
    summary = storage.read_json(run.eval_summary) or {}
    tasks, failed = summary.get("tasks") or {}, summary.get("failed") or {}
    if not tasks and not failed:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{html.escape(m)}</td><td>{fmt(v)}</td></tr>"
        for t, ms in sorted(tasks.items())
        for m, v in sorted(ms.items())
    )
    body += "".join(
        f"<tr><td>{html.escape(t)}</td><td>failed</td><td>{html.escape(str(why))}</td></tr>"
        for t, why in failed.items()
    )
    return f"<h2 id='benchmarks'>Benchmarks (lm_eval)</h2><table class='grid'><tr><th>task</th><th>metric</th><th>value</th></tr>{body}</table>"


# ---------------------------------------------------------------------------------------------------------
# The page

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:2px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}.cols{display:flex;gap:32px;flex-wrap:wrap}.cols>div{flex:1;min-width:380px}
table{border-collapse:collapse;font-size:13px}table.kv th{text-align:left;padding:3px 14px 3px 0;color:#555;
font-weight:600;vertical-align:top;white-space:nowrap}table.kv td{padding:3px 0}
table.grid th,table.grid td{border:1px solid #ddd;padding:4px 10px;text-align:right}table.grid th{background:#f6f6f6}
table.grid td:first-child{text-align:left}img{max-width:100%;margin:6px 0 2px}p.note{color:#555;font-size:13px;margin:2px 0 10px}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""

# The plots every method has: (title, note).
SHARED_PLOTS = {
    "loss": ("Loss", "Total loss and each source's loss over the global batch. With UFT a source's loss is the mean "
             "of (sigmoid(r) - s)^2; before the first update r = 0, so it starts at the mean of (0.5 - s)^2."),
    "throughput": ("Throughput", "Training throughput, and the fraction of tokens that were padding and of step "
                   "time spent waiting for data (both should stay low)."),
    "optimization": ("Optimization", "Learning-rate schedule, gradient norm, and the per-token divergence from the "
                     "reference."),
    "quarantine": ("Quarantine", "Rows the data plane rejected, by reason (kept with their raw text under "
                   "quarantine/)."),
}  # fmt: skip


def write_page(
    inp: RunInputs,
    pngs: dict[str, bytes],
    sections: list[tuple[str, str, str]],
    config_rows: list[Row],
    final: list[Row],
) -> str:
    """Write `pngs` as `plots/{name}.png` and `report.html` with `sections` ((name, title, note) in page order)
    under the configuration and final-numbers tables; returns the HTML path."""
    run, run_dir, cfg = inp.run, inp.run_dir, inp.cfg
    for name, data in pngs.items():
        storage.atomic_write(run.plot(name), data)

    run_name = (cfg.get("output") or {}).get("run_name") or os.path.basename(run_dir)
    paths = [("run directory", run_dir), ("metrics", run.metrics)]
    if storage.is_dir(run.adapter):
        paths.insert(1, ("adapter (peft)", run.adapter))
    built = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>uft-ray report: {html.escape(run_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>uft-ray run <code>{html.escape(run_name)}</code></h1>",
        f"<p class='sub'>{len(inp.rows)} steps logged; report built {built} from <code>{METRICS}</code>. "
        f"Rebuild with <code>uft-ray report {html.escape(run_dir)}</code>.</p>",
        "<div class='cols'><div><h2>Configuration</h2>",
        _table(config_rows) if cfg else "<p class='note'>no config.yaml in the run directory</p>",
        "</div><div><h2>Final numbers</h2>",
        _table(final),
        "</div></div>",
        _table(paths),
    ]
    for name, title, note in sections:
        b64 = base64.b64encode(pngs[name]).decode("ascii")
        parts.append(f"<h2 id='{name}'>{title}</h2><p class='note'>{html.escape(note)}</p>")
        parts.append(f"<img alt='{name}' src='data:image/png;base64,{b64}'>")
        if name == "quarantine":
            parts.append(_data_table(inp.summary))
    parts.append(_before_after_table(run))
    parts.append(_benchmarks_table(run))
    parts.append("</body></html>")
    storage.atomic_write(run.report, "\n".join(parts).encode())  # a reader never sees a half-written report
    return run.report


def write_shared_report(inp: RunInputs) -> str:
    """The plots every method has (SHARED_PLOTS: loss, throughput, optimization, quarantine) and the page: the
    report of a method with none of its own; returns the HTML path."""
    rows, sources, colors = inp.rows, inp.sources, inp.colors
    pngs = {
        "loss": plot_loss(rows, sources, colors),
        "throughput": plot_throughput(rows),
        "optimization": plot_optimization(rows, sources, colors),
        "quarantine": plot_quarantine(inp.qcounts, colors),
    }
    sections = [(name, *SHARED_PLOTS[name]) for name in pngs]
    method = [("method", str(inp.method))]
    return write_page(inp, pngs, sections, [*shared_config_rows(inp.cfg), *method], final_rows(rows, sources))
