"""Evidence in miniature: a small CPU experiment per seed paper, seeded and repeated, with a plot and a
table for docs/results.md. `uft-ray evidence NAME` runs one:

    uft-ray evidence hints        # Liu et al.: hints rescue RL where plain RL gets no reward
    uft-ray evidence forgetting   # Wang et al.: one stage forgets less than SFT then alignment

`hints` trains the demo's tiny random-init model on a toy it cannot solve by chance (uft_ray/tasks/toy.py) four
ways from the same start, each arm a real run (Ray, DeepSpeed, rollout actors, the verifier process):
`uft` (hint-guided RFT on the cosine schedule), `rft` (no hints), `sft` (the NLL of whole answers) and
`sft_then_rft` (SFT for half the steps, then RFT from its adapter). `sft_then_rft`'s SFT half is the `sft` arm's
first half: it branches from that run's checkpoint at half the steps instead of training the same steps again (a
constant learning rate and a plan whose first steps do not depend on its length make them the same computation:
the separate stage-1 runs this replaced had bit-identical losses and evaluations to step 120, 3 seeds). Its metric
is held-out accuracy: greedy answers to prompts no training row has, without hints (`eval/accuracy`), every
`eval.every` steps. Each arm runs under every seed (`train.seed` and `data.seed`: the LoRA start, the prompt
order, the hints and the rollouts).

The same command runs the two papers' claims on the real model, SmolLM2-135M-Instruct (the demo's packaged GGUF):

    uft-ray evidence hints-real        # Liu et al. on three-number sums (uft_ray/tasks/sum3.py): the four arms above
    uft-ray evidence forgetting-real   # Wang et al.: base, sft, sft -> dpo, sft -> una, uft-mix (uft_ray/evidence_real.py)

`forgetting` runs the compare recipe jobs/evidence/forgetting.yaml under every seed on the toy data of
uft_ray/tasks/toy.py (`write_forgetting_data`): a skill taught by SFT (held-out NLL, `eval/nll/skill`) and
alignment data that prefers another answer to a look-alike prompt (held-out pair accuracy,
`eval/pair_accuracy/align_pairs`); arms sft, sft-dpo, sft-uft (stage 2 continuing the SFT run) and uft-mix (one
stage). A two-stage arm's curve runs on through its stage 2, its steps counted on from stage 1's.

Outputs, under `--out` (default `runs/evidence/NAME`): every run's directory, `{name}.json` (each metric's curve per
arm and seed), `{name}.png` (a panel per metric: the mean over seeds, the band from the lowest to the highest seed)
and `{name}.md` (each metric's final value per arm: mean, spread, per seed). `--results docs/results.md` also
replaces that file's section between `<!-- evidence:{name} -->` and `<!-- /evidence:{name} -->` with the table and
the plot, copied beside it. `--set KEY=VALUE` (repeatable) overrides a config value in every stage of every arm, after the recipe's and
the arm's own values (`--set loss.beta=0.01`: the paper's beta everywhere); without `--out` such a run goes to
`runs/evidence/NAME@KEY=VALUE,...` and `--results` writes the section `NAME@KEY=VALUE,...`, so it sits beside the
recipe's own and never resumes or overwrites its runs. `--jobs N` (default 1) runs N seeds at once, each in a process of its own with its own
local Ray (`{out}/logs/seed{S}.log`): for machines with cores to spare. A seed's curves are the same either way
(seeds 0 and 1 of `hints` side by side gave exactly the curves they give in turn), but on 2 cores two at a time
is slower (8.8 min for the pair against 8.0 in turn): a run is not one core's work, Ray's processes take their
share, and most of a toy run is its ~20 s of start-up (fresh processes importing torch, transformers, DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from uft_ray import compare, driver, evidence_real
from uft_ray.config import Config, ConfigError, load_config, validate
from uft_ray.demo import ensure_demo_assets, ensure_real_demo_assets
from uft_ray.run_dir import CHECKPOINT_ADAPTER, RunDir, read_metrics
from uft_ray.tasks import sum3, toy

RECIPES = {
    "hints": "jobs/evidence/hints.yaml",
    "forgetting": "jobs/evidence/forgetting.yaml",
    "hints-real": "jobs/evidence/hints_real.yaml",
    "forgetting-real": "jobs/evidence/forgetting_real.yaml",
}
METRICS = {
    "hints": {"eval/accuracy": "held-out accuracy (greedy, no hints)"},
    "hints-real": {"eval/accuracy": "held-out accuracy (greedy, no hints)",
                   "reward/mean": "training reward (uft: with the hint shown)"},
    "forgetting": {"eval/nll/skill": "skill: held-out NLL per token", "eval/pair_accuracy/align_pairs":
                   "alignment: held-out pair accuracy"},
}  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent

N_TRAIN, N_EVAL = 140, 60  # of the 200 (verb, digit) prompts: held-out prompts are pairs no training row has
SUM3_TRAIN, SUM3_EVAL = 240, 24  # hints-real: the hint_rft demo's triples (uft_ray/tasks/sum3.py)
# arm: its overrides of the recipe
HINT_ARMS: dict[str, list[str]] = {
    "uft": ["rft.hint.mode=cosine"],
    "rft": ["rft.hint.mode=rft"],
    "sft": ["rft.objective=sft"],
    "sft_then_rft": ["rft.hint.mode=rft"],
}
# arm: the arm whose run it continues from half the steps, on its own overrides for the rest
BRANCHES = {"sft_then_rft": "sft"}


def _sft_batch(prompts_per_step: int, workers: int) -> list[str]:
    # sft trains one sequence per prompt: its micro-batches hold a rank's prompts of the step
    return [f"train.micro_batch_size={prompts_per_step // workers}", "train.grad_accum=1"]


def hint_configs(
    recipe: str,
    out: Path,
    seed: int,
    steps: int | None,
    model: str,
    files: dict[str, str],
    rl_lr: float | None = None,
    sets: list[str] | None = None,
) -> dict[str, list[Config]]:
    """Every arm's stage configs under `seed`: {arm: [Config, ...]}; `rl_lr`: the learning rate of every RL stage
    (uft, rft, sft_then_rft's second), the SFT stages keeping the recipe's; `sets`: dotted overrides of every
    stage, applied last (they win over the arm's own). A branching arm's stages are the arm
    it branches from (the same run, checkpointed at half the steps) and its own run from that checkpoint's
    adapter for the other half (paths checked when it starts: the checkpoint is written by the first stage)."""
    common = [
        f"model.path={model}", f"rft.path={files['train']}", f"rft.eval_path={files['eval']}",
        f"train.seed={seed}", f"data.seed={seed}", f"output.storage_path={out / 'runs'}",
    ]  # fmt: skip
    sets = list(sets or [])
    base = load_config(recipe, [*common, *sets])
    total = steps or base.train.max_steps
    half = total // 2

    def overrides(arm: str) -> list[str]:
        extra = list(HINT_ARMS[arm])
        if "rft.objective=sft" in extra:
            extra += _sft_batch(base.rft.prompts_per_step, base.train.num_workers)
        elif rl_lr is not None:
            extra += [f"train.lr={rl_lr}"]
        return extra

    arms: dict[str, list[Config]] = {}
    for arm in HINT_ARMS:
        if arm in BRANCHES:
            continue
        save_half = [f"train.checkpoint_every={half}"] if arm in BRANCHES.values() and half else []
        name = f"output.run_name=hints-{arm}-s{seed}"
        stage = [*common, *overrides(arm), *save_half, f"train.max_steps={total}", name, *sets]
        arms[arm] = [load_config(recipe, stage)]
    for arm, parent in BRANCHES.items():
        first = arms[parent][0]
        adapter = str(Path(RunDir(first.output.run_dir).checkpoint(half)) / CHECKPOINT_ADAPTER)
        rest = [f"train.max_steps={total - half}", f"output.run_name=hints-{arm}-s{seed}",
                f"model.adapter={adapter}", f"reference.adapter={adapter}"]  # fmt: skip
        arms[arm] = [first, load_config(recipe, [*common, *overrides(arm), *rest, *sets], check_paths=False)]
    return {arm: arms[arm] for arm in HINT_ARMS}


def _points(run_dir: str, metric: str, offset: int, steps: int) -> list[tuple[int, float]]:
    return [
        (int(r["step"]) + offset, float(r[metric]))
        for r in read_metrics(str(Path(run_dir) / "metrics.jsonl"))
        if r.get(metric) is not None and int(r["step"]) <= steps
    ]


def stage_curve(stages: list[tuple[str, int]], metric: str) -> list[tuple[int, float]]:
    """One curve through an arm's stages [(run_dir, steps)]: a stage's points up to its `steps` (a branch's first
    stage is a longer run), a later stage's steps counted on from the earlier stages' (its step-0 evaluation is
    the previous stage's last model: kept once)."""
    curve: list[tuple[int, float]] = []
    offset = 0
    for run_dir, steps in stages:
        points = _points(run_dir, metric, offset, steps)
        curve += [p for p in points if not curve or p[0] > curve[-1][0]]
        offset += steps
    return curve


def run_hints(
    out: Path,
    seeds: list[int],
    steps: int | None,
    recipe: str,
    assets_root: str | None,
    arms: list[str] | None = None,
    rl_lr: float | None = None,
    write_data: bool = True,
    sets: list[str] | None = None,
    real: bool = False,
) -> dict:
    """Run every arm under every seed (a finished run is not rerun: the driver resumes it); the curves.
    `write_data` False: the task files are already in `out` (a seed's process of `--jobs`). `real`: Experiment L,
    SmolLM2-135M-Instruct on three-number sums (uft_ray/tasks/sum3.py) instead of the tiny model on the toy."""
    ensure = ensure_real_demo_assets if real else ensure_demo_assets
    assets = ensure(assets_root) if assets_root else ensure()
    task = sum3 if real else toy
    train, held = sum3.generate(SUM3_TRAIN, SUM3_EVAL, seed=0) if real else toy.generate(N_TRAIN, N_EVAL, seed=0)
    files = {"train": str(out / "task" / "train.jsonl"), "eval": str(out / "task" / "eval.jsonl")}
    if write_data:
        task.write(train, files["train"])
        task.write(held, files["eval"])
    arms = arms or list(HINT_ARMS)
    name = "hints-real" if real else "hints"
    metrics = list(METRICS[name])
    curves: dict[str, dict[str, dict[str, list[tuple[int, float]]]]] = {m: {arm: {} for arm in arms} for m in metrics}
    seconds: dict[str, float] = {}
    for seed in seeds:
        ran: dict[str, str] = {}  # run name: its directory, each run once (a branch's first stage is its parent)
        for arm, stages in hint_configs(recipe, out, seed, steps, assets["model"], files, rl_lr, sets).items():
            if arm not in arms:
                continue
            t0 = time.monotonic()
            for cfg in stages:
                if cfg.output.run_name not in ran:
                    problems = validate(cfg)  # a branch's checkpoint exists now
                    if problems:
                        raise ConfigError(problems)
                    ran[cfg.output.run_name] = driver.run(cfg).run_dir
            shares = [c.train.max_steps for c in stages]
            if arm in BRANCHES:  # the parent's run counts up to the branch point: where the second stage starts
                shares[0] -= shares[1]
            done = [(ran[c.output.run_name], n) for c, n in zip(stages, shares, strict=True)]
            for metric in metrics:
                curves[metric][arm][str(seed)] = stage_curve(done, metric)
            seconds[f"{arm}/s{seed}"] = round(time.monotonic() - t0, 1)
    return {"name": name, "seeds": seeds, "metrics": curves, "seconds": seconds,
            "n_train": len(train), "n_eval": len(held)}  # fmt: skip


def run_forgetting(
    out: Path,
    seeds: list[int],
    steps: int | None,
    recipe: str,
    assets_root: str | None,
    arms: list[str] | None,
    write_data: bool = True,
    sets: list[str] | None = None,
) -> dict:
    """The compare recipe under every seed, on the toy data (written once), its table per seed
    (`{out}/runs/seed{S}/compare.md`); each metric's curves. `steps`: every stage's `train.max_steps`; `sets`:
    dotted overrides of every stage of every arm."""
    assets = ensure_demo_assets(assets_root) if assets_root else ensure_demo_assets()
    data = out / "data"
    if write_data:
        toy.write_forgetting_data(data)
    metrics = METRICS["forgetting"]
    result: dict[str, Any] = {"name": "forgetting", "seeds": seeds, "metrics": {m: {} for m in metrics}, "seconds": {}}
    for seed in seeds:
        rec = forgetting_recipe(out, seed, recipe, data, assets["model"], steps, sets)
        rec.arms = [a for a in rec.arms if not arms or a.name in arms]
        t0 = time.monotonic()
        compare.run_arms(rec)
        compare.write_tables(rec)
        result["seconds"][f"s{seed}"] = round(time.monotonic() - t0, 1)
        for arm in rec.arms:
            done = [(c.output.run_dir, _steps(c.output.run_dir)) for c in arm.stages]
            for m in metrics:
                result["metrics"][m].setdefault(arm.name, {})[str(seed)] = stage_curve(done, m)
    return result


def forgetting_recipe(
    out: Path, seed: int, recipe: str, data: Path, model: str, steps: int | None, sets: list[str] | None = None
) -> Any:
    """One seed's compare recipe (uft_ray.compare.Recipe, every arm's configs checked). The seed's recipe is
    written as a file (the data's paths filled in, its own storage path): `uft-ray compare` on it with the same
    overrides resumes or extends this seed's runs. `sets` come after the seed's own overrides: they win."""
    folder = out / f"recipe-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    base = Path(recipe).with_name(Path(recipe).stem + "_base.yaml")
    (folder / base.name).write_text(base.read_text().replace("${DATA}", str(data)))
    raw = yaml.safe_load(Path(recipe).read_text().replace("${DATA}", str(data)))
    raw["storage_path"] = str(out / "runs" / f"seed{seed}")
    (folder / Path(recipe).name).write_text(yaml.safe_dump(raw, sort_keys=False))
    overrides = [f"model.path={model}", f"train.seed={seed}", f"data.seed={seed}"]
    overrides += [f"train.max_steps={steps}"] if steps else []
    return compare.load_recipe(folder / Path(recipe).name, [*overrides, *(sets or [])])


def variant(name: str, sets: list[str]) -> str:
    """The experiment's name with its `--set` overrides (`forgetting@loss.beta=0.01`): its default folder and its
    section of the results file, so a variant never shares runs with the recipe as written."""
    if not sets:
        return name
    return name + "@" + re.sub(r"[^A-Za-z0-9._=+,-]", "_", ",".join(sets))


def _steps(run_dir: str) -> int:
    return max((int(r["step"]) for r in read_metrics(str(Path(run_dir) / "metrics.jsonl"))), default=0)


def final_table(result: dict[str, Any], metric: str, label: str) -> str:
    """Markdown: per arm, the metric's final value: mean, spread (min to max) and each seed's."""
    seeds = [str(s) for s in result["seeds"]]
    lines = [f"| arm | final {label}: mean | min - max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]  # fmt: skip
    for arm, per_seed in result["metrics"][metric].items():
        finals = [per_seed[s][-1][1] for s in seeds if per_seed.get(s)]
        if not finals:
            continue
        cells = " | ".join(f"{per_seed[s][-1][1]:.3f}" if per_seed.get(s) else "-" for s in seeds)
        lines.append(f"| {arm} | {statistics.mean(finals):.3f} | {min(finals):.3f} - {max(finals):.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, labels: dict[str, str]) -> None:
    """A panel per metric: the mean over seeds per arm against steps, the band from the lowest to the highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(labels), figsize=(6.4 * len(labels), 4.0), dpi=110, squeeze=False)
    for ax, (metric, label) in zip(axes[0], labels.items(), strict=True):
        for arm, per_seed in result["metrics"][metric].items():
            runs = [dict((int(s), v) for s, v in c) for c in per_seed.values() if c]
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(r) for r in runs)))
            values = [[r[s] for r in runs] for s in steps]
            ax.plot(steps, [statistics.mean(v) for v in values], label=arm, marker="o", markersize=3)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if "accuracy" in metric:
            ax.set_ylim(-0.02, 1.02)
        ax.legend()
    title = variant(result["name"], result.get("sets") or []).replace("@", " ")
    fig.suptitle(f"{title}: {len(result['seeds'])} seeds (mean; band: lowest to highest seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_section(results_md: Path, name: str, body: str) -> None:
    """Replace the section between `<!-- evidence:NAME -->` and `<!-- /evidence:NAME -->` (appended if absent)."""
    start, end = f"<!-- evidence:{name} -->", f"<!-- /evidence:{name} -->"
    text = results_md.read_text() if results_md.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(text)


def merge(parts: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One result from the per-seed results of `--jobs`: every metric's curves and every run's seconds."""
    result: dict[str, Any] = {k: v for k, v in parts[0].items() if k not in ("metrics", "seconds", "seeds")}
    result |= {"seeds": seeds, "metrics": {}, "seconds": {}}
    for part in parts:
        result["seconds"] |= part["seconds"]
        for metric, arms in part["metrics"].items():
            for arm, curves in arms.items():
                result["metrics"].setdefault(metric, {}).setdefault(arm, {}).update(curves)
    return result


def fan_out(name: str, seeds: list[int], jobs: int, out: Path, passthrough: list[str]) -> dict[str, Any]:
    """Each seed in a process of its own (its own local Ray), `jobs` at a time. A seed's output goes to
    `{out}/logs/seed{S}.log`; a failed seed fails the whole experiment, naming its log."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    todo, running, failed = list(seeds), [], []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                seed = todo.pop(0)
                log = open(out / "logs" / f"seed{seed}.log", "w")  # noqa: SIM115 - closed when the process ends
                cmd = [sys.executable, "-m", "uft_ray.evidence", name, "--seeds", str(seed), "--out", str(out)]
                proc = subprocess.Popen([*cmd, "--part", *passthrough], stdout=log, stderr=subprocess.STDOUT)
                running.append((seed, log, proc))
                print(f"[uft-ray] evidence {name}: seed {seed} started (log {log.name})", flush=True)
            time.sleep(1.0)
            for entry in list(running):
                seed, log, proc = entry
                if proc.poll() is not None:
                    running.remove(entry)
                    log.close()
                    print(f"[uft-ray] evidence {name}: seed {seed} exit {proc.returncode}", flush=True)
                    if proc.returncode != 0:
                        failed.append(f"seed {seed} ({log.name})")
    finally:  # interrupted: no seed's process (nor its Ray) outlives the command
        for _, log, proc in running:
            proc.terminate()
            proc.wait()
            log.close()
    if failed:
        raise SystemExit(f"evidence {name}: failed: {', '.join(failed)}")
    parts = [json.loads((out / "parts" / f"{name}-s{seed}.json").read_text()) for seed in seeds]
    return merge(parts, seeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="uft-ray evidence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="steps per arm (default: the recipe's train.max_steps)")
    p.add_argument("--arms", default=None, help=f"comma-separated arms (default: all; hints: {', '.join(HINT_ARMS)})")
    p.add_argument(
        "--rl-lr", type=float, default=None, help="hints: the RL stages' learning rate (default: the recipe's)"
    )
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every stage of every arm (repeatable), e.g. loss.beta=0.01")  # fmt: skip
    p.add_argument("--recipe", default=None, help="the recipe (default: jobs/evidence/NAME.yaml)")
    p.add_argument("--out", default=None, help="the experiment's folder (default: runs/evidence/NAME)")
    p.add_argument("--assets", default=None, help="the demo assets' root (default: uft-ray demo's)")
    p.add_argument("--results", default=None, help="also write the section of this markdown file (docs/results.md)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process (default 1)")
    p.add_argument(
        "--probe-rows",
        default=None,
        metavar="H,B,S",
        help="forgetting-real: held-out instruction prompts, bare questions and sums probed (default 30,12,16)",
    )
    p.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # one seed's process of --jobs
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs: at least 1")
    if bad := [s for s in args.sets if "=" not in s or not s.split("=", 1)[0].strip()]:
        p.error(f"--set: KEY=VALUE (a dotted config key), got {', '.join(map(repr, bad))}")
    label = variant(args.name, args.sets)
    out = Path(args.out or f"runs/evidence/{label}").resolve()
    recipe = args.recipe or str(ROOT / RECIPES[args.name])
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.sets:  # a bad key or value fails here, naming it, before any data, model or cluster work
        first = (
            recipe if args.name.startswith("hints") else str(Path(recipe).with_name(Path(recipe).stem + "_base.yaml"))
        )
        try:
            # the task files are the command's to write: a stand-in path for the check
            task = ["rft.path=task/train.jsonl", "rft.eval_path=task/eval.jsonl"] if args.name == "hints-real" else []
            load_config(first, [*task, *args.sets], check_paths=False)
        except ConfigError as e:
            p.exit(2, "uft-ray evidence: --set: " + "; ".join(e.messages) + "\n")
    t0 = time.monotonic()
    arms = [a for a in (args.arms or "").split(",") if a] or None
    known = {"hints": HINT_ARMS, "hints-real": HINT_ARMS, "forgetting-real": evidence_real.ARMS}.get(args.name)
    if known and arms and (unknown := sorted(set(arms) - set(known))):
        p.error(f"--arms: unknown {', '.join(unknown)}; use {', '.join(known)}")
    sizes = None
    if args.probe_rows is not None:
        parts = args.probe_rows.split(",")
        if len(parts) != 3 or not all(x.strip().isdigit() and int(x) > 0 for x in parts):
            p.error(f"--probe-rows: three positive integers H,B,S, got {args.probe_rows!r}")
        sizes = tuple(int(x) for x in parts)

    def experiment(seeds_: list[int], write_data: bool = True) -> dict:
        if args.name.startswith("hints"):
            return run_hints(out, seeds_, args.steps, recipe, args.assets, arms, args.rl_lr, write_data, args.sets,
                             real=args.name == "hints-real")  # fmt: skip
        if args.name == "forgetting-real":

            def make_recipe(seed: int, data: Path, model: str) -> Any:
                return forgetting_recipe(out, seed, recipe, data, model, args.steps, args.sets)

            return evidence_real.run_forgetting_real(out, seeds_, make_recipe, args.assets, arms, sizes, write_data)
        return run_forgetting(out, seeds_, args.steps, recipe, args.assets, arms, write_data, args.sets)

    if args.part:  # one seed of a fan-out: the data is written, the parent tables and plots
        result = experiment(seeds, False)
        (out / "parts" / f"{args.name}-s{seeds[0]}.json").write_text(json.dumps(result))
        return 0
    if args.jobs > 1 and len(seeds) > 1:
        # the data and the model once, here, before the seeds' processes read them
        experiment([])
        passthrough = [f"--recipe={recipe}", *(f"--set={s}" for s in args.sets)] + [f"--{k.replace('_', '-')}={v}" for k, v in (
            ("steps", args.steps), ("arms", args.arms), ("rl_lr", args.rl_lr), ("assets", args.assets),
            ("probe_rows", args.probe_rows)) if v is not None]  # fmt: skip
        result = fan_out(args.name, seeds, args.jobs, out, passthrough)
    else:
        result = experiment(seeds)
    result["sets"] = list(args.sets)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    if args.name == "forgetting-real":
        labels = evidence_real.METRICS
        evidence_real.plot_bars(result, out / f"{args.name}.png", labels)
        table = evidence_real.tables(result, final_table)
    else:
        labels = METRICS[args.name]
        plot(result, out / f"{args.name}.png", labels)
        table = "\n".join(final_table(result, m, label) for m, label in labels.items())
    (out / f"{args.name}.md").write_text(table)
    print(table)
    print(f"[uft-ray] evidence {args.name}: {result['wall_s']:.0f} s; {out / (args.name + '.png')}")
    if args.results:
        md = Path(args.results)
        shutil.copyfile(out / f"{args.name}.png", md.parent / f"evidence_{label}.png")
        cmd = f"uft-ray evidence {args.name} --seeds {args.seeds}" + (f" --steps {args.steps}" if args.steps else "")
        cmd += f" --jobs {args.jobs}" if args.jobs != 1 else ""
        cmd += f" --rl-lr {args.rl_lr:g}" if args.rl_lr is not None else ""
        cmd += f" --probe-rows {args.probe_rows}" if args.probe_rows else ""
        cmd += "".join(f" --set {s}" for s in args.sets)
        body = (f"```bash\n{cmd}     # {result['wall_s'] / 60:.1f} min on this machine\n```\n\n{table}\n"
                f"![{label}](evidence_{label}.png)\n")  # fmt: skip
        write_section(md, label, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
