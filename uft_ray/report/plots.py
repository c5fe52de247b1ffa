"""The report's figures: one function per plot, each returning PNG bytes (`uft_ray.report` lays them out).

matplotlib is imported inside `pyplot()` (Agg backend) so importing the package stays light. `pyplot` and
`to_png` are the figure helpers for any other page of plots (`uft_ray.compare` uses them).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

# Fixed colours per source so a source keeps its colour across every plot.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

Panels = list[tuple[str, list[tuple[str, str, str]]]]  # (title, [(metric key, label, colour), ...]) per panel


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


def pyplot():
    """matplotlib.pyplot on the Agg backend, with the report's style."""
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


def to_png(fig) -> bytes:
    """The figure as PNG bytes; closes it."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "step":  # steps are whole numbers: no 2.5 ticks on a 16-step run
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    pyplot().close(fig)
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
    plt = pyplot()
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
    return to_png(fig)


def plot_reward(rows, sources, colors) -> bytes:
    plt = pyplot()
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
    return to_png(fig)


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
    plt = pyplot()
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
    return to_png(fig)


def plot_throughput(rows) -> bytes:
    plt = pyplot()
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
    return to_png(fig)


def plot_optimization(rows, sources, colors) -> bytes:
    plt = pyplot()
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
    return to_png(fig)


def plot_panels(rows, panels: Panels) -> bytes:
    """One row of panels, each a few metrics by key (hint_rft's plots, the held-out rows)."""
    plt = pyplot()
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
    return to_png(fig)


def plot_quarantine(counts: dict[tuple[str, str], int], colors) -> bytes:
    plt = pyplot()
    reasons = sorted({r for r, _ in counts}, key=lambda r: -sum(n for (rr, _), n in counts.items() if rr == r))
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.45 * max(len(reasons), 1)))
    if not reasons:
        _empty(ax, "no rows quarantined")
        ax.set_title("Quarantined rows by reason")
        return to_png(fig)
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
    return to_png(fig)
