"""Evidence on the real model: Experiment W (Wang et al.) on SmolLM2-135M-Instruct, `uft-ray evidence
forgetting-real` (Experiment L, `hints-real`, runs through uft_ray.evidence's hints path on uft_ray/tasks/sum3.py).

W asks whether SFT -> DPO on length-biased preferences loses the instruction following SFT taught, while one-stage
UFT-mix keeps it. The data (`write_data`): instruction rows in the UltraChat layout (uft_ray/demo/instructions.py:
five verifiable families, exact transforms of plain answers), and preference rows in the HelpSteer2 layout on other
training prompts, each prompt's compliant and plain answers with the LONGER one rated high. That length bias agrees
with three families (end phrase, start word and quotes add text) and pulls against two (at most N words, one
sentence). The arms are the compare recipe jobs/evidence/forgetting_real.yaml, run by the product's driver
(uft_ray.compare.run_arms: the shared SFT run is trained once per seed), and the base model.

After each arm's last run, `probe` loads the base model with the arm's adapter merged and measures, greedily:
- held-out instruction following: prompts with questions and values no training row has, each answer scored by
  its family's exact checker (all families, and the two the length bias pulls against);
- untouched abilities: one-shot three-number sums (one worked demonstration in the chat, then a new triple; the
  last number of the answer must be the sum), the per-token NLL of the base model's own greedy answers to bare
  held-out questions (how far the arm moved from what the base model says), and the mean length in words of the
  arm's answers to those questions.
Held-out pair accuracy comes from the driver's own evaluation (`eval/pair_accuracy/length_pairs`, against each
run's reference), kappa from the UFT-mix run's first step (`kappa/instr`).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uft_ray import compare
from uft_ray.demo import ensure_real_demo_assets
from uft_ray.demo import instructions as ins
from uft_ray.demo.before_after import answer_nll, greedy_answers
from uft_ray.demo.samples import write_parquet
from uft_ray.model_store import local_model
from uft_ray.run_dir import RunDir, read_metrics

ARMS = ("base", "sft", "sft-dpo", "sft-una", "uft-mix")
METRICS = {
    "probe/instructions": "held-out instructions passed (all families)",
    "probe/length_limited": "held-out 'at most N words' + 'one sentence' passed",
    "eval/pair_accuracy/length_pairs": "held-out length-pair accuracy",
    "probe/sums": "one-shot three-number sums correct",
    "probe/nll_base_answers": "NLL/token of the base model's own answers",
    "probe/words": "answer length to bare questions (words)",
}
LIMITED = ("max_words", "one_sentence")
HELDOUT, BARE, SUMS = 30, 12, 16  # held-out instruction prompts (6 questions x 5 families), bare questions, sums
MAX_NEW_TOKENS = 64
# HelpSteer2's five 0-4 ratings: the longer answer rated high, the shorter low, whatever the instruction says
LONGER = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 4}
SHORTER = {"helpfulness": 2, "correctness": 3, "coherence": 3, "complexity": 1, "verbosity": 1}
SUM_DEMO = ("Add 2, 5 and 1.", "2 + 5 = 7\n7 + 1 = 8\nThe sum is 8.")


def length_pair(ex: Any) -> list[dict[str, Any]]:
    """Two consecutive HelpSteer2 rows for one prompt: its two answers, the longer (in characters) rated high."""
    long, short = sorted((ex.answer, ex.plain), key=len, reverse=True)
    return [{"prompt": ex.prompt, "response": long, **LONGER}, {"prompt": ex.prompt, "response": short, **SHORTER}]


def write_data(out: Path, seed: int = 0) -> dict[str, str]:
    """The experiment's rows under `out` (the recipe's ${DATA}): UltraChat train/test parquet and HelpSteer2
    train/validation jsonl.gz. Instruction rows and preference rows are the two disjoint halves of the training
    (question, family) pairs; the held-out rows (test, validation) are the held-out questions and values."""
    sft, pref = ins.split_train(seed)
    held = ins.examples("heldout", seed)
    paths = {
        "train_sft": out / "ultrachat_200k" / "data" / "train_sft-00000-of-00001.parquet",
        "test_sft": out / "ultrachat_200k" / "data" / "test_sft-00000-of-00001.parquet",
        "train_pairs": out / "helpsteer2" / "train.jsonl.gz",
        "validation_pairs": out / "helpsteer2" / "validation.jsonl.gz",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(paths["train_sft"], (ins.ultrachat_row(ex, seed, i) for i, ex in enumerate(sft)))
    write_parquet(paths["test_sft"], (ins.ultrachat_row(ex, seed, 10_000 + i) for i, ex in enumerate(held)))
    for key, rows in (("train_pairs", pref), ("validation_pairs", held)):
        with gzip.open(paths[key], "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for ex in rows for r in length_pair(ex))
    return {k: str(v) for k, v in paths.items()}


def probe_sets(n_heldout: int = HELDOUT, n_bare: int = BARE, n_sums: int = SUMS, seed: int = 0) -> dict[str, Any]:
    """The probes' prompts: held-out instruction examples (the first questions, every family each), bare held-out
    questions and (a, b, c) triples of one-digit numbers."""
    held = ins.examples("heldout", seed)[:n_heldout]
    bare = [q for q, _ in ins.QA[-ins.HELDOUT_QUESTIONS :]][:n_bare]
    rng = random.Random(f"sums:{seed}")
    sums = [tuple(rng.randint(1, 9) for _ in range(3)) for _ in range(n_sums)]
    return {"heldout": held, "bare": bare, "sums": sums}


def last_number(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def probe(model_path: str, adapter: str | None, sets: dict[str, Any], base_answers: list[str] | None = None) -> dict:
    """Greedy answers of the base model (adapter None) or the base with `adapter` merged, scored (see the module
    docstring). `base_answers`: the base model's answers to the bare questions, whose NLL is measured."""
    import os

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    torch.set_num_threads(os.cpu_count() or 1)
    path = os.path.expanduser(local_model(model_path))
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, os.path.expanduser(adapter)).merge_and_unload()

    def chat(turns: list[str]) -> str:
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    held, bare, sums = sets["heldout"], sets["bare"], sets["sums"]
    prompts = [chat([ex.prompt]) for ex in held] + [chat([q]) for q in bare]
    prompts += [chat([*SUM_DEMO, f"Add {a}, {b} and {c}."]) for a, b, c in sums]
    answers = greedy_answers(model, tok, prompts)
    a_held, a_bare, a_sums = answers[: len(held)], answers[len(held) : len(held) + len(bare)], answers[-len(sums) :]
    passed = [ex.check(a) for ex, a in zip(held, a_held, strict=True)]
    limited = [p for ex, p in zip(held, passed, strict=True) if ex.family in LIMITED]
    out = {
        "probe/instructions": sum(passed) / len(passed),
        "probe/length_limited": sum(limited) / max(1, len(limited)),
        "probe/sums": sum(last_number(a) == sum(t) for a, t in zip(a_sums, sums, strict=True)) / len(sums),
        "probe/words": sum(len(a.split()) for a in a_bare) / len(a_bare),
        "families": {f: sum(p for ex, p in zip(held, passed, strict=True) if ex.family == f)
                     / max(1, sum(ex.family == f for ex in held)) for f in dict.fromkeys(ex.family for ex in held)},
        "answers": {"heldout": a_held, "bare": a_bare, "sums": a_sums},
    }  # fmt: skip
    out["probe/nll_base_answers"] = answer_nll(model, tok, prompts[len(held) : len(held) + len(bare)],
                                         base_answers if base_answers is not None else a_bare)  # fmt: skip
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _cached_probe(path: Path, key: dict[str, Any], make: Any) -> dict:
    """A probe's result from `path` when made for the same `key` (adapter, probe sizes), else made and written."""
    try:
        found = json.loads(path.read_text())
        if found.get("key") == key:
            return found
    except (OSError, ValueError):
        pass
    result = make() | {"key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def _final(run_dir: str, metric: str) -> tuple[int, float] | None:
    rows = [r for r in read_metrics(str(Path(run_dir) / "metrics.jsonl")) if r.get(metric) is not None]
    return (int(rows[-1]["step"]), float(rows[-1][metric])) if rows else None


def _first(run_dir: str, metric: str) -> float | None:
    rows = [r for r in read_metrics(str(Path(run_dir) / "metrics.jsonl")) if r.get(metric) is not None]
    return float(rows[0][metric]) if rows else None


def run_forgetting_real(
    out: Path,
    seeds: list[int],
    make_recipe: Callable[[int, Path, str], Any],
    assets_root: str | None,
    arms: list[str] | None,
    sizes: tuple[int, ...] | None = None,
    write: bool = True,
) -> dict:
    """Every arm under every seed through the compare recipe `make_recipe(seed, data, model)` gives (one Ray for
    all), each arm's final adapter probed; the base model probed once (greedy: the same for every seed). Each metric
    as a one-point curve per arm and seed (its value after the arm's last step), the shape of uft_ray.evidence's
    curves. `sizes`: the held-out instruction prompts, bare questions and sums probed; `write` False: the data is
    already in `out`."""
    sizes = tuple(sizes or (HELDOUT, BARE, SUMS))
    assets = ensure_real_demo_assets(assets_root) if assets_root else ensure_real_demo_assets()
    data = out / "data"
    if write:
        write_data(data)
    sets_ = probe_sets(*sizes)
    key = {"sizes": list(sizes)}
    base = _cached_probe(out / "probes" / "base.json", key, lambda: probe(assets["model"], None, sets_))
    wanted = [a for a in ARMS if not arms or a in arms]
    result: dict[str, Any] = {"name": "forgetting-real", "seeds": seeds, "metrics": {m: {} for m in METRICS},
                              "seconds": {}, "kappa": {}, "families": {}, "sizes": list(sizes)}  # fmt: skip
    for seed in seeds:
        t0 = time.monotonic()
        rec = make_recipe(seed, data, assets["model"])
        rec.arms = [a for a in rec.arms if a.name in wanted]
        compare.run_arms(rec)
        compare.write_tables(rec)
        for arm in ["base", *(a.name for a in rec.arms)]:
            if arm not in wanted:
                continue
            if arm == "base":
                found, last, step = base, None, 0
            else:
                stages = next(a for a in rec.arms if a.name == arm).stages
                last = stages[-1].output.run_dir
                adapter = RunDir(last).adapter
                found = _cached_probe(out / "probes" / f"{arm}-s{seed}.json", key | {"adapter": adapter},
                                      lambda a=adapter: probe(assets["model"], a, sets_, base["answers"]["bare"]))  # fmt: skip
                step = sum(_steps(c.output.run_dir) for c in stages)
            for m in METRICS:
                value = _final(last, m)[1] if m.startswith("eval/") and last and _final(last, m) else found.get(m)
                if value is not None:
                    result["metrics"][m].setdefault(arm, {})[str(seed)] = [(step, float(value))]
            result["families"].setdefault(arm, {})[str(seed)] = found["families"]
            if arm == "uft-mix" and last and (k := _first(last, "kappa/instr")) is not None:
                result["kappa"][str(seed)] = k
        result["seconds"][f"s{seed}"] = round(time.monotonic() - t0, 1)
    return result


def _steps(run_dir: str) -> int:
    return max((int(r["step"]) for r in read_metrics(str(Path(run_dir) / "metrics.jsonl"))), default=0)


def plot_bars(result: dict[str, Any], path: Path, labels: dict[str, str]) -> None:
    """A panel per metric: each arm's mean over seeds as a bar, the line from the lowest to the highest seed."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), dpi=110, squeeze=False)
    for ax, (metric, label) in zip(axes.flat, labels.items(), strict=False):
        names, means, lows, highs = [], [], [], []
        for arm, per_seed in result["metrics"].get(metric, {}).items():
            values = [c[-1][1] for c in per_seed.values() if c]
            if values:
                names.append(arm)
                means.append(statistics.mean(values))
                lows.append(means[-1] - min(values))
                highs.append(max(values) - means[-1])
        colors = [f"C{ARMS.index(a) if a in ARMS else len(ARMS)}" for a in names]  # an arm's color in every panel
        ax.bar(names, means, yerr=[lows, highs], capsize=4, color=colors)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        if "accuracy" in metric or metric in ("probe/instructions", "probe/length_limited", "probe/sums"):
            ax.set_ylim(0, 1.02)
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    fig.suptitle(f"{result['name']}: {len(result['seeds'])} seeds (mean; line: lowest to highest seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def family_table(result: dict[str, Any]) -> str:
    """Markdown: per arm, the held-out pass rate of each family, the mean over seeds."""
    import statistics

    fams: list[str] = []
    for per_seed in result["families"].values():
        for f in per_seed.values():
            fams += [x for x in f if x not in fams]
    lines = ["| arm | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for arm, per_seed in result["families"].items():
        cells = [statistics.mean(s[f] for s in per_seed.values() if f in s) for f in fams]
        lines.append(f"| {arm} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def tables(result: dict[str, Any], final_table: Callable[[dict, str, str], str]) -> str:
    """Markdown: each metric's value after each arm's last step (`final_table`: mean, range, per seed), UFT-mix's
    kappa, and the held-out pass rate per family."""
    import statistics

    parts = [final_table(result, m, label) for m, label in METRICS.items() if result["metrics"].get(m)]
    kappa = result.get("kappa") or {}
    if kappa:
        values = list(kappa.values())
        parts.append(f"uft-mix kappa/instr at step 1 (beta x n x the reference NLL per token, an upper bound): "
                     f"mean {statistics.mean(values):.3f}, range {min(values):.3f} - {max(values):.3f}\n")  # fmt: skip
    parts.append("Held-out instructions passed per family (mean over seeds):\n\n" + family_table(result))
    return "\n".join(parts)
