"""The run configuration's shape: one dataclass per section, each field with a comment, and the allowed values.

Parsing (`uft_ray.config.parsing`) builds these from YAML and overrides; validation (`uft_ray.config.validation`)
checks them. Derived values are properties; `compute_dtype` is the one dtype rule of the policy and the reference.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from uft_ray import methods
from uft_ray.config.paths import is_remote
from uft_ray.data.formats import FORMAT_KINDS

LOSS_TYPES = ("uft", "una_bce", "dpo", "kto", "sft")
# Row kinds each loss can train on (docs/design.md "The losses").
LOSS_KINDS: dict[str, tuple[str, ...]] = {
    "uft": ("sft", "score", "binary"),
    "una_bce": ("sft", "score", "binary"),
    "dpo": ("pair",),
    "kto": ("sft", "binary"),
    "sft": ("sft", "score", "binary", "pair"),
}
ROLLOUT_BACKENDS = ("auto", "hf", "vllm")
# The learning rate after warmup, over all optimizer steps (uft_ray.train.engine.lr_scheduler).
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class ModelConfig:
    path: str = ""  # local dir, s3:// / gs:// prefix, or a hub id (resolved by transformers where a network exists)
    revision: str | None = None  # hub revision; part of the reference cache fingerprint
    adapter: str | None = None  # a peft adapter the policy starts from and keeps training (sequential stage 2)
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False  # never on unless asked: it runs code shipped with the weights


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class SourceConfig:
    name: str = ""
    format: str = ""
    path: str = ""  # file, directory, glob, or URI (s3://, gs://, hf://)
    kind: str | None = None  # score | binary | pair where the format allows a choice; None = format default
    score_weights: dict[str, float] | None = None  # helpsteer2 `score` kind; None = the UNA/UFT paper weights

    @property
    def resolved_kind(self) -> str:
        return self.kind or FORMAT_KINDS.get(self.format, ("sft",))[0]


@dataclass
class DataConfig:
    seed: int = 0
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class MixtureConfig:
    counts: dict[str, int] | None = None  # absolute trainable rows per source (the paper's 20k + 20k)
    ratios: dict[str, float] | None = None  # or relative ratios, with `total`
    total: int | None = None
    allow_upsample: bool = False  # a source smaller than its quota repeats rows instead of failing
    at_most: bool = False  # counts are caps: a smaller source gives every row it has (held-out splits)


@dataclass
class TokenizeConfig:
    max_prompt_len: int = 1024
    max_len: int = 2048
    overflow: str = "drop"  # drop | truncate_prompt_left


@dataclass
class LossConfig:
    type: str = "uft"
    beta: float = 0.01
    source_weights: dict[str, float] | None = None  # multiplies each row's loss by its source's weight
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    # loss.type sft: "row" (each row's token mean, then the mean over rows: every row counts the same) or "token"
    # (the step's token mean over every rank and micro-batch: long responses weigh more, as in the papers' summed
    # token NLL, up to one factor per step)
    sft_reduction: str = "row"


@dataclass
class ReferenceConfig:
    mode: str = "actor"  # actor | adapter_off
    run: str = "precompute"  # precompute | stream
    model_path: str | None = None  # None = model.path
    revision: str | None = None  # a hub revision pinning reference.model_path (model.path's is model.revision)
    # a peft adapter on top of the reference base (sequential recipes' stage 1). hint_rft: the KL reference is
    # base + this adapter, by default model.adapter's (the initial policy), loaded frozen in the trainer
    adapter: str | None = None
    actors: int | list[int] = 1  # an int, or [min, max] for an autoscaling actor pool
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    # Rows a scorer receives per call: it sorts their sequences by length and cuts them into forwards of at most
    # `batch_tokens` padded tokens (rows x the longest; a longer sequence alone). The token budget bounds a
    # forward's memory whatever the lengths; the rows only bound how long a call holds its batch.
    batch_size: int = 256
    batch_tokens: int = 16384
    cache_dir: str = "~/.cache/uft-ray"


@dataclass
class DeepSpeedConfig:
    # auto: no parameter sharding at world size 1 or when the frozen base fits one device with room for
    # activations (ZeRO-0: with LoRA the optimizer state is tiny), ZeRO-3 with a sharded load when it does not
    # (uft_ray.train.engine.choose_zero_stage); 0-3 is honoured as given.
    zero_stage: int | str = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class TrainConfig:
    num_workers: int = 8
    use_gpu: bool = True
    # auto: on a local cluster (a laptop, the demo) every core the workers can share, cores // num_workers;
    # on a running cluster 1. A CPU worker runs torch with this many threads.
    cpus_per_worker: float | str = "auto"
    gpus_per_worker: float = 1.0
    micro_batch_size: int = 1
    grad_accum: int = 1
    lr: float = 3.0e-5
    # constant | cosine (to 0) | linear (to 0), after a linear warmup from 0 over round(warmup_ratio * optimizer
    # steps); both methods. hint_rft's optimizer steps are steps x rft.updates_per_step.
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0  # AdamW's decoupled decay, on the LoRA parameters
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    checkpoint_every: int = 200
    max_failures: int = 3
    # A step whose loss or gradient is not a number: fail (stop the run at that step, before its checkpoint) | skip
    # (every rank leaves the adapter, optimizer state and lr schedule as they were, the step's rows are consumed and
    # counted in metrics as nonfinite/skipped; max_nonfinite_in_a_row such steps in a row still fail the run)
    on_nonfinite: str = "fail"
    max_nonfinite_in_a_row: int = 3
    seed: int = 0
    group_by_length: bool = True
    # Padding-free micro-batches (uft_ray.packing): the rows side by side, each attending to itself only; the
    # same rows and the same math as padded ones, without computing pads. true | false | auto (packed on GPU; on
    # CPU only where the plan's padding share pays for the layout's cost: uft_ray.packing.choose, said in the log).
    packing: bool | str = "auto"
    # With packing: a pair's chosen and rejected (a prompt's rollouts) share their prompt, computed once (a 4D
    # attention mask: model.attn_implementation sdpa or eager).
    share_prompts: bool = True
    # With packing: the most tokens in one packed sequence; a micro-batch takes as many as it needs, all in one
    # forward (bounds the attention's [L, L] cost). null: one sequence per micro-batch.
    micro_batch_tokens: int | None = None
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def global_batch_size(self) -> int:
        return self.num_workers * self.micro_batch_size * self.grad_accum


@dataclass
class HintConfig:
    # The hint schedule of uft_ray.tasks.hints (the authors' numbers): cosine | rft | r3 | staged.
    mode: str = "cosine"
    p_low: float = 0.05
    p_high: float = 0.95
    t_hint: int = 300  # steps with hints; none after, and never at evaluation
    max_buckets: int = 5


@dataclass
class RolloutConfig:
    backend: str = "auto"  # auto: vllm on GPU where it is installed, else hf (transformers generate) | hf | vllm
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0  # used when train.use_gpu
    batch_size: int = 64  # requests per generate call of the hf backend
    # vllm: the share of the device's memory an actor's engine takes; null: 0.9 x gpus_per_actor (0.9 on a GPU of
    # its own, 0.45 on half of one: uft_ray.rft.rollout.rollout_memory_fraction)
    gpu_memory_utilization: float | None = None
    # Seconds a call to an actor (a rollout batch, an adapter sync) may take, restarts included; the error names
    # the actor. Under the trainers' process-group timeout (30 min), so a hung engine fails the run with its name.
    call_timeout_s: float = 900.0


@dataclass
class RftConfig:
    """`method: hint_rft` (docs/design.md "Hint-guided RFT"): prompts, rollouts, rewards and the loss's coefficients."""

    task: str = "countdown"  # countdown | knights_knaves | math | a generic task's verifier as module:function
    # Task files (file, directory or glob; uft_ray.tasks.files: veRL's parquet as the authors publish theirs, ours,
    # MATH-lighteval, generic). Required for math / generic; for countdown / knights_knaves a path replaces the
    # generated rows (no eval_path: held-out rows generated with another seed)
    path: str | None = None
    eval_path: str | None = None
    # The training set: this many prompts, drawn once and repeated over epochs (the authors: 10,240 prompts for
    # about 12.5 epochs); generated tasks generate this many; null: every usable row of rft.path
    n_train: int | None = 10240
    prompts_per_step: int = 256
    # grpo: rollouts + GRPO + hint NLL (UFT, RFT, R3, staged); sft: no rollouts, the NLL of each prompt's whole
    # reference answer (the paper's SFT baseline, and stage 1 of SFT-then-RFT)
    objective: str = "grpo"
    n: int = 4  # rollouts per prompt (the GRPO group); sft trains one sequence per prompt
    # Optimizer steps per rollout batch (veRL: train_batch_size / ppo_mini_batch_size): each rank's rollouts cut
    # in order into this many mini-batches of grad_accum x micro_batch_size whole GRPO groups; > 1 recomputes the
    # old log-probs first (and needs lora.dropout 0)
    updates_per_step: int = 1
    max_prompt_len: int = 256  # prompt + revealed hint, tokens
    max_response_len: int = 1024
    temperature: float = 1.0  # sampling; the trainer divides its logits by it too (policy, old and reference)
    top_p: float = 1.0
    clip: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    hint_coef: float = 0.001
    verifier_timeout_s: float = 2.0  # per rollout; past it the verifier's child is killed and the rollout scores 0
    # Each rank's scoring of one step's rollouts (and of one evaluation): rollouts still unscored when it runs out
    # score 0 without running (metrics: verifier/timeouts); the verifier's child may use this much address space
    verifier_budget_s: float = 300.0
    verifier_memory_mb: int = 4096
    # Built-in tasks' rewards (uft_ray.tasks.rules): paper (the authors' reward code) | strict (this project's own,
    # each task's verify); a generic task's module:function verifier is its own rule
    reward_rules: str = "paper"
    hint: HintConfig = field(default_factory=HintConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class EvalConfig:
    """Held-out evaluation (uft_ray.evaluation.heldout) and benchmarks after training (uft_ray.evaluation)."""

    # Held-out rows, one of: each training source's own split (entries like data.sources, named as they are),
    # or a seeded fraction of every training source kept out of training. Neither: no held-out metrics (uft).
    sources: list[SourceConfig] = field(default_factory=list)
    holdout: float | None = None
    every: int | None = None  # steps between held-out evaluations (plus one before the first and one at the end)
    max_rows: int | None = 256  # held-out rows per source (hint_rft: held-out prompts)
    tasks: list[str] = field(default_factory=list)  # lm_eval tasks run on the final adapter (`uft-ray eval`)
    preset: str | None = None  # or a named protocol (uft-paper: the paper's tasks, shots and scoring)
    include_path: str | None = None  # a folder of lm_eval task YAMLs for `tasks`
    limit: float | None = None  # lm_eval's limit per task (N rows, or a fraction)
    # lm_eval's vLLM backend: its context (prompt + generation; the model's own, 32k for Qwen2.5, reserves more KV
    # cache than a 32B leaves free on an 80 GB GPU) and GPUs per eval worker (tensor parallel; hf spreads layers)
    max_model_len: int = 4096
    tensor_parallel_size: int = 1

    @property
    def heldout(self) -> bool:
        return bool(self.sources) or self.holdout is not None


@dataclass
class OutputConfig:
    storage_path: str = "./runs"
    run_name: str = "uft-run"

    @property
    def run_dir(self) -> str:
        """`{storage_path}/{run_name}`: a URI as given for object storage, else an absolute local path."""
        if is_remote(self.storage_path):
            return self.storage_path.rstrip("/") + "/" + self.run_name
        return os.path.join(os.path.abspath(os.path.expanduser(self.storage_path)), self.run_name)


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or the running cluster, else start a local one
    num_cpus: int | None = None  # local cluster only: logical CPUs to declare (may exceed cores)


@dataclass
class LoggingConfig:
    """Experiment trackers (uft_ray.trackers), fed by the driver from metrics.jsonl: the same keys, by step.

    Credentials come from the environment only (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...), never from here.
    """

    trackers: list[str] = field(default_factory=list)  # any of wandb, mlflow, tensorboard (`uft-ray[trackers]`)
    project: str = "uft-ray"  # the W&B project and the MLflow experiment; the run is output.run_name
    mlflow_tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default (./mlruns)
    wandb_mode: str | None = None  # online | offline | disabled; None: WANDB_MODE, else online
    tensorboard_dir: str | None = None  # None: {run_dir}/tensorboard; else {tensorboard_dir}/{output.run_name}


@dataclass
class Config:
    # uft (offline: data.sources, loss.type) | hint_rft (online: rft) | a registered method (uft_ray.methods)
    method: str = "uft"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rft: RftConfig = field(default_factory=RftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # A registered method's own section, by the method's name (`Method.options`, a dataclass): in YAML a top-level
    # section named after the method (`my_method: {...}`), here its built value (uft_ray.config.parsing).
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        """Whether the method's loss has a reference policy (the method says: `Method.needs_reference`)."""
        return methods.of(self).needs_reference(self)

    @property
    def reference_from_cache(self) -> bool:
        """Whether the reference log-probs come from the reference actor pool and its cache (a reference pass over
        prepared rows), not from the trainer itself: the one rule the driver, the resource model, the pre-check
        and validation ask (`Method.reference_from_cache`)."""
        return methods.of(self).reference_from_cache(self)

    def source(self, name: str) -> SourceConfig:
        for s in self.data.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, a method's own section at the top level under its name (as it is written)."""
        out = dataclasses.asdict(self)
        out.update(out.pop("options"))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def reference_revision(cfg: Config) -> str | None:
    """The hub revision the reference base loads: model.revision for the policy's own base, else
    reference.revision (the scorer and the reference cache key use this one rule)."""
    ref_path = cfg.reference.model_path or cfg.model.path
    return cfg.model.revision if ref_path == cfg.model.path else cfg.reference.revision


def compute_dtype(cfg: Config) -> str:
    """The dtype the policy (uft_ray.train.engine) and the reference scorer compute in: one rule for both.

    A CPU run (`train.use_gpu: false`) computes in float32 whatever `model.dtype` says: DeepSpeed has no bf16
    on CPU, and a bf16 reference against an fp32 policy would make r != 0 before the first step. On GPU,
    `model.dtype`, with `auto` meaning bfloat16.
    """
    if not cfg.train.use_gpu:
        return "float32"
    return "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
