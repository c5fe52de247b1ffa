"""UFT on an SFT row is SFT with a fading step size (uft_ray.losses): rho, the saturated share and kappa per source,
and the loop's early-saturation warning, on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from uft_ray.losses import SATURATED, sft_loss, sft_row_saturation, uft_loss, uft_sft_gain
from uft_ray.train.loop import saturation_warning


def test_rho_by_hand():
    n, beta = torch.tensor([10.0, 10.0, 4.0]), 0.1
    r = torch.tensor([0.0, math.log(9.0), -math.log(2.0)], dtype=torch.float64)
    rho = uft_sft_gain(r, n, beta)
    # u = 0: 2*10*0.1 * 0.5 * 0.25 = 0.25 (n beta / 4); sigmoid = 0.9: 2*10*0.1 * 0.9 * 0.01 = 0.018;
    # sigmoid = 1/3 (rho's peak): 2*4*0.1 * 1/3 * 4/9 = 0.11852
    assert rho.tolist() == pytest.approx([0.25, 0.018, 3.2 / 27])
    assert float(rho[1] / rho[0]) < 0.08  # past sigmoid(r) = 0.9 a row pulls under 8% of its start


@pytest.mark.parametrize("r0", [-1.0, 0.0, 1.5, 2.2, 4.0])
def test_uft_on_an_sft_row_is_sfts_gradient_times_rho(r0):
    """The mechanism, checked by autograd: d UFT / d logp = rho(r) * d SFT / d logp on a target-1 row."""
    beta, n, ref = 0.05, torch.tensor([7.0], dtype=torch.float64), torch.tensor([-30.0], dtype=torch.float64)
    logp = (ref + r0 / beta).clone().requires_grad_(True)
    uft, _ = uft_loss(logp, ref, torch.ones(1, dtype=torch.float64), beta)
    (g_uft,) = torch.autograd.grad(uft, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    sft, _ = sft_loss(logp2, n)
    (g_sft,) = torch.autograd.grad(sft, logp2)
    rho = uft_sft_gain(torch.tensor([r0], dtype=torch.float64), n, beta)
    assert float(g_uft) == pytest.approx(float(rho * g_sft), rel=1e-9)
    assert float(g_sft) == pytest.approx(-1 / 7)


def test_saturated_share_and_kappa_per_source_over_sft_rows_only():
    beta = 0.1
    rows = {
        # r: sigmoid(3) = 0.953 and sigmoid(2.5) = 0.924 are saturated, sigmoid(2) = 0.881 is not
        "rows/reward": torch.tensor([3.0, 0.0, 2.5, 2.0, 5.0, 0.0], dtype=torch.float64),
        "rows/logp": torch.tensor([-5.0, -20.0, -10.0, -4.0, -1.0, -3.0], dtype=torch.float64),
    }
    kinds = ["sft", "sft", "sft", "sft", "score", "score"]
    sources = ["skill", "skill", "skill", "chat", "align", "align"]
    out = sft_row_saturation(rows, kinds, sources, beta)
    assert out == {"saturated/skill": pytest.approx(2 / 3), "saturated/chat": 0.0}  # no key for score rows
    out = sft_row_saturation(rows, kinds, sources, beta, kappa=True)
    # logp_ref = logp - r / beta: skill -35, -20, -35 -> kappa = beta * 90 / 3 = 3.0; chat: -24 -> 2.4
    assert out["kappa/skill"] == pytest.approx(3.0) and out["kappa/chat"] == pytest.approx(2.4)
    assert "kappa/align" not in out and "saturated/align" not in out
    assert sft_row_saturation(rows, ["score"] * 6, sources, beta) == {}
    # the threshold is strict: sigmoid(r) exactly 0.9 has not saturated
    edge = {"rows/reward": torch.tensor([math.log(9.0)], dtype=torch.float64), "rows/logp": torch.zeros(1)}
    assert SATURATED == 0.9 and sft_row_saturation(edge, ["sft"], ["s"], beta)["saturated/s"] == 0.0


def test_kappa_at_the_first_step_is_beta_times_the_reference_nll():
    """At step 1 the policy is the reference (r = 0): kappa = beta * n * NLL_ref per token = -beta * logp."""
    rows = {"rows/reward": torch.zeros(2, dtype=torch.float64), "rows/logp": torch.tensor([-69.0, -138.0])}
    out = sft_row_saturation(rows, ["sft", "sft"], ["skill", "skill"], 0.1, kappa=True)
    # the toy's skill: n = 10 and 20 tokens at 6.9 nats each; beta 0.1 -> 6.9 and 13.8, mean 10.35
    assert out["kappa/skill"] == pytest.approx(10.35)
    out = sft_row_saturation(rows, ["sft", "sft"], ["skill", "skill"], 0.01, kappa=True)
    assert out["kappa/skill"] == pytest.approx(1.035)


def test_the_warning_fires_in_the_first_quarter_when_half_a_sources_sft_rows_saturate():
    row = {"saturated/skill": 0.75, "saturated/chat": 0.25, "kappa/skill": 10.35, "loss": 0.1}
    text = saturation_warning(row, 3, 48, 0.1)  # step 4 of 48: within the first 12
    assert text is not None and text.startswith("[uft-ray] warning: step 4 of 48")
    assert "skill 75%" in text and "chat" not in text.split("(kappa")[0]
    assert "2/beta = 20 nats" in text and "kappa at step 0: skill 10.3" in text and "lower loss.beta" in text
    assert saturation_warning(row, 12, 48, 0.1) is None  # step 13: past the first quarter
    assert saturation_warning(row, 11, 48, 0.1) is not None  # step 12: the quarter's last
    assert saturation_warning({"saturated/skill": 0.49}, 0, 48, 0.1) is None  # under half
    assert saturation_warning({"saturated/skill": 0.5}, 0, 3, 0.01) is not None  # a 3-step run: its first step
    assert saturation_warning({"saturated/skill": 0.5}, 1, 3, 0.01) is None
    assert saturation_warning({"loss": 0.3}, 0, 48, 0.1) is None  # no SFT rows in the run


def test_the_report_plots_the_saturated_share_and_names_kappa(tmp_path):
    import json
    from pathlib import Path

    from uft_ray.config import load_config
    from uft_ray.report import PLOTS, write_report

    d = tmp_path / "run"
    d.mkdir()
    rows = [{"step": 0, "eval/nll/skill": 6.9}]  # a held-out baseline row first: kappa is on step 1's
    for step in range(1, 9):
        row = {"step": step, "time": 100.0 + step, "loss": 0.2, "loss/skill": 0.2, "reward/skill": 0.5 * step,
               "loss/align": 0.05, "reward/align": 0.1, "saturated/skill": min(1.0, step / 4)}  # fmt: skip
        rows.append(row | ({"kappa/skill": 13.8} if step == 1 else {}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        {
            "model": {"path": "/models/tiny"},
            "data": {
                "sources": [
                    {"name": "skill", "format": "ultrachat_200k", "path": "/d/u"},
                    {"name": "align", "format": "helpsteer2", "path": "/d/h"},
                ]
            },  # fmt: skip
            "mixture": {"counts": {"skill": 8, "align": 8}},
            "loss": {"type": "uft", "beta": 0.1},
            "output": {"run_name": "run"},
        },
        check_paths=False,
    )
    (d / "config.yaml").write_text(cfg.to_yaml())
    html = Path(write_report(d)).read_text()
    assert "<img alt='saturation'" in html and (d / "plots" / "saturation.png").read_bytes()[:4] == b"\x89PNG"
    assert "about 2/beta = 20 nats here" in html.replace("About", "about") and "skill 13.8" in html
    assert html.index("alt='reward'") < html.index("alt='saturation'") < html.index("alt='heldout'")
    assert "saturation" not in PLOTS  # only runs that log it get it
