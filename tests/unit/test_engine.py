"""The DeepSpeed engine's pure choices (no Ray, no process group): the ZeRO stage for a job, the base's size, the
DeepSpeed config (buckets, precision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uft_ray.config import load_config
from uft_ray.train.engine import (
    FIT_FRACTION,
    ParamSizes,
    base_model_bytes,
    choose_zero_stage,
    deepspeed_config,
    param_sizes,
    zero_buckets,
)

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


# ---------------------------------------------------------------------------------------------------------
# ZeRO's buckets sized for what is trained (a few MB of adapter, not DeepSpeed's defaults), and one adapter precision under every stage.

QWEN25_0_5B_R64 = ParamSizes(
    # LoRA r 64 on the 7 projections of 24 layers (hidden 896, k/v 128, mlp 4864): per layer
    # q, o 64 x (896 + 896) = 114688; k, v 64 x (896 + 128) = 65536; gate, up, down 64 x (896 + 4864) = 368640
    trainable=24 * (2 * 114688 + 2 * 65536 + 3 * 368640),
    largest_trainable=4864 * 64,  # gate / up's B, down's A
    largest_frozen=151936 * 896,  # the (tied) embedding
)


def test_zero_buckets_hold_the_adapter_and_prefetch_the_largest_frozen_tensor():
    assert QWEN25_0_5B_R64.trainable == 35_192_832
    assert zero_buckets(QWEN25_0_5B_R64, 3) == {
        "reduce_bucket_size": 35_192_832,  # every LoRA gradient in one bucket: 141 MB fp32, not 2 GB
        "allgather_bucket_size": 35_192_832,
        "stage3_prefetch_bucket_size": 136_134_656,
        "stage3_param_persistence_threshold": 311_296,  # every LoRA matrix stays whole
    }
    assert zero_buckets(QWEN25_0_5B_R64, 0) == {"reduce_bucket_size": 35_192_832, "allgather_bucket_size": 35_192_832}
    tiny = ParamSizes(trainable=4096, largest_trainable=256, largest_frozen=8192)  # the floors
    assert zero_buckets(tiny, 3) == {
        "reduce_bucket_size": 1_000_000,
        "allgather_bucket_size": 1_000_000,
        "stage3_prefetch_bucket_size": 1_000_000,
        "stage3_param_persistence_threshold": 100_000,  # DeepSpeed's default
    }
    huge = ParamSizes(trainable=600_000_000, largest_trainable=2_000_000, largest_frozen=10**9)
    assert zero_buckets(huge, 3)["reduce_bucket_size"] == 500_000_000  # never above DeepSpeed's default


def test_param_sizes_count_a_partitioned_parameter_at_its_full_size():
    model = torch.nn.Module()
    model.lora_a = torch.nn.Parameter(torch.zeros(4, 32))  # 128 trained
    model.lora_b = torch.nn.Parameter(torch.zeros(64, 4))  # 256 trained
    model.norm = torch.nn.Parameter(torch.zeros(32), requires_grad=False)
    model.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # a ZeRO-3 partition: numel 0
    model.weight.ds_numel = 2048 * 32
    assert param_sizes(model) == ParamSizes(trainable=384, largest_trainable=256, largest_frozen=65536)


def test_deepspeed_config_buckets_and_precision():
    """The buckets only once the model is known (zero.Init loads under DeepSpeed's defaults); DeepSpeed's bf16
    mode only under ZeRO-3, so that ZeRO-0 keeps peft's fp32 LoRA weights as ZeRO-3 does (fp16: its loss
    scaling under every stage)."""
    cfg = cfg_for("/m")  # GPU, dtype auto = bf16
    sizes = ParamSizes(trainable=2_000_000, largest_trainable=150_000, largest_frozen=3_000_000)
    assert "reduce_bucket_size" not in deepspeed_config(cfg, True, 3)["zero_optimization"]
    zero3 = deepspeed_config(cfg, True, 3, sizes=sizes)
    assert zero3["zero_optimization"] == {
        "stage": 3, "contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": 2_000_000,
        "allgather_bucket_size": 2_000_000, "stage3_prefetch_bucket_size": 3_000_000,
        "stage3_param_persistence_threshold": 150_000,
    }  # fmt: skip
    zero0 = deepspeed_config(cfg, True, 0, sizes=sizes)
    assert (zero3["bf16"]["enabled"], zero0["bf16"]["enabled"]) == (True, False)
    assert not zero0["fp16"]["enabled"] and not zero3["fp16"]["enabled"]
    fp16 = cfg_for("/m")
    fp16.model.dtype = "float16"
    assert [deepspeed_config(fp16, True, s)["fp16"]["enabled"] for s in (0, 3)] == [True, True]
    # On CPU (fp32) neither; a test may ask for bf16 on CPU explicitly.
    cpu = cfg_for("/m", use_gpu=False)
    assert not deepspeed_config(cpu, False, 3)["bf16"]["enabled"]
    assert deepspeed_config(cpu, False, 3, dtype=torch.bfloat16)["bf16"]["enabled"]
