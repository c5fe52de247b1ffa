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
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hf://", "abfs://", "az://", "http://", "https://")


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
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class TrainConfig:
    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 1.0
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
class OutputConfig:
    storage_path: str = "./runs"
    run_name: str = "uft-run"

    @property
    def run_dir(self) -> str:
        return os.path.join(os.path.abspath(os.path.expanduser(self.storage_path)), self.run_name)


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or the running cluster, else start a local one
    num_cpus: int | None = None  # local cluster only: logical CPUs to declare (may exceed cores)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def needs_reference(self) -> bool:
        return self.loss.type != "sft"

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
    path: str | os.PathLike | dict | None = None, overrides: list[str] | None = None, *, check_paths: bool = True
) -> Config:
    """Read YAML (or a dict), apply overrides, build the typed config and validate it.

    Raises `ConfigError` listing every problem. Relative source/model paths are resolved against the
    YAML file's directory when they exist there, else against the working directory.
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
    if base_dir is not None:
        _resolve_relative(cfg, base_dir)
    errors.extend(validate(cfg, check_paths=check_paths))
    if errors:
        raise ConfigError(errors)
    return cfg


def _deepcopy(d: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(d, sort_keys=False))


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def _resolve_relative(cfg: Config, base: Path) -> None:
    def fix(p: str) -> str:
        if not p or is_remote(p) or os.path.isabs(os.path.expanduser(p)):
            return p
        cand = base / p
        if cand.exists() or glob.glob(str(cand)):
            return str(cand.resolve())
        return p

    for s in cfg.data.sources:
        s.path = fix(s.path)


def _path_exists(p: str) -> bool:
    p = os.path.expanduser(p)
    return os.path.exists(p) or bool(glob.glob(p))


def validate(cfg: Config, *, check_paths: bool = True) -> list[str]:
    """Semantic checks beyond types. Returns one message per problem (empty when the config can run)."""
    e: list[str] = []

    def one_of(where: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            e.append(f"{where}: {value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")

    def positive(where: str, value: float | int | None, *, zero_ok: bool = False) -> None:
        if value is None:
            return
        if value < 0 or (value == 0 and not zero_ok):
            e.append(f"{where}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")

    # model
    if not cfg.model.path:
        e.append("model.path: required (a local model directory, s3:// or gs:// prefix, or a hub id)")
    one_of("model.dtype", cfg.model.dtype, ("auto", "bfloat16", "float16", "float32"))
    one_of("model.attn_implementation", cfg.model.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
    # lora
    positive("lora.r", cfg.lora.r)
    positive("lora.alpha", cfg.lora.alpha)
    if not 0 <= cfg.lora.dropout < 1:
        e.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout!r}")
    if not cfg.lora.target_modules:
        e.append("lora.target_modules: at least one module name (e.g. q_proj)")
    # data
    if not cfg.data.sources:
        e.append("data.sources: at least one source (name, format, path)")
    names = [s.name for s in cfg.data.sources]
    for i, s in enumerate(cfg.data.sources):
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
    # mixture
    m = cfg.mixture
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
            positive("mixture.total", m.total)
    elif m.total is not None and m.counts is not None:
        e.append("mixture.total: only with mixture.ratios (counts already fix the total)")
    # tokenize
    t = cfg.tokenize
    positive("tokenize.max_len", t.max_len)
    positive("tokenize.max_prompt_len", t.max_prompt_len)
    if t.max_prompt_len >= t.max_len > 0:
        e.append(f"tokenize.max_prompt_len: must be < tokenize.max_len ({t.max_len}), got {t.max_prompt_len}")
    one_of("tokenize.overflow", t.overflow, ("drop", "truncate_prompt_left"))
    # loss
    one_of("loss.type", cfg.loss.type, LOSS_TYPES)
    positive("loss.beta", cfg.loss.beta)
    if cfg.loss.type in LOSS_KINDS:
        for i, s in enumerate(cfg.data.sources):
            if s.format in FORMAT_KINDS and s.resolved_kind not in LOSS_KINDS[cfg.loss.type]:
                e.append(f"data.sources.{i}.kind: loss.type {cfg.loss.type} cannot train {s.resolved_kind!r} rows "
                         f"(source {s.name}); it takes: {', '.join(LOSS_KINDS[cfg.loss.type])}")  # fmt: skip
    for k, v in (cfg.loss.source_weights or {}).items():
        if k not in names:
            e.append(f"loss.source_weights.{k}: no source named {k!r}")
        positive(f"loss.source_weights.{k}", v, zero_ok=True)
    # reference
    r = cfg.reference
    one_of("reference.mode", r.mode, ("actor", "adapter_off"))
    one_of("reference.run", r.run, ("precompute", "stream"))
    if isinstance(r.actors, list):
        if len(r.actors) != 2 or not 1 <= r.actors[0] <= r.actors[1]:
            e.append(f"reference.actors: a range must be [min, max] with 1 <= min <= max, got {r.actors!r}")
    else:
        positive("reference.actors", r.actors)
    positive("reference.gpus_per_actor", r.gpus_per_actor, zero_ok=True)
    positive("reference.cpus_per_actor", r.cpus_per_actor, zero_ok=True)
    positive("reference.batch_size", r.batch_size)
    if r.mode == "adapter_off" and r.adapter:
        e.append("reference.adapter: only with reference.mode=actor (adapter_off's reference is the bare base)")
    # train
    tr = cfg.train
    positive("train.num_workers", tr.num_workers)
    positive("train.micro_batch_size", tr.micro_batch_size)
    positive("train.grad_accum", tr.grad_accum)
    positive("train.lr", tr.lr)
    positive("train.cpus_per_worker", tr.cpus_per_worker, zero_ok=True)
    positive("train.gpus_per_worker", tr.gpus_per_worker, zero_ok=True)
    positive("train.weight_decay", tr.weight_decay, zero_ok=True)
    positive("train.max_grad_norm", tr.max_grad_norm, zero_ok=True)
    if not 0 <= tr.warmup_ratio < 1:
        e.append(f"train.warmup_ratio: must be in [0, 1), got {tr.warmup_ratio!r}")
    positive("train.epochs", tr.epochs)
    positive("train.max_steps", tr.max_steps)
    positive("train.checkpoint_every", tr.checkpoint_every)
    positive("train.max_failures", tr.max_failures, zero_ok=True)
    if tr.deepspeed.zero_stage not in (0, 1, 2, 3):
        e.append(f"train.deepspeed.zero_stage: {tr.deepspeed.zero_stage!r} is not allowed; use 0, 1, 2 or 3")
    if tr.deepspeed.offload_params and tr.deepspeed.zero_stage != 3:
        e.append("train.deepspeed.offload_params: needs train.deepspeed.zero_stage=3")
    if cfg.loss.type == "dpo" and cfg.train.micro_batch_size < 1:
        e.append("train.micro_batch_size: dpo needs at least one pair per micro-batch")
    # output
    if not cfg.output.run_name or "/" in cfg.output.run_name:
        e.append(f"output.run_name: a non-empty name without '/', got {cfg.output.run_name!r}")
    if not cfg.output.storage_path:
        e.append("output.storage_path: required (a local dir or shared storage URI)")
    return e
