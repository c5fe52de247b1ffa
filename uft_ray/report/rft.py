"""The report of a hint-guided RFT run (`method: hint_rft`; its metrics: `uft_ray.rft.loop`).

One task and no mixture, so no reward or mixture plots and no per-source lines: rollouts, hints and the policy
take their place.
"""

from __future__ import annotations

from typing import Any

from uft_ray.report.page import SHARED_PLOTS, Row, RunInputs, cfg_get, final_rows, fmt, shared_config_rows, write_page
from uft_ray.report.plots import Panels, plot_loss, plot_optimization, plot_panels, plot_quarantine, plot_throughput

RFT_PLOTS = ("loss", "rollouts", "hints", "policy", "rollout_time", "throughput", "optimization", "quarantine")

_PANELS: dict[str, Panels] = {
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

_OWN_PLOTS = {
    "rollouts": ("Rollouts and held-out accuracy", "Rewards of the training rollouts (1.0 correct, 0.1 formatted but "
                 "wrong, 0 no answer), computed on hint + response; held-out accuracy of greedy rollouts without "
                 "hints; mean generated length."),
    "hints": ("Hints", "The share of each reference solution revealed in the prompt (the cosine schedule, 0 after "
              "T_hint) and the NLL of the revealed hint tokens, which the hint term trains down."),
    "policy": ("Policy", "KL to the reference (the same model with the adapter off), entropy of the policy on its "
               "own responses, and the share of tokens where PPO's ratio clip was active."),
    "rollout_time": ("Generation and adapter sync", "How much of each step the rollout actors take, the adapter sync "
                     "after each optimizer step (only the LoRA tensors travel), and the actor pool's generation "
                     "throughput."),
}  # fmt: skip


def config_rows(cfg: dict[str, Any]) -> list[Row]:
    """The "Configuration" table of a hint_rft run."""
    model, lora, training = shared_config_rows(cfg)
    r, h = cfg_get(cfg, "rft") or {}, cfg_get(cfg, "rft", "hint") or {}
    return [model, lora, training] + [
        ("method", f"hint_rft on {r.get('task', '-')}: {r.get('prompts_per_step', '-')} prompts x {r.get('n', '-')} rollouts a step, "
         f"responses <= {r.get('max_response_len', '-')} tokens, temperature {fmt(r.get('temperature'))}"),
        ("hints", f"{h.get('mode', '-')}, p {fmt(h.get('p_high'))} \u2192 {fmt(h.get('p_low'))} over T_hint {h.get('t_hint', '-')} steps"),
        ("loss", f"clip {fmt(r.get('clip'))}, kl {fmt(r.get('kl_coef'))}, entropy {fmt(r.get('entropy_coef'))}, hint {fmt(r.get('hint_coef'))}"),
    ]  # fmt: skip


def write_rft_report(inp: RunInputs) -> str:
    """Plots RFT_PLOTS and the page; returns the HTML path."""
    rows, colors = inp.rows, inp.colors
    pngs = {
        "loss": plot_loss(rows, [], colors),  # one task, no mixture: the total alone
        "throughput": plot_throughput(rows),
        "optimization": plot_optimization(rows, [], colors),
        "quarantine": plot_quarantine(inp.qcounts, colors),
    }
    pngs |= {name: plot_panels(rows, panels) for name, panels in _PANELS.items()}
    described = SHARED_PLOTS | _OWN_PLOTS
    sections = [(name, *described[name]) for name in RFT_PLOTS]
    return write_page(inp, pngs, sections, config_rows(inp.cfg), final_rows(rows, []))
