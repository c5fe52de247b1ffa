"""What the GPU checks import beyond the device machine's image, as wheels in one folder of at most 60 MiB.

    python gpu/bundle.py --out .gpu-bundle                      # for the device: CPython 3.12, x86_64 (make gpu-bundle)
    python gpu/bundle.py --proof /tmp/uft-gpu-bundle-proof      # the CPU proof here (make gpu-bundle-proof)

The device machine (one H200, no network, at most 64 MiB of files brought to it) has a fixed image: IMAGE below.
Its torch, transformers and peft run the checks; what they lack is Ray (Ray Train, Ray Data), DeepSpeed, pydantic,
hjson, pytest-timeout and what those need. The bundle is that difference: the requirement closure of ROOTS read
from this machine's installed metadata (markers for the target Python), less the closure of IMAGE, plus CARRY (the
image has them, at versions the suite never ran with: the bundle's folder comes first on the path), each
distribution pinned to the version installed here (the one the suite ran with). Then:

- Ray's wheel is trimmed of what Ray Train, Ray Data and the core never load (RAY_TRIM: the Java jars, the
  dashboard's web client, RLlib, Serve, Ray LLM) and its binaries are stripped of symbols (gcs_server, raylet and
  _raylet.so are 119 MB with symbols, 84 MB without), its RECORD rewritten to match;
- DeepSpeed, an sdist on PyPI, is built here as a pure-Python wheel with DS_BUILD_OPS=0 (no op is prebuilt: the
  checks' Adam is torch's, and an op would be JIT-built on first use like on any machine without prebuilt ops).

`gpu/check.py --bundle DIR` installs only these files (`pip install --no-index --no-deps --target`) into a
private folder and runs every check from the source tree with that folder on PYTHONPATH; MANIFEST.json lists each
wheel, its size and what was trimmed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The device machine's image: CPython 3.12 with these distributions (None: some version).
IMAGE: dict[str, str | None] = {
    "torch": "2.11.0", "transformers": "5.17.0", "tokenizers": "0.23.2", "safetensors": "0.8.0", "peft": None,
    "pyarrow": None, "accelerate": "1.15.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0", "pandas": None,
    "matplotlib": None, "psutil": None, "py-cpuinfo": None, "ninja": None, "msgpack": None, "pyyaml": None,
    "jinja2": None, "filelock": None, "fsspec": None, "pytest": None,
}  # fmt: skip
# Known not to be there (the image's own listing), whatever a newer release of an image package requires here
# (huggingface-hub's typer pulls pydantic in today's releases).
ABSENT = ("ray", "deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson")
# What the checks import beyond it: Ray Train needs pydantic (ray[train]); gpu/check.py's pytest runs with --timeout.
ROOTS = ("ray", "deepspeed", "pydantic", "pytest-timeout")
# In the image, but carried at the suite's versions: peft (the LoRA the checks train and load) and typing_extensions
# (pydantic's and torch's typing; the image's version was never seen by the suite).
CARRY = ("peft", "typing-extensions")
RAY_TRIM = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/serve/", "ray/llm/")
MAX_MIB = 60.0
PLATFORM = "manylinux2014_x86_64"


def closure(roots: tuple[str, ...] | list[str], python_version: str) -> set[str]:
    """Canonical names of `roots` and everything they require (installed metadata, markers for the target)."""
    env = default_environment() | {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # in the image but not here: it brings what it needs there
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env | {"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def bundle_set(python_version: str) -> dict[str, str]:
    """{distribution: version installed here} for what ROOTS need and IMAGE does not hold, and CARRY."""
    have = closure(list(IMAGE), python_version) - {canonicalize_name(a) for a in ABSENT}
    need = (closure(ROOTS, python_version) - have) | {canonicalize_name(c) for c in CARRY}
    return {name: metadata.version(name) for name in sorted(need)}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _strip(data: bytes, tmp: Path) -> bytes:
    """An ELF file without its symbols (`strip --strip-unneeded`); unchanged where strip is missing or fails."""
    if not data.startswith(b"\x7fELF") or shutil.which("strip") is None:
        return data
    src, dst = tmp / "elf.in", tmp / "elf.out"
    src.write_bytes(data)
    done = subprocess.run(["strip", "--strip-unneeded", "-o", str(dst), str(src)], capture_output=True)
    return dst.read_bytes() if done.returncode == 0 else data


def trim_wheel(wheel: Path, out: Path, drop: tuple[str, ...], strip: bool = True) -> dict[str, object]:
    """Rewrite `wheel` to `out` without the paths under `drop`, ELF files stripped, RECORD matching the files."""
    removed: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zin:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        files: list[tuple[zipfile.ZipInfo, bytes]] = []
        for info in zin.infolist():
            if info.filename == record_name:
                continue
            top = next((d for d in drop if info.filename.startswith(d)), None)
            if top is not None:
                removed[top] = removed.get(top, 0) + info.file_size
                continue
            data = zin.read(info)
            files.append((info, _strip(data, Path(tmp)) if strip else data))
        record = io.StringIO()
        writer = csv.writer(record, lineterminator="\n")
        for info, data in files:
            writer.writerow([info.filename, _record_hash(data), len(data)])
        writer.writerow([record_name, "", ""])
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info, data in files:
                new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                new.external_attr = info.external_attr  # keeps the binaries executable
                new.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(new, data)
            zout.writestr(record_name, record.getvalue())
    return {"removed_bytes": removed, "size_before": wheel.stat().st_size, "size_after": out.stat().st_size}


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def fetch_wheel(name: str, version: str, dest: Path, python_version: str, platform: str) -> Path:
    """The wheel of name==version for the target: a binary from the index, else built here (pure Python only)."""
    tag = python_version.replace(".", "")
    before = set(dest.iterdir())
    got = _pip("download", f"{name}=={version}", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", "--abi", f"cp{tag}", "--platform", platform, "-d", str(dest))  # fmt: skip
    if got.returncode != 0:
        # DeepSpeed ships only an sdist: its wheel without prebuilt ops is pure Python, good for any CPython.
        env = dict(os.environ, DS_BUILD_OPS="0", DS_BUILD_AIO="0")
        got = _pip("wheel", f"{name}=={version}", "--no-deps", "--no-build-isolation", "-w", str(dest), env=env)
    new = sorted(set(dest.iterdir()) - before)
    wheels = [p for p in new if p.suffix == ".whl"]
    if got.returncode != 0 or len(wheels) != 1:
        raise SystemExit(f"gpu_bundle: no wheel for {name}=={version}: {(got.stderr or got.stdout)[-600:]}")
    if "none-any" not in wheels[0].name and f"cp{tag}" not in wheels[0].name and "abi3" not in wheels[0].name:
        raise SystemExit(f"gpu_bundle: {wheels[0].name} is not for CPython {python_version}")
    return wheels[0]


def build(out: Path, python_version: str = "3.12", platform: str = PLATFORM, max_mib: float = MAX_MIB) -> dict:
    """Write the bundle's wheels and MANIFEST.json to `out` (emptied first); refuse one over `max_mib`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wanted = bundle_set(python_version)
    manifest: dict[str, object] = {"python_version": python_version, "platform": platform, "image": IMAGE,
                                   "roots": list(ROOTS), "wheels": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        for name, version in wanted.items():
            wheel = fetch_wheel(name, version, raw, python_version, platform)
            entry: dict[str, object] = {"name": name, "version": version, "file": wheel.name}
            if name == "ray":
                entry |= trim_wheel(wheel, out / wheel.name, RAY_TRIM)
            else:
                shutil.copy2(wheel, out / wheel.name)
            entry["bytes"] = (out / wheel.name).stat().st_size
            manifest["wheels"].append(entry)  # type: ignore[union-attr]
    total = sum(int(w["bytes"]) for w in manifest["wheels"])  # type: ignore[union-attr]
    manifest["total_bytes"] = total
    manifest["total_mib"] = round(total / 2**20, 2)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if total > max_mib * 2**20:
        raise SystemExit(f"gpu_bundle: {total / 2**20:.1f} MiB is over the {max_mib:g} MiB limit (see MANIFEST.json)")
    return manifest


# The CPU proof runs on this machine's CPython 3.11, with two stand-ins for the image's pins: torch 2.13.0, the CPU
# build on this disk (no CPU wheel of 2.11.0 is reachable; the image's is +cu130), and numpy at the version here
# (numpy 2.5 needs Python >= 3.12). Everything else is at the image's version.
PROOF_STAND_INS = ("torch", "numpy")
PROOF_CHECKS = ("install", "env", "step_7b", "rollout_0.5b", "train_0.5b", "reference_0.5b")


def image_pins() -> list[str]:
    """IMAGE as pip requirements for the CPU proof: its pinned versions, the rest (and the stand-ins) at the version
    installed here."""
    pins = []
    for name, version in IMAGE.items():
        if version is None or name in PROOF_STAND_INS:
            version = metadata.version(name)
        pins.append(f"{name}=={version}")
    return pins


def prove(root: Path) -> int:
    """The bundle, proven on CPU: a virtual environment holding only the image's packages (IMAGE, at its versions),
    the bundle built for its Python and installed by `gpu/check.py --bundle` alone, then every window-one check's
    CPU variant (`--cpu-smoke`: env with its all_reduce and ray.init, the in-process step, the hf rollout, two Ray
    Train steps, pytest tests/gpu collected, the reference actor). Exit 0 only if each passes (pytest_gpu: every
    test skipped, as without CUDA it must be)."""
    root.mkdir(parents=True, exist_ok=True)
    venv, py = root / "venv", root / "venv" / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *image_pins()], check=True)
    present = [a for a in ABSENT if subprocess.run([str(py), "-m", "pip", "show", "-q", a], capture_output=True)
               .returncode == 0]  # fmt: skip
    if present:  # pulled in by a newer release of an image package than the image's: not there on the device
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
    version = subprocess.run([str(py), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    m = build(root / "bundle", version)
    print(f"[gpu_bundle] proof: {m['total_mib']} MiB for CPython {version}; image without {', '.join(ABSENT)}")
    work = root / "work"
    cmd = [str(py), str(Path(__file__).resolve().parent / "check.py"), "--bundle", str(root / "bundle"),
           "--cpu-smoke", "--gpu", "no", "--work", str(work), "--out", str(root / "out"),
           "--budget", "2400"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "OUT")}
    done = subprocess.run(cmd, env=env)
    report = json.loads((root / "out" / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    print(f"[gpu_bundle] proof: {status}")
    expected = {name: "passed" for name in PROOF_CHECKS} | {"pytest_gpu": "skipped"}
    ok = done.returncode == 0 and all(status.get(n) == s for n, s in expected.items())
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the folder to write (emptied first)")
    p.add_argument("--proof", metavar="DIR", help="prove a bundle on CPU in DIR (a venv of the image's packages)")
    p.add_argument("--python-version", default="3.12", help="the target CPython (the device image's: 3.12)")
    p.add_argument("--platform", default=PLATFORM)
    p.add_argument("--max-mib", type=float, default=MAX_MIB)
    p.add_argument("--list", action="store_true", help="print the distributions and versions only")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        p.error("--python-version: like 3.12")
    if args.proof:
        return prove(Path(args.proof).resolve())
    if not args.out:
        p.error("--out is required")
    if args.list:
        for name, version in bundle_set(args.python_version).items():
            print(f"{name}=={version}")
        return 0
    m = build(Path(args.out), args.python_version, args.platform, args.max_mib)
    for w in m["wheels"]:  # type: ignore[union-attr]
        print(f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
    print(f"{m['total_mib']:8.2f} MiB  in all ({len(m['wheels'])} wheels) -> {args.out}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
