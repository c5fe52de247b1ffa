"""`uft-ray compare RECIPE.yaml`: the paper's comparison in one command (docs/design.md "Evaluation").

A recipe lists arms: one config, or a two-stage sequence (stage 1 SFT, stage 2 continuing its adapter against it
as the reference, as `jobs/sequential.py` runs them). Every arm runs on the same data and model and is
evaluated the same way: the recipe's `eval:` section (its `eval.sources` are required, so every arm is
measured on the same held-out rows; `eval.tasks` adds lm_eval benchmarks) is merged into each config. The
results are one table, arms x metrics, the best of each column marked, in `compare.md` and `compare.html`
(with a plot), under the recipe's `storage_path`.

    name: compare-demo
    storage_path: ./runs/compare-demo       # every arm's run directories, and the tables
    overrides: [train.max_steps=8]          # dotted overrides for every config of every arm
    eval: {sources: [...], every: 4, max_rows: 16}
    arms:
      - {name: uft, config: demo.yaml}                          # paths relative to the recipe file
      - name: sft-dpo
        stages:
          - {config: demo.yaml, set: {loss: {type: sft}}}       # `set`: per section, the keys given replace
          - {config: demo.yaml, set: {...}, overrides: [...]}

Resume per arm: a finished arm (its marker under `{storage_path}/arms/` matches its resolved configs) is not
rerun; an interrupted one resumes from its checkpoints like any run. Arms whose stage 1 is the same config share
one stage-1 run (the paper's SFT -> DPO / KTO / UNA / UFT all start from one SFT model).

Columns: the held-out metrics of each arm's final step (`eval/...`), the change of each `eval/nll/{source}`
over the arm's last stage (`delta eval/nll/...`: forgetting shows as a rise during an alignment stage), and
`bench/{task}/{metric}` from the final adapter's lm_eval summary.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uft_ray import driver, methods, storage
from uft_ray.config import Config, ConfigError, load_config, resolve_config_paths, validate
from uft_ray.console import say
from uft_ray.data import prepared as prep
from uft_ray.report.plots import pyplot, to_png
from uft_ray.run_dir import RunDir, read_metrics

LOWER_IS_BETTER = ("/loss/", "/nll/", "/score_mse/")


@dataclass
class Arm:
    name: str
    stages: list[Config]  # one, or two (stage 1 SFT, then stage 2 from its adapter)

    @property
    def run_dirs(self) -> list[str]:
        return [c.output.run_dir for c in self.stages]


@dataclass
class Recipe:
    name: str
    path: str
    storage_path: str
    arms: list[Arm] = field(default_factory=list)

    @property
    def out_dir(self) -> str:
        return self.storage_path


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _stage_config(spec: Any, where: str, root: Path, common: list[str], eval_section: dict, storage_path: str) -> dict:
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), str):
        raise ConfigError([f"{where}: needs `config: FILE` (relative to the recipe), optional `set` and `overrides`"])
    path = root / spec["config"]
    if not path.is_file():
        raise ConfigError([f"{where}.config: {str(path)!r} does not exist"])
    data = yaml.safe_load(path.read_text()) or {}
    for section, value in (spec.get("set") or {}).items():  # per section, each key given replaces the config's
        data[section] = (
            {**data[section], **value} if isinstance(value, dict) and isinstance(data.get(section), dict) else value
        )
    data["eval"] = _merge(data.get("eval") or {}, eval_section)
    data.setdefault("output", {})["storage_path"] = storage_path
    # Relative input paths in the arm's config mean its own folder (as for `uft-ray train FILE`).
    return {"data": data, "base": path.parent, "overrides": list(common) + list(spec.get("overrides") or [])}


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, *, check_paths: bool = True) -> Recipe:
    """Read and check a recipe and every arm's configs (ConfigError naming the field) before any cluster work;
    `check_paths` off for a recipe whose paths are a cluster's."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"recipe {str(p)!r} does not exist"])
    raw = yaml.safe_load(p.read_text()) or {}
    problems = []
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        problems.append("name: a non-empty recipe name without '/'")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, list) or not arms_raw:
        problems.append("arms: a list of arms, each {name, config} or {name, stages: [stage1, stage2]}")
    eval_section = raw.get("eval") or {}
    if not (eval_section.get("sources") or []):
        problems.append("eval.sources: required, so that every arm is measured on the same held-out rows")
    if problems:
        raise ConfigError(problems)
    storage_path = os.path.abspath(os.path.expanduser(str(raw.get("storage_path") or f"./runs/{name}")))
    common = list(raw.get("overrides") or []) + list(overrides or [])
    recipe = Recipe(name=name, path=str(p), storage_path=storage_path)
    seen: set[str] = set()
    stage1_names: dict[str, str] = {}  # resolved first-stage config -> its run name (shared)
    for i, a in enumerate(arms_raw):
        where = f"arms.{i}"
        arm_name = a.get("name") if isinstance(a, dict) else None
        if not isinstance(arm_name, str) or not arm_name or "/" in arm_name or arm_name in seen:
            raise ConfigError([f"{where}.name: a unique arm name without '/', got {arm_name!r}"])
        seen.add(arm_name)
        specs = a.get("stages") if "stages" in a else [a]
        if not isinstance(specs, list) or len(specs) not in (1, 2):
            raise ConfigError([f"{where}.stages: one or two stages (stage 1 SFT, stage 2 from its adapter)"])
        stages = []
        for k, spec in enumerate(specs):
            sw = f"{where}.stages.{k}" if "stages" in a else where
            st = _stage_config(spec, sw, p.parent, common, eval_section, storage_path)
            st["data"].setdefault("output", {})["run_name"] = (
                arm_name if len(specs) == 1 else f"{arm_name}-stage{k + 1}"
            )
            try:
                cfg = load_config(st["data"], st["overrides"], check_paths=False, resolve_paths=False)
                resolve_config_paths(cfg, st["base"])  # the arm config's relative paths: its own folder
                if problems := validate(cfg, check_paths=check_paths):
                    raise ConfigError(problems)
            except ConfigError as e:
                raise ConfigError([f"{sw} ({spec['config']}): {m}" for m in e.messages]) from None
            stages.append(cfg)
        if len(stages) == 2 and (why := methods.of(stages[0]).first_stage_problem(stages[0])) is not None:
            raise ConfigError([f"{where}.stages.0: {why}"])
        # A stage-1 config seen before (another arm's stage 1, or a one-stage arm) is that run: trained once.
        key = _config_key(stages[0])
        stages[0].output.run_name = stage1_names.setdefault(key, stages[0].output.run_name)
        recipe.arms.append(Arm(arm_name, stages))
    return recipe


def _config_key(cfg: Config) -> str:
    d = cfg.to_dict()
    d["output"].pop("run_name", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _arm_key(arm: Arm) -> str:
    return hashlib.sha1(
        json.dumps([c.to_dict() for c in arm.stages], sort_keys=True, default=str).encode()
    ).hexdigest()


def _marker(recipe: Recipe, arm: Arm) -> str:
    return os.path.join(recipe.out_dir, "arms", f"{arm.name}.json")


def run_arms(recipe: Recipe, only: list[str] | None = None, *, hooks: Any = None) -> list[str]:
    """Run every arm not already finished (resume per arm); returns the names of the arms that ran."""
    ran = []
    for arm in recipe.arms:
        if only and arm.name not in only:
            continue
        done = storage.read_json(_marker(recipe, arm)) or {}
        if done.get("key") == _arm_key(arm) and all(os.path.isdir(RunDir(d).adapter) for d in arm.run_dirs):
            say(f"compare: arm {arm.name} already finished; not rerun")
            continue
        say(f"compare: arm {arm.name} ({len(arm.stages)} stage(s))")
        if len(arm.stages) == 1:
            driver.run(arm.stages[0], hooks=hooks)
        else:
            driver.run_sequential(arm.stages[0], arm.stages[1], hooks=hooks)
        storage.write_json(_marker(recipe, arm), {"key": _arm_key(arm), "run_dirs": arm.run_dirs})
        ran.append(arm.name)
    return ran


# ---------------------------------------------------------------------------------------------------------
# The table


def heldout_rows_digest(run_dir: str) -> str | None:
    """Which held-out rows a run evaluated (its prepared eval split's row ids): equal for every arm."""
    d = RunDir(run_dir).prepared_eval
    if not prep.is_prepared(d):
        return None
    ids = sorted(prep.read_rows(d, ["row_id"]).column("row_id").to_pylist())
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def arm_results(arm: Arm) -> dict[str, Any]:
    """One arm's row of the table: the final held-out metrics, the NLL change over the last stage, benchmarks."""
    last = arm.run_dirs[-1]
    rows = read_metrics(RunDir(last).metrics)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    out: dict[str, Any] = {}
    if evals:
        final, start = evals[-1], evals[0]
        out |= {k: v for k, v in final.items() if k.startswith("eval/")}
        for k, v in final.items():
            if k.startswith("eval/nll/") and k in start:
                out[f"delta {k}"] = v - start[k]
    summary = storage.read_json(RunDir(last).eval_summary) or {}
    for task, metrics in (summary.get("tasks") or {}).items():
        for m, v in metrics.items():
            if isinstance(v, (int, float)):
                out[f"bench/{task}/{m}"] = v
    return out


def _better(column: str, a: float, b: float) -> bool:
    if column.startswith("delta "):
        return a < b  # less forgetting
    return a < b if any(s in column for s in LOWER_IS_BETTER) else a > b


def table(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The columns (sorted) and, per column, the arm with the best value."""
    columns = sorted({c for r in results.values() for c in r})
    best = {}
    for c in columns:
        values = [(arm, r[c]) for arm, r in results.items() if isinstance(r.get(c), (int, float))]
        if values:
            arm, _ = values[0]
            for a, v in values[1:]:
                if _better(c, v, results[arm][c]):
                    arm = a
            best[c] = arm
    return columns, best


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def write_tables(recipe: Recipe) -> dict[str, str]:
    """compare.md, compare.html and compare.png under the recipe's storage path; returns their paths."""
    results = {arm.name: arm_results(arm) for arm in recipe.arms}
    digests = {arm.name: heldout_rows_digest(arm.run_dirs[-1]) for arm in recipe.arms}
    columns, best = table(results)
    md = [f"# {recipe.name}: arms x metrics", "", f"Recipe: `{recipe.path}`. Best per column in **bold**.", ""]
    md.append("| arm | " + " | ".join(columns) + " |")
    md.append("|---|" + "---|" * len(columns))
    for arm, r in results.items():
        cells = [(f"**{_fmt(r.get(c))}**" if best.get(c) == arm else _fmt(r.get(c))) for c in columns]
        md.append(f"| {arm} | " + " | ".join(cells) + " |")
    same = len({d for d in digests.values()}) == 1 and None not in digests.values()
    md += ["", f"Held-out rows: {'the same for every arm' if same else 'NOT the same for every arm'} ({digests})."]
    os.makedirs(recipe.out_dir, exist_ok=True)
    paths = {k: os.path.join(recipe.out_dir, f"compare.{k}") for k in ("md", "html", "png", "json")}
    storage.atomic_write(paths["md"], ("\n".join(md) + "\n").encode())
    storage.write_json(paths["json"], {"columns": columns, "best": best, "arms": results, "heldout_rows": digests})
    png = _plot(results, columns)
    storage.atomic_write(paths["png"], png)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = ""
    for arm, r in results.items():
        cells = "".join(
            f"<td class='best'>{_fmt(r.get(c))}</td>" if best.get(c) == arm else f"<td>{_fmt(r.get(c))}</td>"
            for c in columns
        )
        body += f"<tr><td>{html.escape(arm)}</td>{cells}</tr>"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(recipe.name)}</title><style>"
        "body{font-family:sans-serif;margin:24px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        ".best{font-weight:bold;background:#e8f5e9}</style></head><body>"
        f"<h1>{html.escape(recipe.name)}</h1><p>Best per column highlighted. Held-out rows "
        f"{'the same for every arm' if same else 'NOT the same for every arm'}.</p>"
        f"<table><tr><th>arm</th>{head}</tr>{body}</table>"
        f"<img alt='compare' src='data:image/png;base64,{base64.b64encode(png).decode()}'></body></html>"
    )
    storage.atomic_write(paths["html"], page.encode())
    return paths


def _plot(results: dict[str, dict[str, Any]], columns: list[str]) -> bytes:
    plt = pyplot()
    shown = [c for c in columns if c.startswith(("eval/nll/", "delta ", "eval/pair_accuracy/", "eval/score_mse/"))]
    shown = shown[:6] or columns[:6]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.4), squeeze=False)
    arms = list(results)
    for ax, c in zip(axes[0], shown, strict=False):
        ax.bar(range(len(arms)), [results[a].get(c, float("nan")) for a in arms], color="#4c72b0")
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
        ax.set_title(c, fontsize=9)
    return to_png(fig)
