"""The vLLM rollout backend's adapter directories, with real files: the current and the previous version kept,
older ones removed, the folder gone on close, at process exit, and (after a kill) at the next actor's start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from uft_ray.rft.rollout import AdapterDirs, sweep_stale_adapter_dirs

ROOT = Path(__file__).resolve().parents[2]
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _state(version: int) -> dict[str, torch.Tensor]:
    a = torch.full((4, 8), float(version))
    return {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": a}


def _versions(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("v"))


def test_only_the_current_and_previous_versions_stay_and_each_is_a_peft_adapter(tmp_path):
    dirs = AdapterDirs(str(tmp_path))
    try:
        assert os.path.dirname(dirs.root) == str(tmp_path)
        for v in range(5):
            path = dirs.write(_state(v), v, LORA)
            assert path == os.path.join(dirs.root, f"v{v}")
            assert _versions(dirs.root) == sorted({f"v{max(v - 1, 0)}", f"v{v}"})
            loaded = load_file(os.path.join(path, "adapter_model.safetensors"))
            assert torch.equal(next(iter(loaded.values())), torch.full((4, 8), float(v)))
            cfg = json.loads(Path(path, "adapter_config.json").read_text())
            assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        # the same version sent again (a restarted actor) is rewritten in place and stays the current one
        dirs.write(_state(4), 4, LORA)
        dirs.write(_state(5), 5, LORA)
        assert _versions(dirs.root) == ["v4", "v5"]
    finally:
        dirs.close()
    assert not os.path.exists(dirs.root)
    dirs.close()  # twice is fine


def _child(parent: Path, ending: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, sys, time, torch
        from uft_ray.rft.rollout import AdapterDirs
        d = AdapterDirs({str(parent)!r})
        d.write({{"w.lora_A.weight": torch.ones(2, 2)}}, 0, {LORA!r})
        print(d.root, flush=True)
        if {ending!r} == "wait":
            time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)


def test_the_folder_goes_when_the_process_exits(tmp_path):
    p = _child(tmp_path, "exit")
    root = p.stdout.readline().strip()
    assert p.wait(timeout=120) == 0
    assert root.startswith(str(tmp_path)) and not os.path.exists(root)


def test_a_killed_actors_folder_is_swept_by_the_next_but_a_live_ones_is_not(tmp_path):
    live = AdapterDirs(str(tmp_path))
    live.write(_state(0), 0, LORA)
    p = _child(tmp_path, "wait")
    try:
        root = p.stdout.readline().strip()
        assert os.path.isdir(os.path.join(root, "v0"))
        assert sweep_stale_adapter_dirs(str(tmp_path), stale_after_s=0) == []  # both owners alive
        p.send_signal(signal.SIGKILL)  # what ray.kill does to an actor: no exit handler runs
        p.wait(timeout=60)
        assert os.path.isdir(os.path.join(root, "v0"))
        # a folder younger than stale_after_s is left alone (its owner may not have locked it yet)
        assert sweep_stale_adapter_dirs(str(tmp_path), stale_after_s=3600) == []
        nxt = AdapterDirs(str(tmp_path), stale_after_s=0)  # the next actor on the node
        try:
            assert not os.path.exists(root)
            assert os.path.isdir(os.path.join(live.root, "v0"))
            assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(d.root) for d in (live, nxt))
        finally:
            nxt.close()
    finally:
        if p.poll() is None:
            p.kill()
        live.close()
