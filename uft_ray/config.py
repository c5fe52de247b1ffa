"""Typed run configuration: YAML plus dotted ``key=value`` overrides, validated at load.

Every field is a dataclass attribute with a docstring-style comment; `load_config` parses, coerces and
validates in one pass so that a bad config fails before any cluster work, with one line per problem that
names the field and what is allowed (`ConfigError.messages`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMATS = (
    "ultrachat_200k",
    "ultrachat_raw",
    "helpsteer2",
    "helpsteer2_preference",
    "messages",
    "prompt_completion",
    "unpaired",
    "preference",
    "scored",
)
# Which row kinds each format can produce; the first is the default.
FORMAT_KINDS: dict[str, tuple[str, ...]] = {
    "ultrachat_200k": ("sft",),
    "ultrachat_raw": ("sft",),
    "helpsteer2": ("score", "binary", "pair"),
    "helpsteer2_preference": ("pair",),
    "messages": ("sft",),
    "prompt_completion": ("sft",),
    "unpaired": ("binary",),
    "preference": ("pair",),
    "scored": ("score",),
}
METHODS = ("uft", "hint_rft")  # the offline implicit-reward UFT (Wang et al.); hint-guided RFT (Liu et al.)
LOSS_TYPES = ("uft", "una_bce", "dpo", "kto", "sft")
# Row kinds each loss can train on (DESIGN.md "The math").
LOSS_KINDS: dict[str, tuple[str, ...]] = {
    "uft": ("sft", "score", "binary"),
    "una_bce": ("sft", "score", "binary"),
    "dpo": ("pair",),
    "kto": ("sft", "binary"),
    "sft": ("sft", "score", "binary", "pair"),
}
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config that cannot run. `messages` holds one line per problem, each naming its field."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("invalid config:\n" + "\n".join(f"  - {m}" for m in self.messages))


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


@dataclass
class ReferenceConfig:
    mode: str = "actor"  # actor | adapter_off
    run: str = "precompute"  # precompute | stream
    model_path: str | None = None  # None = model.path
    adapter: str | None = None  # a peft adapter on top of the reference base (sequential recipes' stage 1)
    actors: int | list[int] = 1  # an int, or [min, max] for an autoscaling actor pool
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    batch_size: int = 8
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
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    checkpoint_every: int = 200
    max_failures: int = 3
    seed: int = 0
    group_by_length: bool = True
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
    gpu_memory_utilization: float = 0.4  # vllm: the rollout engine shares its GPU with nothing else by default


@dataclass
class RftConfig:
    """`method: hint_rft` (DESIGN.md "Hint-guided RFT"): prompts, rollouts, rewards and the loss's coefficients."""

    task: str = "countdown"  # countdown | knights_knaves | math | a generic task's verifier as module:function
    path: str | None = None  # math / generic: training rows (file, directory or glob); generated tasks: None
    eval_path: str | None = None  # math / generic: held-out rows; generated tasks draw them with another seed
    n_train: int = 10000  # generated tasks: instances to train on
    prompts_per_step: int = 256
    # grpo: rollouts + GRPO + hint NLL (UFT, RFT, R3, staged); sft: no rollouts, the NLL of each prompt's whole
    # reference answer (the paper's SFT baseline, and stage 1 of SFT-then-RFT)
    objective: str = "grpo"
    n: int = 4  # rollouts per prompt (the GRPO group); sft trains one sequence per prompt
    updates_per_step: int = 1  # optimizer steps per rollout batch; > 1 recomputes old log-probs first
    max_prompt_len: int = 256  # prompt + revealed hint, tokens
    max_response_len: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    clip: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    hint_coef: float = 0.001
    verifier_timeout_s: float = 2.0
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
    method: str = "uft"  # uft (offline: data.sources, loss.type) | hint_rft (online: rft)
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

    @property
    def needs_reference(self) -> bool:
        """A reference pass over prepared rows (hint_rft scores its rollouts with the adapter off instead)."""
        return self.method == "uft" and self.loss.type != "sft"

    def source(self, name: str) -> SourceConfig:
        for s in self.data.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


def compute_dtype(cfg: Config) -> str:
    """The dtype the policy (uft_ray.train.engine) and the reference scorer compute in: one rule for both.

    A CPU run (`train.use_gpu: false`) computes in float32 whatever `model.dtype` says: DeepSpeed has no bf16
    on CPU, and a bf16 reference against an fp32 policy would make r != 0 before the first step. On GPU,
    `model.dtype`, with `auto` meaning bfloat16.
    """
    if not cfg.train.use_gpu:
        return "float32"
    return "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype


# ---------------------------------------------------------------------------------------------------------
# Parsing: dict -> dataclasses, collecting every problem instead of stopping at the first.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, a, where, trial)
            if not trial:
                return out
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return tp()
        return _build(tp, value, where, errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}.{i}", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
            return {}
        _, v_tp = typing.get_args(tp)
        return {str(k): _coerce(v, v_tp, f"{where}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return None


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            errors.append(f"{where}: unknown key; allowed: {', '.join(sorted(names))}")
            continue
        kwargs[key] = _coerce(value, hints[key], where, errors)
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError as e:  # pragma: no cover - all fields have defaults
        errors.append(f"{prefix}: {e}")
        return cls()


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one dotted ``a.b.0.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError([f"{override}: overrides look like key.path=value"])
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError([f"{where}: list index must be an integer"])
            idx = int(part)
            if idx > len(node):
                raise ConfigError([f"{where}: index {idx} out of range (list has {len(node)} items)"])
            if idx == len(node):
                node.append({})
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = {}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = [] if parts[i + 1].isdigit() else {}
                node = node[part]
        else:
            raise ConfigError([f"{where}: cannot set a key inside a {type(node).__name__}"])


def load_config(
    path: str | os.PathLike | dict | None = None,
    overrides: list[str] | None = None,
    *,
    check_paths: bool = True,
    resolve_paths: bool = True,
) -> Config:
    """Read YAML (or a dict), apply overrides, build the typed config and validate it.

    Raises `ConfigError` listing every problem. With `resolve_paths` (the default; off only for a config that
    is shipped to another machine, whose paths are that machine's), every path field is normalized in one
    place before anything loads (`resolve_config_paths`): `~` is expanded, and a relative input path (a source,
    the model, an adapter) becomes absolute against the YAML file's directory when it exists there, else
    against the working directory when it exists there; one that exists in neither is left as written (a hub
    id such as `Qwen/Qwen2.5-0.5B`).
    """
    base_dir = None
    if path is None:
        data: dict[str, Any] = {}
    elif isinstance(path, dict):
        data = _deepcopy(path)
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(p)!r} does not exist"])
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p}: not valid YAML: {e}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{p}: the top level must be a mapping"])
        base_dir = p.parent
    for o in overrides or []:
        apply_override(data, o)
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if resolve_paths:
        resolve_config_paths(cfg, base_dir)
    errors.extend(validate(cfg, check_paths=check_paths))
    if errors:
        raise ConfigError(errors)
    return cfg


def _deepcopy(d: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(d, sort_keys=False))


def is_remote(path: str) -> bool:
    from uft_ray.storage import is_remote as _is_remote

    return _is_remote(path)


def _resolve_input(p: str | None, base: Path | None) -> str | None:
    if not p or is_remote(p):
        return p
    p = os.path.expanduser(p)
    if os.path.isabs(p):
        return p
    for root in ([base] if base is not None else []) + [Path.cwd()]:
        cand = root / p
        if cand.exists() or glob.glob(str(cand)):
            return str(cand.resolve()) if cand.exists() else os.path.abspath(cand)
    return p  # a hub id, or a path validate will report


def resolve_config_paths(cfg: Config, base: Path | None = None) -> None:
    """Expand `~` in every path field and make relative input paths absolute (see `load_config`), in place.

    Output locations (`output.storage_path`, `reference.cache_dir`) only get `~` expanded: a relative one
    means the working directory of the process that runs (`OutputConfig.run_dir` makes it absolute there).
    """
    for s in cfg.data.sources:
        s.path = _resolve_input(s.path, base) or s.path
    cfg.model.path = _resolve_input(cfg.model.path, base) or cfg.model.path
    cfg.model.adapter = _resolve_input(cfg.model.adapter, base)
    cfg.reference.model_path = _resolve_input(cfg.reference.model_path, base)
    cfg.reference.adapter = _resolve_input(cfg.reference.adapter, base)
    for s in cfg.eval.sources:
        s.path = _resolve_input(s.path, base) or s.path
    cfg.eval.include_path = _resolve_input(cfg.eval.include_path, base)
    for holder, name in ((cfg.output, "storage_path"), (cfg.reference, "cache_dir")):
        value = getattr(holder, name)
        if value and not is_remote(value):
            setattr(holder, name, os.path.expanduser(value))


def _path_exists(p: str) -> bool:
    p = os.path.expanduser(p)
    return os.path.exists(p) or bool(glob.glob(p))


def _looks_local(p: str) -> bool:
    """A path that can only mean this filesystem (not a hub id): absolute, `~`, `./` or `../`."""
    return os.path.isabs(p) or p.startswith(("~", "./", "../"))


class _Problems(list):
    """The problems found so far, one message each, with the checks every section uses."""

    def one_of(self, where: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            self.append(f"{where}: {value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")

    def positive(self, where: str, value: float | int | None, *, zero_ok: bool = False) -> None:
        if value is None:
            return
        if value < 0 or (value == 0 and not zero_ok):
            self.append(f"{where}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")

    def local_path(self, where: str, value: str | None, what: str, check: bool) -> None:
        # A hub id (`org/name`) cannot be checked here; an absolute or ~ path that is not there fails now,
        # not after Ray has started and a worker tries to load it.
        if check and value and not is_remote(value) and _looks_local(value) and not _path_exists(value):
            self.append(f"{where}: {value!r} does not exist ({what})")


def validate(cfg: Config, *, check_paths: bool = True) -> list[str]:
    """Semantic checks beyond types. Returns one message per problem (empty when the config can run).

    Section by section: model, lora, data sources, mixture, tokenize, loss, reference, train, output.
    `check_paths` off skips the existence of local paths (a config whose paths are a cluster's).
    """
    e = _Problems()
    e.one_of("method", cfg.method, METHODS)
    _check_model(e, cfg, check_paths)
    _check_lora(e, cfg.lora)
    if cfg.method == "hint_rft":  # prompts come from rft.task, not data.sources; the reference is adapter-off
        _check_rft(e, cfg, check_paths)
    else:
        _check_sources(e, cfg.data.sources, check_paths)
        _check_mixture(e, cfg.mixture, [s.name for s in cfg.data.sources])
        _check_tokenize(e, cfg.tokenize)
        _check_loss(e, cfg)
        _check_reference(e, cfg.reference, check_paths)
    _check_train(e, cfg.train)
    _check_eval(e, cfg, check_paths)
    _check_output(e, cfg.output)
    _check_logging(e, cfg.logging, check_paths)
    return list(e)


def _check_model(e: _Problems, cfg: Config, check_paths: bool) -> None:
    m = cfg.model
    if not m.path:
        e.append("model.path: required (a local model directory, s3:// or gs:// prefix, or a hub id)")
    e.local_path("model.path", m.path, "a local model directory", check_paths)
    e.local_path("model.adapter", m.adapter, "a peft adapter directory", check_paths)
    e.one_of("model.dtype", m.dtype, ("auto", "bfloat16", "float16", "float32"))
    e.one_of("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2"))


def _check_lora(e: _Problems, lora: LoraConfig) -> None:
    e.positive("lora.r", lora.r)
    e.positive("lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        e.append(f"lora.dropout: must be in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules:
        e.append("lora.target_modules: at least one module name (e.g. q_proj)")


def _check_sources(e: _Problems, sources: list[SourceConfig], check_paths: bool) -> None:
    if not sources:
        e.append("data.sources: at least one source (name, format, path)")
    names = [s.name for s in sources]
    for i, s in enumerate(sources):
        w = f"data.sources.{i}"
        if not s.name:
            e.append(f"{w}.name: required")
        elif names.count(s.name) > 1:
            e.append(f"{w}.name: {s.name!r} is used by more than one source")
        if s.format not in FORMATS:
            e.append(f"{w}.format: {s.format!r} is not allowed; use one of: {', '.join(FORMATS)}")
            continue
        if s.kind is not None and s.kind not in FORMAT_KINDS[s.format]:
            e.append(f"{w}.kind: {s.kind!r} is not allowed for format {s.format}; use one of: "
                     f"{', '.join(FORMAT_KINDS[s.format])}")  # fmt: skip
        if not s.path:
            e.append(f"{w}.path: required (a file, directory, glob, or s3:// gs:// hf:// URI)")
        elif check_paths and not is_remote(s.path) and not _path_exists(s.path):
            e.append(f"{w}.path: {s.path!r} does not exist")
        if s.score_weights is not None:
            if s.format != "helpsteer2":
                e.append(f"{w}.score_weights: only for format helpsteer2")
            for k in s.score_weights:
                if k not in HELPSTEER2_ATTRIBUTES:
                    e.append(f"{w}.score_weights.{k}: unknown attribute; use: {', '.join(HELPSTEER2_ATTRIBUTES)}")
            if not any(v != 0 for v in s.score_weights.values()):
                e.append(f"{w}.score_weights: at least one weight must be non-zero")


def _check_mixture(e: _Problems, m: MixtureConfig, names: list[str]) -> None:
    if m.counts is not None and m.ratios is not None:
        e.append("mixture: give either counts or ratios (with total), not both")
    if m.counts is None and m.ratios is None:
        e.append("mixture: give counts {source: rows} or ratios {source: r} with total")
    for key, table in (("counts", m.counts), ("ratios", m.ratios)):
        if table is None:
            continue
        for k, v in table.items():
            if k not in names:
                e.append(f"mixture.{key}.{k}: no source named {k!r}; sources: {', '.join(names) or '(none)'}")
            if v < 0:
                e.append(f"mixture.{key}.{k}: must be >= 0, got {v!r}")
        for n in names:
            if n and n not in table:
                e.append(f"mixture.{key}.{n}: source {n!r} has no entry; give it rows (or 0 to leave it out)")
        if table and all(v == 0 for v in table.values()):
            e.append(f"mixture.{key}: all zero; at least one source needs rows")
        if not table:
            e.append(f"mixture.{key}: empty; name at least one source")
    if m.ratios is not None:
        if m.total is None:
            e.append("mixture.total: required with mixture.ratios (the number of trainable rows)")
        else:
            e.positive("mixture.total", m.total)
    elif m.total is not None and m.counts is not None:
        e.append("mixture.total: only with mixture.ratios (counts already fix the total)")


def _check_tokenize(e: _Problems, t: TokenizeConfig) -> None:
    e.positive("tokenize.max_len", t.max_len)
    e.positive("tokenize.max_prompt_len", t.max_prompt_len)
    if t.max_prompt_len >= t.max_len > 0:
        e.append(f"tokenize.max_prompt_len: must be < tokenize.max_len ({t.max_len}), got {t.max_prompt_len}")
    e.one_of("tokenize.overflow", t.overflow, ("drop", "truncate_prompt_left"))


def _check_loss(e: _Problems, cfg: Config) -> None:
    loss, names = cfg.loss, [s.name for s in cfg.data.sources]
    e.one_of("loss.type", loss.type, LOSS_TYPES)
    e.positive("loss.beta", loss.beta)
    if loss.type in LOSS_KINDS:
        for i, s in enumerate(cfg.data.sources):
            if s.format in FORMAT_KINDS and s.resolved_kind not in LOSS_KINDS[loss.type]:
                e.append(f"data.sources.{i}.kind: loss.type {loss.type} cannot train {s.resolved_kind!r} rows "
                         f"(source {s.name}); it takes: {', '.join(LOSS_KINDS[loss.type])}")  # fmt: skip
    for k, v in (loss.source_weights or {}).items():
        if k not in names:
            e.append(f"loss.source_weights.{k}: no source named {k!r}")
        e.positive(f"loss.source_weights.{k}", v, zero_ok=True)


def _check_reference(e: _Problems, r: ReferenceConfig, check_paths: bool) -> None:
    e.one_of("reference.mode", r.mode, ("actor", "adapter_off"))
    e.one_of("reference.run", r.run, ("precompute", "stream"))
    e.local_path("reference.model_path", r.model_path, "a local model directory", check_paths)
    e.local_path("reference.adapter", r.adapter, "a peft adapter directory", check_paths)
    if isinstance(r.actors, list):
        if len(r.actors) != 2 or not 1 <= r.actors[0] <= r.actors[1]:
            e.append(f"reference.actors: a range must be [min, max] with 1 <= min <= max, got {r.actors!r}")
    else:
        e.positive("reference.actors", r.actors)
    e.positive("reference.gpus_per_actor", r.gpus_per_actor, zero_ok=True)
    e.positive("reference.cpus_per_actor", r.cpus_per_actor, zero_ok=True)
    e.positive("reference.batch_size", r.batch_size)
    if r.mode == "adapter_off" and r.adapter:
        e.append("reference.adapter: only with reference.mode=actor (adapter_off's reference is the bare base)")


def _check_train(e: _Problems, tr: TrainConfig) -> None:
    for name in ("num_workers", "micro_batch_size", "grad_accum", "lr", "epochs", "max_steps", "checkpoint_every"):
        e.positive(f"train.{name}", getattr(tr, name))
    for name in ("gpus_per_worker", "weight_decay", "max_grad_norm", "max_failures"):
        e.positive(f"train.{name}", getattr(tr, name), zero_ok=True)
    if isinstance(tr.cpus_per_worker, str):
        e.one_of("train.cpus_per_worker", tr.cpus_per_worker, ("auto",))
    else:
        e.positive("train.cpus_per_worker", tr.cpus_per_worker, zero_ok=True)
    if not 0 <= tr.warmup_ratio < 1:
        e.append(f"train.warmup_ratio: must be in [0, 1), got {tr.warmup_ratio!r}")
    if tr.deepspeed.zero_stage not in (0, 1, 2, 3, "auto"):
        e.append(f"train.deepspeed.zero_stage: {tr.deepspeed.zero_stage!r} is not allowed; use auto, 0, 1, 2 or 3")
    if tr.deepspeed.offload_params and tr.deepspeed.zero_stage not in (3, "auto"):
        e.append("train.deepspeed.offload_params: needs train.deepspeed.zero_stage=3 (or auto)")


def _check_logging(e: _Problems, lg: LoggingConfig, check_packages: bool) -> None:
    from uft_ray.trackers import TRACKERS, missing_packages

    for i, name in enumerate(lg.trackers):
        e.one_of(f"logging.trackers.{i}", name, TRACKERS)
    if lg.wandb_mode is not None:
        e.one_of("logging.wandb_mode", lg.wandb_mode, ("online", "offline", "disabled"))
    if not lg.project:
        e.append("logging.project: required (the W&B project / MLflow experiment name)")
    # Like the paths, checked where the run runs (a submitter needs none of them installed).
    if check_packages and (missing := missing_packages([t for t in lg.trackers if t in TRACKERS])):
        e.append(f"logging.trackers: {', '.join(missing)} not installed here; pip install 'uft-ray[trackers]'")


def _check_output(e: _Problems, out: OutputConfig) -> None:
    if not out.run_name or "/" in out.run_name:
        e.append(f"output.run_name: a non-empty name without '/', got {out.run_name!r}")
    if not out.storage_path:
        e.append("output.storage_path: required (a local dir or shared storage URI)")


GENERATED_TASKS = ("countdown", "knights_knaves")
FILE_TASKS = ("math",)
ROLLOUT_BACKENDS = ("auto", "hf", "vllm")


def _check_rft(e: _Problems, cfg: Config, check_paths: bool) -> None:
    r, tr = cfg.rft, cfg.train
    if r.task not in GENERATED_TASKS + FILE_TASKS and ":" not in r.task:
        e.append(f"rft.task: {r.task!r} is not allowed; use one of: {', '.join(GENERATED_TASKS + FILE_TASKS)}, "
                 "or a generic task's verifier as module:function")  # fmt: skip
    if r.task in GENERATED_TASKS:
        e.positive("rft.n_train", r.n_train)
        for name in ("path", "eval_path"):
            if getattr(r, name):
                e.append(f"rft.{name}: {r.task} instances are generated; leave rft.{name} unset")
    elif not r.path:
        e.append(f"rft.path: required for task {r.task!r} (a file, directory or glob of its rows)")
    for name in ("path", "eval_path"):
        value = getattr(r, name)
        if check_paths and value and not is_remote(value) and not _path_exists(value):
            e.append(f"rft.{name}: {value!r} does not exist")
    for name in ("prompts_per_step", "n", "updates_per_step", "max_prompt_len", "max_response_len",
                 "verifier_timeout_s", "temperature"):  # fmt: skip
        e.positive(f"rft.{name}", getattr(r, name))
    for name in ("kl_coef", "entropy_coef", "hint_coef", "clip"):
        e.positive(f"rft.{name}", getattr(r, name), zero_ok=True)
    if not 0 < r.top_p <= 1:
        e.append(f"rft.top_p: must be in (0, 1], got {r.top_p!r}")
    h = r.hint
    e.one_of("rft.objective", r.objective, ("grpo", "sft"))
    e.one_of("rft.hint.mode", h.mode, ("cosine", "rft", "r3", "staged"))
    if not 0 <= h.p_low <= h.p_high <= 1:
        e.append(f"rft.hint: need 0 <= p_low <= p_high <= 1, got p_low={h.p_low!r} p_high={h.p_high!r}")
    e.positive("rft.hint.t_hint", h.t_hint)
    e.positive("rft.hint.max_buckets", h.max_buckets)
    ro = r.rollout
    e.one_of("rft.rollout.backend", ro.backend, ROLLOUT_BACKENDS)
    for name in ("actors", "batch_size"):
        e.positive(f"rft.rollout.{name}", getattr(ro, name))
    for name in ("cpus_per_actor", "gpus_per_actor"):
        e.positive(f"rft.rollout.{name}", getattr(ro, name), zero_ok=True)
    if ro.backend == "vllm" and not tr.use_gpu:
        e.append("rft.rollout.backend: vllm needs train.use_gpu=true (use hf on CPU)")
    # Every rank trains whole GRPO groups, and its rollouts fill its micro-batches exactly.
    if tr.num_workers > 0 and r.prompts_per_step % tr.num_workers:
        e.append(f"rft.prompts_per_step: {r.prompts_per_step} must be a multiple of train.num_workers "
                 f"({tr.num_workers}): every rank takes whole groups")  # fmt: skip
    elif tr.num_workers > 0:
        n = 1 if r.objective == "sft" else r.n
        per_rank = r.prompts_per_step // tr.num_workers * n
        per_update = r.updates_per_step * tr.grad_accum * tr.micro_batch_size
        if per_rank != per_update:
            sft = r.objective == "sft"
            what = (
                "prompts_per_step / num_workers (sft: one sequence per prompt)"
                if sft
                else ("prompts_per_step / num_workers * n")
            )
            e.append(f"rft: each rank trains {what} = {per_rank} sequences a step, "
                     f"but rft.updates_per_step * train.grad_accum * train.micro_batch_size = {per_update}; "
                     "make them equal")  # fmt: skip


def _check_eval(e: _Problems, cfg: Config, check_paths: bool) -> None:
    ev = cfg.eval
    e.positive("eval.every", ev.every)
    e.positive("eval.max_rows", ev.max_rows)
    if ev.limit is not None:
        e.positive("eval.limit", ev.limit)
    e.local_path("eval.include_path", ev.include_path, "a folder of lm_eval task YAMLs", check_paths)
    if ev.preset is not None:
        e.one_of("eval.preset", ev.preset, ("uft-paper",))
    if cfg.method == "hint_rft":
        if ev.heldout:
            e.append("eval.sources / eval.holdout: hint_rft holds out prompts itself (rft.eval_path, or generated)")
        return
    stream = cfg.needs_reference and cfg.reference.mode == "actor" and cfg.reference.run == "stream"
    if ev.heldout and stream:
        e.append("eval: held-out metrics need the held-out rows' reference log-probs: reference.run precompute "
                 "(stream scores only the rows that are trained) or reference.mode adapter_off")  # fmt: skip
    if ev.sources and ev.holdout is not None:
        e.append("eval: give eval.sources (each source's own split) or eval.holdout (a fraction), not both")
    if ev.holdout is not None and not 0 < ev.holdout <= 0.5:
        e.append(f"eval.holdout: a fraction of each training source in (0, 0.5], got {ev.holdout!r}")
    # A held-out split is named as the source it holds out; it may also be one the run does not train on (an
    # SFT-only arm of `uft-ray compare` is still measured on the HelpSteer2 pairs).
    if ev.sources:
        sub = _Problems()
        _check_sources(sub, ev.sources, check_paths)
        e.extend(m.replace("data.sources", "eval.sources", 1) for m in sub)
        # Any kind can be held out under any loss: pairs give pair accuracy and margin, SFT rows their NLL,
        # scored rows their score MSE; eval/loss/{source} only where the run's loss applies to the rows.
