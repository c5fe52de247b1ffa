"""The prompts of a hint_rft run: task rows, the step plan, and each rank's feed with its hints attached.

Task rows (`uft_ray.tasks`): a path given (`rft.path`, `rft.eval_path`: a file, directory or glob, local or behind
a URI such as `s3://`, read through uft_ray.storage), the rows of its files for any task, in any layout
`uft_ray.tasks.files` reads: veRL's parquet as the UFT authors publish theirs (the prompt text and hint chunks kept
byte for byte), this project's rows, MATH-lighteval's (`problem`, `level`, `type`, `solution`), or a generic
task's records (`prompt`, `hint` or `solution`, `answer`) with the verifier named by `rft.task`
(`module:function`). No path: Countdown and Knights and Knaves are generated (training rows from `data.seed`,
held-out rows from another seed, any prompt that is also a training prompt dropped). A record that cannot be a
row (malformed, or a prompt longer than `rft.max_prompt_len` tokens) is quarantined with its reason, never dropped
silently. The prompt's token ids are its text tokenized as given: no chat template (the authors' prompts are
already the whole text the policy continues, and their fork tokenizes them so).

The training set is `rft.n_train` of the usable prompts, drawn once (`draw_train`, seeded by data.seed; all of
them when there are no more) and repeated over epochs, as the authors train 10,240 prompts for about 12.5 epochs.
The plan: step t trains `rft.prompts_per_step` prompts, a slice of epoch e's permutation of that set (seeded by
(data.seed, e)); rank r takes the r-th contiguous share, so each rank holds whole GRPO groups. It is saved as
`plan.parquet` in the offline plan's schema (`micro` 0), and each rank's feed is the prompt table tagged with
its share (`uft_ray.train.feeds.rank_feeds`, as the offline feeds), the step's revealed hint count joined (a pure
function of (seed, step, row_id): `uft_ray.tasks.hints`), sorted in plan order: a Ray Data pipeline, as the
offline feeds are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray import storage
from uft_ray.config import Config
from uft_ray.run_dir import RunDir
from uft_ray.tasks import countdown, knights_knaves
from uft_ray.tasks.files import MISSING_FIELD, read_rows
from uft_ray.tasks.hints import HintSchedule, with_hint
from uft_ray.tasks.names import GENERATED_TASKS
from uft_ray.train import feeds
from uft_ray.train.plan import PLAN_SCHEMA, Plan, PlanSummary, fingerprint

EVAL_SEED_OFFSET = 1_000_003  # held-out generated instances come from another seed
PROMPT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("hint", pa.list_(pa.string())),
        ("row_json", pa.string()),  # the whole row, for its verifier (task fields differ per task)
    ]
)
TOO_LONG = "too_long"  # a prompt past rft.max_prompt_len; the file reasons are in uft_ray.tasks.files
DRAW_STREAM = 0x6E747261  # the seed stream of the n_train draw, apart from the plan's epoch permutations


def schedule(cfg: Config) -> HintSchedule:
    h = cfg.rft.hint
    return HintSchedule(h.mode, h.p_low, h.p_high, h.t_hint, h.max_buckets, seed=cfg.train.seed)


def task_rows(cfg: Config, split: str, quarantined: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task's rows of `split` ("train" or "eval"); unusable records appended to `quarantined`.

    A path given (`rft.path` for train, `rft.eval_path` for eval): the rows of its files, in any layout
    uft_ray.tasks.files reads (the authors' veRL parquet included), for every task. No path: a generated task
    generates them (train from `data.seed`, `rft.n_train` of them; eval from another seed, any prompt that is also
    a training prompt dropped); a file task has no eval rows."""
    r = cfg.rft
    path = r.path if split == "train" else r.eval_path
    if path:
        rows = read_rows(path, r.task, split=split, quarantined=quarantined)
        if r.objective == "sft":  # the reference answer is the target: a row without one cannot train
            for row in [row for row in rows if not isinstance(row.get("answer"), str)]:
                quarantined.append({"row_id": row["row_id"], "reason": MISSING_FIELD, "detail": "answer: missing"})
            rows = [row for row in rows if isinstance(row.get("answer"), str)]
        return rows
    if r.task not in GENERATED_TASKS:
        return []
    module = countdown if r.task == countdown.NAME else knights_knaves
    if split == "train":
        return module.generate(r.n_train, seed=cfg.data.seed)
    seen = {row["prompt"] for row in task_rows(cfg, "train", [])}
    n_eval = cfg.eval.max_rows or 256
    rows = module.generate(n_eval + n_eval // 4 + 8, seed=cfg.data.seed + EVAL_SEED_OFFSET)
    return [row for row in rows if row["prompt"] not in seen][:n_eval]


def draw_train(table: pa.Table, n_train: int | None, seed: int) -> pa.Table:
    """The training set: `n_train` of the usable prompts, drawn once (seeded by `data.seed`) and kept in file order;
    every epoch of the plan permutes this same set. All of them when there are no more (or `n_train` is None)."""
    if n_train is None or table.num_rows <= n_train:
        return table
    keep = np.sort(np.random.default_rng([seed, DRAW_STREAM]).choice(table.num_rows, n_train, replace=False))
    return table.take(pa.array(keep))


def _table(rows: list[dict[str, Any]], tokenizer: Any, max_len: int, quarantined: list[dict[str, Any]]) -> pa.Table:
    keep, ids = [], []
    encoded = tokenizer([row["prompt"] for row in rows])["input_ids"] if rows else []
    for row, prompt_ids in zip(rows, encoded, strict=True):
        if len(prompt_ids) > max_len:
            quarantined.append(
                {"row_id": row["row_id"], "reason": TOO_LONG, "detail": f"{len(prompt_ids)} > {max_len} tokens"}
            )
            continue
        keep.append(row)
        ids.append(prompt_ids)
    return pa.table(
        {
            "row_id": [str(r["row_id"]) for r in keep],
            "task": [str(r.get("task", "")) for r in keep],
            "prompt": [r["prompt"] for r in keep],
            "prompt_ids": ids,
            "hint": [list(r["hint"]) for r in keep],
            "row_json": [json.dumps(r, default=str) for r in keep],
        },
        schema=PROMPT_SCHEMA,
    )


@dataclass
class Prompts:
    """A run's task rows, built in memory (`build_prompts`) and written (`save_prompts`) once the run may write."""

    train: pa.Table
    eval: pa.Table
    quarantined: list[dict[str, Any]]  # each with its split and reason
    counts: dict[str, Any]  # train, eval, train_usable, quarantine (rows by reason)


def build_prompts(cfg: Config, tokenizer: Any) -> Prompts:
    """The task's train and eval prompts and the quarantined records; writes nothing."""
    counts: dict[str, Any] = {}
    quarantined: list[dict[str, Any]] = []
    tables = {}
    for split in ("train", "eval"):
        found: list[dict[str, Any]] = []
        table = _table(task_rows(cfg, split, found), tokenizer, cfg.rft.max_prompt_len, found)
        if split == "train":
            counts["train_usable"] = table.num_rows
            table = draw_train(table, cfg.rft.n_train, cfg.data.seed)
        tables[split] = table
        counts[split] = table.num_rows
        quarantined += [{"split": split, **q} for q in found]
    by_reason: dict[str, int] = {}
    for q in quarantined:
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + int(q.get("rows", 1))
    counts["quarantine"] = by_reason
    return Prompts(tables["train"], tables["eval"], quarantined, counts)


def check_prompts(cfg: Config, prompts: Prompts, run_dir: RunDir) -> None:
    """Enough training prompts for one step, or a ValueError naming the quarantine."""
    if prompts.counts["train"] < cfg.rft.prompts_per_step:
        raise ValueError(
            f"rft: {prompts.counts['train']} usable training prompts, fewer than rft.prompts_per_step "
            f"({cfg.rft.prompts_per_step}); quarantined {prompts.counts['quarantine']}, see "
            f"{run_dir.quarantine_prompts}"
        )


def save_prompts(prompts: Prompts, run_dir: RunDir) -> None:
    """`{run_dir}/prompts/{train,eval}.parquet` and the quarantine file."""
    storage.makedirs(run_dir.prompts)
    storage.makedirs(run_dir.quarantine)
    for split, table in (("train", prompts.train), ("eval", prompts.eval)):
        storage.atomic_write(run_dir.prompts_file(split), lambda f, t=table: pq.write_table(t, f))
    lines = "".join(json.dumps(q) + "\n" for q in prompts.quarantined)
    storage.atomic_write(run_dir.quarantine_prompts, lines.encode())
    storage.write_json(run_dir.quarantine_counts, prompts.counts["quarantine"], sort_keys=True)


def write_prompts(cfg: Config, run_dir: RunDir, tokenizer: Any) -> dict[str, Any]:
    """Build and write the prompts and the quarantine file (a run's own driver decides before it writes:
    `build_prompts`, then `save_prompts`); returns the counts."""
    prompts = build_prompts(cfg, tokenizer)
    save_prompts(prompts, run_dir)
    check_prompts(cfg, prompts, run_dir)
    return prompts.counts


def read_prompts(run_dir: RunDir, split: str) -> pa.Table:
    return pq.read_table(run_dir.prompts_file(split))


# ---------------------------------------------------------------------------------------------------------
# The plan: which prompts each rank takes at each step.


def steps_per_epoch(n_rows: int, prompts_per_step: int) -> int:
    return n_rows // prompts_per_step


def make_rft_plan(table: pa.Table, cfg: Config) -> Plan:
    """Step t: `prompts_per_step` prompts of epoch t // steps_per_epoch's seeded permutation, cut per rank."""
    r, tr = cfg.rft, cfg.train
    n, pps, world = table.num_rows, r.prompts_per_step, tr.num_workers
    spe = steps_per_epoch(n, pps)
    steps = tr.max_steps if tr.max_steps is not None else tr.epochs * spe
    per_rank = pps // world
    row_ids = np.asarray(table.column("row_id").to_pylist(), dtype=object)
    lengths = np.asarray([len(x) for x in table.column("prompt_ids").to_pylist()], dtype=np.int32)
    cols: dict[str, list] = {k: [] for k in ("row_id", "source", "length", "epoch", "step", "rank", "micro", "slot")}
    perm: np.ndarray | None = None
    for step in range(steps):
        epoch, i = divmod(step, spe)
        if i == 0 or perm is None:
            perm = np.random.default_rng([cfg.data.seed, epoch]).permutation(n)
        idx = perm[i * pps : (i + 1) * pps]
        cols["row_id"] += row_ids[idx].tolist()
        cols["source"] += [r.task] * pps
        cols["length"] += lengths[idx].tolist()
        cols["epoch"] += [epoch] * pps
        cols["step"] += [step] * pps
        cols["rank"] += [j // per_rank for j in range(pps)]
        cols["micro"] += [0] * pps
        cols["slot"] += [j % per_rank for j in range(pps)]
    plan_table = pa.table(cols, schema=PLAN_SCHEMA)
    summary = PlanSummary(
        global_batch_size=pps,
        num_workers=world,
        micro_batch_size=per_rank,
        grad_accum=1,
        steps=steps,
        steps_per_epoch=spe,
        epochs=-(-steps // spe) if spe else 0,
        rows_per_epoch=spe * pps,
        rows_planned=steps * pps,
        tail_dropped=n - spe * pps,
        rows_by_source={r.task: steps * pps},
        target_fraction={r.task: 1.0},
        seed=cfg.data.seed,
        group_by_length=False,
        fingerprint=fingerprint(plan_table),
    )
    return Plan(plan_table, summary)


def attach_hints(batch: pa.Table, schedule: HintSchedule) -> pa.Table:
    """A `map_batches` stage: how many hint chunks each planned (row, step) reveals (steps 1-based)."""
    steps = batch.column("step").to_pylist()
    hints = batch.column("hint").to_pylist()
    ids = batch.column("row_id").to_pylist()
    revealed = [schedule.revealed(s + 1, rid, len(h)) for s, rid, h in zip(steps, ids, hints, strict=True)]
    return batch.append_column("revealed", pa.array(revealed, pa.int32()))


def rank_feeds(run_dir: RunDir, plan: Plan, cfg: Config, start: int) -> dict[str, Any]:
    """Per rank: its prompts from step `start` on, tagged with (step, slot) and their hints, in plan order
    (uft_ray.train.feeds: one pass over the prompts for every rank), materialized."""
    import functools

    import ray.data

    rows = ray.data.read_parquet(run_dir.prompts_file("train"))
    hints = functools.partial(attach_hints, schedule=schedule(cfg))
    return feeds.rank_feeds(rows, plan, start, transform=hints)


# ---------------------------------------------------------------------------------------------------------
# On a worker: a step's prompts (a batch of its feed) as token ids, with their hints or their targets.


def prompts_with_hints(batch: dict[str, np.ndarray], tokenizer: Any, max_prompt_len: int) -> list[dict[str, Any]]:
    """Each prompt with its revealed hint as token ids; a hint that would pass `max_prompt_len` reveals fewer
    chunks (the prompt alone always fits: longer ones were quarantined)."""
    out = []
    for i in range(len(batch["row_id"])):
        prompt_ids = [int(t) for t in batch["prompt_ids"][i]]
        chunks = [str(c) for c in batch["hint"][i]]
        revealed = int(batch["revealed"][i])
        hint_ids: list[int] = []
        while revealed:
            hint_text = with_hint("", chunks, revealed)
            hint_ids = tokenizer(hint_text, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) + len(hint_ids) <= max_prompt_len:
                break
            revealed -= 1
            hint_ids = []
        out.append(
            {
                "row_id": str(batch["row_id"][i]),
                "row": json.loads(str(batch["row_json"][i])),
                "prompt_ids": prompt_ids,
                "hint_ids": hint_ids,
                "hint_text": with_hint("", chunks, revealed),
                "revealed": revealed,
                "n_chunks": len(chunks),
            }
        )
    return out


def sft_targets(batch: dict[str, np.ndarray], tokenizer: Any) -> list[dict[str, Any]]:
    """`rft.objective: sft`: each prompt with its whole reference answer (steps and the closing answer tag, then
    EOS) as `target_ids`, the sequence uft_ray.rft.update.sft_update trains on. The whole solution is shown, so
    every hint chunk counts as revealed (the step's `hint/share` is 1)."""
    out = []
    for i in range(len(batch["row_id"])):
        row = json.loads(str(batch["row_json"][i]))
        target = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        n_chunks = len(batch["hint"][i])
        out.append(
            {
                "row_id": str(batch["row_id"][i]),
                "prompt_ids": [int(t) for t in batch["prompt_ids"][i]],
                "target_ids": target,
                "revealed": n_chunks,
                "n_chunks": n_chunks,
            }
        )
    return out
