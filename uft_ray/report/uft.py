"""The report of a UFT run (`method: uft`, every offline loss): per-source loss, reward, mixture and held-out plots."""

from __future__ import annotations

from typing import Any

from uft_ray.report.page import SHARED_PLOTS, Row, RunInputs, cfg_get, final_rows, fmt, shared_config_rows, write_page
from uft_ray.report.plots import (
    Panels,
    plot_loss,
    plot_mixture,
    plot_optimization,
    plot_panels,
    plot_quarantine,
    plot_reward,
    plot_throughput,
)

# + "saturation" (a uft loss with SFT rows) and "heldout" (held-out rows) after "reward"
PLOTS = ("loss", "reward", "mixture", "throughput", "optimization", "quarantine")

_OWN_PLOTS = {
    "reward": ("Reward", "Left: mean implicit reward per source; instruction rows (target 1) should climb above 0. "
               "Right: sigmoid(r) against the target score it regresses onto (dashed)."),
    "mixture": ("Target vs realized mixture", "Realized share of each source (solid) against the configured target "
                "(dashed): per step on the left, cumulative on the right. A gap that does not close means the "
                "sampler is off."),
    "heldout": ("Held-out rows", "The run's loss, the implicit reward and the per-token NLL of SFT responses on rows "
                "no step trains (eval.sources or eval.holdout), before the first step (step 0), every eval.every "
                "steps and at the end; score MSE of sigmoid(r) against the target, and for pairs the share with "
                "r_chosen > r_rejected."),
}  # fmt: skip


def _saturation_note(rows: list[dict[str, Any]], beta: Any) -> str:
    """The saturation plot's note, with the run's kappa per source (logged on the first step)."""
    first = next((r for r in rows if any(k.startswith("kappa/") for k in r)), {})
    kappa = {k.removeprefix("kappa/"): v for k, v in first.items() if k.startswith("kappa/")}
    where = f" About 2/beta = {2 / beta:.3g} nats here." if isinstance(beta, (int, float)) and beta > 0 else ""
    est = ", ".join(f"{s} {fmt(v)}" for s, v in kappa.items())
    return (
        "Share of each source's SFT rows (target 1) with sigmoid(r) > 0.9. On an SFT row UFT moves the model along "
        "SFT's gradient scaled by rho(r) = 2 n beta sigmoid(r)(1 - sigmoid(r))^2, which fades once a row's "
        f"log-ratio to the reference is about 2/beta nats: a saturated row no longer teaches.{where} "
        "kappa = beta x n x (per-token NLL drop needed) decides whether a row is learned before it saturates "
        "(about 1 or below: it can be; well above 2: it saturates first); estimated at the first step as beta x n x "
        "the reference's NLL per token (the drop to a certain response, an upper bound)"
        + (f": {est}." if est else ".")
        + " A share that climbs early while the held-out NLL is still high means a lower loss.beta."
    )


def _heldout_panels(sources: list[str], colors: dict[str, str]) -> Panels:
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


def config_rows(cfg: dict[str, Any]) -> list[Row]:
    """The "Configuration" table of a UFT run."""

    def g(*keys: str, default: Any = None) -> Any:
        return cfg_get(cfg, *keys, default=default)

    model, lora, training = shared_config_rows(cfg)
    mix = g("mixture", "counts") or g("mixture", "ratios") or {}
    srcs = g("data", "sources") or []
    return [
        model,
        ("loss", f"{g('loss', 'type', default='-')}, beta {fmt(g('loss', 'beta'))}"),
        lora,
        ("data", ", ".join(f"{s.get('name')} ({s.get('format')}, {s.get('kind') or 'default kind'})" for s in srcs) or "-"),
        ("mixture", ", ".join(f"{k}: {fmt(v)}" for k, v in mix.items()) + (f" of {fmt(g('mixture', 'total'))}" if g("mixture", "total") else "")),
        ("tokenize", f"prompt <= {g('tokenize', 'max_prompt_len', default='-')}, total <= {g('tokenize', 'max_len', default='-')}, overflow {g('tokenize', 'overflow', default='-')}"),
        ("reference", f"{g('reference', 'mode', default='-')} ({g('reference', 'run', default='-')})" + (f" + adapter {g('reference', 'adapter')}" if g("reference", "adapter") else "")),
        training,
    ]  # fmt: skip


def write_uft_report(inp: RunInputs) -> str:
    """Plots PLOTS (+ "heldout" when the run logged held-out metrics) and the page; returns the HTML path."""
    rows, sources, colors = inp.rows, inp.sources, inp.colors
    pngs = {
        "loss": plot_loss(rows, sources, colors),
        "reward": plot_reward(rows, sources, colors),
        "mixture": plot_mixture(rows, sources, colors),
        "throughput": plot_throughput(rows),
        "optimization": plot_optimization(rows, sources, colors),
        "quarantine": plot_quarantine(inp.qcounts, colors),
    }
    described = SHARED_PLOTS | _OWN_PLOTS
    saturated = [s for s in sources if any(f"saturated/{s}" in r for r in rows)]
    if saturated:  # a uft loss with SFT rows (uft_ray.losses.sft_row_saturation)
        lines = [(f"saturated/{s}", s, colors[s]) for s in saturated]
        pngs["saturation"] = plot_panels(rows, [("SFT rows with sigmoid(r) > 0.9 (share)", lines)])
        described["saturation"] = ("Saturated SFT rows", _saturation_note(rows, cfg_get(inp.cfg, "loss", "beta")))
    if any(k.startswith("eval/") for r in rows for k in r):  # held-out metrics (uft_ray.evaluation.heldout)
        pngs["heldout"] = plot_panels(rows, _heldout_panels(sources, colors))
    extra = tuple(name for name in ("saturation", "heldout") if name in pngs)
    order = PLOTS[:2] + extra + PLOTS[2:]
    sections = [(name, *described[name]) for name in order]
    return write_page(inp, pngs, sections, config_rows(inp.cfg), final_rows(rows, sources))
