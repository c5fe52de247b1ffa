"""Checkpoints are never unpickled: DeepSpeed's optimizer and scheduler files load with `weights_only=True` and an
explicit allow-list (uft_ray.train.engine.load_state_file). A checkpoint file carrying a pickle payload is refused
with a clear error and its code never runs; a real checkpoint of ZeRO-0, 2 and 3 still restores exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = """
import json, os, sys, glob, pathlib
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
sys.path.insert(0, sys.argv[2])
from fixtures.tiny_lora import tiny_lora
from uft_ray.config import load_config
from uft_ray.train.engine import CheckpointError, Engine, deepspeed_config, initialize, param_sizes
deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
cfg = load_config(json.loads(sys.argv[1]), check_paths=False)
root = pathlib.Path(os.getcwd())
batches = [torch.randint(1, 100, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]


class Touch:
    def __reduce__(self):
        return (pathlib.Path.touch, (root / "pwned",))


def engine(stage):
    model = tiny_lora(seed=0)
    ds = initialize(model, cfg, deepspeed_config(cfg, False, stage, sizes=param_sizes(model)), total_steps=6)
    return Engine(ds=ds, hf_ds_config=None, sharded_at_load=False, zero_stage=stage)


def train(e, xs):
    for x in xs:
        e.backward(e.module(input_ids=x, labels=x).loss)
        e.step()


def lora(e):
    return {k: v.clone() for k, v in e.adapter_state_dict().items()}


out = {}
for stage in (0, 2, 3):  # ZeRO-1 saves and loads through ZeRO-2's optimizer (stage_1_and_2.py)
    a = engine(stage)
    train(a, batches[:2])
    ckpt = str(root / f"zero{stage}")
    a.save(ckpt, rank=0)
    train(a, batches[2:])  # the uninterrupted run
    b = engine(stage)
    b.load(ckpt)  # a restarted worker
    train(b, batches[2:])
    exact = all(torch.equal(v, lora(b)[k]) for k, v in lora(a).items()) and a.lr == b.lr
    # the same checkpoint with one of DeepSpeed's files replaced by a pickle that runs code when unpickled
    files = sorted(glob.glob(f"{ckpt}/ds/**/*.pt", recursive=True))
    refused = []
    for f in files:
        good = pathlib.Path(f).read_bytes()
        torch.save({"module": Touch(), "optimizer_state_dict": Touch()}, f)
        try:
            engine(stage).load(ckpt)
            refused.append(None)
        except CheckpointError as err:
            refused.append(str(err))
        pathlib.Path(f).write_bytes(good)
    out[stage] = {"exact": exact, "files": [os.path.basename(f) for f in files], "refused": refused}
out["pwned"] = (root / "pwned").exists()
print("RESULT " + json.dumps(out))
"""


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_real_checkpoints_restore_exactly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "model": {"path": "/m"},
        "data": {"sources": [{"name": "s", "format": "messages", "path": "unused"}]},
        "mixture": {"counts": {"s": 1}},
        "train": {"num_workers": 1, "use_gpu": False, "lr": 1e-2, "micro_batch_size": 1, "grad_accum": 1,
                  "lr_schedule": "cosine", "warmup_ratio": 0.2},
    }  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    tests_dir = str(Path(__file__).resolve().parents[1])
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(cfg), tests_dir],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out.pop("pwned") is False  # no payload ever ran
    for stage, got in out.items():
        assert got["exact"], f"ZeRO-{stage}: the resumed engine differs from the uninterrupted one"
        assert got["files"] and len(got["refused"]) == len(got["files"])
        for name, err in zip(got["files"], got["refused"], strict=True):
            assert err is not None, f"ZeRO-{stage}: {name} with a pickle payload was loaded"
            assert name in err and "refused" in err and "allow-list" in err, err


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_load_state_file_refuses_any_global_outside_the_allow_list(tmp_path: Path, payload: str) -> None:
    import torch

    from uft_ray.train.engine import CheckpointError, load_state_file

    module, name = payload.split(".")
    path = tmp_path / "state.pt"
    # a hand-made pickle: GLOBAL module name, an argument, REDUCE (what any code-running payload comes down to)
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00true\x85R.")
    with pytest.raises(CheckpointError, match=f"refused: it holds [a-z.]*{name}, outside the checkpoint allow-list"):
        load_state_file(str(path))
    torch.save({"w": torch.ones(2), "step": 3, "names": ["a"]}, tmp_path / "plain.pt")  # tensors and plain data load
    assert load_state_file(str(tmp_path / "plain.pt"))["step"] == 3
