"""`method: uft`, the registered unit (uft_ray.methods): the offline losses over prepared rows.

UFT (Wang et al.'s implicit-reward loss on SFT, scored and binary rows) and the baselines it is compared with
(`loss.type`: una_bce, dpo, kto, sft). Its parts: the driver beside this module (`driver`: data plane, reference
pass, plan, Ray Train), the per-worker loop (uft_ray.train.loop), the data plane (uft_ray.data), the reference
actor pool and its cache (uft_ray.reference), the report (uft_ray.report.uft). Here: its config checks, the one
rule for where its reference comes from, its report and its demo.

Every config check imports this module (`load_config` asks the method registry), so it imports at its top only
what the checks need (config); a hook that needs the run's parts (the driver, report, demo) imports them when
called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uft_ray import methods
from uft_ray.config import Config
from uft_ray.config.validation import Problems, check_data, check_heldout

# Per-source metric names of a step's row (uft_ray.train.loop); the CLI's progress line shows the first three.
METRICS = ("loss/{source}", "reward/{source}", "mixture/{source}/cumulative", "mixture/{source}/target",
           "saturated/{source}", "kappa/{source}", "eval/loss/{source}")  # fmt: skip


class Uft(methods.Method):
    """The offline method: rows prepared by the data plane, a deterministic plan over them, the reference's
    log-probs from the reference actor pool and its cache (or the adapter-off policy), the loss of `loss.type`."""

    name = "uft"
    help = "the offline losses over prepared rows: UFT (default), una_bce, dpo, kto or sft (loss.type)"
    metrics = METRICS

    def check(self, cfg: Config, check_paths: bool) -> list[str]:
        e = Problems()
        check_data(e, cfg, check_paths)  # data.sources, mixture, tokenize, loss, reference
        check_heldout(e, cfg, check_paths)  # eval.sources / eval.holdout: held-out prepared rows
        return list(e)

    def needs_reference(self, cfg: Config) -> bool:
        return cfg.loss.type != "sft"

    def reference_from_cache(self, cfg: Config) -> bool:
        """The reference actor pool scores the prepared rows (before training, or streaming beside it) through the
        cache, unless `reference.mode: adapter_off` (the trainer's own policy with the adapter off) or loss sft."""
        return self.needs_reference(cfg) and cfg.reference.mode == "actor"

    def first_stage_problem(self, cfg: Config) -> str | None:
        return None if cfg.loss.type == "sft" else f"stage 1 must be loss.type sft, got {cfg.loss.type}"

    def run(self, cfg: Config, *, hooks: Any = None, **options: Any) -> Any:
        from uft_ray.uft.driver import run  # the run's parts (the reference scorer imports torch): see above

        return run(cfg, hooks=hooks, **options)

    def summary_line(self, cfg: Config) -> str:
        m = cfg.mixture.counts or {k: f"{v:g}x{cfg.mixture.total}" for k, v in (cfg.mixture.ratios or {}).items()}
        mix = ", ".join(f"{k} {v}" for k, v in m.items())
        beta = f" (beta {cfg.loss.beta:g})" if cfg.needs_reference else ""
        return (
            f"model {cfg.model.path}; loss {cfg.loss.type}{beta}; mixture {mix}; "
            f"{cfg.train.num_workers} {'GPU' if cfg.train.use_gpu else 'CPU'} workers, "
            f"ZeRO-{cfg.train.deepspeed.zero_stage}; run dir {cfg.output.run_dir}"
        )

    def write_report(self, inp: Any) -> str:
        from uft_ray.report.uft import write_uft_report  # the run's parts: see the module docstring

        return write_uft_report(inp)

    def demo_config(self, tiny: bool) -> Path:
        from uft_ray.demo import DEMO_DIR  # the run's parts: see the module docstring

        return DEMO_DIR / ("demo_tiny.yaml" if tiny else "demo.yaml")

    def demo_overrides(self, root: str, tiny: bool) -> list[str]:
        """The model and the two sources: UltraChat rows and HelpSteer2 rows (real instruction rows, or the toy's
        synthetic shards)."""
        from uft_ray.demo import (  # the run's parts: see the module docstring
            ensure_demo_assets,
            ensure_real_demo_assets,
        )

        assets = ensure_demo_assets(root) if tiny else ensure_real_demo_assets(root)
        return [
            f"model.path={assets['model']}",
            f"data.sources.0.path={assets['ultrachat_200k_train']}",
            f"data.sources.1.path={assets['helpsteer2_train']}",
        ]

    def demo_text(self, cfg: Config) -> str:
        return (
            f"reference log-probs by a Ray actor pool, then {cfg.train.num_workers} DeepSpeed worker(s) "
            f"(ZeRO stage {cfg.train.deepspeed.zero_stage}) with LoRA train on the mixed UltraChat + HelpSteer2 rows."
        )

    def demo_checks(self, cfg: Config, root: str) -> int:
        """The held-out before/after table of the formatting instructions (uft_ray.demo.before_after)."""
        from uft_ray.demo import ensure_real_demo_assets  # the run's parts: see the module docstring
        from uft_ray.demo.before_after import instruction_checks  # (likewise)

        return instruction_checks(cfg, ensure_real_demo_assets(root)["heldout"])


methods.register(Uft())
