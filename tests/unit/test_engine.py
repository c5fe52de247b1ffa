"""The DeepSpeed engine's pure choices (no Ray, no process group): the ZeRO stage for a job, the base's size."""

from __future__ import annotations

from pathlib import Path

import pytest

from uft_ray.config import load_config
from uft_ray.train.engine import FIT_FRACTION, base_model_bytes, choose_zero_stage

GIB = 2**30


def cfg_for(model: str, **train):
    return load_config(
        {
            "model": {"path": model},
            "data": {"sources": [{"name": "s", "format": "messages", "path": "unused"}]},
            "mixture": {"counts": {"s": 1}},
            "train": {"use_gpu": True, **train},
        },
        check_paths=False,
    )


@pytest.mark.parametrize(
    ("world", "base", "device", "stage", "why"),
    [
        (1, 60 * GIB, 80 * GIB, 0, "one worker"),  # nothing to shard, whatever the size
        (8, 14.5 * GIB, 80 * GIB, 0, "fits one device"),  # Mistral-7B bf16 on an 80 GB GPU
        (32, 65.5 * GIB, 80 * GIB, 3, "does not fit"),  # Qwen2.5-32B bf16: the sharded-load recipe
        (8, None, 80 * GIB, 3, "unknown"),  # a hub id: no local files to size
        (2, 1 * GIB, None, 3, "unknown"),
    ],
)
def test_auto_zero_stage(world, base, device, stage, why):
    got, reason = choose_zero_stage(cfg_for("/m"), world, device, None if base is None else int(base))
    assert got == stage and why in reason


def test_the_fit_boundary_and_explicit_stages():
    cfg = cfg_for("/m")
    device = 80 * GIB
    assert choose_zero_stage(cfg, 2, device, int(FIT_FRACTION * device))[0] == 0
    assert choose_zero_stage(cfg, 2, device, int(FIT_FRACTION * device) + 1)[0] == 3
    for stage in (0, 1, 2, 3):  # an explicit stage is honoured, even where auto would choose otherwise
        explicit = cfg_for("/m", deepspeed={"zero_stage": stage})
        assert choose_zero_stage(explicit, 1, device, 1) == (stage, "set by train.deepspeed.zero_stage")
    offload = cfg_for("/m", deepspeed={"offload_params": True})
    assert choose_zero_stage(offload, 1, device, 1)[0] == 3


def test_base_model_bytes_reads_the_safetensors_headers(tmp_path: Path):
    """The tiny model's parameters, counted from the headers, at the compute dtype's width (fp32 on CPU)."""
    from transformers import AutoModelForCausalLM

    from uft_ray.demo.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    tied = AutoModelForCausalLM.from_pretrained(model).config.tie_word_embeddings
    assert not tied  # else the head is stored once and counted once: the same either way below
    assert base_model_bytes(cfg_for(model, use_gpu=False)) == numel * 4
    assert base_model_bytes(cfg_for(model)) == numel * 2  # bf16 on GPU
    assert base_model_bytes(cfg_for("Qwen/Qwen2.5-0.5B")) is None
