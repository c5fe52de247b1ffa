"""`uft-ray`: the command line. One typed config (YAML + dotted `key=value` overrides) drives every command.

    uft-ray demo [--tiny]                               the embedded default: SmolLM2-135M, local Ray, a real UFT run
    uft-ray validate CONFIG [--cluster FILE] [k=v ...]  check a config (and that it fits a cluster file); no Ray
    uft-ray prepare CONFIG --out DIR [k=v ...]          data plane only: rows, quarantine, summary (+ reference)
    uft-ray train CONFIG [k=v ...]                      run here: the current Ray cluster or a local one
    uft-ray submit CONFIG --address URL [k=v ...]       run as a Ray job on a cluster
    uft-ray status|logs|stop JOB_ID --address URL       follow a submitted job
    uft-ray report RUN_DIR                              rebuild report.html from metrics.jsonl
    uft-ray eval RUN_DIR|ADAPTER --tasks T[,T...]       benchmarks with lm-evaluation-harness (or --preset uft-paper)
    uft-ray compare RECIPE.yaml [k=v ...]               run every arm of a comparison, then its table
    uft-ray tasks check PATH --task TASK                hint_rft task files: does every row's own answer score 1.0?
    uft-ray evidence NAME [--seeds 0,1,2]               a paper's claim in miniature on CPU: curves, table, plot
    uft-ray models [prepare [SOURCE]]                   the model cache; convert a GGUF model (SmolLM2 by default)

Exit codes: 0 success; 1 the run or job failed (or the cluster could not be reached); 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from uft_ray import compare, driver, methods, storage
from uft_ray.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_error, err
from uft_ray.cli_eval import cmd_eval
from uft_ray.cli_jobs import cmd_logs, cmd_status, cmd_stop, cmd_submit
from uft_ray.cli_models import add_models_parser
from uft_ray.cli_tasks import add_tasks_parser
from uft_ray.cluster_spec import check_file, file_worker_cpus, never_fits, read_cluster_file
from uft_ray.config import Config, ConfigError, load_config
from uft_ray.console import marked, number
from uft_ray.data.prepared import read_summary
from uft_ray.demo import CONFIGS, DEMO_ROOT, demo_config_text, demo_overrides, ensure_demo_assets
from uft_ray.evaluation.presets import PRESETS
from uft_ray.model_gguf import GGUFError
from uft_ray.ray_utils import VERBOSE_ENV, init_ray
from uft_ray.report import write_report
from uft_ray.run_dir import RunDir
from uft_ray.train.plan import read_plan_summary


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


# ---------------------------------------------------------------------------------------------------------
# Commands that run here (the job commands are in uft_ray.cli_jobs, eval in uft_ray.cli_eval)


def _load(args: argparse.Namespace, *, check_paths: bool = True) -> Config:
    return load_config(args.config, args.overrides, check_paths=check_paths)


def _summary_line(cfg: Config) -> str:
    return methods.of(cfg).summary_line(cfg)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args, check_paths=not args.no_check_paths)
    except ConfigError as e:
        return config_error(e, args.config)
    if args.print:
        print(cfg.to_yaml(), end="")
    else:
        print(f"OK: {args.config}")
        print(f"  {_summary_line(cfg)}")
    return _validate_cluster(cfg, args) if args.cluster else EXIT_OK


def _validate_cluster(cfg: Config, args: argparse.Namespace) -> int:
    """`validate --cluster FILE`: the file's nodes, then one line per phase; exit 2 when a phase can never fit."""
    try:
        spec = read_cluster_file(args.cluster)
    except ConfigError as e:
        return config_error(e, args.cluster)
    print(f"cluster {args.cluster} ({spec.kind}):")
    print("".join(f"  {line}\n" for line in spec.lines), end="")
    if (auto := file_worker_cpus(cfg, spec)) is not None:
        print(f"  {auto.why}")
    fits = check_file(cfg, spec)
    print("".join(f"{f.line()}\n" for f in fits), end="")
    if (e := never_fits(fits)) is not None:
        err(f"{args.config} can never run on {args.cluster}:")
        for m in e.messages:
            err(f"  - {m}")
        return EXIT_USAGE
    return EXIT_OK


def _print_result(result: driver.RunResult) -> None:
    print()
    print(f"run finished: {result.run_dir}")
    print(f"  adapter   {result.adapter_dir}")
    print(f"  metrics   {result.metrics_path}")
    print(f"  report    {result.report_path or '(not written: rebuild with `uft-ray report RUN_DIR`)'}")


class _Progress:
    """One line per optimizer step, read from metrics.jsonl (rank 0 writes it) while the driver trains.

    Tailing the file keeps the training loop free of printing and shows the same numbers the report plots. The
    step, the loss, each source's terms and the throughput are every method's; the rest is the method's own
    (`Method.progress`): `method`, or the method whose metric names the row carries (`Method.metrics`).
    """

    def __init__(self, run_dir: str, sources: list[str], poll_s: float = 1.0,
                 method: methods.Method | None = None) -> None:  # fmt: skip
        self.run = RunDir(run_dir)
        self.sources, self.poll_s, self.method = sources, poll_s, method
        self.last = self._steps_in_file()  # a resumed run prints only its new steps
        self.total: int | None = None
        self._first: tuple[int, float] | None = None  # (step, when) of the first step line: the pace for the ETA
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uft-ray-progress", daemon=True)

    def _steps_in_file(self) -> int:
        return max((s for m in self.run.read_metrics() if isinstance(s := m.get("step"), int)), default=0)

    def _total(self) -> int | None:
        if self.total is None and storage.is_file(self.run.plan):
            try:
                self.total = read_plan_summary(self.run.plan).steps
            except Exception:  # the plan is being written, or another format: show the step alone
                return None
        return self.total

    def _method_of(self, m: dict[str, Any]) -> methods.Method | None:
        if self.method is None:
            known = [methods.get(name) for name in methods.names()]
            self.method = next((k for k in known if any(name in m for name in k.metrics)), None)
        return self.method

    def line(self, m: dict[str, Any]) -> str:
        """The step's line from whatever the row holds: a term a config leaves out (hint_rft's `kl` at
        rft.kl_coef 0, `hint_nll` with no hint revealed) or a value that is not a number is left out."""
        total = self._total()
        parts = [f"step {m.get('step')}" + (f"/{total}" if total else "")]
        if (loss := number(m, "loss", ".4f")) is not None:
            parts.append(f"loss {loss}")
        for s in self.sources:
            bits = [s]
            if (v := number(m, f"loss/{s}", ".4f")) is not None:
                bits.append(f"loss {v}")
            if (v := number(m, f"reward/{s}", "+.3f")) is not None:
                bits.append(f"r {v}")
            if (v := number(m, f"mixture/{s}/cumulative", ".2f")) is not None:
                target = number(m, f"mixture/{s}/target", ".2f")
                bits.append(f"share {v}" + (f" (target {target})" if target is not None else ""))
            if len(bits) > 1:
                parts.append(" ".join(bits))
        method = self._method_of(m)
        if method is not None:
            parts += method.progress(m)
        if (v := number(m, "tokens_per_s", ".0f")) is not None:
            parts.append(f"{v} tok/s")
        return marked(" | ".join(p for p in parts if p))

    def eta(self, step: int, now: float) -> str | None:
        """Time left at this run's pace so far, e.g. `eta 3m05s`; None before a second step or a known total."""
        if self._first is None:
            self._first = (step, now)
        total, (s0, t0) = self._total(), self._first
        if not total or step <= s0:
            return None
        left = (now - t0) / (step - s0) * max(0, total - step)
        return f"eta {int(left // 60)}m{int(left % 60):02d}s"

    def _emit(self) -> None:
        """Print the new steps' lines. The display never fails the run it shows: a problem here (a row it does not
        understand, a metrics file it cannot read) is said once on stderr and the run goes on."""
        try:
            for m in self.run.read_metrics():
                step = m.get("step", 0)
                if isinstance(step, int) and step > self.last:
                    self.last = step
                    eta = self.eta(step, time.monotonic())
                    print(self.line(m) + (f" | {eta}" if eta else ""), flush=True)
        except Exception as e:
            if not self._warned:
                self._warned = True
                err(f"warning: the progress line failed ({type(e).__name__}: {e}); the run goes on")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._emit()

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._emit()


@contextlib.contextmanager
def _verbose(on: bool) -> Iterator[None]:
    """`--verbose`: Ray's own output (progress bars, Ray Data's banners) stays, for this command only."""
    before = os.environ.get(VERBOSE_ENV)
    if on:
        os.environ[VERBOSE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = before


def _run(cfg: Config, verbose: bool = False) -> int:
    try:
        sources = [src.name for src in cfg.data.sources]
        with _verbose(verbose), _Progress(cfg.output.run_dir, sources, method=methods.of(cfg)):
            result = driver.run(cfg)
    except KeyboardInterrupt:
        err("interrupted; rerun the same command to resume from the last checkpoint")
        return 130
    except ConfigError as e:  # checks the driver can only make once it sees the data or the cluster
        return config_error(e)
    except Exception as e:
        traceback.print_exc()
        err(f"run failed: {type(e).__name__}: {e}")
        return EXIT_FAILED
    _print_result(result)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as e:
        return config_error(e, args.config)
    print(f"uft-ray train: {_summary_line(cfg)}", flush=True)
    return _run(cfg, args.verbose)


def cmd_demo(args: argparse.Namespace) -> int:
    raw = yaml.safe_load(demo_config_text(args.method, tiny=args.tiny))
    root = args.out or DEMO_ROOT
    extra = [f"output.storage_path={os.path.join(os.path.expanduser(args.out), 'runs')}"] if args.out else []
    try:
        load_config(raw, list(args.overrides), check_paths=False)  # a bad override fails before the assets are made
    except ConfigError as e:
        return config_error(e, "demo config")
    t0 = time.monotonic()
    what_assets = "the tiny model and sample shards" if args.tiny else "the sample shards and the packaged SmolLM2"
    print(f"uft-ray demo: making {what_assets} under {os.path.expanduser(root)} ...", flush=True)
    try:
        overrides = demo_overrides(root, args.method, tiny=args.tiny) + extra + list(args.overrides)
        cfg = load_config(raw, overrides)
    except ConfigError as e:
        return config_error(e, "demo config")
    except GGUFError as e:
        err(str(e))
        return EXIT_USAGE
    method = methods.of(cfg)
    what = f"  {method.demo_text(cfg)}"
    print(
        f"  ready in {time.monotonic() - t0:.0f} s.\n"
        f"uft-ray demo: a real {cfg.method} run on a local Ray cluster: {_summary_line(cfg)}\n{what}\n"
        "  The first run on a machine JIT-builds a DeepSpeed op (about 100 s) and converts the GGUF model (about 30 s).",
        flush=True,
    )
    rc = _run(cfg, args.verbose)
    if rc == EXIT_OK and not args.tiny:
        rc = method.demo_checks(cfg, root)
    if rc == EXIT_OK:
        print(f"demo done in {time.monotonic() - t0:.0f} s. Open the report in a browser; rerun with "
              "`uft-ray demo train.max_steps=...` or any other key=value override.")  # fmt: skip
    return rc


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as e:
        return config_error(e, args.config)
    from uft_ray.data.pipeline import prepare  # imports Ray (Ray Data): only for this command
    from uft_ray.uft.driver import write_prepared_key  # imports the reference scorer (torch): likewise

    out = args.out if storage.is_remote(args.out) else os.path.abspath(os.path.expanduser(args.out))
    try:
        init_ray(cfg.ray)
        summary = prepare(cfg, out)
        write_prepared_key(cfg, out)  # a run given these rows checks they were made for its config
        if cfg.reference_from_cache and cfg.reference.run == "precompute":
            from uft_ray.reference import attach_reference  # imports the reference scorer (torch)

            attach_reference(cfg, out)
            summary = read_summary(out)
    except ConfigError as e:
        return config_error(e, args.config)
    except Exception as e:
        traceback.print_exc()
        err(f"prepare failed: {type(e).__name__}: {e}")
        return EXIT_FAILED
    print(json.dumps(summary, indent=2, default=str))
    print(f"prepared rows in {out}/rows, quarantine in {out}/quarantine, summary in {out}/summary.json")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        recipe = compare.load_recipe(args.recipe, list(args.overrides), check_paths=not args.demo_assets)
    except ConfigError as e:
        return config_error(e, args.recipe)
    if args.demo_assets:  # the demo recipe points at the demo's tiny model and shards: make them first
        ensure_demo_assets()
        try:
            recipe = compare.load_recipe(args.recipe, list(args.overrides))
        except ConfigError as e:
            return config_error(e, args.recipe)
    only = [a.strip() for a in (args.only or "").split(",") if a.strip()]
    unknown = [a for a in only if a not in {arm.name for arm in recipe.arms}]
    if unknown:
        err(f"--only: no arm named {', '.join(unknown)} (arms: {', '.join(a.name for a in recipe.arms)})")
        return EXIT_USAGE
    print(f"uft-ray compare {recipe.name}: {len(recipe.arms)} arms ({', '.join(a.name for a in recipe.arms)}); "
          f"runs and tables in {recipe.out_dir}", flush=True)  # fmt: skip
    try:
        compare.run_arms(recipe, only or None)
        paths = compare.write_tables(recipe)
    except ConfigError as e:
        return config_error(e, args.recipe)
    except Exception as e:
        traceback.print_exc()
        err(f"compare failed: {type(e).__name__}: {e} (rerun: finished arms are not run again)")
        return EXIT_FAILED
    print(Path(paths["md"]).read_text(), flush=True)
    print(f"tables: {paths['md']}, {paths['html']}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    if not storage.is_dir(args.run_dir):
        err(f"{args.run_dir}: not a directory (give a run directory: {{output.storage_path}}/{{output.run_name}})")
        return EXIT_USAGE
    if not storage.is_file(RunDir(args.run_dir).metrics):
        err(f"warning: {args.run_dir} has no metrics yet; the report will have empty plots")
    print(write_report(args.run_dir))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# Parser


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="keep Ray's own output (Ray Data progress bars and banners); default: uft-ray's lines, "
                   "warnings and errors")  # fmt: skip


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray dashboard URL, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, "
        "else http://127.0.0.1:8265). The token in RAY_AUTH_TOKEN / ~/.ray/auth_token is sent when present.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uft-ray",
        formatter_class=_Formatter,
        description="Unified fine-tuning (UFT: SFT + alignment in one stage) on Ray.",
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, epilog="examples:\n" + epilog, formatter_class=_Formatter
        )

    p = add("train", "run a config to completion here (the current Ray cluster, or a local one)",
            "  uft-ray train jobs/configs/demo.yaml train.max_steps=4\n"
            "  RAY_ADDRESS=auto uft-ray train jobs/configs/mistral7b_uft.yaml output.run_name=try2\n"
            "  (rerunning the same config and run_name resumes from the last checkpoint)")  # fmt: skip
    _add_config(p)
    _add_verbose(p)
    p.set_defaults(fn=cmd_train)

    p = add("prepare", "data plane only: read, normalize, mix, tokenize (+ reference log-probs) into DIR",
            "  uft-ray prepare jobs/configs/demo.yaml --out /tmp/prep\n"
            "  uft-ray prepare my.yaml --out /tmp/prep mixture.counts.ultrachat=1000 reference.run=stream")  # fmt: skip
    _add_config(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (rows/, quarantine/, summary.json)")
    p.set_defaults(fn=cmd_prepare)

    p = add("validate", "check a config and print OK or one line per problem (exit 2); no cluster work",
            "  uft-ray validate jobs/configs/demo.yaml\n"
            "  uft-ray validate jobs/configs/qwen25_32b_uft.yaml --no-check-paths   # paths live on the cluster\n"
            "  uft-ray validate my.yaml loss.type=dpo --print                     # the resolved config\n"
            "  uft-ray validate jobs/configs/qwen25_32b_uft.yaml --no-check-paths --cluster infra/cluster.yaml")  # fmt: skip
    _add_config(p)
    p.add_argument("--no-check-paths", action="store_true", help="skip checking that data/model paths exist here")
    p.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    p.add_argument("--cluster", metavar="FILE", help="also check that every phase of the run fits this cluster, "
                   "offline: a Ray cluster-launcher YAML or a KubeRay RayCluster / RayJob manifest")  # fmt: skip
    p.set_defaults(fn=cmd_validate)

    p = add("demo", "the embedded default: SmolLM2-135M-Instruct + sample shards, local Ray, a real UFT run on CPU",
            "  uft-ray demo\n"
            "  uft-ray demo --out /tmp/uft-demo train.max_steps=4\n"
            "  uft-ray demo loss.type=una_bce output.run_name=demo-una\n"
            "  uft-ray demo --method hint_rft train.max_steps=4")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the demo config")
    p.add_argument("--method", choices=list(CONFIGS), default="uft",
                   help="; ".join(f"{m}: {methods.get(m).help}" for m in CONFIGS))  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="the tiny random-init Qwen2 and synthetic shards instead of SmolLM2 (seconds a step)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help=f"where the tiny assets and runs/ go (default: assets in {DEMO_ROOT}, "
                   "the run in ./runs/demo)")  # fmt: skip
    _add_verbose(p)
    p.set_defaults(fn=cmd_demo)

    p = add("submit", "submit a config as a Ray job (validated here first); follows its logs unless --no-wait",
            "  uft-ray submit jobs/configs/demo.yaml --address http://127.0.0.1:8265\n"
            "  uft-ray submit jobs/configs/mistral7b_uft.yaml --address http://head:8265 \\\n"
            "      --runtime-env infra/runtime_env.yaml --env HF_TOKEN --no-wait output.storage_path=/shared/runs")  # fmt: skip
    _add_config(p)
    _add_address(p)
    p.add_argument("--working-dir", help="directory shipped to the job (default: the runtime env's, else .)")
    p.add_argument("--runtime-env", metavar="FILE", help="runtime_env YAML merged in (e.g. infra/runtime_env.yaml)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="copy this environment variable (e.g. HF_TOKEN) into the job; repeatable; never logged")  # fmt: skip
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="gitignore-style pattern left out of the upload; repeatable")  # fmt: skip
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="pack a secret-bearing name (.env, *.pem, .aws/, wandb/, ...) anyway; repeatable")  # fmt: skip
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    _add_verbose(p)
    p.set_defaults(fn=cmd_submit)

    p = add("status", "print a job's status", "  uft-ray status raysubmit_XYZ --address http://head:8265")
    p.add_argument("job_id", metavar="JOB_ID")
    _add_address(p)
    p.set_defaults(fn=cmd_status)

    p = add("logs", "print (or --follow) a job's logs",
            "  uft-ray logs raysubmit_XYZ --follow --address http://head:8265")  # fmt: skip
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 1 if it failed")
    _add_address(p)
    p.set_defaults(fn=cmd_logs)

    p = add("stop", "stop a running job", "  uft-ray stop raysubmit_XYZ --address http://head:8265 --wait")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.add_argument("--timeout", type=float, default=120, help="seconds --wait waits (default 120)")
    _add_address(p)
    p.set_defaults(fn=cmd_stop)

    p = add("report", "rebuild RUN_DIR/report.html (PNG plots) from metrics.jsonl",
            "  uft-ray report runs/demo")  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(fn=cmd_report)

    p = add("compare", "the paper's comparison in one command: every arm of a recipe, evaluated the same way, tabled",
            "  uft-ray compare jobs/configs/compare_demo.yaml --demo-assets\n"
            "  uft-ray compare jobs/configs/compare_paper.yaml --only sft,uft")  # fmt: skip
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every config of every arm")
    p.add_argument("--only", metavar="ARM[,ARM...]", help="run only these arms (the table still has every arm)")
    p.add_argument("--demo-assets", action="store_true", help="first make the demo's tiny model and shards")
    p.set_defaults(fn=cmd_compare)

    p = add("evidence", "a small CPU experiment per seed paper, seeded and repeated: curves, table, plot "
            "(uft_ray/evidence.py; `uft-ray evidence hints --help`)",
            "  uft-ray evidence hints --results docs/results.md\n"
            "  uft-ray evidence hints --seeds 0 --steps 20 --arms uft,rft")  # fmt: skip
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="NAME [OPTIONS]")
    p.set_defaults(fn=cmd_evidence)

    p = add("eval", "benchmarks with lm-evaluation-harness on base + adapter, in Ray actors (one per GPU)",
            "  uft-ray eval runs/demo --tasks my_task --include-path tasks/ --limit 8\n"
            "  uft-ray eval /shared/runs/mistral7b-uft --preset uft-paper --address auto\n"
            "  uft-ray eval runs/x/checkpoints/checkpoint_000100/adapter --tasks gsm8k,arc_challenge --num-fewshot 5\n"
            "  (results: RUN_DIR/eval/, or ADAPTER/eval/: lm_eval's JSON per task and summary.json)")  # fmt: skip
    p.add_argument(
        "target", metavar="RUN_DIR|ADAPTER", help="a run directory (config.yaml + adapter/) or a peft adapter"
    )
    p.add_argument("--tasks", metavar="NAME[,NAME...]", help="lm_eval tasks, groups or tags, comma-separated")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named protocol: its tasks with their shots "
                   "(uft-paper: the paper's, no chat template); with --tasks, only those of its tasks")  # fmt: skip
    p.add_argument("--include-path", metavar="DIR", help="a folder of lm_eval task YAMLs (as lm_eval's CLI calls it)")
    p.add_argument("--limit", type=float, metavar="N", help="at most N docs per task (a fraction if < 1); for checks")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="shots for every task (default: each task's own)")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto",
                   help="lm_eval model: hf (transformers + peft) or vllm; auto: vllm on GPU where installed")  # fmt: skip
    p.add_argument("--gpus", type=int, metavar="N", help="GPU actors (default: the cluster's GPUs, at most one per "
                   "task; 0: one CPU actor)")  # fmt: skip
    p.add_argument("--batch-size", metavar="B", help="lm_eval batch size (default: auto on GPU, 8 on CPU)")
    p.add_argument("--base", metavar="PATH", help="base model, instead of the one the run or adapter names")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (never taken "
                   "from a run directory's config.yaml)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="results folder (default: RUN_DIR/eval or ADAPTER/eval)")
    p.add_argument("--log-samples", action="store_true", help="also write samples_{task}.jsonl (per-doc records)")
    p.add_argument("--offline", action="store_true", help="no hub access (default: offline when the hub is "
                   "unreachable or HF_HUB_OFFLINE is set); missing datasets then fail at once")  # fmt: skip
    p.add_argument("--address", help="Ray cluster to run in, as ray.init takes it (auto, HOST:6379, ray://HOST:10001;"
                   " default: RAY_ADDRESS, else a local Ray)")  # fmt: skip
    p.set_defaults(fn=cmd_eval)

    p = add("tasks", "hint_rft task files: `check` scores every row's own answer (exit 0 when all score 1.0)",
            "  uft-ray tasks check data/countdown/train.parquet --task countdown\n"
            "  uft-ray tasks check s3://bucket/kk/test.parquet --task knights_knaves --rules strict")  # fmt: skip
    add_tasks_parser(p)

    p = add("models", "the model cache: list it, or `prepare` a GGUF model (the packaged SmolLM2 by default)",
            "  uft-ray models\n"
            "  uft-ray models prepare\n"
            "  uft-ray models prepare ~/models/Qwen2.5-0.5B-Instruct-Q8_0.gguf")  # fmt: skip
    add_models_parser(p)
    return parser


def cmd_evidence(args: argparse.Namespace) -> int:
    from uft_ray import evidence  # its experiments import torch: only for this command

    return evidence.main(list(args.args))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`submit cfg.yaml --address X a=1`): argparse leaves those in `extra`.
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 on bad usage
    try:
        return int(args.fn(args))
    except BrokenPipeError:  # `uft-ray ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
