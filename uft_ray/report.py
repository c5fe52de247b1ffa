"""The run report: `report.html` with PNG plots, built from a run directory's files alone.

Inputs (docs/internals.md): `metrics.jsonl` (one object per optimizer step), `config.yaml`, and the data
plane's `summary.json` (per-source counts and quarantine counts by reason) with `quarantine/*.parquet` when
they are there. Output: `{run_dir}/report.html`, self-contained (plots embedded as PNG data URIs, so the file
can be mailed or opened from object storage), and the same PNGs under `{run_dir}/plots/`.

`uft-ray report RUN_DIR` rebuilds it; the driver calls `write_report` at the end of a run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import yaml

from uft_ray import storage
from uft_ray.data.prepared import SUMMARY, summary_path
from uft_ray.run_dir import METRICS, RunDir

PLOTS = ("loss", "reward", "mixture", "throughput", "optimization", "quarantine")  # + "heldout" after "reward"
# method: hint_rft (its metrics: uft_ray.rft.loop)
RFT_PLOTS = ("loss", "rollouts", "hints", "policy", "rollout_time", "throughput", "optimization", "quarantine")
_RFT_PANELS: dict[str, list[tuple[str, list[tuple[str, str, str]]]]] = {
    "rollouts": [
        ("Rollout rewards (training, with hints)",
         [("reward/mean", "mean reward", "black"), ("reward/accuracy", "correct", "#2ca02c"),
          ("reward/format", "formatted", "#1f77b4")]),
        ("Held-out accuracy (greedy, no hints)", [("eval/accuracy", "eval/accuracy", "#d62728")]),
        ("Response length (generated tokens)", [("response/length", "mean length", "#9467bd")]),
    ],
    "hints": [
        ("Revealed share of the hint", [("hint/share", "hint/share", "#ff7f0e")]),
        ("Hint NLL (per hint token)", [("hint_nll", "hint_nll", "#8c564b")]),
    ],
    "policy": [
        ("KL to the reference (k3, per token)", [("kl", "kl", "#d62728")]),
        ("Entropy (per response token)", [("entropy", "entropy", "#1f77b4")]),
        ("Clipped share of tokens", [("clip_frac", "clip_frac", "#7f7f7f")]),
    ],
    "rollout_time": [
        ("Generation share of step time", [("time/generate_frac", "generate", "#17becf")]),
        ("Adapter sync to the rollout actors (s)", [("sync/adapter_s", "sync/adapter_s", "#bcbd22")]),
        ("Rollout tokens per second (actor pool)", [("rollout/tokens_per_s", "tokens/s", "#e377c2")]),
    ],
}  # fmt: skip

# Fixed colours per source so a source keeps its colour across every plot.
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def sources_in(rows: list[dict[str, Any]]) -> list[str]:
    """Source names found in per-source metric keys, in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            parts = k.split("/")
            if len(parts) >= 2 and parts[0] in ("loss", "reward", "mixture", "rows", "score_pred", "kl", "logp"):
                seen.setdefault(parts[1], None)
    return list(seen)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r.get("step", i + 1)))
            ys.append(float(v))
    return xs, ys


def _ema(ys: list[float], n: int) -> list[float]:
    """Exponential moving average; the span grows with the run so short runs stay unsmoothed."""
    if n < 20:
        return ys
    alpha = 2.0 / (max(5, n // 20) + 1)
    out, m = [], ys[0]
    for y in ys:
        m = alpha * y + (1 - alpha) * m
        out.append(m)
    return out


def _load_summary(run: RunDir) -> dict[str, Any] | None:
    """The data plane's summary: beside the run's files, else its own prepared directory's."""
    for path in (storage.join(run.path, SUMMARY), summary_path(run.prepared)):
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


# ---------------------------------------------------------------------------------------------------------
# Plots. Each returns PNG bytes; matplotlib is imported here (Agg) so the rest of the package stays light.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "axes.titlesize": 11,
            "legend.fontsize": 9,
            "legend.frameon": False,
        }
    )
    return plt


def _png(fig) -> bytes:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "step":  # steps are whole numbers: no 2.5 ticks on a 16-step run
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _line(ax, rows, key, *, label, color, smooth=True, **kw) -> bool:
    xs, ys = _series(rows, key)
    if not xs:
        return False
    if smooth and len(ys) >= 20:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _ema(ys, len(ys)), color=color, label=label, linewidth=1.6, **kw)
    else:
        ax.plot(xs, ys, color=color, label=label, linewidth=1.6, marker="o" if len(xs) <= 12 else None, ms=3, **kw)
    return True


def plot_loss(rows, sources, colors) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.6))
    any_ = _line(ax, rows, "loss", label="loss (all rows)", color="black")
    for s in sources:
        any_ |= _line(ax, rows, f"loss/{s}", label=f"loss/{s}", color=colors[s])
    if any_:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Loss, overall and per source")
        ax.legend(loc="best")
    else:
        _empty(ax, "no loss recorded")
    return _png(fig)


def plot_reward(rows, sources, colors) -> bytes:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    any1 = any2 = False
    for s in sources:
        any1 |= _line(a1, rows, f"reward/{s}", label=s, color=colors[s])
        any2 |= _line(a2, rows, f"score_pred/{s}", label=f"{s} sigmoid(r)", color=colors[s])
        # The target is what sigmoid(r) regresses onto (UFT Eq. 7): draw it dashed in the same colour.
        any2 |= _line(a2, rows, f"score_target/{s}", label=f"{s} target s", color=colors[s], smooth=False, ls="--")
    if any1:
        a1.axhline(0.0, color="#999", linewidth=0.8)
        a1.set_title("Implicit reward r = beta (logp - logp_ref), mean per source")
        a1.set_xlabel("step")
        a1.set_ylabel("r")
        a1.legend(loc="best")
    else:
        _empty(a1, "no reward recorded (sft loss has none)")
    if any2:
        a2.set_title("Predicted score sigmoid(r) vs target score")
        a2.set_xlabel("step")
        a2.set_ylim(-0.02, 1.02)
        a2.legend(loc="best")
    else:
        _empty(a2, "no scores recorded")
    return _png(fig)


def _targets(rows, sources, colors, ax) -> None:
    """Dashed target lines; sources that share a constant target share one line (two 50% sources overlap)."""
    groups: dict[float, list[str]] = defaultdict(list)
    for s in sources:
        _, ys = _series(rows, f"mixture/{s}/target")
        if ys and max(ys) - min(ys) < 1e-9:
            groups[round(ys[0], 9)].append(s)
        elif ys:
            _line(ax, rows, f"mixture/{s}/target", label=f"{s} target", color=colors[s], smooth=False, ls="--")
    for value, names in groups.items():
        color = colors[names[0]] if len(names) == 1 else "#555"
        ax.axhline(value, color=color, ls="--", linewidth=1.2, label=f"target {value:.3g} ({', '.join(names)})")


def plot_mixture(rows, sources, colors) -> bytes:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    any_ = False
    for s in sources:
        any_ |= _line(a1, rows, f"mixture/{s}/step", label=f"{s} realized", color=colors[s], smooth=True)
        _line(a2, rows, f"mixture/{s}/cumulative", label=f"{s} realized", color=colors[s], smooth=False)
    if any_:
        _targets(rows, sources, colors, a1)
        _targets(rows, sources, colors, a2)
        a1.set_title("Share of each source per step")
        a2.set_title("Cumulative share since step 1")
        for a in (a1, a2):
            a.set_xlabel("step")
            a.set_ylim(-0.02, 1.02)
        a1.set_ylabel("fraction of rows")
        a2.legend(loc="best")
    else:
        _empty(a1, "no mixture recorded")
        _empty(a2, "")
    return _png(fig)


def plot_throughput(rows) -> bytes:
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title, color in ((a1, "tokens_per_s", "Tokens per second (all workers)", "#1f77b4"),
                                  (a2, "samples_per_s", "Rows per second (all workers)", "#ff7f0e")):  # fmt: skip
        if _line(ax, rows, key, label=key, color=color):
            ax.set_title(title)
            ax.set_ylim(bottom=0)
        else:
            _empty(ax, f"no {key} recorded")
        ax.set_xlabel("step")
    ok = _line(a3, rows, "padding_frac", label="padding fraction of tokens", color="#9467bd")
    ok |= _line(a3, rows, "data_wait_frac", label="data-wait fraction of step time", color="#8c564b")
    if ok:
        a3.set_title("Wasted work")
        a3.set_ylim(-0.02, 1.02)
        a3.legend(loc="best")
    else:
        _empty(a3, "no padding / data-wait recorded")
    a3.set_xlabel("step")
    return _png(fig)


def plot_optimization(rows, sources, colors) -> bytes:
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.4))
    if _line(a1, rows, "lr", label="lr", color="black", smooth=False):
        a1.set_title("Learning rate")
        a1.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    else:
        _empty(a1, "no lr recorded")
    if _line(a2, rows, "grad_norm", label="grad norm", color="#d62728"):
        a2.set_title("Gradient norm")
    else:
        _empty(a2, "no grad norm recorded")
    any_kl = False
    for s in sources:
        any_kl |= _line(a3, rows, f"kl/{s}", label=s, color=colors[s])
    if any_kl:
        a3.set_title("Per-token logp - logp_ref (KL estimate)")
        a3.legend(loc="best")
    else:
        _empty(a3, "no KL recorded")
    for a in (a1, a2, a3):
        a.set_xlabel("step")
    return _png(fig)


def plot_panels(rows, panels: list[tuple[str, list[tuple[str, str, str]]]]) -> bytes:
    """One row of panels, each a few metrics by key (hint_rft's plots)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        drawn = False
        for key, label, color in lines:
            drawn |= _line(ax, rows, key, label=label, color=color)
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("step")
            if len(lines) > 1:
                ax.legend(loc="best")
        else:
            _empty(ax, f"no {lines[0][0]} recorded")
    return _png(fig)


def _heldout_panels(sources, colors) -> list[tuple[str, list[tuple[str, str, str]]]]:
    def per(prefix: str) -> list[tuple[str, str, str]]:
        return [(f"eval/{prefix}/{s}", s, colors[s]) for s in sources]

    return [
        ("Held-out loss", per("loss")),
        ("Held-out reward r", per("reward")),
        ("Held-out NLL per token (SFT rows)", per("nll")),
        ("Held-out score MSE / pair accuracy",
         [(f"eval/score_mse/{s}", f"{s} MSE", colors[s]) for s in sources]
         + [(f"eval/pair_accuracy/{s}", f"{s} pair acc", colors[s]) for s in sources]),
    ]  # fmt: skip


def _benchmarks_table(run: RunDir) -> str:
    """lm_eval results of `uft-ray eval` / `eval.tasks` (eval/summary.json), metric names as lm_eval reports them."""
    summary = storage.read_json(run.eval_summary) or {}
    tasks, failed = summary.get("tasks") or {}, summary.get("failed") or {}
    if not tasks and not failed:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{html.escape(m)}</td><td>{_fmt(v)}</td></tr>"
        for t, ms in sorted(tasks.items())
        for m, v in sorted(ms.items())
    )
    body += "".join(
        f"<tr><td>{html.escape(t)}</td><td>failed</td><td>{html.escape(str(why))}</td></tr>"
        for t, why in failed.items()
    )
    return f"<h2 id='benchmarks'>Benchmarks (lm_eval)</h2><table class='grid'><tr><th>task</th><th>metric</th><th>value</th></tr>{body}</table>"


def plot_quarantine(counts: dict[tuple[str, str], int], colors) -> bytes:
    plt = _plt()
    reasons = sorted({r for r, _ in counts}, key=lambda r: -sum(n for (rr, _), n in counts.items() if rr == r))
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.45 * max(len(reasons), 1)))
    if not reasons:
        _empty(ax, "no rows quarantined")
        ax.set_title("Quarantined rows by reason")
        return _png(fig)
    order = list(colors)
    srcs = sorted({s for _, s in counts}, key=lambda s: (order.index(s) if s in order else len(order), s))
    left = [0] * len(reasons)
    for s in srcs:
        vals = [counts.get((r, s), 0) for r in reasons]
        ax.barh(reasons, vals, left=left, height=0.6, label=s or "all sources", color=colors.get(s, "#7f7f7f"))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:,}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_title(f"Quarantined rows by reason ({sum(left):,} in all)")
    if len(srcs) > 1 or (srcs and srcs[0]):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    ax.set_xlim(0, max(left) * 1.15)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------
# HTML


def _fmt(v: Any, digits: int = 4) -> str:
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


def _config_rows(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    def g(*keys, default=None):
        node: Any = cfg
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    mix = g("mixture", "counts") or g("mixture", "ratios") or {}
    srcs = g("data", "sources") or []
    tr = g("train") or {}
    ds = tr.get("deepspeed") or {}
    lora = g("lora") or {}
    rows = [
        ("model", f"{g('model', 'path', default='-')}" + (f" + adapter {g('model', 'adapter')}" if g("model", "adapter") else "")),
        ("loss", f"{g('loss', 'type', default='-')}, beta {_fmt(g('loss', 'beta'))}"),
        ("LoRA", f"r {lora.get('r', '-')}, alpha {lora.get('alpha', '-')}, dropout {lora.get('dropout', '-')}"),
        ("data", ", ".join(f"{s.get('name')} ({s.get('format')}, {s.get('kind') or 'default kind'})" for s in srcs) or "-"),
        ("mixture", ", ".join(f"{k}: {_fmt(v)}" for k, v in mix.items()) + (f" of {_fmt(g('mixture', 'total'))}" if g("mixture", "total") else "")),
        ("tokenize", f"prompt <= {g('tokenize', 'max_prompt_len', default='-')}, total <= {g('tokenize', 'max_len', default='-')}, overflow {g('tokenize', 'overflow', default='-')}"),
        ("reference", f"{g('reference', 'mode', default='-')} ({g('reference', 'run', default='-')})" + (f" + adapter {g('reference', 'adapter')}" if g("reference", "adapter") else "")),
        ("training", f"{tr.get('num_workers', '-')} workers ({'GPU' if tr.get('use_gpu') else 'CPU'}), ZeRO-{ds.get('zero_stage', '-')}, micro-batch {tr.get('micro_batch_size', '-')} x accum {tr.get('grad_accum', '-')}, lr {_fmt(tr.get('lr'))}, epochs {tr.get('epochs', '-')}"
         + (f", max steps {tr.get('max_steps')}" if tr.get("max_steps") else "")),
    ]  # fmt: skip
    if g("method") == "hint_rft":
        r, h = g("rft") or {}, g("rft", "hint") or {}
        rows = [rows[0], rows[2], rows[-1]] + [
            ("method", f"hint_rft on {r.get('task', '-')}: {r.get('prompts_per_step', '-')} prompts x {r.get('n', '-')} rollouts a step, "
             f"responses <= {r.get('max_response_len', '-')} tokens, temperature {_fmt(r.get('temperature'))}"),
            ("hints", f"{h.get('mode', '-')}, p {_fmt(h.get('p_high'))} \u2192 {_fmt(h.get('p_low'))} over T_hint {h.get('t_hint', '-')} steps"),
            ("loss", f"clip {_fmt(r.get('clip'))}, kl {_fmt(r.get('kl_coef'))}, entropy {_fmt(r.get('entropy_coef'))}, hint {_fmt(r.get('hint_coef'))}"),
        ]  # fmt: skip
    return rows


def _final_rows(rows: list[dict[str, Any]], sources: list[str]) -> list[tuple[str, str]]:
    if not rows:
        return [("steps", "0 (no metrics.jsonl yet)")]
    last = rows[-1]
    out = [("steps", _fmt(last.get("step", len(rows))))]
    if "epoch" in last:
        out.append(("epoch", _fmt(last.get("epoch"))))
    times = [r.get("time") for r in rows if isinstance(r.get("time"), (int, float))]
    if len(times) >= 2:
        out.append(("wall time (first to last step)", f"{times[-1] - times[0]:.1f} s"))
    tail = rows[-max(1, len(rows) // 10) :]  # last 10% of steps: less noisy than the last step alone

    def span(key: str) -> str | None:
        first = _mean([rows[0].get(key)])
        end = _mean(r.get(key) for r in tail)
        if end is None:
            return None
        return f"{_fmt(first)} \u2192 {_fmt(end)}" if first is not None and len(rows) > 1 else _fmt(end)

    out.append(("loss (first step \u2192 last 10%)", span("loss") or "-"))
    for key in ("reward/mean", "reward/accuracy", "hint_nll", "kl"):  # hint_rft
        if key in last:
            out.append((f"{key} (first step \u2192 last 10%)", span(key) or "-"))
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    if evals:
        out.append(("eval/accuracy (first \u2192 last evaluation)", f"{_fmt(evals[0])} \u2192 {_fmt(evals[-1])}"))
    for s in sources:
        parts = []
        for key, name in (("loss", "loss"), ("reward", "reward"), ("score_pred", "sigmoid(r)")):
            v = span(f"{key}/{s}")
            if v is not None:
                parts.append(f"{name} {v}")
        t = _mean(r.get(f"score_target/{s}") for r in rows)
        if t is not None:
            parts.append(f"target score {_fmt(t, 3)}")
        c = last.get(f"mixture/{s}/cumulative")
        t = last.get(f"mixture/{s}/target")
        if c is not None:
            parts.append(f"share {_fmt(c, 3)}" + (f" (target {_fmt(t, 3)})" if t is not None else ""))
        if parts:
            out.append((s, "; ".join(parts)))
    for key, name in (("tokens_per_s", "tokens/s (mean)"), ("samples_per_s", "samples/s (mean)"),
                      ("padding_frac", "padding fraction (mean)"), ("data_wait_frac", "data-wait fraction (mean)")):  # fmt: skip
        v = _mean(r.get(key) for r in rows)
        if v is not None:
            out.append((name, _fmt(v)))
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _data_table(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("sources"):
        return ""
    cols = ("rows_read", "rows_out", "quota", "quarantined", "dropped_for_length", "upsampled")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in ("source", *cols))
    body = ""
    for name, st in summary["sources"].items():
        cells = "".join(f"<td>{_fmt(st.get(c))}</td>" for c in cols)
        body += f"<tr><td>{html.escape(name)}</td>{cells}</tr>"
    return f"<h2>Data</h2><table class='grid'><tr>{head}</tr>{body}</table>"


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

_NOTES = {
    "loss": "Total loss and each source's loss over the global batch. With UFT a source's loss is the mean of "
    "(sigmoid(r) - s)^2; before the first update r = 0, so it starts at the mean of (0.5 - s)^2.",
    "reward": "Left: mean implicit reward per source; instruction rows (target 1) should climb above 0. "
    "Right: sigmoid(r) against the target score it regresses onto (dashed).",
    "mixture": "Realized share of each source (solid) against the configured target (dashed): per step on the "
    "left, cumulative on the right. A gap that does not close means the sampler is off.",
    "throughput": "Training throughput, and the fraction of tokens that were padding and of step time spent "
    "waiting for data (both should stay low).",
    "optimization": "Learning-rate schedule, gradient norm, and the per-token divergence from the reference.",
    "quarantine": "Rows the data plane rejected, by reason (kept with their raw text under quarantine/).",
    "heldout": "The run's loss, the implicit reward and the per-token NLL of SFT responses on rows no step "
    "trains (eval.sources or eval.holdout), before the first step (step 0), every eval.every steps and at the end; "
    "score MSE of sigmoid(r) against the target, and for pairs the share with r_chosen > r_rejected.",
    "rollouts": "Rewards of the training rollouts (1.0 correct, 0.1 formatted but wrong, 0 no answer), computed on "
    "hint + response; held-out accuracy of greedy rollouts without hints; mean generated length.",
    "hints": "The share of each reference solution revealed in the prompt (the cosine schedule, 0 after T_hint) "
    "and the NLL of the revealed hint tokens, which the hint term trains down.",
    "policy": "KL to the reference (the same model with the adapter off), entropy of the policy on its own "
    "responses, and the share of tokens where PPO's ratio clip was active.",
    "rollout_time": "How much of each step the rollout actors take, the adapter sync after each optimizer step "
    "(only the LoRA tensors travel), and the actor pool's generation throughput.",
}


def write_report(run_dir: str | os.PathLike) -> str:
    """Build `{run_dir}/report.html` (and `plots/*.png`) from the run's files; returns the HTML path."""
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
    colors = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(sources)}
    qcounts = _quarantine_counts(run, summary)

    rft = cfg.get("method") == "hint_rft"
    if rft:
        sources = []  # one task, no mixture: the loss plot shows the total
    pngs = {
        "loss": plot_loss(rows, sources, colors),
        "reward": plot_reward(rows, sources, colors),
        "mixture": plot_mixture(rows, sources, colors),
        "throughput": plot_throughput(rows),
        "optimization": plot_optimization(rows, sources, colors),
        "quarantine": plot_quarantine(qcounts, colors),
    }
    if rft:
        pngs |= {name: plot_panels(rows, panels) for name, panels in _RFT_PANELS.items()}
        del pngs["reward"], pngs["mixture"]
    elif any(k.startswith("eval/") for r in rows for k in r):  # held-out metrics (uft_ray.evaluation.heldout)
        pngs["heldout"] = plot_panels(rows, _heldout_panels(sources, colors))
    for name, data in pngs.items():
        storage.atomic_write(storage.join(run.plots, f"{name}.png"), data)

    titles = {
        "loss": "Loss",
        "reward": "Reward",
        "mixture": "Target vs realized mixture",
        "throughput": "Throughput",
        "optimization": "Optimization",
        "quarantine": "Quarantine",
        "heldout": "Held-out rows",
        "rollouts": "Rollouts and held-out accuracy",
        "hints": "Hints",
        "policy": "Policy",
        "rollout_time": "Generation and adapter sync",
    }
    run_name = (cfg.get("output") or {}).get("run_name") or os.path.basename(run_dir)
    paths = [("run directory", run_dir), ("metrics", run.metrics)]
    if storage.is_dir(run.adapter):
        paths.insert(1, ("adapter (peft)", run.adapter))
    built = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>uft-ray report: {html.escape(run_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>uft-ray run <code>{html.escape(run_name)}</code></h1>",
        f"<p class='sub'>{len(rows)} steps logged; report built {built} from <code>{METRICS}</code>. "
        f"Rebuild with <code>uft-ray report {html.escape(run_dir)}</code>.</p>",
        "<div class='cols'><div><h2>Configuration</h2>",
        _table(_config_rows(cfg)) if cfg else "<p class='note'>no config.yaml in the run directory</p>",
        "</div><div><h2>Final numbers</h2>",
        _table(_final_rows(rows, sources)),
        "</div></div>",
        _table(paths),
    ]
    order = RFT_PLOTS if rft else PLOTS[:2] + ("heldout",) * ("heldout" in pngs) + PLOTS[2:]
    for name in order:
        b64 = base64.b64encode(pngs[name]).decode("ascii")
        parts.append(f"<h2 id='{name}'>{titles[name]}</h2><p class='note'>{html.escape(_NOTES[name])}</p>")
        parts.append(f"<img alt='{name}' src='data:image/png;base64,{b64}'>")
        if name == "quarantine":
            parts.append(_data_table(summary))
    parts.append(_benchmarks_table(run))
    parts.append("</body></html>")
    storage.atomic_write(run.report, "\n".join(parts).encode())  # a reader never sees a half-written report
    return run.report
