"""Validation: semantic checks beyond types, one message per problem, each naming its field.

The allowed values of other packages come from their small tables (data formats from `uft_ray.data.formats`,
rft tasks from `uft_ray.tasks.names`, trackers from `uft_ray.tracker_names`), never from the modules that
implement them, so validating a config imports no task, tracker or data-pipeline code.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from uft_ray import methods
from uft_ray.config.paths import is_remote, looks_local, path_exists
from uft_ray.config.schema import (
    LOSS_KINDS,
    LOSS_TYPES,
    LR_SCHEDULES,
    Config,
    LoggingConfig,
    LoraConfig,
    MixtureConfig,
    OutputConfig,
    ReferenceConfig,
    SourceConfig,
    TokenizeConfig,
    TrainConfig,
)
from uft_ray.data.formats import FORMAT_KINDS, FORMATS, HELPSTEER2_ATTRIBUTES
from uft_ray.model_gguf import GGUFError
from uft_ray.model_store import check_gguf
from uft_ray.tracker_names import INSTALL, TRACKERS, missing_packages


class ConfigError(ValueError):
    """A config that cannot run. `messages` holds one line per problem, each naming its field."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("invalid config:\n" + "\n".join(f"  - {m}" for m in self.messages))


class Problems(list):
    """The problems found so far, one message each, with the checks every section uses."""

    def one_of(self, where: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            self.append(f"{where}: {value!r} is not allowed; use one of: {', '.join(map(str, allowed))}")

    def positive(self, where: str, value: float | int | None, *, zero_ok: bool = False) -> None:
        if value is None or not _finite(value):  # a non-finite number is reported once, by _check_finite
            return
        if value < 0 or (value == 0 and not zero_ok):
            self.append(f"{where}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")

    def model_source(self, where: str, value: str | None, check: bool) -> None:
        """A local path must exist; a GGUF file (or a folder of one) must hold an architecture transformers loads."""
        before = len(self)
        self.local_path(where, value, "a local model directory or GGUF file", check)
        if not check or not value or len(self) > before:
            return
        try:
            check_gguf(value)
        except GGUFError as err:
            self.append(f"{where}: {err}")

    def local_path(self, where: str, value: str | None, what: str, check: bool) -> None:
        # A hub id (`org/name`) cannot be checked here; an absolute or ~ path that is not there fails now,
        # not after Ray has started and a worker tries to load it.
        if check and value and not is_remote(value) and looks_local(value) and not path_exists(value):
            self.append(f"{where}: {value!r} does not exist ({what})")


def validate(cfg: Config, *, check_paths: bool = True) -> list[str]:
    """Semantic checks beyond types. Returns one message per problem (empty when the config can run).

    Section by section: model, lora, the method's own (`Method.check`: uft_ray.methods), train, packing, eval,
    output, logging. `check_paths` off skips the existence of local paths (a config whose paths are a cluster's).
    """
    e = Problems()
    nonfinite = _check_finite(e, cfg)
    method = methods.find(cfg.method) if isinstance(cfg.method, str) else None
    if method is None:
        e.one_of("method", cfg.method, methods.names())
    _check_model(e, cfg, check_paths)
    _check_lora(e, cfg.lora)
    if method is not None:
        e.extend(method.check(cfg, check_paths))
    _check_train(e, cfg.train)
    _check_packing(e, cfg)
    _check_eval(e, cfg, check_paths)
    _check_output(e, cfg.output)
    _check_logging(e, cfg.logging, check_paths)
    _check_numbers(e, cfg)
    # a non-finite field gets its one message; the range checks that also trip on it would only repeat it
    said = tuple(m.split(":")[0] + ":" for m in e[:nonfinite])
    return e[:nonfinite] + [m for m in e[nonfinite:] if not (said and m.startswith(said))]


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _check_finite(e: Problems, cfg: Config) -> int:
    """Every float anywhere in the config (a field, a mapping's value, a list's item) is a number: NaN and Inf
    compare false with every bound, so each later range check would let them through. Returns how many."""

    def walk(value: Any, where: str) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{where}.{f.name}" if where else f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{where}.{i}")
        elif not _finite(value):
            e.append(f"{where}: must be a finite number, got {value!r}")

    walk(cfg, "")
    return len(e)


SEED_LIMIT = 2**32  # numpy's and Ray Data's seeds: 0 <= seed < 2**32


def _check_numbers(e: Problems, cfg: Config) -> None:
    """Ranges that span sections, or that no section's own check covers."""
    for where, seed in (("data.seed", cfg.data.seed), ("train.seed", cfg.train.seed)):
        if not 0 <= seed < SEED_LIMIT:
            e.append(f"{where}: must be in [0, 2**32), got {seed!r}")
    tr = cfg.train
    if tr.use_gpu and _finite(tr.gpus_per_worker) and tr.gpus_per_worker <= 0:
        e.append(f"train.gpus_per_worker: must be > 0 with train.use_gpu: true, got {tr.gpus_per_worker!r} "
                 "(set train.use_gpu: false to train on CPU)")  # fmt: skip
    if cfg.ray.num_cpus is not None and cfg.ray.num_cpus <= 0:
        e.append(f"ray.num_cpus: must be > 0, got {cfg.ray.num_cpus!r}")


def _check_model(e: Problems, cfg: Config, check_paths: bool) -> None:
    m = cfg.model
    if not m.path:
        e.append("model.path: required (a local model directory or .gguf file, s3:// or gs:// prefix, or a hub id)")
    e.model_source("model.path", m.path, check_paths)
    e.local_path("model.adapter", m.adapter, "a peft adapter directory", check_paths)
    e.one_of("model.dtype", m.dtype, ("auto", "bfloat16", "float16", "float32"))
    e.one_of("model.attn_implementation", m.attn_implementation, ("sdpa", "eager", "flash_attention_2"))


def _check_lora(e: Problems, lora: LoraConfig) -> None:
    e.positive("lora.r", lora.r)
    e.positive("lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        e.append(f"lora.dropout: must be in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules:
        e.append("lora.target_modules: at least one module name (e.g. q_proj)")


def check_data(e: Problems, cfg: Config, check_paths: bool) -> None:
    """The sections of a run over prepared rows: data sources, mixture, tokenize, loss, reference (the offline
    method's, uft_ray.uft.method)."""
    _check_sources(e, cfg.data.sources, check_paths)
    _check_mixture(e, cfg.mixture, [s.name for s in cfg.data.sources])
    _check_tokenize(e, cfg.tokenize)
    _check_loss(e, cfg)
    _check_reference(e, cfg.reference, check_paths)


def _check_sources(e: Problems, sources: list[SourceConfig], check_paths: bool) -> None:
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
        elif check_paths and not is_remote(s.path) and not path_exists(s.path):
            e.append(f"{w}.path: {s.path!r} does not exist")
        if s.score_weights is not None:
            if s.format != "helpsteer2":
                e.append(f"{w}.score_weights: only for format helpsteer2")
            for k in s.score_weights:
                if k not in HELPSTEER2_ATTRIBUTES:
                    e.append(f"{w}.score_weights.{k}: unknown attribute; use: {', '.join(HELPSTEER2_ATTRIBUTES)}")
            if not any(v != 0 for v in s.score_weights.values()):
                e.append(f"{w}.score_weights: at least one weight must be non-zero")


def _check_mixture(e: Problems, m: MixtureConfig, names: list[str]) -> None:
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


def _check_tokenize(e: Problems, t: TokenizeConfig) -> None:
    e.positive("tokenize.max_len", t.max_len)
    e.positive("tokenize.max_prompt_len", t.max_prompt_len)
    if t.max_prompt_len >= t.max_len > 0:
        e.append(f"tokenize.max_prompt_len: must be < tokenize.max_len ({t.max_len}), got {t.max_prompt_len}")
    e.one_of("tokenize.overflow", t.overflow, ("drop", "truncate_prompt_left"))


def _check_loss(e: Problems, cfg: Config) -> None:
    loss, names = cfg.loss, [s.name for s in cfg.data.sources]
    e.one_of("loss.type", loss.type, LOSS_TYPES)
    e.positive("loss.beta", loss.beta)
    e.one_of("loss.sft_reduction", loss.sft_reduction, ("row", "token"))
    if loss.type in LOSS_KINDS:
        for i, s in enumerate(cfg.data.sources):
            if s.format in FORMAT_KINDS and s.resolved_kind not in LOSS_KINDS[loss.type]:
                e.append(f"data.sources.{i}.kind: loss.type {loss.type} cannot train {s.resolved_kind!r} rows "
                         f"(source {s.name}); it takes: {', '.join(LOSS_KINDS[loss.type])}")  # fmt: skip
    for name in ("kto_desirable_weight", "kto_undesirable_weight"):
        e.positive(f"loss.{name}", getattr(loss, name), zero_ok=True)
    if loss.type == "kto" and loss.kto_desirable_weight == 0 == loss.kto_undesirable_weight:
        e.append("loss.kto_desirable_weight / loss.kto_undesirable_weight: both 0 train nothing; give one > 0")
    for k, v in (loss.source_weights or {}).items():
        if k not in names:
            e.append(f"loss.source_weights.{k}: no source named {k!r}")
        e.positive(f"loss.source_weights.{k}", v, zero_ok=True)


def _check_reference(e: Problems, r: ReferenceConfig, check_paths: bool) -> None:
    e.one_of("reference.mode", r.mode, ("actor", "adapter_off"))
    e.one_of("reference.run", r.run, ("precompute", "stream"))
    e.model_source("reference.model_path", r.model_path, check_paths)
    e.local_path("reference.adapter", r.adapter, "a peft adapter directory", check_paths)
    if isinstance(r.actors, list):
        if len(r.actors) != 2 or not 1 <= r.actors[0] <= r.actors[1]:
            e.append(f"reference.actors: a range must be [min, max] with 1 <= min <= max, got {r.actors!r}")
    else:
        e.positive("reference.actors", r.actors)
    e.positive("reference.gpus_per_actor", r.gpus_per_actor, zero_ok=True)
    e.positive("reference.cpus_per_actor", r.cpus_per_actor, zero_ok=True)
    e.positive("reference.batch_size", r.batch_size)
    e.positive("reference.batch_tokens", r.batch_tokens)
    if r.mode == "adapter_off" and r.adapter:
        e.append("reference.adapter: only with reference.mode=actor (adapter_off's reference is the bare base)")


def _check_train(e: Problems, tr: TrainConfig) -> None:
    for name in ("num_workers", "micro_batch_size", "grad_accum", "lr", "epochs", "max_steps", "checkpoint_every"):
        e.positive(f"train.{name}", getattr(tr, name))
    for name in ("gpus_per_worker", "weight_decay", "max_grad_norm", "max_failures"):
        e.positive(f"train.{name}", getattr(tr, name), zero_ok=True)
    if isinstance(tr.cpus_per_worker, str):
        e.one_of("train.cpus_per_worker", tr.cpus_per_worker, ("auto",))
    else:
        e.positive("train.cpus_per_worker", tr.cpus_per_worker, zero_ok=True)
    e.one_of("train.lr_schedule", tr.lr_schedule, LR_SCHEDULES)
    e.one_of("train.on_nonfinite", tr.on_nonfinite, ("fail", "skip"))
    e.positive("train.max_nonfinite_in_a_row", tr.max_nonfinite_in_a_row)
    if not 0 <= tr.warmup_ratio < 1:
        e.append(f"train.warmup_ratio: must be in [0, 1), got {tr.warmup_ratio!r}")
    if tr.deepspeed.zero_stage not in (0, 1, 2, 3, "auto"):
        e.append(f"train.deepspeed.zero_stage: {tr.deepspeed.zero_stage!r} is not allowed; use auto, 0, 1, 2 or 3")
    if tr.deepspeed.offload_params and tr.deepspeed.zero_stage not in (3, "auto"):
        e.append("train.deepspeed.offload_params: needs train.deepspeed.zero_stage=3 (or auto)")


def _check_packing(e: Problems, cfg: Config) -> None:
    tr = cfg.train
    e.positive("train.micro_batch_tokens", tr.micro_batch_tokens)
    if tr.packing not in (True, False, "auto") or type(tr.packing) not in (bool, str):
        e.append(f"train.packing: {tr.packing!r} is not allowed; use true, false or auto")
    if tr.packing is False or cfg.model.attn_implementation != "flash_attention_2":
        return
    # flash-attention's variable-length kernels take the rows from the position ids of one sequence: no custom
    # mask (a shared prompt), no batch of several packed sequences.
    if tr.share_prompts:
        e.append("train.share_prompts: needs model.attn_implementation sdpa or eager (flash_attention_2 takes no "
                 "custom attention mask); set train.share_prompts: false")  # fmt: skip
    if tr.micro_batch_tokens is not None:
        e.append("train.micro_batch_tokens: needs model.attn_implementation sdpa or eager (flash_attention_2 packs "
                 "one sequence per forward); set it to null")  # fmt: skip


def _check_logging(e: Problems, lg: LoggingConfig, check_packages: bool) -> None:
    for i, name in enumerate(lg.trackers):
        e.one_of(f"logging.trackers.{i}", name, TRACKERS)
    if lg.wandb_mode is not None:
        e.one_of("logging.wandb_mode", lg.wandb_mode, ("online", "offline", "disabled"))
    if not lg.project:
        e.append("logging.project: required (the W&B project / MLflow experiment name)")
    # Like the paths, checked where the run runs (a submitter needs none of them installed).
    if check_packages and (missing := missing_packages([t for t in lg.trackers if t in TRACKERS])):
        e.append(f"logging.trackers: {', '.join(missing)} not installed here; {INSTALL}")


# One path segment under storage_path, the same locally and as an object key: no separator, no `.` or `..`, nothing
# a shell, a URL or a bucket reads specially; a leading `-` would read as a command-line flag.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+@-]{0,127}")


def _check_output(e: Problems, out: OutputConfig) -> None:
    if not RUN_NAME.fullmatch(out.run_name or ""):
        e.append("output.run_name: one path segment of at most 128 ASCII letters, digits and . _ - = + @, not "
                 f"starting with '.' or '-', got {out.run_name!r}")  # fmt: skip
    if not out.storage_path:
        e.append("output.storage_path: required (a local dir or shared storage URI)")


def _check_eval(e: Problems, cfg: Config, check_paths: bool) -> None:
    ev = cfg.eval
    e.positive("eval.every", ev.every)
    e.positive("eval.max_rows", ev.max_rows)
    e.positive("eval.max_model_len", ev.max_model_len)
    e.positive("eval.tensor_parallel_size", ev.tensor_parallel_size)
    if ev.limit is not None and _finite(ev.limit):
        # lm_eval: below 1 a fraction of each task, else a number of rows
        if not (0 < ev.limit < 1 or (ev.limit >= 1 and float(ev.limit).is_integer())):
            e.append(f"eval.limit: a fraction in (0, 1) or a whole number of rows, got {ev.limit!r}")
    e.local_path("eval.include_path", ev.include_path, "a folder of lm_eval task YAMLs", check_paths)
    if ev.preset is not None:
        e.one_of("eval.preset", ev.preset, ("uft-paper",))


def check_heldout(e: Problems, cfg: Config, check_paths: bool) -> None:
    """`eval.sources` / `eval.holdout`: held-out rows of the prepared data (a run over prepared rows only)."""
    ev = cfg.eval
    stream = cfg.reference_from_cache and cfg.reference.run == "stream"
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
        sub = Problems()
        _check_sources(sub, ev.sources, check_paths)
        e.extend(m.replace("data.sources", "eval.sources", 1) for m in sub)
        # Any kind can be held out under any loss: pairs give pair accuracy and margin, SFT rows their NLL,
        # scored rows their score MSE; eval/loss/{source} only where the run's loss applies to the rows.
