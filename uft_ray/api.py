"""The Python job API: `run` a config in this process, or `submit` it to a Ray cluster as a job.

    import uft_ray
    result = uft_ray.run("jobs/configs/demo.yaml", overrides=["train.max_steps=4"])   # in process

    job = uft_ray.submit("jobs/configs/mistral7b_uft.yaml", address="http://head:8265")
    job.wait()            # -> "SUCCEEDED" / "FAILED" / "STOPPED"
    print(job.logs())

`submit` goes through Ray's `JobSubmissionClient`. The config is validated here first (a bad config never
reaches the cluster), resolved with its overrides into one YAML, and packed into the job's working directory
as `.uft_ray_job/config.yaml`; the job's entrypoint is `python jobs/train.py --config .uft_ray_job/config.yaml`.
Secrets never go into the config: environment variables named in `env` are copied from the submitter's
environment into the job's `runtime_env.env_vars`, and nothing prints their values.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from uft_ray import driver
from uft_ray.config import Config, apply_override, load_config
from uft_ray.ray_utils import VERBOSE_ENV

if TYPE_CHECKING:  # Ray is imported only when a job is submitted or run
    from ray.job_submission import JobSubmissionClient

JOB_CONFIG = ".uft_ray_job/config.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never worth uploading: run outputs, VCS data, virtualenvs, caches. .gitignore / .rayignore add to these,
# as they do for `ray job submit --working-dir`.
DEFAULT_EXCLUDES = (
    "runs/",
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".benchmarks/",
    "*.egg-info/",
)
# Names that carry credentials: never packed unless a pattern in `includes` (`uft-ray submit --include`) names
# them. The package sits in Ray's GCS, where anyone with dashboard access can fetch it.
SECRET_EXCLUDES = (
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    "_netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    "credentials",
    "credentials.json",
    "*service-account*.json",
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".azure/",
    ".kube/",
    ".docker/",
    ".config/gcloud/",
    ".gcloud/",
    ".huggingface/",
    ".ray/",
    "wandb/",
    "mlruns/",
)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


# ---------------------------------------------------------------------------------------------------------
# Config


def resolve_config(
    config: Config | dict | str | os.PathLike,
    overrides: Sequence[str] | None = None,
    *,
    check_paths: bool = True,
) -> Config:
    """A `Config` from a Config, a dict or a YAML path, with dotted overrides; raises `ConfigError`."""
    if isinstance(config, Config):
        config = config.to_dict()
    return load_config(config, list(overrides or []), check_paths=check_paths)


def _job_config_yaml(config: Config | dict | str | os.PathLike, overrides: Sequence[str] | None) -> tuple[Config, str]:
    """Validate (path checks off: the paths are the cluster's) and render the YAML the job will read.

    The YAML is built from the raw mapping plus overrides, not from a path-resolved `Config`: relative paths
    that happen to exist on the submitter must stay relative (to the job's working directory).
    """
    if isinstance(config, Config):
        raw: dict[str, Any] = config.to_dict()
    elif isinstance(config, dict):
        raw = yaml.safe_load(yaml.safe_dump(config))
    else:
        load_config(config, list(overrides or []), check_paths=False)  # ConfigError naming the file's problems
        raw = yaml.safe_load(Path(config).read_text()) or {}
    for o in overrides or []:
        apply_override(raw, o)
    cfg = load_config(raw, check_paths=False, resolve_paths=False)  # `~` and relative paths are the cluster's
    return cfg, yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def run(config: Config | dict | str | os.PathLike, overrides: Sequence[str] | None = None) -> Any:
    """Run a config to completion in this process (local Ray, or the cluster in RAY_ADDRESS).

    Returns the driver's `RunResult` (`run_dir`, `adapter_dir`, `metrics_path`, ...).
    """
    cfg = resolve_config(config, overrides)

    return driver.run(cfg)


# ---------------------------------------------------------------------------------------------------------
# Working-dir package


class UploadTooLarge(ValueError):
    """The working-dir package would exceed what Ray accepts; raised before anything is uploaded."""


def upload_limit_bytes() -> int:
    """Ray's limit on a working_dir package sent through the job API.

    Two limits apply: the dashboard's HTTP request body (`DASHBOARD_CLIENT_MAX_SIZE`, 100 MiB, what
    `JobSubmissionClient` uploads through; ray-project/ray#55877) and the GCS store
    (`GCS_STORAGE_MAX_SIZE`, the gRPC message size, 512 MiB). The smaller one wins.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return min(int(ray_constants.DASHBOARD_CLIENT_MAX_SIZE), int(GCS_STORAGE_MAX_SIZE))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ignore_matcher(root: Path, patterns: Sequence[str]):
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's own packaging uses

    spec = PathSpec.from_lines("gitwildmatch", list(patterns))
    return lambda p: spec.match_file(str(p.relative_to(root)) + ("/" if p.is_dir() else ""))


def _ignore_files(d: Path) -> list[str]:
    # Same files and the same switch (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 drops .gitignore) as Ray's packaging.
    names = [".rayignore"]
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1":
        names.insert(0, ".gitignore")
    lines: list[str] = []
    for n in names:
        f = d / n
        if f.is_file():
            lines += f.read_text().splitlines()
    return lines


def pack_working_dir(
    working_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    extra_files: dict[str, str] | None = None,
    excludes: Sequence[str] = (),
    includes: Sequence[str] = (),
    limit: int | None = None,
) -> int:
    """Zip `working_dir` (minus excludes, .gitignore and .rayignore) plus `extra_files` into `dest`.

    Links are never followed out of the working dir: a link to a file inside it is packed as that file, every
    other link (to a file or folder outside, to a folder, dangling) is left out. Secret-bearing names
    (`SECRET_EXCLUDES`: `.env`, keys, `.aws/`, `.ssh/`, `wandb/`, `mlruns/`, ...) are left out unless a pattern in
    `includes` names them. What was left out for either reason is one `UserWarning` line.

    Returns the package size in bytes. Raises `UploadTooLarge` as soon as the package passes `limit`, naming
    the largest entries so the user knows what to exclude. Nothing has been uploaded at that point.
    """
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"working_dir {str(root)!r} is not a directory")
    limit = upload_limit_bytes() if limit is None else limit
    by_top: dict[str, int] = defaultdict(int)
    patterns = list(DEFAULT_EXCLUDES) + list(excludes)
    secret = _ignore_matcher(root, SECRET_EXCLUDES)
    included = _ignore_matcher(root, includes) if includes else (lambda p: False)
    secrets_out: list[str] = []
    links_out: list[str] = []
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        fp = zf.fp

        def walk(d: Path, matchers: list) -> None:
            local = _ignore_files(d)
            if local:
                matchers = [*matchers, _ignore_matcher(d, local)]
            entries = sorted(d.iterdir())
            if not entries and d != root:
                zf.write(d, str(d.relative_to(root)) + "/")
            for p in entries:
                if any(m(p) for m in matchers):
                    continue
                rel = p.relative_to(root)
                if p.is_symlink():
                    target = p.resolve()
                    if not (target.is_file() and target.is_relative_to(root)):
                        links_out.append(str(rel))
                        continue
                if secret(p) and not included(p):
                    secrets_out.append(str(rel) + ("/" if p.is_dir() and not p.is_symlink() else ""))
                    continue
                if p.is_dir() and not p.is_symlink():
                    walk(p, matchers)
                elif p.is_file():
                    zf.write(p.resolve() if p.is_symlink() else p, str(rel))
                    by_top[rel.parts[0]] += p.stat().st_size
                    size = fp.tell() if fp is not None else 0
                    if size >= limit:
                        top = sorted(by_top.items(), key=lambda kv: -kv[1])[:5]
                        biggest = ", ".join(f"{k} ({_mib(v)})" for k, v in top)
                        raise UploadTooLarge(
                            f"working_dir {str(root)!r} packs to more than {_mib(limit)}, Ray's limit for a job "
                            f"upload (stopped at {_mib(size)}); largest entries: {biggest}. Exclude them "
                            "(--exclude PATTERN, .gitignore or .rayignore), or put data and models on shared "
                            "storage and point the config at it."
                        )

        walk(root, [_ignore_matcher(root, patterns)])
        for name, text in (extra_files or {}).items():
            zf.writestr(name, text)
    size = os.path.getsize(dest)
    if size >= limit:
        raise UploadTooLarge(f"working_dir package is {_mib(size)}, over Ray's {_mib(limit)} limit for a job upload")
    if secrets_out or links_out:
        warnings.warn(_left_out(secrets_out, links_out), UserWarning, stacklevel=2)
    return size


def _left_out(secrets: list[str], links: list[str], shown: int = 20) -> str:
    """One line: what the job package left out and how to pack a secret-bearing name anyway."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")

    parts = []
    if secrets:
        parts.append(f"{len(secrets)} secret-bearing {'name' if len(secrets) == 1 else 'names'} ({some(secrets)}; "
                     "--include PATTERN packs one anyway)")  # fmt: skip
    if links:
        parts.append(f"{len(links)} {'link' if len(links) == 1 else 'links'} to a folder or out of the working dir "
                     f"({some(links)})")  # fmt: skip
    return "left out of the job package: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Client and handle


def auth_headers() -> dict[str, str]:
    """The bearer token Ray itself would send (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).

    Ray 2.60 turns token authentication on for a `ray start --head` on a machine that has a token, but its
    client only sends one when RAY_AUTH_MODE=token is set in the submitter's environment; a plain
    `JobSubmissionClient` then gets 401. Sending the token Ray would use makes both cases work. Set
    RAY_AUTH_MODE=disabled to send none. The token is never logged.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None = None, headers: dict[str, str] | None = None) -> JobSubmissionClient:
    """A `JobSubmissionClient` for `address` (else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, as in Ray)."""
    from ray.job_submission import JobSubmissionClient

    hdrs = dict(headers or {})
    if not any(k.lower() == "authorization" for k in hdrs):
        hdrs.update(auth_headers())
    if address is None and not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        address = DEFAULT_ADDRESS
    return JobSubmissionClient(address, headers=hdrs)


@dataclass
class JobHandle:
    """A submitted job. `status()` is one of PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED."""

    job_id: str
    client: Any = field(repr=False)
    address: str = ""

    def status(self) -> str:
        return str(self.client.get_job_status(self.job_id).value)

    def info(self) -> Any:
        """Ray's `JobDetails` (entrypoint, message, start/end time, metadata, ...)."""
        return self.client.get_job_info(self.job_id)

    def logs(self) -> str:
        """Everything the job's driver has printed so far."""
        return self.client.get_job_logs(self.job_id)

    def follow(self) -> Iterator[str]:
        """Log chunks as the job prints them, until it ends."""
        agen = self.client.tail_job_logs(self.job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(agen.aclose())
            loop.close()

    def wait(self, timeout: float | None = None, poll_s: float = 2.0) -> str:
        """Block until the job ends; returns its final status. Raises `TimeoutError` after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if st in TERMINAL:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {st} after {timeout:.0f} s")
            time.sleep(poll_s)

    def stop(self) -> bool:
        """Ask Ray to stop the job; True if it was running. `wait()` then returns STOPPED."""
        return bool(self.client.stop_job(self.job_id))


def job(job_id: str, address: str | None = None, headers: dict[str, str] | None = None) -> JobHandle:
    """A handle on an already submitted job."""
    c = client(address, headers)
    return JobHandle(job_id=job_id, client=c, address=getattr(c, "_address", address or ""))


def _load_runtime_env(runtime_env: dict | str | os.PathLike | None) -> dict[str, Any]:
    if runtime_env is None:
        return {}
    if isinstance(runtime_env, dict):
        return yaml.safe_load(yaml.safe_dump(runtime_env)) or {}
    data = yaml.safe_load(Path(runtime_env).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{runtime_env}: a runtime_env file must hold a mapping")
    return data


def submit(
    config: Config | dict | str | os.PathLike,
    *,
    address: str | None = None,
    working_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] | None = None,
    env: Sequence[str] = (),
    runtime_env: dict | str | os.PathLike | None = None,
    excludes: Sequence[str] = (),
    includes: Sequence[str] = (),
    submission_id: str | None = None,
    headers: dict[str, str] | None = None,
    verbose: bool = False,
) -> JobHandle:
    """Submit a config as a Ray job; returns a `JobHandle` at once (call `.wait()` to block).

    Args:
        config: a `Config`, a dict, or a YAML path; validated here with path checks off (the paths are the
            cluster's: the job checks them again before any work and fails fast with the messages).
        address: the dashboard address, `http://head:8265` (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS,
            else 127.0.0.1:8265).
        working_dir: the directory shipped to the job (default: the runtime_env's, else "."); `runs/`, `.git`,
            caches, .gitignore and .rayignore entries are left out, and so are secret-bearing names and links
            out of it (`pack_working_dir`). Refused before upload if over Ray's limit.
        overrides: dotted `key=value` overrides, applied before validation.
        env: names of environment variables to copy from this process into the job (e.g. HF_TOKEN).
        runtime_env: a dict or YAML file (e.g. infra/runtime_env.yaml) merged under the above.
        excludes: more gitignore-style patterns to leave out of the working dir.
        includes: gitignore-style patterns of secret-bearing names (`SECRET_EXCLUDES`) to pack anyway.
        verbose: the job keeps Ray's own output (Ray Data's progress bars), as `uft-ray train --verbose`.
    """
    cfg, text = _job_config_yaml(config, overrides)
    renv = _load_runtime_env(runtime_env)
    wd = working_dir if working_dir is not None else renv.get("working_dir", ".")
    wd = str(wd)
    if "://" in wd:
        raise ValueError(
            f"working_dir {wd!r} is a URI; uft_ray.submit packs a local directory with the resolved config. "
            "For a prebuilt package use `ray job submit` with jobs/train.py and a config inside the package."
        )
    env_vars = dict(renv.get("env_vars") or {})
    missing = [n for n in env if n not in os.environ]
    if missing:
        raise ValueError(f"not set in this environment, so not passed to the job: {', '.join(missing)}")
    env_vars.update({n: os.environ[n] for n in env})
    if verbose:
        env_vars[VERBOSE_ENV] = "1"
    pats = list(renv.get("excludes") or []) + list(excludes)
    sp = cfg.output.storage_path
    if "://" not in sp and not os.path.isabs(os.path.expanduser(sp)):
        # The job runs in an unpacked copy of the working dir: a relative path lands inside that copy.
        warnings.warn(
            f"output.storage_path {sp!r} is relative: the job writes its run inside its copy of the working "
            "dir on the cluster. Pass output.storage_path=/shared/path (or s3://...) to keep the outputs.",
            stacklevel=2,
        )

    entry_script = Path(wd) / "jobs" / "train.py"
    entrypoint = (
        f"python jobs/train.py --config {JOB_CONFIG}"
        if entry_script.is_file()
        else f"python -m uft_ray train {JOB_CONFIG}"  # a project without the repo's jobs/ dir
    )
    with tempfile.TemporaryDirectory(prefix="uft-ray-submit-") as tmp:
        pkg = os.path.join(tmp, "working_dir.zip")
        # refuses before any contact
        pack_working_dir(wd, pkg, extra_files={JOB_CONFIG: text}, excludes=pats, includes=includes)
        c = client(address, headers)
        renv_out = {k: v for k, v in renv.items() if k not in ("working_dir", "excludes", "env_vars")}
        renv_out["working_dir"] = pkg
        if env_vars:
            renv_out["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
        source = str(config) if isinstance(config, (str, os.PathLike)) else f"<{type(config).__name__}>"
        job_id = c.submit_job(
            entrypoint=entrypoint,
            runtime_env=renv_out,
            submission_id=submission_id,
            metadata={"uft_ray_config": source, "uft_ray_run_name": cfg.output.run_name},
        )
    return JobHandle(job_id=job_id, client=c, address=getattr(c, "_address", address or ""))
