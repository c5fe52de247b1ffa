"""Held-out metrics while training (`eval.sources` or `eval.holdout`, every `eval.every` steps): which rows are
held out, and the metrics of docs/design.md "Evaluation" from their log-probs. Pure (numpy, pyarrow, torch), no Ray.

Which rows:
- `eval.sources`: each training source's own split (UltraChat `test_sft`, HelpSteer2 `validation`), prepared like
  the training rows (`eval_prepare_config`: the same tokenization, at most `eval.max_rows` rows per source);
- `eval.holdout: f`: the prepared rows whose seeded hash falls below f are kept out of the plan (`is_heldout`;
  an upsampled copy `id#k` goes with its row), and the `eval.max_rows` of each source with the smallest hash
  are evaluated. Training and held-out rows never share a row_id.

The metrics, per source, over every rank's rows (`metrics`), with r = beta (logp - logp_ref) as in training:
`eval/loss/{s}` (the run's `loss.type` on those rows, unweighted), `eval/reward/{s}` (mean r; for pairs the
chosen response's), `eval/score_mse/{s}` and `eval/score_spearman/{s}` (sigmoid(r) against the target score,
scored rows), `eval/pair_accuracy/{s}` (r_chosen > r_rejected: a tie is not a win, as TRL counts it; rewards
within `TIE` of each other are a tie)
and `eval/margin/{s}` (pairs), `eval/nll/{s}` (per-token NLL of the response, SFT rows). Before the first
update the policy is the reference, so r = 0 and the pair accuracy is 0.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uft_ray import storage
from uft_ray.config import ConfigError
from uft_ray.evaluation import harness
from uft_ray.evaluation.harness import TaskSpec
from uft_ray.evaluation.presets import PRESETS
from uft_ray.evaluation.worker import run_eval
from uft_ray.run_dir import EVAL_SUMMARY

if TYPE_CHECKING:  # pragma: no cover
    from uft_ray.config import Config

HOLDOUT_SALT = "uft-ray:holdout"
# Rewards closer than this are a tie: the reference's cached log-probs and the policy's come from two forwards
# (different batches, so different padding) of the same fp32 weights, which agree to ~1e-7 relative.
TIE = 1e-6


def _unit(seed: int, row_id: str) -> float:
    """A row's position in [0, 1), the same in every process (its upsampled copies share it)."""
    base = row_id.split("#", 1)[0]
    digest = hashlib.sha256(f"{HOLDOUT_SALT}\x1f{seed}\x1f{base}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def is_heldout(row_id: str, fraction: float | None, seed: int) -> bool:
    return fraction is not None and _unit(seed, row_id) < fraction


def _held_by_source(
    row_ids: list[str], sources: list[str], fraction: float, seed: int
) -> tuple[dict[str, int], dict[str, list[tuple[float, str]]]]:
    """Each source's rows (upsampled copies not counted: they go with their row) and its held-out (hash, id)s."""
    rows: dict[str, int] = {}
    held: dict[str, list[tuple[float, str]]] = {}
    for rid, src in zip(row_ids, sources, strict=True):
        if "#" in rid:
            continue
        rows[src] = rows.get(src, 0) + 1
        u = _unit(seed, rid)
        if u < fraction:
            held.setdefault(src, []).append((u, rid))
    return rows, held


def holdout_rows(
    row_ids: list[str], sources: list[str], fraction: float, seed: int, max_rows: int | None
) -> list[str]:
    """The held-out rows to evaluate: per source the `max_rows` held-out ids of smallest hash (copies once)."""
    _, by_source = _held_by_source(row_ids, sources, fraction, seed)
    out = []
    for src in sorted(by_source):
        out += [rid for _, rid in sorted(by_source[src])[:max_rows]]
    return out


def check_holdout(row_ids: list[str], sources: list[str], fraction: float, seed: int) -> list[str]:
    """One warning per source that `eval.holdout` holds out no row of (a small source: it gets no held-out
    metrics); ConfigError when that is every source (the run would evaluate nothing)."""
    rows, held = _held_by_source(row_ids, sources, fraction, seed)
    empty = [s for s in sorted(rows) if s not in held]

    def n_rows(s: str) -> str:
        return f"{rows[s]} row{'s' * (rows[s] != 1)}"

    if empty and len(empty) == len(rows):
        counts = ", ".join(f"{s!r} {n_rows(s)}" for s in empty)
        raise ConfigError(
            [
                f"eval.holdout: {fraction} holds out no row of any source ({counts}, 0 held out), so nothing "
                f"would be evaluated: raise eval.holdout (each row is held out with that probability), or give "
                f"eval.sources instead"
            ]
        )
    return [
        f"eval.holdout: {fraction} holds out no row of source {s!r} ({n_rows(s)}, 0 held out): it gets no "
        f"held-out metrics; raise eval.holdout to evaluate it"
        for s in empty
    ]


def eval_prepare_config(cfg: Config) -> Config:
    """The config that prepares `eval.sources` like the training rows: same model and tokenization, each
    source capped at `eval.max_rows` rows (a smaller split gives all it has), no upsampling."""
    out = copy.deepcopy(cfg)
    out.data.sources = copy.deepcopy(cfg.eval.sources)
    cap = cfg.eval.max_rows or 10**9
    out.mixture.counts = {s.name: cap for s in cfg.eval.sources}
    out.mixture.ratios = None
    out.mixture.total = None
    out.mixture.allow_upsample = False
    out.mixture.at_most = True
    return out


def rank_share(row_ids: list[str], rank: int, world: int) -> list[str]:
    """This rank's held-out rows: every world-th of the sorted ids."""
    return sorted(row_ids)[rank::world]


def heldout_plan(row_ids: list[str], world: int) -> pa.Table:
    """The held-out rows as a plan-like table for `uft_ray.train.feeds.table_feeds`: rank r's `rank_share` in
    order as slots 0, 1, ... of step 0, micro 0, epoch 0 (the worker loop reads `eval_{r}` in that order)."""
    ids: list[str] = []
    ranks: list[int] = []
    slots: list[int] = []
    for rank in range(world):
        share = rank_share(row_ids, rank, world)
        ids += share
        ranks += [rank] * len(share)
        slots += range(len(share))
    zeros = pa.array(np.zeros(len(ids), dtype=np.int32))
    return pa.table(
        {
            "row_id": pa.array(ids, pa.string()),
            "rank": pa.array(ranks, pa.int32()),
            "epoch": zeros,
            "step": zeros,
            "micro": zeros,
            "slot": pa.array(slots, pa.int32()),
        }
    )


def spearman(x: np.ndarray, y: np.ndarray, tol: float = 0.0) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when n < 2 or either side spreads <= `tol`."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) <= tol or np.ptp(y) <= tol:
        return None

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def metrics(records: list[dict[str, Any]], cfg: Config) -> dict[str, float]:
    """The `eval/...` metrics of every rank's held-out rows (see the module docstring).

    A record: `source`, `kind`, `score`, `policy`, `ref`, `n_tokens` (summed response log-probs and their
    token count), and for pairs `policy_rejected`, `ref_rejected`, `n_tokens_rejected`.
    """
    import torch

    from uft_ray import losses  # imports torch, as above

    loss_type, beta = cfg.loss.type, cfg.loss.beta
    out: dict[str, float] = {}

    def col(rows: list[dict[str, Any]], key: str) -> torch.Tensor:
        return torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)

    kto_z = None
    if loss_type == "kto" and records:  # one reference point for the whole held-out set, as for a step
        kto_z = max(0.0, float((col(records, "policy") - col(records, "ref")).mean()))
    for source in sorted({r["source"] for r in records}):
        rows = [r for r in records if r["source"] == source]
        policy, ref, n = col(rows, "policy"), col(rows, "ref"), col(rows, "n_tokens")
        score = col(rows, "score")
        pairs = "policy_rejected" in rows[0]
        loss = None  # the run's loss where it applies to these rows (a DPO run's loss needs pairs, and so on)
        if pairs:
            pr, rr, nr = col(rows, "policy_rejected"), col(rows, "ref_rejected"), col(rows, "n_tokens_rejected")
            if loss_type in ("dpo", "sft"):
                loss, _ = (losses.dpo_loss(policy, pr, ref, rr, beta, n_tokens_chosen=n, n_tokens_rejected=nr)
                           if loss_type == "dpo" else losses.sft_loss(policy, n))  # fmt: skip
            chosen, rejected = beta * (policy - ref), beta * (pr - rr)
            out[f"eval/pair_accuracy/{source}"] = float((chosen - rejected > TIE).double().mean())
            out[f"eval/margin/{source}"] = float((chosen - rejected).mean())
        elif loss_type == "sft":
            loss, _ = losses.sft_loss(policy, n)
        elif loss_type == "kto":
            loss, _ = losses.kto_loss(policy, ref, score >= 0.5, beta, kl=kto_z, n_tokens=n)
        elif loss_type in ("uft", "una_bce"):
            fn = losses.uft_loss if loss_type == "uft" else losses.una_bce_loss
            loss, _ = fn(policy, ref, score, beta, n_tokens=n)
        if loss is not None:
            out[f"eval/loss/{source}"] = float(loss)
        reward = beta * (policy - ref)
        out[f"eval/reward/{source}"] = float(reward.mean())
        scored = [i for i, r in enumerate(rows) if r["kind"] in ("score", "binary")]
        if scored and not pairs:
            pred, target = torch.sigmoid(reward[scored]), score[scored]
            out[f"eval/score_mse/{source}"] = float(((pred - target) ** 2).mean())
            rho = spearman(pred.numpy(), target.numpy(), tol=TIE / 4)  # sigmoid'(0) = 1/4: r within TIE
            if rho is not None:  # undefined while every prediction is 0.5 (before the first update)
                out[f"eval/score_spearman/{source}"] = rho
        sft = [i for i, r in enumerate(rows) if r["kind"] == "sft"]
        if sft:
            out[f"eval/nll/{source}"] = float(-policy[sft].sum() / n[sft].sum().clamp(min=1))
    return out


# ---------------------------------------------------------------------------------------------------------
# eval.tasks: lm_eval benchmarks on the final adapter, run by the driver after training.


def check_benchmarks(cfg: Config) -> None:
    """Fail before any cluster work when `eval.tasks` names a task lm_eval does not know (EvalError)."""
    if not benchmark_specs(cfg):
        return

    names = [s.task for s in benchmark_specs(cfg)]
    try:
        harness.check_tasks(names, harness.task_manager(cfg.eval.include_path, names))
    except harness.EvalError as e:
        raise ConfigError([f"eval.tasks: {e}"]) from None


def benchmark_specs(cfg: Config) -> list[Any]:
    """`eval.tasks` (their default shots), or the tasks of `eval.preset` with its shots (a subset: the tasks named)."""
    if cfg.eval.preset:
        tasks = PRESETS[cfg.eval.preset].tasks
        return [TaskSpec(t.task, t.num_fewshot) for t in tasks if not cfg.eval.tasks or t.task in cfg.eval.tasks]
    return [TaskSpec(t) for t in cfg.eval.tasks]


def run_benchmarks(cfg: Config, run_dir: str) -> dict[str, Any] | None:
    """`eval.tasks` on the run's final adapter (`uft-ray eval RUN_DIR` with the config's tasks), on the Ray
    cluster the run used; results in `{run_dir}/eval/`. Returns summary.json's content, None without tasks."""
    specs = benchmark_specs(cfg)
    if not specs:
        return None

    target = harness.resolve_target(run_dir, trust_remote_code=cfg.model.trust_remote_code)  # the user's config
    limit = cfg.eval.limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    preset = cfg.eval.preset
    run_eval(
        target,
        specs,
        include_path=cfg.eval.include_path,
        limit=limit,
        gpus=None if cfg.train.use_gpu else 0,
        preset=preset,
        apply_chat_template=PRESETS[preset].apply_chat_template if preset else False,
    )
    return storage.read_json(storage.join(target.out_dir, EVAL_SUMMARY))
