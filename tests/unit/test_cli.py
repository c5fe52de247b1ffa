"""The command line and the job API without a cluster: parsing, exit codes, validation before any Ray work,
the working-dir package (excludes, the size limit), authentication headers, and what `submit` sends.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from uft_ray import api, cli
from uft_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jobs/configs/demo_tiny.yaml"
MISTRAL = ROOT / "jobs/configs/mistral7b_uft.yaml"
COMMANDS = (
    "train",
    "prepare",
    "validate",
    "demo",
    "submit",
    "status",
    "logs",
    "stop",
    "report",
    "eval",
    "compare",
    "tasks",
)


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uft_ray", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------------------------------------------------
# Parsing and help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"uft-ray {command}" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


@pytest.mark.parametrize(
    "argv", [[], ["frobnicate"], ["validate"], ["validate", str(DEMO), "--bogus"], ["prepare", str(DEMO)]]
)
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_overrides_may_follow_options():
    args = cli.parse_args(["submit", str(DEMO), "a.b=1", "--address", "http://x:8265", "c.d=2", "--no-wait"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.address == "http://x:8265" and args.no_wait


def test_console_script_and_module_entrypoints():
    r = run_cli("validate", str(MISTRAL), "--no-check-paths")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK:")
    exe = Path(sys.executable).parent / "uft-ray"
    script = str(exe) if exe.exists() else "uft-ray"
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "submit" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# validate / train / demo: a bad config fails with exit 2 and the messages, before any Ray work


def test_validate_ok_and_print(capsys):
    assert cli.main(["validate", str(MISTRAL), "--no-check-paths"]) == 0
    assert "mistral7b-uft" in capsys.readouterr().out
    assert cli.main(["validate", str(MISTRAL), "--no-check-paths", "loss.beta=0.5", "--print"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["loss"]["beta"] == 0.5 and printed["model"]["path"] == "/models/Mistral-7B-v0.1"


def test_validate_names_every_bad_field(capsys):
    rc = cli.main(["validate", str(MISTRAL), "--no-check-paths", "loss.type=bogus", "train.lr=-1", "lora.rank=4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "loss.type: 'bogus' is not allowed" in err
    assert "train.lr: must be > 0" in err
    assert "lora.rank: unknown key" in err


def test_validate_checks_paths_unless_told_not_to(capsys):
    assert cli.main(["validate", str(MISTRAL)]) == 2
    assert "data.sources.0.path: '/data/ultrachat_200k" in capsys.readouterr().err
    assert cli.main(["validate", str(MISTRAL), "--no-check-paths"]) == 0


def test_validate_missing_file(capsys):
    assert cli.main(["validate", "nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_config_fails_before_ray_is_imported(tmp_path):
    """train / demo / submit / jobs/train.py on a bad config: exit 2, the messages, and Ray never imported."""
    code = (
        "import sys\n"
        "from uft_ray.cli import main\n"
        "rcs = [main(a) for a in (\n"
        f"    ['train', {str(MISTRAL)!r}, 'loss.type=bogus'],\n"
        "    ['demo', 'loss.type=bogus'],\n"
        f"    ['submit', {str(MISTRAL)!r}, 'loss.type=bogus', '--address', 'http://127.0.0.1:9'],\n"
        ")]\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(rcs)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[2, 2, 2]"
    assert r.stderr.count("loss.type: 'bogus' is not allowed") == 3


def test_jobs_train_entrypoint_exits_2_with_messages():
    r = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "jobs/configs/mistral7b_uft.yaml", "train.num_workers=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert "train.num_workers: must be > 0" in r.stderr
    assert "data.sources.0.path" in r.stderr  # the job checks the cluster's paths


def test_jobs_sequential_validates_both_stages():
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import sequential
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    assert sequential.split_overrides(["a=1", "stage1.b=2", "stage2.c=3"]) == (["a=1", "b=2"], ["a=1", "c=3"])
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        rc = sequential.main(
            [
                "--stage1",
                "jobs/configs/seq_stage1_sft.yaml",
                "--stage2",
                "jobs/configs/seq_stage2_dpo.yaml",
                "stage2.loss.type=bogus",
            ]
        )
    finally:
        sys.stderr = old
    assert rc == 2
    assert "stage 2 config" in err.getvalue() and "loss.type: 'bogus'" in err.getvalue()


def test_demo_overrides_point_at_the_demo_assets(tmp_path):
    from uft_ray.demo import demo_config_text, demo_overrides

    overrides = demo_overrides(tmp_path, tiny=True)
    assert overrides == [
        f"model.path={tmp_path / 'tiny-model'}",
        f"data.sources.0.path={tmp_path / 'samples/ultrachat_200k/data/train_sft-*.parquet'}",
        f"data.sources.1.path={tmp_path / 'samples/helpsteer2/train.jsonl.gz'}",
    ]
    raw = yaml.safe_load(demo_config_text(tiny=True))
    assert [s["name"] for s in raw["data"]["sources"]] == ["ultrachat", "helpsteer2"]  # the indices above
    cfg = load_config(raw, overrides)  # paths checked: every one exists
    assert cfg.model.path == str(tmp_path / "tiny-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples", "tiny-model"]  # no bad-row fixtures


def test_report_command(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.2}\n')
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert capsys.readouterr().out.strip() == str(run / "report.html")


# ---------------------------------------------------------------------------------------------------------
# api: the job config, the working-dir package, auth


def test_job_config_keeps_relative_paths_and_applies_overrides(tmp_path):
    src = tmp_path / "c.yaml"
    raw = yaml.safe_load(MISTRAL.read_text())
    raw["data"]["sources"][0]["path"] = "data/uc/*.parquet"
    src.write_text(yaml.safe_dump(raw))
    (tmp_path / "data/uc").mkdir(parents=True)  # exists beside the file: load_config would make it absolute
    (tmp_path / "data/uc/x.parquet").write_text("")
    cfg, text = api._job_config_yaml(str(src), ["train.lr=1e-4"])
    shipped = yaml.safe_load(text)
    assert shipped["data"]["sources"][0]["path"] == "data/uc/*.parquet"
    assert shipped["train"]["lr"] == 1e-4 and cfg.train.lr == 1e-4
    # a Config and a dict go through the same path
    assert api._job_config_yaml(cfg, None)[1] == text
    with pytest.raises(ConfigError):
        api._job_config_yaml({"model": {"path": "x"}}, None)


def _tree(root: Path) -> None:
    (root / "jobs").mkdir(parents=True)
    (root / "jobs/train.py").write_text("print('hi')\n")
    (root / "uft_ray").mkdir()
    (root / "uft_ray/x.py").write_text("x = 1\n")
    (root / "uft_ray/__pycache__").mkdir()
    (root / "uft_ray/__pycache__/x.pyc").write_bytes(b"0" * 100)
    (root / "runs/demo").mkdir(parents=True)
    (root / "runs/demo/big.bin").write_bytes(b"0" * 1000)
    (root / ".git").mkdir()
    (root / ".git/HEAD").write_text("ref\n")
    (root / ".gitignore").write_text("secret.env\n")
    (root / "secret.env").write_text("HF_TOKEN=hf_abc\n")
    (root / "notes").mkdir()
    (root / "notes/.rayignore").write_text("*.tmp\n")
    (root / "notes/a.tmp").write_text("tmp\n")
    (root / "notes/a.md").write_text("keep\n")


def test_pack_working_dir_excludes_runs_git_caches_and_ignored(tmp_path):
    _tree(tmp_path / "wd")
    size = api.pack_working_dir(tmp_path / "wd", tmp_path / "p.zip", extra_files={api.JOB_CONFIG: "a: 1\n"})
    names = set(zipfile.ZipFile(tmp_path / "p.zip").namelist())
    assert names == {"jobs/train.py", "uft_ray/x.py", ".gitignore", "notes/.rayignore", "notes/a.md", api.JOB_CONFIG}
    assert size == (tmp_path / "p.zip").stat().st_size


def test_pack_working_dir_refuses_over_the_limit_naming_the_culprit(tmp_path):
    _tree(tmp_path / "wd")
    (tmp_path / "wd/models").mkdir()
    (tmp_path / "wd/models/w.safetensors").write_bytes(os.urandom(50_000))  # incompressible
    with pytest.raises(api.UploadTooLarge) as e:
        api.pack_working_dir(tmp_path / "wd", tmp_path / "p.zip", limit=20_000)
    msg = str(e.value)
    assert "models" in msg and "limit" in msg and "--exclude" in msg
    # excluding it is enough
    api.pack_working_dir(tmp_path / "wd", tmp_path / "p.zip", excludes=["models/"], limit=20_000)


def test_upload_limit_is_rays_job_upload_limit():
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    assert api.upload_limit_bytes() == min(ray_constants.DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)
    assert api.upload_limit_bytes() == 100 * 2**20  # Ray 2.60: the dashboard's request-body limit


def test_auth_headers_follow_rays_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    assert api.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("fromfile\n")
    assert api.auth_headers() == {"Authorization": "Bearer fromfile"}
    (tmp_path / "t").write_text("frompath")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert api.auth_headers() == {"Authorization": "Bearer frompath"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert api.auth_headers() == {"Authorization": "Bearer fromenv"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert api.auth_headers() == {}


# ---------------------------------------------------------------------------------------------------------
# api.submit and JobHandle against a stand-in for JobSubmissionClient


class FakeStatus:
    def __init__(self, value):
        self.value = value


class FakeClient:
    def __init__(self, statuses=("PENDING", "RUNNING", "SUCCEEDED")):
        self.statuses = list(statuses)
        self.submitted: dict = {}
        self.package: dict[str, str] = {}
        self._address = "http://fake:8265"

    def submit_job(self, *, entrypoint, runtime_env, submission_id=None, metadata=None):
        # the package is a temporary file: read it while submit() still holds it
        with zipfile.ZipFile(runtime_env["working_dir"]) as z:
            self.package = {n: z.read(n).decode() for n in z.namelist()}
        self.submitted = {"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata}
        return submission_id or "raysubmit_fake"

    def get_job_status(self, job_id):
        return FakeStatus(self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0])

    def stop_job(self, job_id):
        self.statuses = ["STOPPED"]
        return True

    def get_job_logs(self, job_id):
        return "log line\n"


@pytest.fixture
def fake_client(monkeypatch):
    fc = FakeClient()
    monkeypatch.setattr(api, "client", lambda address=None, headers=None: fc)
    return fc


def test_submit_ships_the_resolved_config_and_named_env_only(tmp_path, fake_client, monkeypatch):
    _tree(tmp_path / "wd")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("OTHER_SECRET", "nope")
    h = api.submit(
        str(MISTRAL),
        working_dir=tmp_path / "wd",
        overrides=["train.lr=1e-5"],
        env=["HF_TOKEN"],
        runtime_env=ROOT / "infra/runtime_env.yaml",
    )
    assert h.job_id == "raysubmit_fake"
    sub = fake_client.submitted
    assert sub["entrypoint"] == f"python jobs/train.py --config {api.JOB_CONFIG}"
    env_vars = sub["runtime_env"]["env_vars"]
    assert env_vars["HF_TOKEN"] == "hf_secret_value" and "OTHER_SECRET" not in env_vars
    assert env_vars["TOKENIZERS_PARALLELISM"] == "false"  # from the runtime_env file
    shipped = yaml.safe_load(fake_client.package[api.JOB_CONFIG])
    assert shipped["train"]["lr"] == 1e-5
    assert "hf_secret_value" not in fake_client.package[api.JOB_CONFIG]
    assert "secret.env" not in fake_client.package  # .gitignore'd
    assert sub["metadata"]["uft_ray_run_name"] == "mistral7b-uft"


def test_submit_without_jobs_dir_uses_the_module_entrypoint(tmp_path, fake_client):
    (tmp_path / "wd").mkdir()
    cfg = yaml.safe_load(MISTRAL.read_text())  # a dict config
    api.submit(cfg, working_dir=tmp_path / "wd")
    assert fake_client.submitted["entrypoint"] == f"python -m uft_ray train {api.JOB_CONFIG}"
    assert fake_client.submitted["metadata"]["uft_ray_config"] == "<dict>"


def test_submit_refuses_missing_env_and_bad_config_before_the_client(tmp_path, monkeypatch):
    def no_client(*a, **k):
        raise AssertionError("the cluster must not be contacted")

    monkeypatch.setattr(api, "client", no_client)
    monkeypatch.delenv("SURELY_UNSET_VAR", raising=False)
    with pytest.raises(ValueError, match="SURELY_UNSET_VAR"):
        api.submit(str(MISTRAL), working_dir=tmp_path, env=["SURELY_UNSET_VAR"])
    with pytest.raises(ConfigError):
        api.submit(str(MISTRAL), working_dir=tmp_path, overrides=["loss.type=bogus"])


def test_submit_warns_on_relative_storage_path(tmp_path, fake_client):
    (tmp_path / "wd").mkdir()
    with pytest.warns(UserWarning, match="output.storage_path"):
        api.submit(str(DEMO), working_dir=tmp_path / "wd")


def test_job_handle_wait_stop_logs(fake_client):
    h = api.JobHandle("j1", fake_client)
    assert h.wait(timeout=5, poll_s=0.01) == "SUCCEEDED"
    assert h.logs() == "log line\n"
    fake_client.statuses = ["RUNNING"]
    with pytest.raises(TimeoutError):
        h.wait(timeout=0.05, poll_s=0.01)
    assert h.stop() is True and h.wait(timeout=1, poll_s=0.01) == "STOPPED"


def test_cli_submit_refusals_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api, "client", lambda *a, **k: FakeClient())
    monkeypatch.delenv("SURELY_UNSET_VAR", raising=False)
    rc = cli.main(["submit", str(MISTRAL), "--working-dir", str(tmp_path), "--env", "SURELY_UNSET_VAR", "--no-wait"])
    assert rc == 2 and "SURELY_UNSET_VAR" in capsys.readouterr().err


def test_cli_submit_no_wait_prints_the_follow_up_commands(tmp_path, fake_client, capsys):
    rc = cli.main(["submit", str(MISTRAL), "--working-dir", str(tmp_path), "--no-wait", "--address", "http://h:8265"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "raysubmit_fake" in out and "uft-ray stop raysubmit_fake --address http://h:8265" in out


def test_import_is_light():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, uft_ray; uft_ray.load_config; print(sorted(m for m in ('ray', 'torch', 'deepspeed', 'matplotlib') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "[]", r.stderr
