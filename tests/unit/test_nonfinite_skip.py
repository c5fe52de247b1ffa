"""`train.on_nonfinite: skip` under DeepSpeed ZeRO-0, 1, 2 and 3 with two real gloo ranks: a step where one rank's
loss is not a number is skipped on both ranks, leaving the LoRA weights, AdamW's state and the learning-rate schedule
exactly as they were, so the run goes on as if the step had never been taken."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import json, math, os, sys
import torch, torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
import deepspeed
sys.path.insert(0, sys.argv[2])
from fixtures.tiny_lora import tiny_lora
from uft_ray.config import load_config
from uft_ray.train.engine import Engine, _torch_optimizer, deepspeed_config, initialize, param_sizes
deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
cfg = load_config(json.loads(sys.argv[1]), check_paths=False)
# per rank, per step, per micro-batch (grad_accum 2)
data = [[torch.randint(1, 100, (1, 8), generator=torch.Generator().manual_seed(100 * rank + 10 * s + m))
         for m in range(2)] for s in range(4)]


def engine(stage, skip):
    model = tiny_lora(seed=0)
    ds = initialize(model, cfg, deepspeed_config(cfg, False, stage, sizes=param_sizes(model)), total_steps=8)
    e = Engine(ds=ds, hf_ds_config=None, sharded_at_load=False, zero_stage=stage)
    if skip:
        e.skip_nonfinite()
    return e


def step(e, s, poison=False, flag=False):
    for m, x in enumerate(data[s]):
        loss = e.module(input_ids=x, labels=x).loss
        if poison and m == 0:
            loss = loss * float("nan")
        e.backward(loss)
        e.step(nonfinite=flag or (poison and m <= 1))


def lora(e):
    return {k: v.clone() for k, v in e.adapter_state_dict().items()}


def opt_state(e):
    out = {}
    for i, st in enumerate(_torch_optimizer(e.ds).state.values()):
        for k, v in st.items():
            out[f"{i}/{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


out = {}
for stage in (0, 1, 2, 3):
    e, ref = engine(stage, True), engine(stage, True)
    step(e, 0); step(ref, 0)
    w0, s0, lr0 = lora(e), opt_state(e), e.lr
    step(e, 1, poison=rank == 1)  # rank 1's loss (and so every gradient after the all-reduce) is NaN
    a = {"skipped": e.skipped, "weights": same(w0, lora(e)), "state": same(s0, opt_state(e)), "lr": e.lr == lr0}
    step(e, 2, flag=rank == 0)  # finite gradients, but rank 0 recorded a NaN term: skipped on both ranks
    b = {"skipped": e.skipped, "weights": same(w0, lora(e)), "state": same(s0, opt_state(e)), "lr": e.lr == lr0}
    step(e, 3); step(ref, 3)  # then it trains on, as the run that never saw steps 1 and 2
    w, r = lora(e), lora(ref)
    c = {"skipped": e.skipped, "moved": not same(w0, w), "as_if_never": same(w, r) and e.lr == ref.lr,
         "finite": all(bool(torch.isfinite(v).all()) for v in list(w.values()) + list(opt_state(e).values()))}
    out[stage] = {"nan_loss": a, "flag_only": b, "after": c}
print("RESULT " + json.dumps(out))
"""


def test_a_skipped_step_leaves_weights_optimizer_and_schedule_untouched_under_every_zero_stage(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "model": {"path": "/m"},
        "data": {"sources": [{"name": "s", "format": "messages", "path": "unused"}]},
        "mixture": {"counts": {"s": 1}},
        "train": {"num_workers": 2, "use_gpu": False, "lr": 1e-2, "micro_batch_size": 1, "grad_accum": 2,
                  "lr_schedule": "linear", "warmup_ratio": 0.0, "on_nonfinite": "skip", "cpus_per_worker": 1},
    }  # fmt: skip
    tests_dir = str(Path(__file__).resolve().parents[1])
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, json.dumps(cfg), tests_dir],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
        ))  # fmt: skip
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    assert results[0] == results[1]  # one decision for both ranks
    for stage, got in results[0].items():
        for case in ("nan_loss", "flag_only"):
            assert got[case] == {"skipped": True, "weights": True, "state": True, "lr": True}, (stage, case, got)
        assert got["after"] == {"skipped": False, "moved": True, "as_if_never": True, "finite": True}, (stage, got)


def test_skipped_steps_are_counted_nulled_and_fail_after_n_in_a_row() -> None:
    import math

    import pytest

    from uft_ray.train.nonfinite import NonFiniteError, Skips

    skips = Skips(limit=2, total=1)  # one skipped before a resume
    row = skips.after({"step": 4, "loss": math.nan, "grad_norm": math.inf, "lr": 0.5}, 1, "step 4: nan")
    assert row == {"step": 4, "loss": None, "grad_norm": None, "lr": 0.5, "nonfinite/skipped": 1,
                   "nonfinite/skipped_total": 2}  # fmt: skip
    import json

    json.loads(json.dumps(row), parse_constant=lambda c: pytest.fail(f"{c} in a metrics line"))
    assert skips.after({"step": 5, "loss": 0.25}, 0, None) == {"step": 5, "loss": 0.25, "nonfinite/skipped": 0,
                                                                "nonfinite/skipped_total": 2}  # fmt: skip
    skips.after({"step": 6}, 1, "step 6: nan")  # one in a row again
    with pytest.raises(NonFiniteError, match=r"step 7: nan 2 steps in a row were skipped \(train.max_nonfinite_in_a"):
        skips.after({"step": 7}, 1, "step 7: nan")


def test_on_nonfinite_is_fail_or_skip_and_the_limit_is_positive() -> None:
    import pytest

    from uft_ray.config import ConfigError, load_config

    base = {"model": {"path": "/m"}, "data": {"sources": [{"name": "s", "format": "messages", "path": "x"}]},
            "mixture": {"counts": {"s": 1}}}  # fmt: skip
    assert load_config(base, check_paths=False).train.on_nonfinite == "fail"
    assert load_config({**base, "train": {"on_nonfinite": "skip"}}, check_paths=False).train.on_nonfinite == "skip"
    with pytest.raises(ConfigError, match="train.on_nonfinite: 'ignore' is not allowed; use one of: fail, skip"):
        load_config({**base, "train": {"on_nonfinite": "ignore"}}, check_paths=False)
    with pytest.raises(ConfigError, match="train.max_nonfinite_in_a_row: must be > 0"):
        load_config({**base, "train": {"max_nonfinite_in_a_row": 0}}, check_paths=False)


def test_the_report_names_the_skipped_steps() -> None:
    from uft_ray.report.page import final_rows

    rows = [{"step": 1, "loss": 1.0, "nonfinite/skipped": 0, "nonfinite/skipped_total": 0},
            {"step": 2, "loss": None, "nonfinite/skipped": 1, "nonfinite/skipped_total": 1},
            {"step": 3, "loss": 0.5, "nonfinite/skipped": 0, "nonfinite/skipped_total": 1}]  # fmt: skip
    assert ("steps skipped (loss or gradient not a number)", "1 (at 2)") in final_rows(rows, [])
