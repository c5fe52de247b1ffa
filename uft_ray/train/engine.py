"""The model side of a training worker: DeepSpeed ZeRO, the LoRA policy, the optimizer, checkpoints.

The only module of uft-ray that imports DeepSpeed. The worker loop sees a narrow surface (OpenRLHF's
"strategy"): `Engine.module` to run forwards, `Engine.peft_model` (whose adapter `reference.mode: adapter_off`
disables), `backward`, `step`, `save` / `load`, and the LoRA weights gathered for saving.

Building the policy, in the order that matters:
1. `HfDeepSpeedConfig(ds_config)` is created, and kept referenced on the `Engine`, *before*
   `from_pretrained`: transformers then loads under `deepspeed.zero.Init`, so with ZeRO-3 each parameter is
   partitioned as it is read and no worker ever holds a 32B model whole (docs/design.md "Training workers").
2. Gradient checkpointing (non-reentrant, plus `enable_input_require_grads` so that the checkpointed blocks of
   a frozen base still see an input that requires grad).
3. LoRA from `peft`: a fresh adapter (seeded identically on every rank, since the new LoRA tensors are created
   outside `zero.Init` and each rank would otherwise keep its own random A), or an existing adapter to keep
   training (`model.adapter`: a sequential stage 2, or a resumed checkpoint); optionally a second, frozen adapter
   for the reference forward (`reference_adapter`: uft_ray.reference.adapter_off.load_reference_adapter).
4. `deepspeed.initialize` with AdamW over the LoRA parameters only (`torch_adam`: torch's AdamW works on CPU,
   under CPU offload and on GPU without building DeepSpeed's fused kernels, and the LoRA parameters are few)
   with `train.weight_decay`, and the `train.lr_schedule` (constant, cosine or linear after a linear warmup
   from 0, `lr_scheduler`), stepped by DeepSpeed once per optimizer step (`initialize`). Its ZeRO buckets are
   sized from the model it wraps (`param_sizes`, `zero_buckets`), not DeepSpeed's full-model defaults.

Precision: the frozen base is loaded in the compute dtype (`resolve_dtype`); the LoRA weights are float32 masters
under every ZeRO stage (peft creates them in fp32 over a bf16 / fp16 base). DeepSpeed's bf16 mode is on only under
ZeRO-3, where zero.Init needs it to load and partition the base in bf16 (and it leaves the fp32 LoRA tensors
alone); under ZeRO-0/1/2 it would cast every parameter, the LoRA ones included, to bf16. So both stages train and
save the same fp32 adapter over the same bf16 base (`deepspeed_config`). fp16 keeps DeepSpeed's fp16 mode under
every stage: its loss scaling is what keeps fp16 activations' gradients from underflowing.

Saving: only the LoRA tensors are gathered (`deepspeed.zero.GatheredParameters` around
`get_peft_model_state_dict`), never the base model, and written in peft's format. Optimizer and scheduler
state go through DeepSpeed's own checkpoint (each rank writes its partition; the Ray checkpoint merges them).
Loading never unpickles: every file DeepSpeed reads back goes through `load_state_file` (`torch.load` with
`weights_only=True` and `CHECKPOINT_GLOBALS`, DeepSpeed's four plain data classes), so a checkpoint that anyone
with write access to `storage_path` replaced cannot run code on the workers: it fails with `CheckpointError`.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from uft_ray.config import Config, compute_dtype
from uft_ray.config.schema import TrainConfig
from uft_ray.model_store import local_model
from uft_ray.packing import attn_implementation
from uft_ray.packing import enabled as packing_enabled
from uft_ray.reference.adapter_off import load_reference_adapter
from uft_ray.run_dir import CHECKPOINT_ADAPTER, CHECKPOINT_DEEPSPEED

DS_TAG = "state"  # DeepSpeed checkpoint tag inside a checkpoint's ds/ folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What DeepSpeed's optimizer/scheduler files hold besides tensors, containers, numbers and strings (torch's own
# weights_only allow-list): ZeRO's stage enum, the loss scalers' state, ZeRO-1/2's fragment addresses.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(RuntimeError):
    """A checkpoint file that holds more than tensors and plain data: refused, never unpickled."""


def _checkpoint_globals() -> list[Any]:
    import importlib

    out = []
    for dotted in CHECKPOINT_GLOBALS:
        module, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


def load_state_file(path: str, map_location: Any = None) -> Any:
    """A checkpoint file's content, loaded with `weights_only=True` and only `CHECKPOINT_GLOBALS` allowed: any other
    object (a pickle payload that would run code) raises `CheckpointError` naming the file and what it held."""
    import pickle

    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|(Unsupported operand[^.]*)", str(e))
        what = (found.group(1) or found.group(2)) if found else "an object it cannot name"
        raise CheckpointError(
            f"{path}: refused: it holds {what}, outside the checkpoint allow-list, so it is not unpickled (a "
            "checkpoint uft-ray wrote holds none: was the run directory written by someone else?)"
        ) from None


class _SafeLoads:
    """DeepSpeed's checkpoint engine with `load` through `load_state_file` (the only way DeepSpeed reads one)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_state_file(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def resolve_dtype(cfg: Config, use_gpu: bool) -> torch.dtype:
    """The policy's dtype: `uft_ray.config.compute_dtype`, the rule the reference scorer follows too (so that
    r == 0 before the first step), and float32 on a worker that sees no GPU."""
    name = compute_dtype(cfg) if use_gpu else "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing on a transformers model, plus input grads for a frozen base.

    transformers >= 5.24 names it `activation_checkpointing_enable`; 5.17 / 5.18 have only
    `gradient_checkpointing_enable` (a deprecated alias since). Non-reentrant either way: the reentrant kind
    gives no gradient to LoRA inside a block whose inputs do not require grad (a frozen base).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} supports no activation checkpointing")
    # the checkpointed blocks of a frozen base must still see an input that requires grad
    model.enable_input_require_grads()


# The frozen base "fits" a device when its weights take at most this share of the device's memory: the rest is
# for activations, logits, LoRA state and the allocator (a 7B bf16 base on an 80 GB GPU fits; a 32B one does not).
FIT_FRACTION = 0.5
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def base_model_bytes(cfg: Config) -> int | None:
    """The frozen base's weights in the compute dtype, from the safetensors headers (no tensor is read);
    None for a model that is not a local directory (a hub id, a URI)."""
    from safetensors import safe_open

    path = os.path.expanduser(local_model(cfg.model.path))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
    if not files:
        return None
    numel = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                numel += math.prod(st.get_slice(key).get_shape())
    return numel * _DTYPE_BYTES[compute_dtype(cfg)]


def choose_zero_stage(
    cfg: Config, world_size: int, device_bytes: int | None, base_bytes: int | None
) -> tuple[int, str]:
    """The ZeRO stage for this job, and why (`train.deepspeed.zero_stage: auto`; an explicit stage is honoured).

    ZeRO-3 shards the frozen base: worth it only when the base does not fit one device, otherwise its per-layer
    gathers are pure overhead (at world size 1 there is nothing to shard at all). With LoRA the optimizer state
    is a few MB, so the stages that shard only it (1, 2) buy nothing either: the choice is 0 or 3.
    """
    stage = cfg.train.deepspeed.zero_stage
    if stage != "auto":
        return int(stage), "set by train.deepspeed.zero_stage"
    if cfg.train.deepspeed.offload_params:
        return 3, "train.deepspeed.offload_params needs ZeRO-3"
    if world_size == 1:
        return 0, "one worker: nothing to shard"
    if base_bytes is None or device_bytes is None:
        return 3, "the base model's size or the device memory is unknown: sharding it is the safe choice"
    gib = f"base {base_bytes / 2**30:.2f} GiB, device {device_bytes / 2**30:.1f} GiB"
    if base_bytes <= FIT_FRACTION * device_bytes:
        return 0, f"the frozen base fits one device ({gib}): no parameter sharding"
    return 3, f"the frozen base does not fit one device with room for activations ({gib}): ZeRO-3, sharded load"


def device_memory_bytes(use_gpu: bool, local_workers: int) -> int | None:
    """Memory one worker can count on: its GPU's, or on CPU this node's RAM shared by its workers."""
    if use_gpu:
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, local_workers))


# ZeRO's buckets, in elements. DeepSpeed's defaults are sized for training every weight of a large model: a 5e8
# reduce bucket is a 2 GB fp32 buffer per GPU under ZeRO-3, for the few MB of gradients of a LoRA adapter.
BUCKET_FLOOR = 1_000_000  # the smallest reduce / allgather / prefetch bucket we configure
DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / allgather_bucket_size: the cap
DEEPSPEED_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold: the least we configure


@dataclass(frozen=True)
class ParamSizes:
    """Parameter sizes in elements, as DeepSpeed counts them (a ZeRO-3 partitioned parameter at its full size)."""

    trainable: int  # every trained element (the LoRA tensors)
    largest_trainable: int  # the largest trained tensor
    largest_frozen: int  # the largest frozen tensor (a base weight, e.g. the embedding)


def param_sizes(model: torch.nn.Module) -> ParamSizes:
    """The `ParamSizes` of a model: trained = `requires_grad`; a partitioned parameter counts its `ds_numel`."""
    trained, frozen = [], []
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        (trained if p.requires_grad else frozen).append(n)
    return ParamSizes(trainable=sum(trained), largest_trainable=max(trained, default=0),
                      largest_frozen=max(frozen, default=0))  # fmt: skip


def zero_buckets(sizes: ParamSizes, zero_stage: int) -> dict[str, int]:
    """ZeRO's bucket sizes for what is trained (elements; keys of DeepSpeed's `zero_optimization`).

    - `reduce_bucket_size` / `allgather_bucket_size`: every trained element in one bucket, at least
      `BUCKET_FLOOR`, at most DeepSpeed's default (an adapter over 5e8 elements reduces in several buckets, as
      before). ZeRO-3 allocates the reduce bucket whole, in the gradients' dtype; ZeRO-1/2 use both.
    - ZeRO-3 only: `stage3_prefetch_bucket_size` = the largest frozen tensor (at least `BUCKET_FLOOR`), so that
      the next module's weights can be fetched whole while this one computes; `stage3_param_persistence_threshold`
      = the largest trained tensor (at least DeepSpeed's 1e5), so that every LoRA matrix stays whole on every
      rank (the adapter's size, replicated) instead of two latency-bound all-gathers per adapted layer per
      forward and backward. Frozen tensors that small are norms and biases, which DeepSpeed keeps whole anyway.
    """
    bucket = min(max(sizes.trainable, BUCKET_FLOOR), DEEPSPEED_BUCKET)
    out = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if zero_stage == 3:
        out["stage3_prefetch_bucket_size"] = max(sizes.largest_frozen, BUCKET_FLOOR)
        out["stage3_param_persistence_threshold"] = max(sizes.largest_trainable, DEEPSPEED_PERSISTENCE)
    return out


def deepspeed_config(
    cfg: Config,
    use_gpu: bool,
    zero_stage: int,
    *,
    sizes: ParamSizes | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """DeepSpeed's config from ours: batch shape, clipping, ZeRO stage and offload, mixed precision, AdamW.

    `sizes`: the wrapped model's (`param_sizes`), for `zero_buckets`; None leaves DeepSpeed's defaults (the config
    zero.Init loads the base under, before the adapter exists). `dtype`: the compute dtype, by default
    `resolve_dtype(cfg, use_gpu)`. DeepSpeed's bf16 mode only under ZeRO-3 (the module docstring's "Precision").
    """
    tr, ds = cfg.train, cfg.train.deepspeed
    dtype = resolve_dtype(cfg, use_gpu) if dtype is None else dtype
    zero: dict[str, Any] = {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": use_gpu}
    if sizes is not None:
        zero.update(zero_buckets(sizes, zero_stage))
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.global_batch_size,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16 and zero_stage == 3},
        "fp16": {"enabled": dtype == torch.float16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tr.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": tr.weight_decay,
                "torch_adam": True,
            },
        },
        # torch's AdamW under ZeRO-Offload: allowed, and plenty for LoRA-sized parameter sets.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """Optimizer steps of linear warmup from 0: round(warmup_ratio x total_steps)."""
    return round(train.warmup_ratio * total_steps)


def lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> Any:
    """`train.lr_schedule` over `total_steps` optimizer steps (transformers' schedules, a torch LambdaLR).

    The rate of the update after s steps is lr x f(s): f = s / W during the W warmup steps (so the very first
    update has rate 0 when W > 0), then 1 (constant), (T - s) / (T - W) (linear) or
    (1 + cos(pi (s - W) / (T - W))) / 2 (cosine), for T = `total_steps`.
    """
    warmup = warmup_steps(train, total_steps)
    if train.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if train.lr_schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if train.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    raise ValueError(f"train.lr_schedule: {train.lr_schedule!r}")


def initialize(model: torch.nn.Module, cfg: Config, ds_config: dict[str, Any], total_steps: int) -> Any:
    """`deepspeed.initialize` over the trainable parameters: AdamW from `ds_config`, the `lr_scheduler`.

    Needs a process group (Ray Train's, or any one the caller set up); returns the DeepSpeed engine."""
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=lambda opt: lr_scheduler(opt, cfg.train, total_steps),
        dist_init_required=False,  # the process group is already up
    )
    engine.checkpoint_engine = _SafeLoads(engine.checkpoint_engine)  # nothing is unpickled on load
    return engine


class _SkipGate:
    """`train.on_nonfinite: skip`: stands in for the torch optimizer's `step` (the innermost one, which every ZeRO
    stage calls with this rank's gradients, or its partition of them, in `.grad`).

    All ranks agree (one all-reduce) on skipping when any rank recorded a non-finite loss for this optimizer step
    (`arm`) or holds a non-finite gradient; a skipped step drops the gradients before the optimizer sees them, so
    the parameters and AdamW's moments and step count stay as they were. ZeRO-1/2/3 already discard a step whose
    gradient norm is not finite before calling it (their overflow check, agreed over ranks); ZeRO-0 does not. The
    decision is latched per optimizer step: ZeRO-3 calls the optimizer once per parameter sub-group."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner, self.real = inner, inner.step
        self.local_bad, self.decided, self.skipped = False, False, False
        inner.step = self  # type: ignore[method-assign]

    def arm(self, local_bad: bool) -> None:
        self.local_bad, self.decided, self.skipped = local_bad, False, False

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"]]

    def __call__(self, closure: Any = None) -> Any:
        if not self.decided:
            bad = self.local_bad or any(
                p.grad is not None and not torch.isfinite(p.grad).all() for p in self._params()
            )
            flag = torch.tensor([float(bad)], device=_collective_device())
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.decided, self.skipped = True, bool(flag.item())
        if self.skipped:
            for p in self._params():
                p.grad = None  # nothing non-finite reaches the moments
            return None
        return self.real(closure) if closure is not None else self.real()


def _collective_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _torch_optimizer(ds: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO-0: itself; fp16 and ZeRO-1/2/3: `.optimizer`)."""
    opt = ds.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(ds.optimizer).__name__}")
    return opt


@dataclass
class Engine:
    ds: Any  # deepspeed.DeepSpeedEngine
    hf_ds_config: Any  # HfDeepSpeedConfig: must stay referenced for ZeRO-3 (transformers keeps a weakref)
    sharded_at_load: bool  # every base parameter was partitioned as it loaded (ZeRO-3)
    zero_stage: int
    _grad_norm: float | None = None  # ZeRO-0's, taken in `step` (DeepSpeed's own is None there)
    _gate: _SkipGate | None = None  # `skip_nonfinite`
    skipped: bool = False  # the last optimizer step was skipped (not a number), nothing applied

    def skip_nonfinite(self) -> None:
        """`train.on_nonfinite: skip`: from now on an optimizer step whose loss (`step(nonfinite=True)` on any rank)
        or gradient is not a number is skipped on every rank: parameters, optimizer state and learning-rate
        schedule stay as they were (`_SkipGate`), and `skipped` says so."""
        if self._gate is None:
            self._gate = _SkipGate(_torch_optimizer(self.ds))

    @property
    def module(self) -> torch.nn.Module:
        """The DeepSpeed-wrapped peft model: call it like the model (`module(input_ids=..., ...)`)."""
        return self.ds

    @property
    def peft_model(self) -> PeftModel:
        return self.ds.module

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps here; see uft_ray.losses.rank_scale.
        self.ds.backward(loss)

    def step(self, nonfinite: bool = False) -> bool:
        """Call after every micro-batch; returns True when this one completed an optimizer step. `nonfinite`: this
        rank saw a loss that is not a number since the last optimizer step (used under `skip_nonfinite`)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        schedule = None
        if boundary and self._gate is not None:
            self._gate.arm(nonfinite)
            sched = self.ds.lr_scheduler
            if sched is not None:
                schedule = (sched, sched.state_dict(), [g["lr"] for g in sched.optimizer.param_groups])
        if boundary and self.zero_stage == 0:
            # DeepSpeed records no gradient norm for a plain fp32 optimizer (ZeRO-0): take it here, before the
            # step clips, from the gradients its backward already averaged over the ranks (LoRA-sized: cheap).
            grads = [p.grad.detach().float() for p in self.lora_parameters() if p.grad is not None]
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        self.ds.step()
        if boundary:
            gated = self._gate is not None and self._gate.skipped
            # ZeRO-1/2/3 skip a non-finite gradient norm themselves (and leave the schedule where it was)
            self.skipped = gated or not self.ds.was_step_applied()
            if gated and schedule is not None:  # DeepSpeed stepped the schedule: a skipped step does not move it
                sched, state, lrs = schedule
                sched.load_state_dict(state)
                for g, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
                    g["lr"] = lr
        return boundary

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def grad_norm(self) -> float:
        """The global gradient norm of the last optimizer step, before clipping."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm
        return float(norm) if norm is not None else float("nan")

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Full-shape LoRA tensors on CPU, gathered from their ZeRO-3 partitions (collective: every rank)."""
        with deepspeed.zero.GatheredParameters(self.lora_parameters()):
            return {
                k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(self.peft_model).items()
            }

    def save_adapter(self, out_dir: str, *, write: bool) -> None:
        """Write peft's `adapter_model.safetensors` + `adapter_config.json`. Collective; `write` on one rank."""
        state = self.adapter_state_dict()
        if not write:
            return
        os.makedirs(out_dir, exist_ok=True)
        save_file(state, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        peft_config = self.peft_model.peft_config["default"]
        inference_mode = peft_config.inference_mode
        peft_config.inference_mode = True  # what peft writes: PeftModel.from_pretrained loads it frozen by default
        try:
            peft_config.save_pretrained(out_dir)
        finally:
            peft_config.inference_mode = inference_mode

    def save(self, out_dir: str, *, rank: int) -> None:
        """Adapter (rank 0) + DeepSpeed optimizer/scheduler state (each rank its partition). Collective."""
        self.save_adapter(os.path.join(out_dir, CHECKPOINT_ADAPTER), write=rank == 0)
        # Frozen base weights are excluded: the checkpoint holds the LoRA state only, whatever the model size.
        self.ds.save_checkpoint(
            os.path.join(out_dir, CHECKPOINT_DEEPSPEED), tag=DS_TAG, exclude_frozen_parameters=True
        )

    def load(self, ckpt_dir: str) -> None:
        """Restore optimizer, scheduler and the fp32 LoRA master weights saved by `save`. Collective."""
        path, _ = self.ds.load_checkpoint(
            os.path.join(ckpt_dir, CHECKPOINT_DEEPSPEED),
            tag=DS_TAG,
            load_module_strict=False,  # the checkpoint has no frozen (base) parameters
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {ckpt_dir}/{CHECKPOINT_DEEPSPEED}")

    def parameter_digests(self) -> dict[str, str]:
        """sha1 of every parameter's full value, gathered one at a time (tests: frozen base, trained LoRA)."""
        out = {}
        for name, p in self.peft_model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = hashlib.sha1(p.detach().cpu().float().numpy().tobytes()).hexdigest()
        return out


def build_engine(
    cfg: Config,
    *,
    total_steps: int,
    use_gpu: bool,
    zero_stage: int,
    adapter: str | None = None,
    reference_adapter: str | None = None,
    dtype: torch.dtype | None = None,
) -> Engine:
    """The policy under DeepSpeed: base model sharded while loading (ZeRO-3), LoRA (fresh, or `adapter` to continue).

    `reference_adapter`: a peft adapter loaded beside the policy's as a frozen second one, for the reference
    forward (uft_ray.reference.adapter_off.reference_model). `dtype`: the compute dtype, by default
    `resolve_dtype(cfg, use_gpu)` (tests pass bfloat16 to run a GPU's precision on CPU).
    """
    # DeepSpeed's comm layer wraps the process group Ray Train already set up (zero.Init reads its world size).
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    dtype = resolve_dtype(cfg, use_gpu) if dtype is None else dtype
    ds_config = deepspeed_config(cfg, use_gpu, zero_stage, dtype=dtype)
    # Created before from_pretrained and kept alive (on the Engine): transformers checks it through a weakref
    # to decide whether to load under zero.Init.
    hf_ds_config = None
    if zero_stage == 3:
        hf_ds_config = HfDeepSpeedConfig(ds_config)
    else:
        unset_hf_deepspeed_config()  # an earlier ZeRO-3 engine in this process must not shard this load
    model = AutoModelForCausalLM.from_pretrained(
        local_model(cfg.model.path),  # a bucket's model: downloaded once per node
        revision=cfg.model.revision,
        dtype=dtype,
        # packed runs: sdpa per row (uft_ray.packing.segment_attention)
        attn_implementation=attn_implementation(cfg.model.attn_implementation, packing_enabled(cfg.train)),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    sharded = hf_ds_config is not None and all(hasattr(p, "ds_shape") and p.numel() == 0 for p in model.parameters())
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)

    adapter = adapter or cfg.model.adapter
    # LoRA tensors are created outside zero.Init, by each rank: the same seed gives every rank the same init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        if adapter:
            model = PeftModel.from_pretrained(model, local_model(adapter), is_trainable=True)
        else:
            lora = LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        if reference_adapter:
            load_reference_adapter(model, local_model(reference_adapter))

    # The buckets from what is trained: the config initialize gets is the load's plus `zero_buckets`.
    ds_config = deepspeed_config(cfg, use_gpu, zero_stage, sizes=param_sizes(model), dtype=dtype)
    engine = initialize(model, cfg, ds_config, total_steps)
    return Engine(ds=engine, hf_ds_config=hf_ds_config, sharded_at_load=sharded, zero_stage=zero_stage)
