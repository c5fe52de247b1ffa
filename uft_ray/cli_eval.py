"""`uft-ray eval`: lm-evaluation-harness benchmarks on base + adapter, in Ray actors (`uft_ray.evaluation`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from uft_ray.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, err
from uft_ray.config import RayConfig
from uft_ray.console import say
from uft_ray.evaluation import harness
from uft_ray.evaluation.harness import EvalError, TaskSpec
from uft_ray.evaluation.presets import PRESETS
from uft_ray.evaluation.worker import run_eval
from uft_ray.ray_utils import init_ray


def _eval_specs(args: argparse.Namespace) -> tuple[list[Any], str | None]:
    """The tasks to run with their shots, from --tasks / --preset / --num-fewshot; EvalError on a bad mix."""
    names = list(dict.fromkeys(t.strip() for t in (args.tasks or "").split(",") if t.strip()))
    if not args.preset:
        if not names:
            raise EvalError("give --tasks NAME[,NAME...] or --preset NAME")
        return [TaskSpec(n, args.num_fewshot) for n in names], None
    if args.num_fewshot is not None:
        raise EvalError(f"--num-fewshot: preset {args.preset} fixes the shots of each task")
    preset = PRESETS[args.preset]
    outside = [n for n in names if preset.task(n) is None]
    if outside:
        raise EvalError(
            f"not in preset {args.preset}: {', '.join(outside)} (its tasks: {', '.join(t.task for t in preset.tasks)})"
        )
    chosen = [t for t in preset.tasks if not names or t.task in names]  # --tasks with --preset: a subset of it
    return [TaskSpec(t.task, t.num_fewshot) for t in chosen], preset.name


def _eval_line(outcome: dict[str, Any]) -> None:
    if not outcome["ok"]:
        say(f"eval failed: {outcome['error']}", err=True)
        return
    metrics = outcome["results"].get("results", {}).get(outcome["task"], {})
    shown = "  ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "," in k and "_stderr" not in k
    )
    say(f"eval {outcome['task']}: {shown or '(see its JSON)'} ({outcome['seconds']:.1f} s)")


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        target = harness.resolve_target(
            args.target, base=args.base, out_dir=args.out, trust_remote_code=args.trust_remote_code
        )
        specs, preset = _eval_specs(args)
        include = os.path.abspath(os.path.expanduser(args.include_path)) if args.include_path else None
        harness.check_tasks([s.task for s in specs], harness.task_manager(include, [s.task for s in specs]))
        if args.limit is not None and args.limit <= 0:
            raise harness.EvalError(f"--limit {args.limit:g}: give a count (N >= 1) or a fraction (0 < f < 1)")
    except harness.EvalError as e:
        err(f"eval: {e}")
        return EXIT_USAGE

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    adapter = target.adapter or "(none)"
    print(f"uft-ray eval: {len(specs)} task(s) on {target.base} + adapter {adapter}; results in {target.out_dir}")
    try:
        init_ray(RayConfig(address=args.address))
        report = run_eval(
            target,
            specs,
            include_path=include,
            limit=limit,
            log_samples=args.log_samples,
            apply_chat_template=PRESETS[preset].apply_chat_template if preset else False,
            backend=args.backend,
            gpus=args.gpus,
            offline=True if args.offline else None,
            batch_size=int(args.batch_size) if (args.batch_size or "").isdigit() else args.batch_size,
            preset=preset,
            on_result=_eval_line,
        )
    except harness.EvalError as e:
        err(f"eval: {e}")
        return EXIT_USAGE
    except Exception as e:  # the cluster could not be reached, an actor could not be placed
        err(f"eval failed: {type(e).__name__}: {harness.one_line(e)}")
        return EXIT_FAILED
    if report.fatal:
        err(f"eval failed: {report.fatal}")
        return EXIT_FAILED
    for name, d in report.summary.get("derived", {}).items():
        print(f"  {name} {d['value']:.4f} (mean of {', '.join(d['mean_of'])})")
    n_failed = len(report.failed)
    print(f"eval done: {len(specs) - n_failed} of {len(specs)} task(s); summary in {target.out_dir}/summary.json")
    return EXIT_OK if report.ok else EXIT_FAILED
