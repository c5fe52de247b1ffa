"""What uft-ray hands vLLM: max_lora_rank from one shared rule (rollout actors and lm_eval's vllm backend), the
eval engine's max_model_len and tensor_parallel_size from the config, and the eval actors' GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from uft_ray.config import ConfigError, load_config
from uft_ray.evaluation import harness
from uft_ray.evaluation.harness import EvalError, EvalTarget, vllm_lora_rank
from uft_ray.evaluation.worker import worker_layout
from uft_ray.rft.rollout import vllm_engine_args

LORA = {"alpha": 16, "target_modules": ["q_proj"]}
DEMO = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo_tiny.yaml")


def test_lora_rank_rounds_up_to_a_value_vllm_accepts_never_below_its_default():
    # vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512; its own default (16) is the floor
    cases = {24: 32, 48: 64, 8: 16, 1: 16, None: 16, 16: 16, 17: 32, 300: 320, 320: 320, 321: 512, 512: 512}
    assert {r: vllm_lora_rank(r) for r in cases} == cases
    with pytest.raises(ValueError, match="LoRA rank 513 "):
        vllm_lora_rank(513)


@pytest.mark.parametrize(("r", "rank"), [(24, 32), (48, 64), (8, 16)])
def test_rollout_engine_gets_the_shared_rank(r, rank):
    args = vllm_engine_args("/m", lora={"r": r, **LORA}, dtype="bfloat16", max_model_len=1536)
    assert args["max_lora_rank"] == rank == vllm_lora_rank(r)
    assert args["enable_lora"] and args["max_loras"] == 1 and args["max_model_len"] == 1536
    with pytest.raises(ValueError, match=r"LoRA rank 600 .*rft.rollout.backend hf"):
        vllm_engine_args("/m", lora={"r": 600, **LORA}, dtype="bfloat16")


def test_vllm_model_args_carry_context_parallelism_and_rank():
    t = EvalTarget(base="/m/base", adapter="/m/adapter", out_dir="/o", lora_r=48)
    args = harness.model_args(t, "vllm", "cuda")
    assert args["max_model_len"] == 4096 and args["tensor_parallel_size"] == 1
    assert args["max_lora_rank"] == 64 == vllm_lora_rank(48)
    assert "distributed_executor_backend" not in args
    t2 = EvalTarget(base="/b", adapter="/a", out_dir="/o", lora_r=24, max_model_len=2048, tensor_parallel_size=2)
    args = harness.model_args(t2, "vllm", "cuda")
    assert (args["max_model_len"], args["tensor_parallel_size"], args["max_lora_rank"]) == (2048, 2, 32)
    assert args["distributed_executor_backend"] == "mp"  # worker processes on the actor's own GPUs
    # the hf backend takes neither vLLM key; with several GPUs per worker it spreads the model over them
    hf = harness.model_args(t2, "hf", "cuda")
    assert "max_model_len" not in hf and "tensor_parallel_size" not in hf and hf["parallelize"] is True
    assert "parallelize" not in harness.model_args(t, "hf", "cuda")
    with pytest.raises(EvalError, match=r"LoRA rank 600 .*--backend hf"):
        harness.model_args(EvalTarget(base="/b", adapter="/a", out_dir="/o", lora_r=600), "vllm", "cuda")


def _run_dir(tmp_path, eval_section):
    base = tmp_path / "base"
    base.mkdir(parents=True)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 24, "base_model_name_or_path": str(base)}))
    cfg = {"model": {"path": str(base)}}
    if eval_section is not None:
        cfg["eval"] = eval_section
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_a_runs_eval_section_sets_the_engine_and_bad_values_name_the_field(tmp_path):
    t = harness.resolve_target(str(_run_dir(tmp_path / "a", {"max_model_len": 2048, "tensor_parallel_size": 2})))
    assert (t.max_model_len, t.tensor_parallel_size, t.lora_r) == (2048, 2, 24)
    t = harness.resolve_target(str(_run_dir(tmp_path / "b", None)))  # a config from before these fields
    assert (t.max_model_len, t.tensor_parallel_size) == (4096, 1)
    with pytest.raises(EvalError, match=r"eval\.max_model_len must be an integer > 0, got 0"):
        harness.resolve_target(str(_run_dir(tmp_path / "c", {"max_model_len": 0})))


def test_eval_workers_get_tensor_parallel_size_gpus_each():
    assert worker_layout(4, 2, 10) == (2, {"num_gpus": 2, "num_cpus": 1})
    assert worker_layout(4, 1, 3) == (3, {"num_gpus": 1, "num_cpus": 1})
    assert worker_layout(5, 2, 1) == (1, {"num_gpus": 2, "num_cpus": 1})
    assert worker_layout(0, 4, 3) == (1, {"num_gpus": 0, "num_cpus": 1})
    with pytest.raises(EvalError, match="eval.tensor_parallel_size 4"):
        worker_layout(2, 4, 3)


def test_config_eval_engine_fields_default_and_errors_name_the_field():
    cfg = load_config(DEMO, check_paths=False)
    assert (cfg.eval.max_model_len, cfg.eval.tensor_parallel_size) == (4096, 1)
    cfg = load_config(DEMO, ["eval.max_model_len=8192", "eval.tensor_parallel_size=4"],
                      check_paths=False)  # fmt: skip
    assert (cfg.eval.max_model_len, cfg.eval.tensor_parallel_size) == (8192, 4)
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["eval.max_model_len=0", "eval.tensor_parallel_size=-1"],
                    check_paths=False)  # fmt: skip
    assert "eval.max_model_len: must be > 0, got 0" in e.value.messages
    assert "eval.tensor_parallel_size: must be > 0, got -1" in e.value.messages
