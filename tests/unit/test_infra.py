"""The launch files: every recipe validates, the cluster YAML passes Ray's own autoscaler validation, the RayJob
passes KubeRay's CRD schema (closed objects, as `kubectl apply --validate=strict`) and names a real config.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from uft_ray import cli
from uft_ray.config import load_config
from uft_ray.demo import demo_config_text

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIGS = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.yaml") if not p.name.startswith("compare_"))
RECIPES = sorted((ROOT / "jobs" / "configs").glob("compare_*.yaml"))  # `uft-ray compare` recipes, not run configs
# KubeRay's RayJob CRD schema, vendored with its source and license (tests/fixtures/kuberay/README.md).
RAYJOB_SCHEMA = ROOT / "tests" / "fixtures" / "kuberay" / "ray.io_rayjobs.v1.schema.json"
IMAGE_APP_DIR = "/home/ray/uft-ray"  # infra/Dockerfile's WORKDIR: where the repo sits in the image


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------------
# jobs/configs


def test_there_is_a_config_per_recipe():
    names = {p.name for p in TINY_CONFIGS}
    assert {"demo_tiny.yaml", "mistral7b_uft.yaml", "qwen25_32b_uft.yaml", "mistral7b_uft_mixture_sweep.yaml"} <= names
    assert "seq_stage1_sft.yaml" in names
    assert {f"seq_stage2_{x}.yaml" for x in ("dpo", "kto", "una_bce", "uft")} <= names


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.name)
def test_every_config_passes_validate_without_path_checks(path, capsys):
    assert cli.main(["validate", str(path), "--no-check-paths"]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {path}")


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.name)
def test_every_config_is_headed_by_its_launch_command(path):
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    text = "\n".join(head)
    assert head, f"{path.name} has no header comment"
    rel = f"jobs/configs/{path.name}"
    if path.name.startswith("seq_"):
        assert "python jobs/sequential.py --stage1 jobs/configs/seq_stage1_sft.yaml --stage2" in text
        assert rel in text
    else:
        assert f"python jobs/train.py --config {rel}" in text or (
            path.name == "demo_tiny.yaml" and "uft-ray demo" in text
        ), text
    # every jobs/configs path named in a header exists
    for named in re.findall(r"jobs/configs/[\w.]+\.yaml", text):
        assert (ROOT / named).is_file(), named


def test_paper_settings():
    cfg = load_config(ROOT / "jobs/configs/mistral7b_uft.yaml", check_paths=False)
    assert (cfg.lora.r, cfg.loss.beta, cfg.train.lr, cfg.loss.type) == (16, 0.01, 3e-5, "uft")
    assert cfg.mixture.counts == {"ultrachat": 20000, "helpsteer2": 20000}
    assert (cfg.tokenize.max_prompt_len, cfg.tokenize.max_len) == (1024, 2048)
    q = load_config(ROOT / "jobs/configs/qwen25_32b_uft.yaml", check_paths=False)
    assert q.train.deepspeed.zero_stage == 3 and q.model.dtype == "bfloat16" and q.model.gradient_checkpointing
    assert q.train.num_workers > 8 and q.reference.gpus_per_actor >= 1 and q.reference.run == "precompute"


def test_sequential_stage2_configs_pair_each_loss_with_its_row_kind():
    expect = {"dpo": "pair", "kto": "binary", "una_bce": "score", "uft": "score"}
    for loss, kind in expect.items():
        cfg = load_config(ROOT / f"jobs/configs/seq_stage2_{loss}.yaml", check_paths=False)
        assert cfg.loss.type == loss and cfg.data.sources[0].resolved_kind == kind
    stage1 = load_config(ROOT / "jobs/configs/seq_stage1_sft.yaml", check_paths=False)
    assert stage1.loss.type == "sft" and stage1.loss.sft_reduction == "token"  # the papers' summed token NLL


def test_paper_recipes_use_the_papers_rates_and_betas_and_state_lora_alpha_at_the_rate():
    """The UNA paper: SFT at lr 1e-4; stage 2 DPO and KTO at beta 0.03, lr 5e-6; UNA-score at beta 0.03, lr 3e-5;
    one-stage UFT at beta 0.01, lr 3e-5. Every paper recipe says next to its rate that alpha 2r is 4x r/2."""
    expect = {
        "seq_stage1_sft": ("sft", None, 1e-4),
        "seq_stage2_dpo": ("dpo", 0.03, 5e-6),
        "seq_stage2_kto": ("kto", 0.03, 5e-6),
        "seq_stage2_uft": ("uft", 0.03, 3e-5),
        "seq_stage2_una_bce": ("una_bce", 0.03, 3e-5),
        "mistral7b_uft": ("uft", 0.01, 3e-5),
    }
    for name, (loss, beta, lr) in expect.items():
        path = ROOT / f"jobs/configs/{name}.yaml"
        cfg = load_config(path, check_paths=False)
        assert cfg.loss.type == loss and cfg.train.lr == lr and (beta is None or cfg.loss.beta == beta), name
        assert (cfg.lora.r, cfg.lora.alpha) == (16, 32), name
        lr_line = next(line for line in path.read_text().splitlines() if line.strip().startswith("lr:"))
        assert "alpha = r/2" in lr_line and "4x" in lr_line, name


def test_mixture_sweep_documents_16k_to_260k_against_20k():
    text = (ROOT / "jobs/configs/mistral7b_uft_mixture_sweep.yaml").read_text()
    points = [int(n) for n in re.search(r"for n in ([\d ]+);", text).group(1).split()]
    assert points[0] == 16250 and points[-1] == 260000 and points == sorted(points)
    for n in points:  # each sweep point is a valid override of the config
        cfg = load_config(
            ROOT / "jobs/configs/mistral7b_uft_mixture_sweep.yaml",
            [f"mixture.counts.ultrachat={n}", f"output.run_name=mistral7b-uft-uc{n}"],
            check_paths=False,
        )
        assert cfg.mixture.counts == {"ultrachat": n, "helpsteer2": 20000}


def test_demo_config_is_one_file_in_two_places():
    for name, method, tiny in [("demo", "uft", False), ("demo_hint_rft", "hint_rft", False),
                               ("demo_tiny", "uft", True), ("demo_hint_rft_tiny", "hint_rft", True)]:  # fmt: skip
        shipped = ROOT / f"uft_ray/demo/{name}.yaml"
        assert (ROOT / f"jobs/configs/{name}.yaml").read_bytes() == shipped.read_bytes(), name
        assert demo_config_text(method, tiny=tiny) == shipped.read_text(), name


def test_hint_rft_recipes_have_the_papers_settings():
    for size in ("0_5b", "1_5b", "3b"):
        cfg = load_config(ROOT / f"jobs/configs/hint_rft_countdown_qwen25_{size}.yaml", check_paths=False)
        r = cfg.rft
        assert (cfg.method, r.task, r.prompts_per_step, r.n, cfg.train.max_steps) == (
            "hint_rft",
            "countdown",
            256,
            4,
            500,
        )
        assert (r.hint.mode, r.hint.t_hint, r.hint.p_low, r.hint.p_high, r.temperature) == (
            "cosine",
            300,
            0.05,
            0.95,
            1.0,
        )
        assert (r.max_prompt_len, r.max_response_len, cfg.eval.every) == (256, 1024, 25)
        assert (r.clip, r.kl_coef, r.entropy_coef, r.hint_coef) == (0.2, 0.001, 0.001, 0.001)
    rft = load_config(ROOT / "jobs/configs/rft_countdown_qwen25_0_5b.yaml", check_paths=False)
    assert rft.rft.hint.mode == "rft"
    sft = load_config(ROOT / "jobs/configs/sft_then_rft_stage1_countdown_qwen25_0_5b.yaml", check_paths=False)
    assert (sft.method, sft.rft.objective) == ("hint_rft", "sft")
    assert sft.output.run_name not in (rft.output.run_name, "sft-rft-countdown-qwen25-0.5b")  # stage 2's name
    math = load_config(ROOT / "jobs/configs/hint_rft_math_qwen25_0_5b.yaml", check_paths=False)
    assert (math.rft.task, math.rft.max_prompt_len, math.rft.max_response_len) == ("math", 1024, 1024)


# ---------------------------------------------------------------------------------------------------------
# infra/cluster.yaml: Ray's own validation, the way `ray up` runs it (prepare_config, then validate_config)


def test_cluster_yaml_passes_ray_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(ROOT / "infra/cluster.yaml")
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises jsonschema.ValidationError on a bad field
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and t["max_workers"] > 0, name
    assert prepared["setup_commands"] == []  # the image has everything; the default would pip-install Ray


def test_cluster_yaml_rejected_by_ray_when_broken():
    """The check above is a real one: Ray's schema refuses an unknown top-level key."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _yaml(ROOT / "infra/cluster.yaml")
    bad["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------------------------------------------------
# infra/kuberay/rayjob.yaml against the RayJob CRD


def _closed(schema):
    """The CRD schema with every object closed, except where Kubernetes keeps unknown fields.

    Kubernetes prunes / rejects unknown fields unless `x-kubernetes-preserve-unknown-fields` is set; an object
    schema with `properties` and no `additionalProperties` is therefore closed.
    """
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _rayjob_validator():
    import jsonschema

    crd = json.loads(RAYJOB_SCHEMA.read_text())
    assert (crd["group"], crd["kind"], crd["version"]) == ("ray.io", "RayJob", "v1")
    schema = _closed(crd["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def rayjob():
    return _yaml(ROOT / "infra/kuberay/rayjob.yaml")


def test_rayjob_validates_against_the_crd(rayjob):
    errors = sorted(_rayjob_validator().iter_errors(rayjob), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] > 0


def test_crd_validator_is_strict(rayjob):
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParamz"] = {}
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    paths = {".".join(map(str, e.path)) for e in _rayjob_validator().iter_errors(bad)}
    assert "spec.rayClusterSpec.headGroupSpec" in paths and "spec.shutdownAfterJobFinishes" in paths


def test_rayjob_entrypoint_names_an_existing_config_that_validates(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = Path(argv[1].replace(IMAGE_APP_DIR, str(ROOT)))
    assert script.is_file() and script.name == "train.py"
    config = Path(argv[argv.index("--config") + 1].replace(IMAGE_APP_DIR, str(ROOT)))
    assert config.is_file(), config
    assert config.parent == ROOT / "jobs" / "configs"
    load_config(config, argv[argv.index("--config") + 2 :], check_paths=False)
    # the image puts the repo where the entrypoint looks for it
    assert f"WORKDIR {IMAGE_APP_DIR}" in (ROOT / "infra/Dockerfile").read_text()


def test_rayjob_runtime_env_matches_runtime_env_yaml(rayjob):
    from ray.runtime_env import RuntimeEnv

    job_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    file_env = _yaml(ROOT / "infra/runtime_env.yaml")
    RuntimeEnv(**job_env)
    RuntimeEnv(**file_env)  # type-checks env_vars (str -> str) and the known fields
    known = {"working_dir", "excludes", "env_vars", "pip", "uv", "conda", "py_modules", "container", "image_uri"}
    assert set(job_env) <= known and set(file_env) <= known
    assert job_env["env_vars"] == file_env["env_vars"]


def test_images_agree():
    """The launcher, the RayJob and the Dockerfile's build command name one image."""
    image = _yaml(ROOT / "infra/cluster.yaml")["docker"]["image"]
    job = _yaml(ROOT / "infra/kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    images = {c["image"] for c in job["headGroupSpec"]["template"]["spec"]["containers"]}
    for g in job["workerGroupSpecs"]:
        images |= {c["image"] for c in g["template"]["spec"]["containers"]}
    assert images == {image}
    assert f"docker build -t {image} -f infra/Dockerfile ." in (ROOT / "infra/Dockerfile").read_text()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_compare_recipes_load_with_every_arm_on_the_same_heldout_rows(path):
    from uft_ray.compare import load_recipe

    recipe = load_recipe(path, check_paths=False)
    assert path.read_text().startswith("#") and f"uft-ray compare jobs/configs/{path.name}" in path.read_text()
    arms = {a.name: a for a in recipe.arms}
    assert set(arms) == {"sft", "uft", "sft-dpo", "sft-kto", "sft-una", "ext-sft-una_bce"}
    losses = {name: [c.loss.type for c in a.stages] for name, a in arms.items()}
    assert losses["uft"] == ["uft"] and losses["sft-dpo"] == ["sft", "dpo"]
    # the UNA paper's SFT+UNA is UNA-score (MSE onto the scores: the uft loss); BCE on scores is the extension
    assert losses["sft-una"] == ["sft", "uft"] and losses["ext-sft-una_bce"] == ["sft", "una_bce"]
    assert {a.stages[1].data.sources[0].resolved_kind for n, a in arms.items() if "una" in n} == {"score"}
    # one SFT run shared by the SFT arm and every stage 1; the same held-out rows everywhere
    assert {a.stages[0].output.run_name for n, a in arms.items() if n != "uft"} == {"sft"}
    heldout = {repr(c.eval.sources) for a in recipe.arms for c in a.stages}
    assert len(heldout) == 1 and len(recipe.arms[0].stages[0].eval.sources) == 3


# ---------------------------------------------------------------------------------------------------------
# infra/Dockerfile's vLLM target: the image for `rft.rollout.backend: vllm`


def _stages(text: str) -> list[tuple[str | None, list[str]]]:
    """(stage name, its instructions with continuation lines joined), in file order; comments dropped."""
    joined = re.sub(
        r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    stages: list[tuple[str | None, list[str]]] = []
    for line in (x.strip() for x in joined.splitlines()):
        if not line:
            continue
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if m:
            stages.append((m.group(1), []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_has_a_vllm_target_that_installs_vllm_with_the_torch_it_pins():
    from uft_ray.preflight import IMAGE_BUILD, VLLM_BUILD, VLLM_TARGET

    text = (ROOT / "infra/Dockerfile").read_text()
    stages = dict(_stages(text))
    assert VLLM_TARGET in stages, list(stages)
    vllm = stages[VLLM_TARGET]
    runs = [i for i, line in enumerate(vllm) if line.startswith("RUN ")]
    # vLLM first (pip takes the torch vLLM pins), and no torch of our own in this stage
    assert 'pip install --no-cache-dir "${VLLM_SPEC}"' in vllm[runs[0]]
    assert not any("TORCH_SPEC" in line or re.search(r'install[^&|]*\s"?torch([=<>"\[\s]|$)', line) for line in vllm)
    assert 'ARG VLLM_SPEC="vllm"' in vllm
    # then this package under a constraint that keeps that torch, with the vllm extra
    package = next(line for line in vllm if "-e " in line)
    assert "-c /tmp/torch-from-vllm.txt" in package and '".[cloud,vllm]"' in package
    assert "torch-from-vllm.txt" in vllm[runs[0]] and runs.index(vllm.index(package)) > 0
    # `docker build` without --target still builds the image without vLLM, with its pinned torch
    last_name, last = _stages(text)[-1]
    assert last_name != VLLM_TARGET and any("TORCH_SPEC" in line for line in last)
    assert not any("vllm" in line.lower() for line in last)
    # both images hold the same code and repo files
    copies = [line for line in last if line.startswith("COPY ")]
    assert copies and copies == [line for line in vllm if line.startswith("COPY ")]
    assert VLLM_BUILD in text and IMAGE_BUILD in text
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == ["vllm"]


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def test_vllm_recipes_and_the_cluster_files_name_the_vllm_image():
    from uft_ray.preflight import VLLM_BUILD, VLLM_IMAGE

    vllm_recipes = []
    for path in TINY_CONFIGS:
        cfg = load_config(path, check_paths=False)
        if cfg.method == "hint_rft" and cfg.rft.rollout.backend == "vllm":
            vllm_recipes.append(path.name)
            assert VLLM_IMAGE in _header(path), f"{path.name}: its header does not name {VLLM_IMAGE}"
    assert "hint_rft_countdown_qwen25_0_5b.yaml" in vllm_recipes and len(vllm_recipes) >= 7
    for doc in ("infra/cluster.yaml", "infra/kuberay/rayjob.yaml", "README.md"):
        assert VLLM_IMAGE in (ROOT / doc).read_text(), doc
    assert VLLM_BUILD in (ROOT / "README.md").read_text()
