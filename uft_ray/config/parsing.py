"""Parsing: YAML (or a dict) plus dotted ``key=value`` overrides -> `Config`, paths resolved, then validated.

`load_config` collects every problem instead of stopping at the first, so a bad config fails before any
cluster work with one line per problem (`ConfigError.messages`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from uft_ray import methods
from uft_ray.config.paths import is_remote
from uft_ray.config.schema import Config
from uft_ray.config.validation import ConfigError, validate

_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# dict -> dataclasses, collecting every problem instead of stopping at the first.


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
    names = {f.name for f in dataclasses.fields(cls)} - ({"options"} if cls is Config else set())
    kwargs: dict[str, Any] = {}
    own: dict[str, Any] = {}  # a registered method's own section (Config only)
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            section = _method_options(key) if cls is Config else None
            if section is None:
                errors.append(f"{where}: unknown key; allowed: {', '.join(sorted(names | _option_sections(cls)))}")
            else:
                own[key] = _coerce(value, section, where, errors)
            continue
        kwargs[key] = _coerce(value, hints[key], where, errors)
    if cls is Config:
        chosen = _method_options(str(kwargs.get("method", "uft")))
        if chosen is not None:  # the run's method's section is always there, its defaults when not written
            own.setdefault(str(kwargs.get("method")), chosen())
        kwargs["options"] = own
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError as e:  # pragma: no cover - all fields have defaults
        errors.append(f"{prefix}: {e}")
        return cls()


def _method_options(name: str) -> type | None:
    """The dataclass of the own section of the registered method called `name`, or None."""
    method = methods.find(name) if name.isidentifier() else None
    section = getattr(method, "options", None)
    return section if dataclasses.is_dataclass(section) else None


def _option_sections(cls: type) -> set[str]:
    """The registered methods' own section names (for the error naming what is allowed at the top level)."""
    return {n for n in methods.names() if cls is Config and _method_options(n) is not None}


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
    the model, an adapter, a hint_rft task file) becomes absolute against the YAML file's directory when it
    exists there, else against the working directory when it exists there; one that exists in neither is left
    as written (a hub id such as `Qwen/Qwen2.5-0.5B`).
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
    cfg.rft.path = _resolve_input(cfg.rft.path, base)
    cfg.rft.eval_path = _resolve_input(cfg.rft.eval_path, base)
    for holder, name in ((cfg.output, "storage_path"), (cfg.reference, "cache_dir")):
        value = getattr(holder, name)
        if value and not is_remote(value):
            setattr(holder, name, os.path.expanduser(value))
