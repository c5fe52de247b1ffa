"""lm-evaluation-harness on one worker: what to evaluate, how lm_eval loads it, one task at a time, and the files.

    target      RUN_DIR (its config.yaml names the base, adapter/ is the final adapter) or an ADAPTER dir
                (peft's adapter_config.json names the base): `resolve_target`
    model args  `model="hf"`: pretrained=base, peft=adapter; `model="vllm"`: lora_local_path=adapter with
                max_lora_rank >= the adapter's r (`vllm_lora_rank`, shared with the rollout actors), max_model_len
                and tensor_parallel_size (a run's `eval:` section, else the config's defaults): `model_args`
    one task    `simple_evaluate` per task on an LM built once (`load_lm`, `evaluate_task`), so a task whose data
                is missing fails alone, with one line naming what is missing (`failure_line`)
    files       {out}/results_{task}.json   lm_eval's results dict for that task, unchanged (its samples left out,
                                            as lm_eval's own output does)
                {out}/samples_{task}.jsonl  per-sample records, one file per leaf task (with log_samples)
                {out}/summary.json          {"tasks": {task: {metric: value}}, "derived": ..., "failed": ...},
                                            rebuilt from every results_*.json in the folder (`write_summary`)

Where results go: `{run_dir}/eval/` for a run; `{adapter_dir}/eval/` for a bare adapter (it travels with the
adapter, and two adapters in one folder do not share a summary); a run's own `adapter/` counts as the run.

Offline (`apply_offline`): HF_HUB_OFFLINE / HF_DATASETS_OFFLINE make a missing hub dataset fail at once instead of
after datasets' retries (about 25 s per task on a machine without a network).

Importable without lm_eval, torch or Ray: they are imported where used.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml

from uft_ray import storage
from uft_ray.config.schema import EvalConfig
from uft_ray.evaluation.presets import DERIVED, is_gated, nltk_needs
from uft_ray.model_store import local_model
from uft_ray.run_dir import ADAPTER, EVAL_SUMMARY, RunDir

if TYPE_CHECKING:  # pragma: no cover
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

BACKENDS = ("auto", "hf", "vllm")
# vLLM accepts only these max_lora_rank values (vllm.config.lora.MaxLoRARanks); an adapter's r is rounded up to the
# next one, never below vLLM's own default (16), the value its LoRA kernels are run with most.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_LORA_RANK = 16
RESULTS_PREFIX = "results_"
SAMPLES_PREFIX = "samples_"
_ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class EvalError(ValueError):
    """Bad input: a path that is neither a run nor an adapter, an unknown task, a bad option. The CLI exits 2."""


@dataclass(frozen=True)
class EvalTarget:
    """What to evaluate and where its results go."""

    base: str  # base model: a local dir or a hub id
    adapter: str | None  # peft adapter dir; None evaluates the bare base
    out_dir: str  # the eval folder
    lora_r: int | None = None  # the adapter's largest rank (rank_pattern included)
    dtype: str = "auto"  # the run's model.dtype; auto = bfloat16 on GPU, float32 on CPU
    tokenizer: str | None = None  # the adapter's tokenizer (a run saves the one it trained with), else the base's
    trust_remote_code: bool = False
    revision: str | None = None
    run_dir: str | None = None
    # the vLLM backend's context and GPUs per eval worker: a run's `eval:` section, else the config's defaults
    max_model_len: int = EvalConfig.max_model_len
    tensor_parallel_size: int = EvalConfig.tensor_parallel_size


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None = None  # None: the task's own default


# ---------------------------------------------------------------------------------------------------------
# What to evaluate


def _is_adapter(path: str) -> bool:
    return storage.is_file(storage.join(path, _ADAPTER_CONFIG))


def _adapter_rank(adapter: str) -> int | None:
    cfg = _read_json_file(storage.join(adapter, _ADAPTER_CONFIG))
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    ranks = [int(r) for r in ranks if isinstance(r, int | float)]
    return max(ranks) if ranks else None


def _read_json_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise EvalError(f"{path}: not a JSON object")
    return data


def _run_model(run_dir: str) -> dict[str, Any]:
    """The `model:` section of a run's config.yaml, read as written (the config it ran with, not today's schema)."""
    path = RunDir(run_dir).config
    try:
        cfg = yaml.safe_load(storage.read_bytes(path)) or {}
    except (OSError, yaml.YAMLError) as e:
        raise EvalError(f"{path}: unreadable ({e})") from e
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("path"):
        raise EvalError(f"{path}: no model.path")
    return model


def _run_eval_engine(run_dir: str) -> dict[str, int]:
    """`eval.max_model_len` / `eval.tensor_parallel_size` from a run's config.yaml (absent: the defaults)."""
    path = RunDir(run_dir).config
    cfg = yaml.safe_load(storage.read_bytes(path)) or {}
    section = cfg.get("eval") if isinstance(cfg, dict) else None
    out = {}
    for name in ("max_model_len", "tensor_parallel_size"):
        value = (section or {}).get(name, getattr(EvalConfig, name))
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EvalError(f"{path}: eval.{name} must be an integer > 0, got {value!r}")
        out[name] = value
    return out


def _check_base(base: str, where: str) -> str:
    """`base` as lm_eval takes it: a local directory (made absolute) or a hub id (`org/name`)."""
    if storage.is_remote(base):  # each eval worker downloads it to its node (uft_ray.model_store)
        if not storage.is_dir(base):
            raise EvalError(f"base model {base} ({where}) is not there; pass --base PATH")
        return base
    local = os.path.expanduser(base)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.isabs(local) or base.startswith("."):  # a path that is not here, not a hub id
        raise EvalError(f"base model {base} ({where}) is not a directory here; pass --base PATH")
    return base


def _out_dir(path: str) -> str:
    return path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))


def resolve_target(
    path: str, *, base: str | None = None, out_dir: str | None = None, trust_remote_code: bool = False
) -> EvalTarget:
    """RUN_DIR or ADAPTER -> base model, adapter and results folder. Raises `EvalError` for anything else.

    Remote code runs only when the caller says so (`trust_remote_code`: `uft-ray eval --trust-remote-code`, or the
    user's own config after training): a config.yaml found on storage cannot switch it on, and one that asks for
    it is an EvalError naming the flag."""
    # A run directory or adapter in object storage stays a URI: the eval workers download what they load.
    path = path.rstrip("/") if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))
    if not storage.is_dir(path):
        raise EvalError(f"{path}: not a directory (give a run directory or a peft adapter directory)")
    run_dir = None
    parent, leaf = path.rsplit("/", 1)
    if storage.is_file(RunDir(path).config):
        run_dir = path
    elif _is_adapter(path) and storage.is_file(RunDir(parent).config):
        if leaf == ADAPTER:  # a run's final adapter: results go to the run's eval/
            run_dir = parent
    if run_dir is not None:
        rd = RunDir(run_dir)
        model = _run_model(run_dir)
        if not _is_adapter(rd.adapter):
            raise EvalError(
                f"{run_dir}: no final adapter ({ADAPTER}/{_ADAPTER_CONFIG}); has the run finished? "
                f"A checkpoint's adapter can be evaluated as is: uft-ray eval {rd.checkpoints}/checkpoint_NNNNNN/adapter"
            )
        adapter, where = rd.adapter, f"model.path in {rd.config}"
        resolved_base = base or str(model["path"])
        dtype = str(model.get("dtype") or "auto")
        revision = model.get("revision")
        if model.get("trust_remote_code") is True and not trust_remote_code:
            raise EvalError(
                f"{rd.config} has model.trust_remote_code: true, and a config found on storage cannot switch "
                f"remote code on: pass --trust-remote-code if you trust {base or model['path']}"
            )
        default_out = rd.eval
        engine = _run_eval_engine(run_dir)
    elif _is_adapter(path):
        adapter, where = path, f"base_model_name_or_path in {os.path.join(path, _ADAPTER_CONFIG)}"
        resolved_base = base or _read_json_file(storage.join(path, _ADAPTER_CONFIG)).get("base_model_name_or_path")
        if not resolved_base:
            raise EvalError(f"{path}: {_ADAPTER_CONFIG} names no base_model_name_or_path; pass --base PATH")
        dtype, revision = "auto", None
        default_out = storage.join(path, "eval")
        engine = {}
    else:
        raise EvalError(f"{path}: neither a run directory (no config.yaml) nor a peft adapter (no {_ADAPTER_CONFIG})")
    has_tokenizer = any(storage.is_file(storage.join(adapter, f)) for f in _TOKENIZER_FILES)
    return EvalTarget(
        base=_check_base(resolved_base, "--base" if base else where),
        adapter=adapter,
        out_dir=_out_dir(out_dir) if out_dir else default_out,
        lora_r=_adapter_rank(adapter),
        dtype=dtype,
        tokenizer=adapter if has_tokenizer else None,
        trust_remote_code=trust_remote_code,
        revision=revision,
        run_dir=run_dir,
        **engine,
    )


# ---------------------------------------------------------------------------------------------------------
# How lm_eval loads it


def resolve_backend(backend: str, device: str) -> str:
    """`auto`: vLLM where it is installed and a GPU is ours, else hf (transformers + peft)."""
    if backend not in BACKENDS:
        raise EvalError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    import importlib.util

    return "vllm" if device.startswith("cuda") and importlib.util.find_spec("vllm") else "hf"


def resolve_dtype(dtype: str, device: str) -> str:
    """uft-ray's meaning of `auto` (bfloat16 on GPU, float32 on CPU), not lm_eval's (the checkpoint's dtype)."""
    if not device.startswith("cuda"):
        return "float32"  # CPU kernels for bf16 are slow, and the tiny test models are float32
    return "bfloat16" if dtype == "auto" else dtype


def vllm_lora_rank(r: int | None) -> int:
    """vLLM's `max_lora_rank` for an adapter of rank r (None: unknown): the smallest value vLLM accepts that is
    >= r and >= its default 16. ValueError naming r above vLLM's largest (512). The rollout actors use it too."""
    need = max(int(r or 0), VLLM_DEFAULT_LORA_RANK)
    for v in VLLM_LORA_RANKS:
        if v >= need:
            return v
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def model_args(target: EvalTarget, backend: str, device: str) -> dict[str, Any]:
    """lm_eval's model arguments for `backend` ("hf" or "vllm") on `device` ("cpu", "cuda"). Called where the model
    loads (the eval worker): what is in object storage is downloaded to this node first."""
    args: dict[str, Any] = {"pretrained": local_model(target.base), "dtype": resolve_dtype(target.dtype, device)}
    if target.tokenizer:
        args["tokenizer"] = local_model(target.tokenizer)
    if target.trust_remote_code:
        args["trust_remote_code"] = True
    if target.revision:
        args["revision"] = target.revision
    tp = target.tensor_parallel_size
    if backend == "hf":
        args["device"] = device
        if tp > 1 and device.startswith("cuda"):  # the worker holds tp GPUs: lm_eval spreads the layers over them
            args["parallelize"] = True
        if target.adapter:
            args["peft"] = local_model(target.adapter)
    elif backend == "vllm":
        # the model's own context (32k for Qwen2.5) reserves more KV cache than a 32B leaves free on 80 GB
        args["max_model_len"] = target.max_model_len
        args["tensor_parallel_size"] = tp
        if tp > 1:  # worker processes on this actor's GPUs; vLLM's Ray executor would ask Ray for more GPUs
            args["distributed_executor_backend"] = "mp"
        if target.adapter:
            args["lora_local_path"] = local_model(target.adapter)
            try:
                args["max_lora_rank"] = vllm_lora_rank(target.lora_r)
            except ValueError as e:
                raise EvalError(f"{e}; use --backend hf") from e
    else:
        raise EvalError(f"backend {backend!r}: hf or vllm")
    return args


def load_lm(backend: str, args: dict[str, Any], batch_size: int | str) -> LM:
    """The lm_eval model, built once per worker and reused for every task."""
    from lm_eval.api.registry import get_model

    return get_model(backend).create_from_arg_obj(args, {"batch_size": batch_size})


# ---------------------------------------------------------------------------------------------------------
# Tasks


def task_manager(include_path: str | None = None, names: list[str] | None = None) -> TaskManager:
    """lm_eval's task index. With `include_path` alone first: indexing lm_eval's own tasks takes seconds, and
    local tasks (the tests', a project's) need none of them."""
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.isdir(include_path):
        raise EvalError(f"--include-path {include_path}: not a directory")
    if include_path and names:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=include_path)


def check_tasks(names: list[str], tm: TaskManager) -> None:
    """Every name a task, group or tag lm_eval knows, else `EvalError` with close matches."""
    known = set(tm.all_tasks)
    bad = [n for n in names if n not in known]
    if not bad:
        return
    hints = []
    for n in bad:
        close = difflib.get_close_matches(n, known, n=3, cutoff=0.75)
        hints.append(f"{n} (did you mean {', '.join(close)}?)" if close else n)
    where = f" or under --include-path {tm.include_path}" if tm.include_path else " (local task YAMLs: --include-path)"
    raise EvalError(f"unknown task{'s' if len(bad) > 1 else ''}: {'; '.join(hints)}: not in lm_eval{where}")


def one_line(text: object, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_line(task: str, exc: BaseException) -> str:
    """One line naming what is missing, for the errors a machine without a network or a token meets."""
    msg = one_line(str(exc) or type(exc).__name__)
    name = type(exc).__name__
    token = " (a gated dataset: set HF_TOKEN in the environment)" if is_gated(task) and not _hf_token() else ""
    if isinstance(exc, ConnectionError) or "OfflineModeIsEnabled" in msg or "Couldn't reach" in msg:
        return f"{task}: its dataset is not here (no network or offline mode, and not in the HF datasets cache): {msg}{token}"
    if name in ("DatasetNotFoundError", "GatedRepoError", "RepositoryNotFoundError"):
        return f"{task}: its dataset cannot be loaded: {msg}{token}"
    if isinstance(exc, LookupError) and "nltk" in msg.lower():
        return f"{task}: nltk data missing: {msg}"
    if isinstance(exc, ImportError):  # ifeval and math_hard import packages lm_eval itself does not install
        return f"{task}: a Python package is missing: {msg} (pip install 'uft-ray[eval-tasks]')"
    if isinstance(exc, FileNotFoundError):
        return f"{task}: file not found: {msg}"
    return f"{task}: {name}: {msg}{token}"


def _hf_token() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


def check_nltk(task: str, offline: bool) -> str | None:
    """The failure line for a task whose nltk data is missing on an offline machine (None: present, or lm_eval
    may still download it). lm_eval's own attempt only prints, and the task would crash while scoring."""
    resource = nltk_needs(task)
    if resource is None or not offline:
        return None
    import nltk

    try:
        nltk.data.find(f"tokenizers/{resource}")
        return None
    except LookupError:
        return (
            f"{task}: needs nltk's {resource} data, not found offline: run `python -m nltk.downloader {resource}` "
            "where a network exists and copy nltk_data here (or point NLTK_DATA at it)"
        )


def evaluate_task(
    lm: LM,
    tm: TaskManager,
    spec: TaskSpec,
    *,
    limit: int | float | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    offline: bool = False,
    bootstrap_iters: int = 100_000,
    model_info: tuple[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run one task (or group) through `simple_evaluate`; never raises for a task's own failure.

    `model_info`: (backend, model args) for the JSON's `config`, which lm_eval leaves empty for a prebuilt LM.
    Returns {"task", "ok": True, "results": lm_eval's dict without samples, "samples": {leaf: [record]} or None,
    "seconds"} or {"task", "ok": False, "error": one line}. Everything in it is plain JSON data.
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    t0 = time.perf_counter()
    missing = check_nltk(spec.task, offline)
    if missing:
        return {"task": spec.task, "ok": False, "error": missing}
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[spec.task],
            num_fewshot=spec.num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            bootstrap_iters=bootstrap_iters,
        )
    except (Exception, SystemExit) as e:  # a task's own code calling sys.exit must not end the worker either
        return {"task": spec.task, "ok": False, "error": failure_line(spec.task, e)}
    if out is None:  # not rank 0: cannot happen with one process per worker
        return {"task": spec.task, "ok": False, "error": f"{spec.task}: lm_eval returned no results"}
    samples = out.pop("samples", None)
    if model_info is not None:  # what lm_eval writes when it builds the model itself (we built it once, per worker)
        out["config"]["model"], out["config"]["model_args"] = model_info
    # numpy scalars, dtypes and functions in configs: lm_eval's own serializer makes them JSON
    results = json.loads(json.dumps(out, default=handle_non_serializable))
    if samples is not None:
        samples = json.loads(json.dumps(samples, default=handle_non_serializable))
    return {"task": spec.task, "ok": True, "results": results, "samples": samples, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------
# Offline


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers on its port (HF_ENDPOINT or huggingface.co:443), within `timeout`."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def apply_offline(offline: bool | None) -> bool:
    """Put this process in HF offline mode when asked, when it already is, or (None) when the hub is unreachable.

    Sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, and the flags `datasets` and `huggingface_hub` read at import when
    they are loaded already. Returns whether the process is offline.
    """
    if offline is None:
        offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))
        offline = offline or not hub_reachable()
    if not offline:
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = True
    return True


# ---------------------------------------------------------------------------------------------------------
# Files


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _file_name(prefix: str, task: str, suffix: str) -> str:
    return f"{prefix}{_SAFE.sub('_', task)}{suffix}"


def write_task_result(out_dir: str, outcome: dict[str, Any]) -> str | None:
    """Write a successful task's lm_eval JSON (and its samples); returns the results file, None for a failure."""
    if not outcome.get("ok"):
        return None
    path = storage.join(out_dir, _file_name(RESULTS_PREFIX, outcome["task"], ".json"))
    storage.write_json(path, outcome["results"], indent=2)
    for leaf, records in (outcome.get("samples") or {}).items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        storage.atomic_write(storage.join(out_dir, _file_name(SAMPLES_PREFIX, leaf, ".jsonl")), lines.encode())
    return path


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from one lm_eval results dict: every task and group it reports, numeric metrics
    under lm_eval's names (`acc,none`, `exact_match,strict-match`; a stderr it did not compute, "N/A", left out)."""
    table: dict[str, dict[str, float]] = {}
    for task, entry in (results.get("results") or {}).items():
        metrics = {
            k: float(v)
            for k, v in entry.items()
            if "," in k and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if metrics:
            table[task] = metrics
    return table


def derived_metrics(tasks: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """The paper's means over several lm_eval metrics (presets.DERIVED), where all their inputs are present."""
    out = {}
    for d in DERIVED:
        values = []
        for ref in d.of:
            task, metric = ref.split("/", 1)
            values.append(tasks.get(task, {}).get(metric))
        if all(v is not None for v in values):
            out[d.name] = {"value": sum(values) / len(values), "mean_of": list(d.of)}
    return out


def write_summary(out_dir: str, failed: dict[str, str], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild `{out_dir}/summary.json` from every results_*.json there, plus this run's `failed` lines.

    An earlier run's tasks stay in the table until a rerun replaces their file, so evaluating more tasks later
    adds to the summary. Returns what it wrote.
    """
    _, files = storage.list_files(out_dir, ".json", recursive=False)
    tasks: dict[str, dict[str, float]] = {}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if not name.startswith(RESULTS_PREFIX):
            continue
        data = storage.read_json(storage.as_uri(out_dir, f))
        if isinstance(data, dict):
            tasks.update(task_metrics(data))
    summary = {"tasks": dict(sorted(tasks.items())), "derived": derived_metrics(tasks), "failed": dict(failed), **meta}
    storage.write_json(storage.join(out_dir, EVAL_SUMMARY), summary, indent=2)
    return summary
