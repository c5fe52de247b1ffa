"""Whether a run fits a cluster file, offline, before paying for the cluster (`uft-ray validate CONFIG --cluster FILE`).

The file is a Ray cluster-launcher YAML (`available_node_types`, `head_node_type`, `max_workers`) or a KubeRay
manifest (RayCluster, or the `rayClusterSpec` of a RayJob / RayService). `read_cluster_file` turns it into the
`ClusterView` the run's pre-check (`uft_ray.cluster_probe.check_cluster`) judges: the head and any fixed workers as
nodes, each autoscaled group as a `NodeType` with its most nodes. `check_file` takes every phase of the run from
`resources.run_phases` (the pre-check's own list) and holds each against it with `resources.assess`. No Ray.

What Ray will see on a node, as the file says it:
- launcher: a type's `resources` (CPU, GPU); a type without them (`resources: {}`, Ray detects them when the node
  starts) holds nothing schedulable here, and its line says so. A type's `max_workers` defaults to the
  top-level one, which also caps the worker nodes in all.
- KubeRay: the group's `resources`, else `rayStartParams` num-cpus / num-gpus, else the first (Ray) container's
  `resources.limits`, else its `requests`: `cpu` and the key ending in `gpu` (`nvidia.com/gpu`), rounded up to a
  whole number as KubeRay passes them to `ray start` (a quantity's Value(): "500m" -> 1 CPU). With
  `enableInTreeAutoscaling` a group adds up to `maxReplicas` x `numOfHosts` nodes; without it the group is
  `replicas` (held within min/maxReplicas) x `numOfHosts` fixed nodes.
Memory is shown where the file gives it but not checked: a run asks Ray for CPUs and GPUs only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uft_ray.config import Config, ConfigError
from uft_ray.resources import (
    RESOURCES,
    AutoCpus,
    ClusterTooSmall,
    ClusterView,
    Needs,
    NodeType,
    assess,
    auto_worker_cpus,
    run_phases,
    with_worker_cpus,
)

KUBE_MAX_REPLICAS = 2147483647  # the CRD's default maxReplicas: no limit
MEMORY_NOT_CHECKED = "memory is not checked (a run asks Ray for CPUs and GPUs only)"
_EPS = 1e-9
_SUFFIX = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "u": 1e-6, "n": 1e-9}
_SUFFIX |= {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)([a-zA-Z]*)$")


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster file as `assess` sees it, and one line per node or node type as read."""

    path: str
    kind: str  # "Ray cluster launcher" | "KubeRay RayCluster" | "KubeRay RayJob" | "KubeRay RayService"
    view: ClusterView
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PhaseFit:
    """One phase of a run against a cluster file: `problems` empty when it fits (`where`: on what)."""

    name: str  # "reference pass" | "training" | "evaluation"
    needs: Needs | None  # None: the run has no such phase (`why`)
    problems: list[str] = field(default_factory=list)
    where: str = ""
    why: str = ""

    def line(self) -> str:
        if self.needs is None:
            return f"{self.name}: none ({self.why})"
        verdict = "NEVER FITS" if self.problems else f"fits ({self.where})"
        return f"{self.name}: {self.needs.summary()}: {verdict}"


# ---------------------------------------------------------------------------------------------------------
# Reading the file


def read_cluster_file(path: str | Path) -> ClusterSpec:
    """The cluster file at `path` (launcher YAML, or a KubeRay manifest; the first such document of a multi-document
    file). ConfigError naming the file and the field when it is neither, or a field is malformed."""
    where = str(path)
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"cannot read cluster file {where}: {e}"]) from None
    for doc in docs:
        if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
            return kuberay_spec(doc, where)
        if "available_node_types" in doc:
            return launcher_spec(doc, where)
    raise ConfigError([f"{where}: neither a Ray cluster-launcher YAML (available_node_types) nor a KubeRay "
                       f"RayCluster / RayJob / RayService manifest (kind)"])  # fmt: skip


def launcher_worker_types(config: dict[str, Any]) -> tuple[list[NodeType], int | None, list[str]]:
    """A launcher config's worker types with resources (the head and `max_workers: 0` types left out), the
    top-level `max_workers` (None: not set), and the names of the types without resources (unknown here)."""
    head, cap = config.get("head_node_type"), config.get("max_workers")
    types, unknown = [], []
    for name, spec in (config.get("available_node_types") or {}).items():
        most = (spec or {}).get("max_workers", cap)
        resources = _cpu_gpu((spec or {}).get("resources") or {})
        if name == head or most == 0:
            continue
        if not resources:
            unknown.append(name)
            continue
        types.append(NodeType(name, resources, None if most is None else int(most)))
    return types, None if cap is None else int(cap), unknown


def launcher_spec(config: dict[str, Any], path: str) -> ClusterSpec:
    """A Ray cluster-launcher config: the head a node (nothing schedulable when its resources are not given),
    the other types what the autoscaler can add."""
    types_cfg = config.get("available_node_types")
    if not isinstance(types_cfg, dict) or not types_cfg:
        raise ConfigError([f"{path}: available_node_types: a mapping of node types is required"])
    head = config.get("head_node_type")
    if head not in types_cfg:
        raise ConfigError([f"{path}: head_node_type: {head!r} is not one of available_node_types"])
    types, cap, unknown = launcher_worker_types(config)
    head_res = (types_cfg[head] or {}).get("resources") or {}
    nodes = [_cpu_gpu(head_res)] if _cpu_gpu(head_res) else []
    lines = [f"{head} (head): " + (f"{_bundle(nodes[0])}{_memory(head_res.get('memory'))}" if nodes else
             f"resources {head_res or '{}'} (not given: Ray detects them when the node starts); counted as "
             f"holding nothing schedulable")]  # fmt: skip
    for t in types:
        spec = types_cfg[t.name]
        lines.append(f"{t.name}: {_bundle(t.resources)}{_memory(spec['resources'].get('memory'))}, "
                     f"{spec.get('min_workers', 0)} to {'any' if t.max_count is None else t.max_count} nodes")  # fmt: skip
    lines += [
        f"{n}: resources not given (Ray detects them when a node starts); counted as holding nothing" for n in unknown
    ]
    lines.append(
        (f"at most {cap} worker nodes in all (max_workers); " if cap is not None else "") + MEMORY_NOT_CHECKED
    )
    also = " (and the top-level max_workers)" if cap is not None else ""
    grow = {r: (f"raise max_workers of a node type with {r}s{also} in {path}" if any(r in t.resources for t in types)
                else f"add a node type with {r}s to available_node_types in {path}") for r in RESOURCES}  # fmt: skip
    view = ClusterView(nodes=nodes, free={}, node_types=types, autoscaler=f"config {path}", max_workers=cap, grow=grow)
    return ClusterSpec(path, "Ray cluster launcher", view, lines)


def kuberay_spec(manifest: dict[str, Any], path: str) -> ClusterSpec:
    """A KubeRay RayCluster, or the `rayClusterSpec` of a RayJob / RayService."""
    kind = manifest.get("kind")
    spec = manifest.get("spec") or {}
    cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec")
    field_ = "spec" if kind == "RayCluster" else "spec.rayClusterSpec"
    if not isinstance(cluster, dict) or not isinstance(cluster.get("headGroupSpec"), dict):
        raise ConfigError([f"{path}: {field_}.headGroupSpec: required in a {kind}"])
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    head, head_mem, head_from = group_resources(cluster["headGroupSpec"])
    nodes, types = [head], []
    lines = [f"head: {_bundle(head)}{_memory(head_mem)} ({head_from}){'' if head else ': holds nothing schedulable'}"]
    for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
        name = g.get("groupName") or f"{field_}.workerGroupSpecs[{i}]"
        res, mem, source = group_resources(g)
        hosts = int(g.get("numOfHosts", 1))
        low, high = int(g.get("minReplicas", 0)), int(g.get("maxReplicas", KUBE_MAX_REPLICAS))
        if g.get("suspend"):
            low = high = 0
        if autoscaling:
            most = None if high >= KUBE_MAX_REPLICAS else high * hosts
            if res and most != 0:
                types.append(NodeType(name, res, most))
            count = f"{low * hosts} to {'any' if most is None else most} nodes (maxReplicas)"
        else:
            n = min(max(int(g.get("replicas", 0)), low), high) * hosts
            nodes += [res] * n
            count = f"{n} nodes (replicas; no autoscaler)"
        known = "" if res else ": holds nothing schedulable"
        lines.append(f"{name}: {_bundle(res)}{_memory(mem)} ({source}), {count}{known}")
    lines.append(MEMORY_NOT_CHECKED)
    field_name = "maxReplicas" if autoscaling else "replicas"
    grow = {r: (f"raise {field_name} of a worker group with {r}s in {path}" if any(r in n for n in nodes[1:]) or
                any(r in t.resources for t in types) else f"add a worker group with {r}s in {path}")
            for r in RESOURCES}  # fmt: skip
    view = ClusterView(nodes=nodes, free={}, node_types=types, autoscaler=f"config {path}", grow=grow)
    return ClusterSpec(path, f"KubeRay {kind}", view, lines)


def group_resources(group: dict[str, Any]) -> tuple[dict[str, float], float | None, str]:
    """What Ray gets on one pod of a KubeRay group: ({CPU, GPU} with zeros left out, memory in bytes or None,
    where the numbers came from). Precedence as KubeRay's: the group's `resources`, `rayStartParams`, the Ray
    container's limits, then its requests; CPUs and GPUs rounded up to whole numbers (what `ray start` gets)."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    given = {k: str(v) for k, v in (group.get("resources") or {}).items()}
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or [{}]
    res = containers[0].get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}

    def first(key: str, param: str, k8s: str) -> tuple[float | None, str]:
        if key in given:
            return k8s_quantity(given[key]), "resources"
        if param in params:
            return k8s_quantity(params[param]), "rayStartParams"
        for name, table in (("limits", limits), ("requests", requests)):
            hits = [v for k, v in table.items() if k == k8s or (k8s == "gpu" and str(k).endswith("gpu"))]
            if hits:
                return k8s_quantity(hits[0]), f"container {name}"
        return None, ""

    out, sources = {}, []
    for r, param, k8s in (("CPU", "num-cpus", "cpu"), ("GPU", "num-gpus", "gpu")):
        value, source = first(r, param, k8s)
        if value:
            out[r] = float(math.ceil(value - _EPS))
        sources.append(f"{r} from {source}" if source else f"no {r} given")
    memory, _ = first("memory", "memory", "memory")
    return out, memory, ", ".join(sources)


def k8s_quantity(value: Any) -> float:
    """A Kubernetes quantity as a number: "500m" 0.5, "16" 16, "32Gi" 2**35, "1e3" 1000."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _QUANTITY.match(str(value).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ConfigError([f"{value!r} is not a Kubernetes quantity (e.g. 16, 500m, 32Gi)"])
    return float(m.group(1)) * _SUFFIX[m.group(2)]


# ---------------------------------------------------------------------------------------------------------
# Holding the run against it


def file_worker_cpus(cfg: Config, spec: ClusterSpec) -> AutoCpus | None:
    """What `train.cpus_per_worker: auto` resolves to on the file's cluster (the run's own rule,
    `uft_ray.resources.auto_worker_cpus`, without a cap by this machine's cores), or None when it is a number."""
    return auto_worker_cpus(cfg, spec.view) if cfg.train.cpus_per_worker == "auto" else None


def check_file(cfg: Config, spec: ClusterSpec) -> list[PhaseFit]:
    """Every phase of the run against the file, in run order: the reference pass, training (with what lives beside
    the workers: stream scorers, rollout actors, data tasks), evaluation. `train.cpus_per_worker: auto` is
    resolved as the run resolves it (`file_worker_cpus`)."""
    auto = file_worker_cpus(cfg, spec)
    sized = with_worker_cpus(cfg, auto.cpus) if auto is not None else cfg
    phases = run_phases(sized)
    out = []
    for name in ("reference pass", "training", "evaluation"):
        needs = phases.get(name)
        if needs is None:
            out.append(PhaseFit(name, None, why=_absent(sized, name)))
            continue
        try:
            assess([needs], spec.view)
        except ClusterTooSmall as e:
            out.append(PhaseFit(name, needs, list(e.messages)))
            continue
        out.append(PhaseFit(name, needs, where=placement(needs, spec.view)))
    return out


def never_fits(fits: list[PhaseFit]) -> ClusterTooSmall | None:
    """One ClusterTooSmall with every phase's problems, or None when every phase fits."""
    problems = [m for f in fits for m in f.problems]
    return ClusterTooSmall(problems) if problems else None


def _absent(cfg: Config, name: str) -> str:
    if name == "evaluation":
        return "no eval.tasks or eval.preset"
    if name == "reference pass" and cfg.reference_from_cache:
        return "reference.run stream: the scorers run beside training"
    return "no reference actors"


def placement(needs: Needs, view: ClusterView) -> str:
    """Where the phase's bundles go (first fit, largest first): on the fixed nodes, or on how many nodes of each
    type that can hold it alone; a phase only several types together hold is said so."""
    bundles = sorted((dict(d.bundle) for d in needs.demands for _ in range(d.count)),
                     key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)), reverse=True)  # fmt: skip
    if _pack(bundles, view.nodes, None, 0) is not None:
        return "on its nodes"
    ways = []
    for t in view.node_types:
        limits = [x for x in (t.max_count, view.max_workers) if x is not None]
        added = _pack(bundles, view.nodes, t.resources, min(limits) if limits else None)
        if added is not None:
            ways.append(f"{added} of up to {'any' if not limits else min(limits)} {t.name}")
    return ", or ".join(ways) if ways else "by the totals; no one node type holds it alone"


def _pack(bundles: list[dict[str, float]], fixed: list[dict[str, float]], new: dict[str, float] | None,
          limit: int | None) -> int | None:  # fmt: skip
    """New nodes of resources `new` (at most `limit`) needed beside `fixed` to hold `bundles`; None: they do not."""
    bins = [dict(n) for n in fixed]
    added = 0
    for b in bundles:
        home = next((x for x in bins if all(x.get(r, 0.0) + _EPS >= v for r, v in b.items())), None)
        if home is None:
            if new is None or (limit is not None and added >= limit):
                return None
            if not all(new.get(r, 0.0) + _EPS >= v for r, v in b.items()):
                return None
            home = dict(new)
            bins.append(home)
            added += 1
        for r, v in b.items():
            home[r] = home.get(r, 0.0) - v
    return added


def _cpu_gpu(resources: dict[str, Any]) -> dict[str, float]:
    return {r: float(resources[r]) for r in RESOURCES if resources.get(r)}


def _bundle(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {v:g}" for r, v in res.items()) + "}"


def _memory(value: Any) -> str:
    if value in (None, ""):
        return ""
    return f", memory {k8s_quantity(value) / 2**30:g} GiB"
