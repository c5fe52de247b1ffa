"""Are the packages a run's backends import there, on the nodes that will import them?

vLLM is not in the default image (infra/Dockerfile), yet the GPU hint_rft recipes set `rft.rollout.backend:
vllm`: without this check the rollout actors die at `from vllm import LLM` minutes into a run, after the data
work. `check_backends(cfg)` runs in the driver right after the cluster pre-check (`runner.open_run`), before any
data or cluster work:

- `backends_needed(cfg)`: each package a backend of the run imports, with the config field that chose it and the
  Ray resources of the actor that imports it: the method's own (`Method.backends`: hint_rft's `vllm` for
  `rft.rollout.backend: vllm`, or `auto` resolved to vllm, on nodes that hold one rollout actor); `lm_eval` for `eval.tasks` / `eval.preset` on nodes that hold one eval
  worker (and `vllm` too for lm_eval's vLLM backend).
- One tiny Ray task per package and node that can hold the actor (`nodes_that_hold`): pinned to that node, it asks
  for no resources of its own, so a node busy with other work still answers at once, and every node of the kind
  is checked (a mixed cluster fails too). It returns `importlib.util.find_spec` (no import: vLLM's pulls in CUDA)
  and the installed version (`probe`).
- No alive node can hold the actor yet (an autoscaler adds it when the run asks): one task with the actor's own
  resources, which asks the autoscaler for such a node; not scheduled within `timeout_s`, it is cancelled and the
  check deferred (one line says so), never failed: the actor itself then fails at its import naming the image.

A missing package raises `BackendMissing` (a `ConfigError`: the CLI exits 2) naming the package, the field, the
nodes and the image to run there (`infra/Dockerfile --target vllm`, tagged `VLLM_IMAGE`).

The lists and messages are pure (tests/unit/test_backends_needed.py); the probes need Ray (tests/integration/
test_preflight.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from uft_ray import methods
from uft_ray.config import Config, ConfigError
from uft_ray.console import say
from uft_ray.resources import evaluation_needs

logger = logging.getLogger(__name__)

IMAGE = "uft-ray:0.1.0"  # infra/Dockerfile's default target (infra/cluster.yaml, infra/kuberay/rayjob.yaml)
IMAGE_BUILD = f"docker build -t {IMAGE} -f infra/Dockerfile ."
VLLM_TARGET = "vllm"  # infra/Dockerfile's stage with vLLM and the torch it pins
VLLM_IMAGE = f"{IMAGE}-vllm"
VLLM_BUILD = f"docker build --target {VLLM_TARGET} -t {VLLM_IMAGE} -f infra/Dockerfile ."
PROBE_TIMEOUT_S = 60.0  # how long a probe may wait to be scheduled before the check is deferred

# The image that has each package, and how to get it.
_WHERE = {
    "vllm": (VLLM_IMAGE, VLLM_BUILD, "or `pip install 'uft-ray[vllm]'` in the nodes' environment"),
    "lm_eval": (IMAGE, IMAGE_BUILD, "or `pip install lm_eval` in the nodes' environment (a uft-ray dependency)"),
}


class BackendMissing(ConfigError):
    """A package a backend imports is not installed where it runs; `messages` name the package, the field that
    chose it, the nodes and the image to use."""

    def __init__(self, messages: list[str]):
        super().__init__(messages)
        self.args = (
            "a backend's package is not installed where it runs:\n" + "\n".join(f"  - {m}" for m in self.messages),
        )


@dataclass(frozen=True)
class BackendNeed:
    """`package` must import on the nodes that run `what`, each asking Ray for `resources`."""

    package: str  # import name: vllm, lm_eval
    field: str  # what chose it: "rft.rollout.backend: vllm", "eval.tasks"
    what: str  # plural noun: "rollout actors"
    resources: dict[str, float] = field(default_factory=dict)  # the actor's num_cpus / num_gpus


def backends_needed(cfg: Config, eval_backend: str = "auto") -> list[BackendNeed]:
    """The packages the run's backends import and where: the method's actors' (hint_rft's rollout actors: vllm),
    then the benchmarks after training (lm_eval; and vllm with `eval_backend` vllm: a run's is `auto`, which falls
    back to hf where vLLM is not installed). Resources as each actor asks Ray for them."""
    out = list(methods.of(cfg).backends(cfg))
    evaluation = evaluation_needs(cfg)
    if evaluation is not None:
        bundle = evaluation.demands[0].bundle
        resources = {"num_cpus": float(bundle.get("CPU", 0.0)), "num_gpus": float(bundle.get("GPU", 0.0))}
        chosen = f"eval.preset: {cfg.eval.preset}" if cfg.eval.preset else "eval.tasks"
        out.append(BackendNeed("lm_eval", chosen, "eval workers", resources))
        if eval_backend == "vllm":
            out.append(BackendNeed("vllm", "eval backend: vllm", "eval workers", resources))
    return out


def nodes_that_hold(nodes: list[dict[str, Any]], resources: dict[str, float]) -> list[dict[str, Any]]:
    """The alive nodes (`ray.nodes()` entries) whose total resources hold one actor of `resources`."""
    want = {"CPU": resources.get("num_cpus", 0.0), "GPU": resources.get("num_gpus", 0.0)}
    return [
        n
        for n in nodes
        if n.get("Alive") and all((n.get("Resources") or {}).get(r, 0.0) + 1e-9 >= v for r, v in want.items())
    ]


def probe(package: str) -> dict[str, Any]:
    """Whether `package` is importable here (found, not imported) and its installed version; the Ray task's body."""
    found = importlib.util.find_spec(package) is not None
    version = None
    if found:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # the standard library, or a module of another name
            pass
    return {"package": package, "found": found, "version": version, "node": _node_name()}


def _node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # outside Ray, or a Ray without a node
        pass
    return socket.gethostname()


def missing_line(need: BackendNeed, nodes: list[str]) -> str:
    """One message: the field, the package, the nodes without it, and the image to run there."""
    image, build, other = _WHERE.get(need.package, (IMAGE, IMAGE_BUILD, f"or install {need.package}"))
    where = f"node {nodes[0]}" if len(nodes) == 1 else f"{len(nodes)} nodes ({', '.join(nodes)})"
    line = (
        f"{need.field}: the {need.what} import {need.package}, not installed on {where} that can hold one of "
        f"them, {_bundle(need.resources)}. Run the image {image} on those nodes ({build}), {other}"
    )
    if need.what == "rollout actors":
        line += ", or set rft.rollout.backend hf"
    return line


def package_missing_error(package: str, chosen: str, what: str) -> ImportError:
    """The ImportError an actor raises when its backend's package is missing (one the pre-check could not see)."""
    image, build, other = _WHERE.get(package, (IMAGE, IMAGE_BUILD, f"or install {package}"))
    return ImportError(
        f"{chosen}: the {what} import {package}, not installed on this node ({_node_name()}); run the image "
        f"{image} here ({build}), {other}"
    )


def _bundle(resources: dict[str, float]) -> str:
    parts = [(r, resources.get(k, 0.0)) for r, k in (("CPU", "num_cpus"), ("GPU", "num_gpus"))]
    return "{" + (", ".join(f"{r}: {v:g}" for r, v in parts if v > 0) or "CPU: 0") + "}"


# ---------------------------------------------------------------------------------------------------------
# The probes, on the connected cluster.


def check_backends(cfg: Config, *, eval_backend: str = "auto", timeout_s: float = PROBE_TIMEOUT_S) -> list[dict]:
    """Probe every package `backends_needed` lists on the nodes that will import it; raise `BackendMissing` naming
    what is missing, else print one line of what was found (or deferred). Returns the probes' answers."""
    needs = backends_needed(cfg, eval_backend)
    if not needs:
        return []
    import ray  # Ray: imported when the cluster is probed
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(max_retries=0)(probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    calls: dict[tuple[str, str], Any] = {}  # (package, node id or the resources) -> ref: one probe per node
    asked: list[tuple[BackendNeed, list[tuple[str, str]]]] = []
    for need in needs:
        keys = []
        held = nodes_that_hold(nodes, need.resources)
        for node in held:
            key = (need.package, node["NodeID"])
            if key not in calls:
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                calls[key] = task.options(num_cpus=0, scheduling_strategy=strategy).remote(need.package)
            keys.append(key)
        if not held:  # none up yet: ask for the actor's own resources (the autoscaler may add such a node)
            key = (need.package, _bundle(need.resources))
            if key not in calls:
                calls[key] = task.options(**need.resources).remote(need.package)
            keys.append(key)
        asked.append((need, keys))
    refs = list(calls.values())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers: dict[tuple[str, str], dict[str, Any] | None] = {}
    for key, ref in calls.items():
        answers[key] = None
        if ref not in ready:
            ray.cancel(ref)
            continue
        try:
            answers[key] = ray.get(ref)
        except ray.exceptions.RayError as e:  # a node lost while probing: no verdict on it
            logger.warning("backend probe of %s on %s failed: %s", key[0], key[1], e)
    problems, found, deferred = [], [], []
    for need, keys in asked:
        got = [answers[k] for k in keys if answers[k] is not None]
        missing = [a["node"] for a in got if not a["found"]]
        if missing:
            problems.append(missing_line(need, missing))
        if len(got) < len(keys):
            deferred.append(
                f"{need.package} for the {need.what} ({need.field}): {len(keys) - len(got)} of {len(keys)} probes "
                f"where {_bundle(need.resources)} fits not answered within {timeout_s:g} s (no such node up yet); "
                f"the {need.what} import it when they start"
            )
        versions = sorted({a["version"] or "?" for a in got if a["found"]})
        if versions:
            found.append(f"{need.package} {'/'.join(versions)} for the {need.what} on {len(got)} node(s)")
    if problems:
        raise BackendMissing(problems)
    for line in deferred:
        say(f"backend check deferred: {line}")
    if found:
        say("backends: " + "; ".join(found))
    return [a for a in answers.values() if a is not None]
