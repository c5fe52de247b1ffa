"""`train.lr_schedule` / `warmup_ratio` / `weight_decay`: the rate of every optimizer step, hand-computed, on the
scheduler the engine builds (`engine.lr_scheduler`), and once through DeepSpeed ZeRO-0 on CPU (`engine.initialize`,
the call `build_engine` makes) with gradient accumulation."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from uft_ray.config import ConfigError, load_config
from uft_ray.config.schema import LR_SCHEDULES, TrainConfig
from uft_ray.train.engine import deepspeed_config, lr_scheduler

ROOT = Path(__file__).resolve().parents[2]
LR = 1e-3


def cfg_for(**train):
    return load_config(
        {
            "model": {"path": "/m"},
            "data": {"sources": [{"name": "s", "format": "messages", "path": "unused"}]},
            "mixture": {"counts": {"s": 1}},
            "train": {"num_workers": 1, "use_gpu": False, "lr": LR, **train},
        },
        check_paths=False,
    )


def rates(cfg, total_steps: int, steps: int) -> tuple[list[float], float]:
    """The rate each of `steps` optimizer steps uses, on AdamW as DeepSpeed builds it from the engine's config
    (`torch_adam`: torch.optim.AdamW with the remaining params), and the optimizer's weight decay."""
    params = dict(deepspeed_config(cfg, False, 0)["optimizer"]["params"])
    params.pop("torch_adam")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], **params)
    sched = lr_scheduler(opt, cfg.train, total_steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    return out, opt.param_groups[0]["weight_decay"]


# T = 10 optimizer steps, warmup round(0.2 x 10) = 2: f(0) = 0, f(1) = 1/2, then from s = 2 (k = s - 2 of 8):
# constant 1; linear (10 - s) / 8; cosine (1 + cos(pi k / 8)) / 2; s = 10 (past the end): 0 for both decays.
C8 = [(1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]  # 1, .96194, .85355, .69134, .5, .30866, .14645, .03806
EXPECTED = {
    "constant": [0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "linear": [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0],
    "cosine": [0, 0.5, *C8, 0],
}


@pytest.mark.parametrize("kind", LR_SCHEDULES)
def test_the_rate_of_every_step_with_warmup(kind):
    got, decay = rates(cfg_for(lr_schedule=kind, warmup_ratio=0.2, weight_decay=0.01), 10, 11)
    assert got == pytest.approx([LR * f for f in EXPECTED[kind]], abs=1e-12)
    assert decay == 0.01
    assert C8[2] == pytest.approx(0.5 + math.sqrt(2) / 4) and C8[4] == pytest.approx(0.5)


def test_no_warmup_starts_at_the_full_rate():
    """The hint_rft recipes: constant, no warmup (veRL's own constant schedule gives its very first step rate 0)."""
    got, decay = rates(cfg_for(lr_schedule="constant", warmup_ratio=0.0, weight_decay=0.01), 2000, 3)
    assert got == [LR, LR, LR] and decay == 0.01
    linear, _ = rates(cfg_for(lr_schedule="linear", warmup_ratio=0.0), 4, 4)
    assert linear == pytest.approx([LR, 0.75 * LR, 0.5 * LR, 0.25 * LR])


def test_defaults_are_the_schedule_uft_always_had():
    """Cosine to 0 after round(0.1 x T) warmup steps, no weight decay: what engine.py hard-coded before."""
    t = TrainConfig()
    assert (t.lr_schedule, t.warmup_ratio, t.weight_decay) == ("cosine", 0.1, 0.0)
    got, decay = rates(cfg_for(), 30, 30)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=LR)
    old = get_cosine_schedule_with_warmup(opt, 3, 30)
    before = []
    for _ in range(30):
        before.append(opt.param_groups[0]["lr"])
        opt.step()
        old.step()
    assert got == pytest.approx(before, abs=1e-15) and got[:4] == pytest.approx([0, LR / 3, 2 * LR / 3, LR])
    assert decay == 0.0


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"train.lr_schedule: 'step' is not allowed; use one of: constant, cosine"):
        cfg_for(lr_schedule="step")


_DEEPSPEED = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from uft_ray.config import load_config
from uft_ray.train.engine import deepspeed_config, initialize
cfg = load_config(json.loads(sys.argv[1]), check_paths=False)
deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
torch.manual_seed(0)
engine = initialize(torch.nn.Linear(2, 1), cfg, deepspeed_config(cfg, False, 0), total_steps=5)
lrs = []
for micro in range(10):
    lrs.append(engine.get_lr()[0])
    engine.backward(engine(torch.ones(1, 2)).sum())
    engine.step()
group = engine.optimizer.param_groups[0]
print("RESULT " + json.dumps({"lrs": lrs, "decay": group["weight_decay"], "opt": type(engine.optimizer).__name__}))
"""


def test_deepspeed_steps_the_schedule_once_per_optimizer_step(tmp_path):
    """ZeRO-0 on CPU, grad_accum 2: 10 micro-batches are 5 optimizer steps of a linear schedule with warmup
    round(0.2 x 5) = 1: rates 0, 1, 3/4, 1/2, 1/4 (x lr), each for both micro-batches of its step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "model": {"path": "/m"},
        "data": {"sources": [{"name": "s", "format": "messages", "path": "unused"}]},
        "mixture": {"counts": {"s": 1}},
        "train": {"num_workers": 1, "use_gpu": False, "lr": LR, "grad_accum": 2, "lr_schedule": "linear",
                  "warmup_ratio": 0.2, "weight_decay": 0.01},
    }  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED, json.dumps(cfg)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["lrs"] == pytest.approx([LR * f for f in (0, 0, 1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25)], abs=1e-12)
    assert out["decay"] == 0.01 and out["opt"] == "AdamW"
