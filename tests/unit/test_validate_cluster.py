"""`uft-ray validate CONFIG --cluster FILE`: every phase of a run against a cluster file, offline, no Ray.

The cluster files are the repo's own (infra/cluster.yaml, infra/kuberay/rayjob.yaml) and small ones written here;
every expected number is worked out by hand in the test's docstring from the files' fields and the config's.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from uft_ray import cli
from uft_ray.cluster_spec import check_file, group_resources, k8s_quantity, read_cluster_file
from uft_ray.config import ConfigError, load_config
from uft_ray.demo import TINY_CONFIGS as DEMO
from uft_ray.resources import NodeType, run_phases, with_worker_cpus

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "infra" / "cluster.yaml"
RAYJOB = ROOT / "infra" / "kuberay" / "rayjob.yaml"
QWEN32B = ROOT / "jobs" / "configs" / "qwen25_32b_uft.yaml"
RUN_CONFIGS = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.yaml") if not p.name.startswith("compare_"))


def _gpu(path: Path) -> bool:
    return bool((yaml.safe_load(path.read_text()).get("train") or {}).get("use_gpu"))


def _rayjob_config() -> str:
    """The config the RayJob's entrypoint runs (the image's /home/ray/uft-ray is the repo)."""
    argv = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    return Path(argv[argv.index("--config") + 1]).name


def _clusters_for(path: Path) -> list[Path]:
    """The cluster files a recipe ships for: every GPU recipe is launched with `ray job submit --runtime-env
    infra/runtime_env.yaml` on the launcher's cluster (infra/cluster.yaml); the RayJob ships for the config its
    entrypoint names."""
    head = path.read_text().split("\n\n", 1)[0]
    out = [LAUNCHER] if "--runtime-env infra/runtime_env.yaml" in head else []
    return out + ([RAYJOB] if path.name == _rayjob_config() else [])


GPU_RECIPES = [(p, c) for p in RUN_CONFIGS if _gpu(p) for c in _clusters_for(p)]


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


# ---------------------------------------------------------------------------------------------------------
# Every GPU recipe fits the cluster it ships for


def test_every_gpu_recipe_has_a_cluster_file():
    gpu = [p.name for p in RUN_CONFIGS if _gpu(p)]
    assert len(gpu) >= 10 and "qwen25_32b_uft.yaml" in gpu
    assert {p.name for p, _ in GPU_RECIPES} == set(gpu)
    assert (QWEN32B, RAYJOB) in GPU_RECIPES and (QWEN32B, LAUNCHER) in GPU_RECIPES


@pytest.mark.parametrize("recipe,cluster", GPU_RECIPES, ids=lambda p: p.name)
def test_every_gpu_recipe_fits_the_cluster_it_ships_for(recipe, cluster, capsys):
    rc = cli.main(["validate", str(recipe), "--no-check-paths", "--cluster", str(cluster)])
    out, errs = capsys.readouterr()
    assert rc == 0, errs
    phases = [line for line in out.splitlines() if line.split(":")[0] in ("reference pass", "training", "evaluation")]
    assert len(phases) == 3 and "NEVER" not in out and errs == ""
    assert next(p for p in phases if p.startswith("training:")).endswith(")") and "fits (" in out


def test_the_32b_recipe_precomputes_on_three_nodes(capsys):
    """Training: 24 workers x {CPU 8, GPU 1} = 8 per 8-GPU node (64 of its 192 / 96 CPUs), so 3 nodes; the data
    task's CPU fits beside them. The reference pass: 24 actors x {CPU 4, GPU 1}, again 3 nodes. The launcher's head
    gives no resources: counted as nothing."""
    assert cli.main(["validate", str(QWEN32B), "--no-check-paths", "--cluster", str(LAUNCHER)]) == 0
    out = capsys.readouterr().out
    assert "head (head): resources {} (not given: Ray detects them when the node starts); counted as holding " \
           "nothing schedulable" in out  # fmt: skip
    assert ("training: 24 x {CPU: 8, GPU: 1} for training workers + 0.25 CPUs for data tasks: fits "
            "(3 of up to 4 gpu_h100x8, or 3 of up to 4 gpu_a100x8)") in out  # fmt: skip
    assert ("reference pass: 24 x {CPU: 4, GPU: 1} for reference actors + 1 CPU for data tasks: fits "
            "(3 of up to 4 gpu_h100x8, or 3 of up to 4 gpu_a100x8)") in out  # fmt: skip
    assert "evaluation: none (no eval.tasks or eval.preset)" in out
    assert "memory is not checked" in out


def test_the_old_32b_shape_never_fits_and_names_gpu_and_the_fields(capsys):
    """reference.run stream with 8 actors: a pool per rank, 24 x 8 = 192 scorer GPUs + 24 trainer GPUs = 216; the
    launcher can add at most 8 worker nodes (top-level max_workers) of 8 GPUs = 64."""
    argv = ["validate", str(QWEN32B), "--no-check-paths", "--cluster", str(LAUNCHER)]
    assert cli.main(argv + ["reference.run=stream", "reference.actors=8"]) == 2
    out, errs = capsys.readouterr()
    assert "reference pass: none (reference.run stream: the scorers run beside training)" in out
    assert "+ 192 x {CPU: 4, GPU: 1} for reference actors + 0.25 CPUs for data tasks: NEVER FITS" in out
    assert errs.startswith(f"{QWEN32B} can never run on {LAUNCHER}:")
    assert "while training the run needs 216 GPUs" in errs and "can grow it to at most 64" in errs
    assert "train.num_workers x reference.actors" in errs and "set reference.run precompute" in errs
    assert f"raise max_workers of a node type with GPUs (and the top-level max_workers) in {LAUNCHER}" in errs


def test_a_cluster_check_without_path_checks_still_refuses_a_bad_config(capsys):
    rc = cli.main(["validate", str(QWEN32B), "--no-check-paths", "--cluster", str(LAUNCHER), "train.lr=-1"])
    assert rc == 2 and "train.lr" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Training fits, evaluation never does


def test_evaluation_that_no_node_can_hold_exits_2_naming_the_phase(tmp_path, capsys):
    """4-GPU nodes, at most 2: training 4 workers x {CPU 8, GPU 1} (train.cpus_per_worker auto: a 32-CPU node's
    CPUs shared by the 4 workers its GPUs hold) + 0.25 data CPU fits one node (the data share on the head, or a
    second node); the reference pass
    (4 actors x {CPU 1, GPU 1} + 1) too. Evaluation: eval.tensor_parallel_size 8 -> one actor of {CPU 1, GPU 8}.
    The cluster's 8 GPUs in all would cover it, but no one node holds 8."""
    cluster = _write(tmp_path, "small.yaml", {
        "cluster_name": "small",
        "max_workers": 2,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4}, "node_config": {}},
            "gpu4": {"min_workers": 0, "max_workers": 2, "resources": {"CPU": 32, "GPU": 4}, "node_config": {}},
        },
    })  # fmt: skip
    overrides = ["train.num_workers=4", "reference.actors=4", "eval.tasks=[hellaswag]", "eval.tensor_parallel_size=8"]
    cfg = str(ROOT / "jobs" / "configs" / "mistral7b_uft.yaml")
    rc = cli.main(["validate", cfg, "--no-check-paths", "--cluster", str(cluster), *overrides])
    out, errs = capsys.readouterr()
    assert rc == 2
    assert "head (head): {CPU: 4}" in out and "gpu4: {CPU: 32, GPU: 4}, 0 to 2 nodes" in out
    assert "train.cpus_per_worker auto: 8 CPUs per worker, the largest share that fits" in out
    assert (
        "training: 4 x {CPU: 8, GPU: 1} for training workers + 0.25 CPUs for data tasks: fits (1 of up to 2 gpu4)"
        in out
    )
    assert "evaluation: 1 x {CPU: 1, GPU: 8} for eval workers: NEVER FITS" in out
    assert (
        "no node can ever hold one of the eval workers during evaluation, {CPU: 1, GPU: 8} "
        "(eval.tensor_parallel_size); its nodes: {CPU: 4}; node types it can add: gpu4 {CPU: 32, GPU: 4}"
    ) in errs
    assert "while training" not in errs and "reference pass" not in errs
    # tensor_parallel_size 4 fits one node: the same run exits 0
    assert cli.main(["validate", cfg, "--no-check-paths", "--cluster", str(cluster), *overrides[:-1],
                     "eval.tensor_parallel_size=4"]) == 0  # fmt: skip
    assert "evaluation: 1 x {CPU: 1, GPU: 4} for eval workers: fits (1 of up to 2 gpu4)" in capsys.readouterr().out


def test_run_phases_evaluation_bundle_is_the_eval_workers():
    """The demo (CPU): eval.tasks -> one eval actor of {CPU 1} (worker_layout with 0 GPUs); no tasks -> no phase.
    On GPU, tensor_parallel_size 2 -> {CPU 1, GPU 2}. The reference pass (1 actor + 1 data CPU) comes first."""
    cfg = load_config(str(DEMO["uft"]), ["train.cpus_per_worker=1"], check_paths=False)
    assert list(run_phases(cfg)) == ["reference pass", "training"]
    cfg = load_config(str(DEMO["uft"]), ["train.cpus_per_worker=1", "eval.tasks=[hellaswag, arc_easy]"],
                      check_paths=False)  # fmt: skip
    phases = run_phases(cfg)
    assert list(phases) == ["reference pass", "training", "evaluation"]
    assert [(d.what, d.count, d.bundle) for d in phases["evaluation"].demands] == [("eval workers", 1, {"CPU": 1.0})]
    gpu = load_config(str(ROOT / "jobs/configs/mistral7b_uft.yaml"), ["eval.tasks=[hellaswag]",
                      "eval.tensor_parallel_size=2"], check_paths=False)  # fmt: skip
    ev = run_phases(with_worker_cpus(gpu, 1))["evaluation"]
    assert ev.total() == {"CPU": 1.0, "GPU": 2.0} and ev.keys("GPU") == ["eval.tensor_parallel_size"]


def test_compare_paper_arms_fit_with_their_benchmarks():
    """compare_paper.yaml adds eval.preset uft-paper to every arm: one eval actor of {CPU 1, GPU 1} after each run,
    beside 8 x {CPU 1, GPU 1} workers: every phase of every stage fits one 8-GPU node of infra/cluster.yaml."""
    from uft_ray.compare import load_recipe

    spec = read_cluster_file(LAUNCHER)
    for arm in load_recipe(ROOT / "jobs/configs/compare_paper.yaml", check_paths=False).arms:
        for cfg in arm.stages:
            fits = {f.name: f for f in check_file(cfg, spec)}
            assert all(not f.problems for f in fits.values()), arm.name
            assert fits["evaluation"].needs.total() == {"CPU": 1.0, "GPU": 1.0}
            assert fits["evaluation"].where == "1 of up to 4 gpu_h100x8, or 1 of up to 4 gpu_a100x8"


# ---------------------------------------------------------------------------------------------------------
# Reading the files


def test_the_launcher_file_reads_to_its_node_types():
    """infra/cluster.yaml: the head's `resources: {}` is no node; h100 {192, 8} and a100 {96, 8}, 4 each, 8 in all."""
    view = read_cluster_file(LAUNCHER).view
    assert view.nodes == [] and view.max_workers == 8 and view.autoscaler == f"config {LAUNCHER}"
    assert view.node_types == [
        NodeType("gpu_h100x8", {"CPU": 192.0, "GPU": 8.0}, 4),
        NodeType("gpu_a100x8", {"CPU": 96.0, "GPU": 8.0}, 4),
    ]
    assert view.max_total("GPU") == 64 and view.max_total("CPU") == 4 * 192 + 4 * 96


def test_the_rayjob_reads_to_a_zero_cpu_head_and_an_autoscaled_gpu_group():
    """rayjob.yaml: head num-cpus "0" (rayStartParams) -> holds nothing; gpu-8x from container limits cpu "96",
    nvidia.com/gpu "8", memory 900Gi; autoscaled (enableInTreeAutoscaling) up to maxReplicas 4."""
    spec = read_cluster_file(RAYJOB)
    assert spec.kind == "KubeRay RayJob" and spec.view.nodes == [{}]
    assert spec.view.node_types == [NodeType("gpu-8x", {"CPU": 96.0, "GPU": 8.0}, 4)]
    assert (
        spec.lines[0] == "head: {}, memory 32 GiB (CPU from rayStartParams, no GPU given): holds nothing schedulable"
    )
    assert spec.lines[1].startswith("gpu-8x: {CPU: 96, GPU: 8}, memory 900 GiB (CPU from container limits, GPU from")


def test_kuberay_groups_from_container_limits_requests_and_start_params(tmp_path):
    """A fixed RayCluster (no enableInTreeAutoscaling): head limits cpu "2" -> {CPU 2}. Group "small": limits cpu
    "500m" (KubeRay passes Value(), rounded up: 1 CPU), nvidia.com/gpu "2", memory "4Gi"; replicas 3 held to
    maxReplicas 2, numOfHosts 2 -> 4 nodes. Group "req": only requests cpu "8" -> {CPU 8}, 1 node. Group "params":
    rayStartParams num-cpus "16" beats limits cpu "4"; suspended -> 0 nodes."""

    def group(name, resources=None, params=None, **scale):
        pod = {"containers": [{"name": "ray-worker", "image": "x", "resources": resources or {}}]}
        return {"groupName": name, "rayStartParams": params or {}, "template": {"spec": pod}, **scale}

    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "t"},
        "spec": {
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
                {"name": "ray-head", "resources": {"limits": {"cpu": "2", "memory": "8Gi"}}}]}}},
            "workerGroupSpecs": [
                group("small", {"limits": {"cpu": "500m", "nvidia.com/gpu": "2", "memory": "4Gi"}},
                      replicas=3, minReplicas=0, maxReplicas=2, numOfHosts=2),
                group("req", {"requests": {"cpu": "8"}}, replicas=1, minReplicas=1, maxReplicas=1),
                group("params", {"limits": {"cpu": "4"}}, {"num-cpus": "16"}, replicas=1, maxReplicas=5,
                      suspend=True),
            ],
        },
    }  # fmt: skip
    spec = read_cluster_file(_write(tmp_path, "rc.yaml", manifest))
    small, req = {"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0}
    assert spec.kind == "KubeRay RayCluster" and not spec.view.scales
    assert spec.view.nodes == [{"CPU": 2.0}, small, small, small, small, req]
    assert "small: {CPU: 1, GPU: 2}, memory 4 GiB (CPU from container limits, GPU from container limits), " \
           "4 nodes (replicas; no autoscaler)" in spec.lines  # fmt: skip
    params = manifest["spec"]["workerGroupSpecs"][2]
    assert group_resources(params) == ({"CPU": 16.0}, None, "CPU from rayStartParams, no GPU given")
    assert (k8s_quantity("500m"), k8s_quantity("16"), k8s_quantity("4Gi"), k8s_quantity("1.5k")) == (
        0.5, 16.0, 4 * 2**30, 1500.0)  # fmt: skip
    with pytest.raises(ConfigError):
        k8s_quantity("lots")


def test_kuberay_autoscaled_group_counts_hosts_and_a_fixed_cluster_names_replicas(tmp_path, capsys):
    """A RayJob with autoscaling: maxReplicas 3 x numOfHosts 2 = up to 6 nodes of {CPU 4, GPU 1}. The same group
    fixed at replicas 1: 2 nodes, 2 GPUs; mistral7b_uft's 8 training GPUs never fit, and the message says to
    raise replicas."""
    pod = {"containers": [{"name": "ray-worker", "resources": {"limits": {"cpu": "4", "nvidia.com/gpu": 1}}}]}
    g = {"groupName": "g1", "replicas": 1, "minReplicas": 0, "maxReplicas": 3, "numOfHosts": 2,
         "rayStartParams": {}, "template": {"spec": pod}}  # fmt: skip
    head = {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [{"name": "ray-head"}]}}}
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j"},
           "spec": {"entrypoint": "x", "rayClusterSpec": {"enableInTreeAutoscaling": True, "headGroupSpec": head,
                                                          "workerGroupSpecs": [g]}}}  # fmt: skip
    view = read_cluster_file(_write(tmp_path, "job.yaml", job)).view
    assert view.node_types == [NodeType("g1", {"CPU": 4.0, "GPU": 1.0}, 6)] and view.nodes == [{}]
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = False
    fixed = _write(tmp_path, "fixed.yaml", job)
    assert read_cluster_file(fixed).view.nodes == [{}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    cfg = str(ROOT / "jobs/configs/mistral7b_uft.yaml")
    assert cli.main(["validate", cfg, "--no-check-paths", "--cluster", str(fixed)]) == 2
    errs = capsys.readouterr().err
    assert "while training the run needs 8 GPUs" in errs and "no autoscaler to add more" in errs
    assert f"raise replicas of a worker group with GPUs in {fixed}" in errs


def test_a_file_that_is_no_cluster_exits_2_naming_it(tmp_path, capsys):
    path = _write(tmp_path, "nope.yaml", {"apiVersion": "v1", "kind": "ConfigMap"})
    assert cli.main(["validate", str(DEMO["uft"]), "--no-check-paths", "--cluster", str(path)]) == 2
    assert f"{path} is invalid:" in capsys.readouterr().err
    assert (
        cli.main(["validate", str(DEMO["uft"]), "--no-check-paths", "--cluster", str(tmp_path / "missing.yaml")]) == 2
    )
    assert "cannot read cluster file" in capsys.readouterr().err
