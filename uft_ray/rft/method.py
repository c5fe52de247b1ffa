"""`method: hint_rft`, the registered unit (uft_ray.methods): hint-guided RFT on a rollout actor pool.

Its parts live beside this module: the driver (`driver`: prompts, plan, rollout actors, Ray Train), the prompts
and hints (`prompts`), the per-worker loop (`loop`), the rollout actors (`rollout`) and sampling (`sampling`);
its report is uft_ray.report.rft. Here: its config section and checks, `rft.rollout.backend: auto` resolved once
where the run opens, its rollout actors in the resource model and the pre-check, its progress line, its demo.

Every config check imports this module (`load_config` asks the method registry), so it imports at its top only
what the checks need (config, tables); a hook that needs the run's parts (resources, pre-check, report, demo)
imports them when called.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from uft_ray import methods
from uft_ray.config import ROLLOUT_BACKENDS, Config
from uft_ray.config.paths import is_remote, path_exists
from uft_ray.config.validation import Problems
from uft_ray.console import number, say
from uft_ray.rft.backend import rollout_backend
from uft_ray.tasks.names import FILE_TASKS, GENERATED_TASKS, REWARD_RULES

# The metric names of a hint_rft step's row (uft_ray.rft.loop) that its progress line and report read.
METRICS = ("reward/mean", "reward/accuracy", "reward/format", "hint/share", "hint_nll", "kl", "time/generate_frac",
           "eval/accuracy", "response/length", "entropy", "clip_frac", "sync/adapter_s", "rollout/tokens_per_s")  # fmt: skip


class HintRft(methods.Method):
    """Hint-guided RFT (Liu et al.): GRPO on rollouts of prompt + a revealed share of the reference solution, plus
    the NLL of the revealed hint; the reference is the initial policy, in the trainer (no reference actors)."""

    name = "hint_rft"
    help = "hint-guided SFT + RFT: GRPO on rollouts from a rollout actor pool, with fading hints"
    sections = ("rft",)
    metrics = METRICS

    def check(self, cfg: Config, check_paths: bool) -> list[str]:
        e = Problems()
        check_rft(e, cfg, check_paths)  # prompts come from rft.task, not data.sources
        if cfg.eval.heldout:
            e.append("eval.sources / eval.holdout: hint_rft holds out prompts itself (rft.eval_path, or generated)")
        return list(e)

    def resolve(self, cfg: Config) -> Config:
        """`rft.rollout.backend: auto` decided here, once, on the driver (the actors and the pre-check read it)."""
        if cfg.rft.rollout.backend != "auto":
            return cfg
        out = copy.deepcopy(cfg)
        out.rft.rollout.backend = rollout_backend(cfg)
        why = (
            "vLLM is installed here"
            if out.rft.rollout.backend == "vllm"
            else ("train.use_gpu is false" if not cfg.train.use_gpu else "vLLM is not installed here")
        )
        say(f"rft.rollout.backend auto: {out.rft.rollout.backend} ({why})")
        return out

    def first_stage_problem(self, cfg: Config) -> str | None:
        """SFT-then-RFT's stage 1 trains the reference answers' NLL, no rollouts."""
        return None if cfg.rft.objective == "sft" else f"stage 1 must be rft.objective sft, got {cfg.rft.objective}"

    def needs_reference(self, cfg: Config) -> bool:
        return cfg.rft.kl_coef > 0  # the reference feeds only the KL term (the adapter-off or initial policy)

    def run(self, cfg: Config, *, hooks: Any = None, **options: Any) -> Any:
        from uft_ray.rft.driver import run  # the run's parts: see the module docstring

        return run(cfg, hooks=hooks, **options)

    def beside_workers(self, cfg: Config) -> list[Any]:
        from uft_ray.resources import Demand, bundle_of  # the run's parts: see the module docstring

        ro = cfg.rft.rollout
        return [
            Demand(
                "rollout actors",
                ro.actors,
                bundle_of(ro.cpus_per_actor, ro.gpus_per_actor if cfg.train.use_gpu else 0.0),
                "rft.rollout.actors",
                {"CPU": "rft.rollout.cpus_per_actor", "GPU": "rft.rollout.gpus_per_actor"},
            )
        ]

    def backends(self, cfg: Config) -> list[Any]:
        """vllm on the nodes that hold a rollout actor, with `rft.rollout.backend` vllm (or auto resolving to it)."""
        from uft_ray.preflight import BackendNeed  # the run's parts: see the module docstring

        ro = cfg.rft.rollout
        backend, chosen = ro.backend, f"rft.rollout.backend: {ro.backend}"
        if backend == "auto":  # a config not resolved by open_run (the pre-check's own tests)
            backend = rollout_backend(cfg)
            chosen = f"rft.rollout.backend: auto ({backend}: it is installed where the driver runs)"
        if backend != "vllm":
            return []
        gpus = float(ro.gpus_per_actor) if cfg.train.use_gpu else 0.0  # as rft.driver.start_rollout_actors asks
        return [
            BackendNeed("vllm", chosen, "rollout actors", {"num_cpus": float(ro.cpus_per_actor), "num_gpus": gpus})
        ]

    def summary_line(self, cfg: Config) -> str:
        r = cfg.rft
        return (
            f"model {cfg.model.path}; hint_rft on {r.task} (hints {r.hint.mode}, T_hint {r.hint.t_hint}); "
            f"{r.prompts_per_step} prompts x {r.n} rollouts a step; {cfg.train.num_workers} "
            f"{'GPU' if cfg.train.use_gpu else 'CPU'} workers; run dir {cfg.output.run_dir}"
        )

    def progress(self, row: dict[str, Any]) -> list[str]:
        """Rewards, the hint's share and NLL, KL (only with rft.kl_coef > 0), the generation share, held-out
        accuracy; a term the row lacks is left out."""
        parts = []
        names = (("reward", "reward/mean", ".3f"), ("acc", "reward/accuracy", ".3f"),
                 ("format", "reward/format", ".3f"))  # fmt: skip
        parts.append(" ".join(f"{n} {v}" for n, k, f in names if (v := number(row, k, f)) is not None))
        share, nll, kl = number(row, "hint/share", ".2f"), number(row, "hint_nll", ".3f"), number(row, "kl", ".4f")
        if share is not None:
            parts.append(f"hint {share}" + (f" nll {nll}" if nll is not None else ""))
        if kl is not None:
            parts.append(f"kl {kl}")
        if (v := number(row, "time/generate_frac", ".0%")) is not None:
            parts.append(f"generate {v}")
        if (v := number(row, "eval/accuracy", ".3f")) is not None:
            parts.append(f"eval/accuracy {v}")
        return parts

    def write_report(self, inp: Any) -> str:
        from uft_ray.report.rft import write_rft_report  # the run's parts: see the module docstring

        return write_rft_report(inp)

    def demo_config(self, tiny: bool) -> Path:
        from uft_ray.demo import DEMO_DIR  # the run's parts: see the module docstring

        return DEMO_DIR / ("demo_hint_rft_tiny.yaml" if tiny else "demo_hint_rft.yaml")

    def demo_overrides(self, root: str, tiny: bool) -> list[str]:
        """The model (hint_rft generates its prompts); the real demo's sum3 task files."""
        from uft_ray.demo import (  # the run's parts: see the module docstring
            ensure_demo_assets,
            ensure_real_demo_assets,
        )

        if tiny:
            return [f"model.path={ensure_demo_assets(root)['model']}"]
        real = ensure_real_demo_assets(root)
        return [f"model.path={real['model']}", f"rft.path={real['sum3_train']}", f"rft.eval_path={real['sum3_eval']}"]

    def demo_text(self, cfg: Config) -> str:
        return (
            f"a rollout actor pool samples {cfg.rft.n} continuations of each prompt + hint, a verifier scores them, "
            f"and {cfg.train.num_workers} DeepSpeed worker(s) with LoRA train GRPO + the hint NLL."
        )

    def demo_checks(self, cfg: Config, root: str) -> int:
        """The held-out accuracy the run logged before its first step and after its last."""
        from uft_ray.demo.before_after import rft_table  # the run's parts: see the module docstring
        from uft_ray.run_dir import RunDir  # (likewise)

        print(rft_table(RunDir(cfg.output.run_dir).read_metrics()), flush=True)
        return 0


def check_rft(e: Problems, cfg: Config, check_paths: bool) -> None:
    """The `rft` section (and the reference adapter hint_rft's KL term loads)."""
    r, tr = cfg.rft, cfg.train
    # the KL reference's adapter, loaded frozen beside the policy's (uft_ray.rft.update.reference_adapter)
    e.local_path("reference.adapter", cfg.reference.adapter, "a peft adapter directory", check_paths)
    if r.task not in GENERATED_TASKS + FILE_TASKS and ":" not in r.task:
        e.append(f"rft.task: {r.task!r} is not allowed; use one of: {', '.join(GENERATED_TASKS + FILE_TASKS)}, "
                 "or a generic task's verifier as module:function")  # fmt: skip
    if r.n_train is not None:
        e.positive("rft.n_train", r.n_train)
    elif not r.path:
        e.append(f"rft.n_train: null takes every row of rft.path; task {r.task!r} generates its rows, give a number")
    if r.task not in GENERATED_TASKS and not r.path:
        e.append(f"rft.path: required for task {r.task!r} (a file, directory or glob of its rows)")
    for name in ("path", "eval_path"):
        value = getattr(r, name)
        if check_paths and value and not is_remote(value) and not path_exists(value):
            e.append(f"rft.{name}: {value!r} does not exist")
    for name in ("prompts_per_step", "n", "updates_per_step", "max_prompt_len", "max_response_len",
                 "verifier_timeout_s", "verifier_budget_s", "temperature"):  # fmt: skip
        e.positive(f"rft.{name}", getattr(r, name))
    if r.verifier_memory_mb < 256:  # the verifier's child interpreter needs ~100 MiB before any verifier runs
        e.append(
            f"rft.verifier_memory_mb: at least 256 (MiB of address space for the verifier), got {r.verifier_memory_mb}"
        )
    for name in ("kl_coef", "entropy_coef", "hint_coef", "clip"):
        e.positive(f"rft.{name}", getattr(r, name), zero_ok=True)
    if not 0 < r.top_p <= 1:
        e.append(f"rft.top_p: must be in (0, 1], got {r.top_p!r}")
    h = r.hint
    e.one_of("rft.objective", r.objective, ("grpo", "sft"))
    if r.objective == "grpo" and 0 < r.n < 2:
        # a group's advantages are its rewards minus their mean: one rollout is always 0, no gradient at all
        e.append(f"rft.n: GRPO needs at least 2 rollouts per prompt (one has no advantage), got {r.n}")
    e.one_of("rft.reward_rules", r.reward_rules, REWARD_RULES)
    e.one_of("rft.hint.mode", h.mode, ("cosine", "rft", "r3", "staged"))
    if not 0 <= h.p_low <= h.p_high <= 1:
        e.append(f"rft.hint: need 0 <= p_low <= p_high <= 1, got p_low={h.p_low!r} p_high={h.p_high!r}")
    e.positive("rft.hint.t_hint", h.t_hint)
    e.positive("rft.hint.max_buckets", h.max_buckets)
    ro = r.rollout
    e.one_of("rft.rollout.backend", ro.backend, ROLLOUT_BACKENDS)
    for name in ("actors", "batch_size", "call_timeout_s"):
        e.positive(f"rft.rollout.{name}", getattr(ro, name))
    for name in ("cpus_per_actor", "gpus_per_actor"):
        e.positive(f"rft.rollout.{name}", getattr(ro, name), zero_ok=True)
    g = ro.gpu_memory_utilization
    if g is not None and not 0 < g <= 1:
        e.append(f"rft.rollout.gpu_memory_utilization: a share of the device's memory in (0, 1], or null, got {g!r}")
    if ro.backend == "vllm" and not tr.use_gpu:
        e.append("rft.rollout.backend: vllm needs train.use_gpu=true (use hf on CPU)")
    _check_updates(e, cfg)


def _check_updates(e: Problems, cfg: Config) -> None:
    """Every rank trains whole GRPO groups, its rollouts fill its micro-batches exactly, and each of the step's
    `updates_per_step` mini-batches holds whole groups (veRL's ppo_mini_batch_size counts prompts)."""
    r, tr = cfg.rft, cfg.train
    grpo = r.objective == "grpo"
    if grpo and r.updates_per_step > 1 and cfg.lora.dropout > 0:
        # the old log-probs and the training forward would draw different dropout masks: ratio != 1 on-policy
        e.append(f"lora.dropout: must be 0 with rft.updates_per_step > 1 (got lora.dropout={cfg.lora.dropout!r}, "
                 f"rft.updates_per_step={r.updates_per_step}): the old and the new log-probs would disagree")  # fmt: skip
    if tr.num_workers <= 0 or r.updates_per_step <= 0:
        return
    if r.prompts_per_step % tr.num_workers:
        e.append(f"rft.prompts_per_step: {r.prompts_per_step} must be a multiple of train.num_workers "
                 f"({tr.num_workers}): every rank takes whole groups")  # fmt: skip
        return
    n = r.n if grpo else 1
    per_rank = r.prompts_per_step // tr.num_workers * n
    per_update = tr.grad_accum * tr.micro_batch_size
    if per_rank != r.updates_per_step * per_update:
        what = (
            "prompts_per_step / num_workers * n"
            if grpo
            else "prompts_per_step / num_workers (sft: one sequence per prompt)"
        )
        e.append(f"rft: each rank trains {what} = {per_rank} sequences a step, "
                 f"but rft.updates_per_step * train.grad_accum * train.micro_batch_size = "
                 f"{r.updates_per_step * per_update}; make them equal")  # fmt: skip
    elif n > 0 and per_update % n:
        e.append(f"rft.updates_per_step: {r.updates_per_step} mini-batches of train.grad_accum * "
                 f"train.micro_batch_size = {per_update} sequences cut the GRPO groups of rft.n = {n}; make "
                 f"train.grad_accum * train.micro_batch_size a multiple of rft.n")  # fmt: skip


methods.register(HintRft())
