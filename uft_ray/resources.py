"""What a run needs from the Ray cluster at once, and whether the cluster can ever give it.

A run holds, while it trains: the trainer's placement group (`train.num_workers` bundles of `cpus_per_worker`
CPUs, plus `gpus_per_worker` GPUs on GPU), the actors that live beside it (`reference.run: stream` scorers, or
hint_rft's rollout actors), and CPUs for Ray Data tasks. Ray Data tasks are not part of the trainer's
placement group (Ray Train V2 does not capture its workers' child tasks), so a cluster the trainer fills
leaves them queued forever: the reported hang, `2.0/2.0 CPU used` and pending `{'CPU': 1.0}` tasks.

Data tasks keep CPU by sizing: `DATA_CPUS` (a whole CPU, for the reads and the feeds' sort) during the reference
pass, and `TRAINING_DATA_CPUS` (a quarter) while training, when the only data tasks left are the reference join,
which asks for exactly that much; `check_cluster` refuses to start a run the cluster cannot hold with it.
`train.cpus_per_worker: auto` (`auto_worker_cpus`) gives the workers everything else. Ray 2.60 has no finer
reservation to use here: `ExecutionOptions`' `exclude_resources` (deprecated) and `resource_limits` only bound Ray
Data's own budget and reserve nothing in Ray's scheduler, `DataContext.scheduling_strategy` is deprecated, and
Train V2 has no `trainer_resources`.

The phases judged are `run_phases`: the reference pass, training (the workers and what lives beside them: the
method's own actors, `Method.beside_workers`, and data tasks) and the benchmarks after it; `assess` holds them
against a `ClusterView`. This module is pure: the live cluster is read by uft_ray.cluster_probe (the run's
pre-check, `check_cluster`, and `train.cpus_per_worker: auto` on it), and a cluster file by
uft_ray.cluster_spec (`uft-ray validate --cluster FILE`, offline).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

from uft_ray import methods
from uft_ray.config import Config, ConfigError
from uft_ray.evaluation.heldout import benchmark_specs
from uft_ray.evaluation.worker import worker_layout

DATA_CPUS = 1.0  # CPUs left to Ray Data tasks during the reference pass (reads, the feeds' map and sort)
# While training the only data tasks are the reference join (uft_ray.uft.driver), each asking for this much: the
# workers get the rest of the cores instead of a whole CPU held back for a few milliseconds' work per block.
TRAINING_DATA_CPUS = 0.25
CPU_STEP = 0.25  # `auto` sizes a worker's reservation in quarter CPUs
RESOURCES = ("CPU", "GPU")  # what uft-ray asks for; memory and custom resources are not checked
_EPS = 1e-9


class ClusterTooSmall(ConfigError):
    """The cluster can never hold what the run needs at once; `messages` name the numbers and the keys."""

    def __init__(self, messages: list[str]):
        super().__init__(messages)
        self.args = ("the cluster can never hold this run:\n" + "\n".join(f"  - {m}" for m in self.messages),)


@dataclass(frozen=True)
class Demand:
    """`count` identical bundles, e.g. 2 training workers of {CPU: 1}."""

    what: str  # plural noun: "training workers"
    count: int
    bundle: dict[str, float]  # per unit; CPU / GPU, zero entries left out
    count_key: str | None = None  # the config field(s) behind `count`
    per_key: dict[str, str] = field(default_factory=dict)  # resource -> the field behind its amount
    instead: str | None = None  # another way to do without these, for the message

    def amount(self, resource: str) -> float:
        return self.count * self.bundle.get(resource, 0.0)

    def keys(self, resource: str) -> list[str]:
        keys = [self.count_key] if self.count_key else []
        return keys + ([self.per_key[resource]] if resource in self.per_key else [])

    def term(self, resource: str) -> str:
        """`2 training workers x 1 CPU (train.num_workers, train.cpus_per_worker)`; `1 for data tasks`."""
        if not self.count_key and not self.per_key:
            return f"{_n(self.amount(resource))} for {self.what}"
        keys = f" ({', '.join(self.keys(resource))})" if self.keys(resource) else ""
        return f"{self.count} {self.what} x {_amount(self.bundle[resource], resource)}{keys}"


@dataclass(frozen=True)
class Needs:
    """Everything one phase of a run holds at once."""

    phase: str  # "while training", "during the reference pass"
    demands: tuple[Demand, ...]

    def total(self) -> dict[str, float]:
        out = {r: sum(d.amount(r) for d in self.demands) for r in RESOURCES}
        return {r: v for r, v in out.items() if v > 0}

    def explain(self, resource: str) -> str:
        """`3 CPUs: 2 training workers x 1 CPU (train.num_workers, train.cpus_per_worker) + 1 for data tasks`."""
        terms = [d.term(resource) for d in self.demands if d.amount(resource) > 0]
        return f"{_amount(self.total()[resource], resource)}: " + " + ".join(terms)

    def summary(self) -> str:
        """`2 x {CPU: 1} for training workers + 1 CPU for data tasks`."""
        parts = []
        for d in self.demands:
            if d.count_key or d.per_key:
                parts.append(f"{d.count} x {_bundle(d.bundle)} for {d.what}")
            else:
                parts.append(" ".join(_amount(v, r) for r, v in d.bundle.items()) + f" for {d.what}")
        return " + ".join(parts)

    def keys(self, resource: str) -> list[str]:
        """The distinct fields behind `resource`'s total ("train.num_workers x reference.actors" counts as two)."""
        out: list[str] = []
        for d in self.demands:
            if d.amount(resource) > 0:
                out += [f for k in d.keys(resource) for f in k.split(" x ") if f not in out]
        return out


def bundle_of(cpus: float, gpus: float) -> dict[str, float]:
    """A bundle of `cpus` CPUs and `gpus` GPUs, zero entries left out."""
    return {r: float(v) for r, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def _min_actors(actors: int | list[int]) -> int:
    """A reference actor pool `[min, max]` starts, and works, with `min` actors."""
    return int(actors[0]) if isinstance(actors, list) else int(actors)


def _worker_demand(cfg: Config) -> Demand:
    tr = cfg.train
    if isinstance(tr.cpus_per_worker, str):
        raise ValueError(
            "train.cpus_per_worker is still 'auto': pass the config uft_ray.cluster_probe.resolve_worker_cpus made"
        )
    gpus = tr.gpus_per_worker if tr.use_gpu else 0.0
    return Demand(
        "training workers",
        tr.num_workers,
        bundle_of(tr.cpus_per_worker, gpus),
        "train.num_workers",
        {"CPU": "train.cpus_per_worker", "GPU": "train.gpus_per_worker"},
    )


def _data_demand(cpus: float = DATA_CPUS) -> Demand:
    return Demand("data tasks", 1, {"CPU": cpus})


def _reference_bundle(cfg: Config) -> dict[str, float]:
    r = cfg.reference
    return bundle_of(r.cpus_per_actor, r.gpus_per_actor if cfg.train.use_gpu else 0.0)  # = scorer.actor_gpus


_REFERENCE_KEYS = {"CPU": "reference.cpus_per_actor", "GPU": "reference.gpus_per_actor"}


def needs(cfg: Config) -> Needs:
    """What the run holds at once while it trains (`cfg` with `train.cpus_per_worker` resolved).

    The trainer's workers; the reference scorers when they stream beside training (`reference.run: stream`:
    each rank's dataset has its own pool of `reference.actors`, so num_workers x actors of them; `precompute`
    ends before training starts); the method's own actors (hint_rft's rollout actors); and `TRAINING_DATA_CPUS` for
    Ray Data tasks.
    """
    demands = [_worker_demand(cfg), *beside_workers(cfg)]
    return Needs("while training", tuple(d for d in demands if d.count > 0 and d.bundle))


def beside_workers(cfg: Config) -> list[Demand]:
    """What holds resources beside the training workers while they train: the actors that live alongside and
    `TRAINING_DATA_CPUS` for Ray Data tasks (no `train.cpus_per_worker` needed: `auto` sizes the workers from what
    is left)."""
    demands = list(methods.of(cfg).beside_workers(cfg))
    if cfg.reference_from_cache and cfg.reference.run == "stream":
        demands.append(
            Demand(
                "reference actors",
                cfg.train.num_workers * _min_actors(cfg.reference.actors),
                _reference_bundle(cfg),
                "train.num_workers x reference.actors",
                _REFERENCE_KEYS,
                instead="set reference.run precompute (its actors end before training starts)",
            )
        )
    demands.append(_data_demand(TRAINING_DATA_CPUS))
    return demands


def with_worker_cpus(cfg: Config, cpus: float) -> Config:
    """A copy of `cfg` with `train.cpus_per_worker` set (the caller's config is left as it was)."""
    out = copy.deepcopy(cfg)
    out.train.cpus_per_worker = float(cpus)
    return out


def worker_threads(cpus: float) -> int:
    """Torch threads for a CPU worker that holds `cpus` (may be fractional): the nearest whole number, at least 1
    (1.75 CPUs beside 0.25 for data tasks is the whole 2-core machine: 2 threads)."""
    return max(1, math.floor(cpus + 0.5))


def _quarter(x: float) -> float:
    return math.floor(x / CPU_STEP + _EPS) * CPU_STEP


@dataclass(frozen=True)
class AutoCpus:
    """What `train.cpus_per_worker: auto` resolved to, and the line saying why."""

    cpus: float
    why: str


def auto_worker_cpus(cfg: Config, view: ClusterView, cores: int | None = None) -> AutoCpus:
    """`train.cpus_per_worker: auto`: the largest reservation per worker (in quarter CPUs) for which everything the
    run holds while training (`needs`: the workers, what lives beside them, `TRAINING_DATA_CPUS` for data tasks)
    passes the pre-check's own test on `view` (`_never_fits`); at most `cores / num_workers` when `cores` is given
    (a one-node cluster on this machine: logical CPUs declared past the cores add no speed). The same rule on one
    node, on a cluster and on a cluster file (`uft-ray validate --cluster`). Candidates: each node shape's CPUs
    (with and without what lives beside the workers) shared by the workers it holds (on GPU, at least as many as
    its GPUs take). 1 when nothing fits (the pre-check then names the fields to change)."""
    tr = cfg.train
    w = tr.num_workers
    beside = sum(d.amount("CPU") for d in beside_workers(cfg))
    gpw = tr.gpus_per_worker if tr.use_gpu else 0.0
    candidates: set[float] = set()
    for shape in [*view.nodes, *(t.resources for t in view.node_types)]:
        kmin = min(w, math.floor(shape.get("GPU", 0.0) / gpw + _EPS)) if gpw else 1
        if kmin < 1:
            continue
        for k in range(kmin, w + 1):
            candidates |= {_quarter((shape.get("CPU", 0.0) - b) / k) for b in (0.0, beside)}
    cap = _quarter(cores / w) if cores else math.inf
    tried: set[float] = set()
    for c in sorted(candidates, reverse=True):
        c = min(c, cap)
        if c < CPU_STEP:
            break
        if c in tried:
            continue
        tried.add(c)
        sized = needs(with_worker_cpus(cfg, c))
        if not _never_fits(sized, view):
            return AutoCpus(c, _auto_why(cfg, c, sized, view, cores))
    return AutoCpus(
        1.0,
        f"train.cpus_per_worker auto: 1 CPU per worker: no larger share fits beside what the run holds while "
        f"training ({_nodes_line(view)})",
    )


def _auto_why(cfg: Config, c: float, sized: Needs, view: ClusterView, cores: int | None) -> str:
    tr = cfg.train
    threads = "" if tr.use_gpu else f" ({worker_threads(c)} torch thread{'s' * (worker_threads(c) > 1)} each)"
    ref = ""
    if cfg.reference_from_cache and cfg.reference.run == "precompute":
        ref = "; the reference actors end before training (reference.run precompute)"
    mine = f", at most {cores} cores / {tr.num_workers}" if cores else ""
    return (
        f"train.cpus_per_worker auto: {_n(c)} CPU{'s' * (c != 1)} per worker{threads}, the largest share that fits"
        f"{mine}: while training the run holds {sized.explain('CPU')}{ref}; {_nodes_line(view)}"
    )


def local_cluster_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray the driver starts itself: the machine's cores, or what the run holds at once
    (training or the reference pass, at 1 CPU per worker for `auto`) when that is more."""
    cores = os.cpu_count() or 1
    sized = with_worker_cpus(cfg, 1) if cfg.train.cpus_per_worker == "auto" else cfg
    phases = [needs(sized), reference_pass_needs(sized)]
    most = max(math.ceil(n.total().get("CPU", 0.0) - _EPS) for n in phases if n is not None)
    return max(cores, most)


def reference_pass_needs(cfg: Config) -> Needs | None:
    """What `reference.run: precompute` holds before training (its actor pool and data tasks), or None."""
    if not (cfg.reference_from_cache and cfg.reference.run == "precompute"):
        return None
    actors = Demand(
        "reference actors",
        _min_actors(cfg.reference.actors),
        _reference_bundle(cfg),
        "reference.actors",
        _REFERENCE_KEYS,
    )
    data = _data_demand(DATA_CPUS)
    return Needs("during the reference pass", tuple(d for d in (actors, data) if d.count > 0 and d.bundle))


def evaluation_needs(cfg: Config) -> Needs | None:
    """What `eval.tasks` (or `eval.preset`) holds after training, or None without benchmarks: at least one eval
    actor of the bundle `evaluation.worker.worker_layout` gives it (`eval.tensor_parallel_size` GPUs on GPU, 1 CPU);
    run_eval starts more, one per task, as the cluster's GPUs allow."""
    specs = benchmark_specs(cfg)
    if not specs:
        return None
    tp = cfg.eval.tensor_parallel_size
    _, options = worker_layout(tp if cfg.train.use_gpu else 0, tp, len(specs))
    bundle = bundle_of(options["num_cpus"], options["num_gpus"])
    return Needs(
        "during evaluation", (Demand("eval workers", 1, bundle, per_key={"GPU": "eval.tensor_parallel_size"}),)
    )


def run_phases(cfg: Config) -> dict[str, Needs]:
    """Every phase of a run that holds cluster resources, in run order: "reference pass" (`reference.run:
    precompute`), "training" (the workers and what lives beside them: stream scorers, hint_rft's rollout actors,
    data tasks), "evaluation" (eval.tasks after training); a phase that holds nothing is left out. `cfg` with
    `train.cpus_per_worker` resolved. The pre-check (`check_cluster`) and `uft-ray validate --cluster` judge these."""
    phases = {"reference pass": reference_pass_needs(cfg), "training": needs(cfg), "evaluation": evaluation_needs(cfg)}
    return {k: v for k, v in phases.items() if v is not None}


def training_first(phases: dict[str, Needs]) -> list[Needs]:
    """The phases as `assess` takes them: training first (what the run waits for), then the others."""
    return [phases["training"], *(n for k, n in phases.items() if k != "training")]


# ---------------------------------------------------------------------------------------------------------
# The cluster: what it has, and what it can become.


@dataclass(frozen=True)
class NodeType:
    """A node type an autoscaler can start: its resources and how many (None: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int | None


@dataclass
class ClusterView:
    nodes: list[dict[str, float]]  # each alive node's total CPU / GPU
    free: dict[str, float]  # available now, cluster-wide
    # What an autoscaler can add; empty on a fixed cluster. `autoscaler` says where it was read ("gcs",
    # "config FILE"), or "none" (a fixed cluster: Ray's read-only monitor), or "unknown" (not visible from here).
    node_types: list[NodeType] = field(default_factory=list)
    autoscaler: str = "none"
    max_workers: int | None = None  # cluster-wide cap on the nodes an autoscaler adds
    max_resources: dict[str, float] = field(default_factory=dict)  # cluster-wide caps (GCS cluster config)
    grow: dict[str, str] = field(default_factory=dict)  # resource -> how to give the cluster more (a file's fields)

    @property
    def scales(self) -> bool:
        return bool(self.node_types)

    def total_now(self) -> dict[str, float]:
        return {r: sum(n.get(r, 0.0) for n in self.nodes) for r in RESOURCES}

    def max_total(self, resource: str) -> float:
        """An upper bound on what the cluster can ever hold of `resource`: its nodes plus the most nodes of each
        type (a type's running nodes counted twice only loosen the bound: it never fails a run wrongly)."""
        now = sum(n.get(resource, 0.0) for n in self.nodes)
        types = [t for t in self.node_types if t.resources.get(resource, 0.0) > 0]
        if any(t.max_count is None for t in types) and self.max_workers is None:
            return math.inf
        if any(t.max_count is None for t in types):  # unlimited types under a cluster-wide cap
            added = [max(t.resources[resource] for t in types)] * (self.max_workers or 0)
        else:
            added = sorted((t.resources[resource] for t in types for _ in range(t.max_count or 0)), reverse=True)
            added = added[: self.max_workers] if self.max_workers is not None else added
        return min(now + sum(added), self.max_resources.get(resource, math.inf))

    def max_placeable(self, bundle: dict[str, float]) -> float:
        """How many `bundle`s the cluster can ever hold at once (exact for one bundle shape on these nodes)."""
        per_node = [_fits(n, bundle) for n in self.nodes]
        added: list[float] = []
        for t in self.node_types:
            k = _fits(t.resources, bundle)
            if k > 0:
                if t.max_count is None:
                    return math.inf
                added += [k] * t.max_count
        added = sorted(added, reverse=True)
        return sum(per_node) + sum(added[: self.max_workers] if self.max_workers is not None else added)


def _fits(node: dict[str, float], bundle: dict[str, float]) -> float:
    """How many `bundle`s one node holds."""
    return min((math.floor(node.get(r, 0.0) / v + _EPS) for r, v in bundle.items() if v > 0), default=0)


@dataclass(frozen=True)
class Fit:
    """`check_cluster`'s answer for a run the cluster can hold: `ok` now, or `waiting` (for what: `line`)."""

    status: str  # ok | waiting
    line: str
    view: ClusterView


def assess(phases: list[Needs], view: ClusterView) -> Fit:
    """Compare what the phases need with the cluster; raises `ClusterTooSmall` when it can never fit."""
    problems: list[str] = []
    if view.autoscaler != "unknown":  # an autoscaler we cannot see may grow the cluster: never fail on a guess
        for needs in phases:
            problems += _never_fits(needs, view)
    if problems:
        raise ClusterTooSmall(problems)
    training = phases[0]
    total, free = training.total(), view.free
    short = {r: v for r, v in total.items() if v > free.get(r, 0.0) + _EPS}
    if not short:
        have = ", ".join(f"{_n(free.get(r, 0.0))} of {_amount(view.total_now()[r], r)} free" for r in total)
        return Fit("ok", f"cluster: the run needs {training.summary()} {training.phase}; {have}", view)
    has = _free_line(short, view)
    if view.scales:
        types = ", ".join(f"{t.name} {_bundle(t.resources)} x up to {'any' if t.max_count is None else t.max_count}"
                          for t in view.node_types)  # fmt: skip
        line = f"waiting for the autoscaler: need {training.summary()}; {has} (it can add: {types})"
    elif view.autoscaler == "unknown":
        line = (f"waiting for resources: need {training.summary()}; {has}; uft-ray cannot see whether this cluster "
                f"autoscales (no GCS cluster config, no autoscaler on this node): if it does not, stop the run and "
                f"lower {', '.join(_all_keys(training, short))}")  # fmt: skip
    else:
        line = f"waiting for other work on the cluster to free resources: need {training.summary()}; {has}"
    return Fit("waiting", line, view)


def _free_line(short: dict[str, float], view: ClusterView) -> str:
    now = view.total_now()
    return "the cluster has " + ", ".join(
        f"{_n(view.free.get(r, 0.0))} of {_amount(now.get(r, 0.0), r)} free" for r in short
    )


def _all_keys(needs: Needs, resources: dict[str, float]) -> list[str]:
    out: list[str] = []
    for r in resources:
        out += [k for k in needs.keys(r) if k not in out]
    return out


def _never_fits(needs: Needs, view: ClusterView) -> list[str]:
    out, short = [], set()
    for r, want in needs.total().items():
        cap = view.max_total(r)
        if want > cap + _EPS:
            short.add(r)
            instead = "".join(f", or {d.instead}" for d in needs.demands if d.instead and d.amount(r) > 0)
            grow = _grow(view, r)
            fix = (
                f"Lower {' or '.join(needs.keys(r))}{instead}, or {grow}"
                if needs.keys(r)
                else grow[0].upper() + grow[1:]
            )
            out.append(f"cluster: {needs.phase} the run needs {needs.explain(r)}; {_has(view, r, cap)}. {fix}")
    for d in needs.demands:
        fit = view.max_placeable(d.bundle)
        keys = ", ".join(dict.fromkeys(k for r in d.bundle for k in d.keys(r)))
        each = f"{_bundle(d.bundle)}" + (f" ({keys})" if keys else "")
        if fit == 0:
            out.append(
                f"cluster: no node can ever hold one of the {d.what} {needs.phase}, {each}; {_nodes_line(view)}"
            )
        elif fit < d.count and not short & set(d.bundle):  # the totals fit, the bundles do not pack onto nodes
            out.append(f"cluster: at most {_n(fit)} of the {d.count} {d.what} of {each} fit on its nodes at once "
                       f"{needs.phase}; {_nodes_line(view)}")  # fmt: skip
    return out


def _has(view: ClusterView, resource: str, cap: float) -> str:
    now = view.total_now().get(resource, 0.0)
    if not view.scales:
        return f"the cluster has {_amount(now, resource)} and no autoscaler to add more"
    return f"the cluster has {_amount(now, resource)} and its autoscaler can grow it to at most {_n(cap)}"


def _grow(view: ClusterView, resource: str) -> str:
    if resource in view.grow:
        return view.grow[resource]
    if view.scales:
        return f"raise max_workers of a node type with {_unit(resource, 2)} in the autoscaler's config"
    flag = "--num-cpus" if resource == "CPU" else "--num-gpus"
    return f"give the cluster more {_unit(resource, 2)} (more nodes, or `ray start {flag}=N` on a node)"


def _nodes_line(view: ClusterView) -> str:
    nodes = ", ".join(_bundle(n) for n in view.nodes) or "none"
    types = ", ".join(f"{t.name} {_bundle(t.resources)}" for t in view.node_types)
    return f"its nodes: {nodes}" + (f"; node types it can add: {types}" if types else "")


# ---------------------------------------------------------------------------------------------------------
# Numbers in messages.


def _n(x: float) -> str:
    return "any" if x == math.inf else f"{x:g}"


def _unit(resource: str, x: float) -> str:
    return resource if x == 1 else f"{resource}s"


def _amount(x: float, resource: str) -> str:
    return f"{_n(x)} {_unit(resource, x)}"


def _bundle(bundle: dict[str, float]) -> str:
    return "{" + (", ".join(f"{r}: {_n(v)}" for r, v in bundle.items()) or "CPU: 0") + "}"
