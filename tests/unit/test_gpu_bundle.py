"""gpu/bundle.py: what the GPU checks need beyond the device image, and Ray's trimmed wheel.

The whole bundle, built and installed into a venv of the image's packages, is proven by `make gpu-bundle-proof`
(minutes: not in the suite); here its parts, on this machine's installed metadata and real wheel files.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "gpu" / "bundle.py")
assert spec is not None and spec.loader is not None
gb = importlib.util.module_from_spec(spec)
sys.modules["gpu_bundle"] = gb
spec.loader.exec_module(gb)


def test_the_closure_follows_installed_requirements_with_the_targets_markers() -> None:
    got = gb.closure(["pytest-timeout"], "3.12")
    assert {"pytest-timeout", "pytest", "pluggy", "iniconfig", "packaging"} <= got
    assert "tomli" not in got  # pytest needs tomli only below Python 3.11
    assert "tomli" in gb.closure(["pytest"], "3.10")


def test_the_bundle_holds_what_the_image_lacks_and_nothing_it_has() -> None:
    wanted = gb.bundle_set("3.12")
    assert {"ray", "deepspeed", "pydantic", "pydantic-core", "hjson", "pytest-timeout", "protobuf"} <= set(wanted)
    assert not {"torch", "transformers", "numpy", "pyyaml", "msgpack", "filelock", "pytest", "ninja"} & set(wanted)
    from importlib import metadata

    assert all(v == metadata.version(k) for k, v in wanted.items())  # pinned to what the suite runs with
    # in the image too, but at versions the suite never ran with: carried, ahead of the image's on the path
    assert {"peft", "typing-extensions"} <= set(wanted)
    assert "peft" in gb.closure(list(gb.IMAGE), "3.12") and "accelerate" not in wanted  # peft's own needs: the image's


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_a_trimmed_wheel_drops_the_paths_strips_elf_files_and_records_what_it_holds(tmp_path: Path) -> None:
    elf = Path(sys.executable).resolve().read_bytes()  # a real ELF binary with its symbol table
    src = tmp_path / "ray-9.9-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("ray/__init__.py", "X = 1\n")
        z.writestr("ray/jars/ray_dist.jar", b"j" * 1000)
        z.writestr("ray/rllib/algo.py", "pass\n")
        info = zipfile.ZipInfo("ray/core/gcs_server")
        info.external_attr = 0o100755 << 16
        z.writestr(info, elf)
        z.writestr("ray-9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: ray\nVersion: 9.9\n")
        z.writestr("ray-9.9.dist-info/RECORD", "stale,,\n")
    out = tmp_path / "out.whl"
    report = gb.trim_wheel(src, out, ("ray/jars/", "ray/rllib/"))
    assert report["removed_bytes"] == {"ray/jars/": 1000, "ray/rllib/": 5}
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert names == {
            "ray/__init__.py",
            "ray/core/gcs_server",
            "ray-9.9.dist-info/METADATA",
            "ray-9.9.dist-info/RECORD",
        }
        binary = z.read("ray/core/gcs_server")
        assert binary.startswith(b"\x7fELF") and len(binary) <= len(elf)
        assert (z.getinfo("ray/core/gcs_server").external_attr >> 16) & 0o111  # still executable
        rows = list(csv.reader(io.StringIO(z.read("ray-9.9.dist-info/RECORD").decode())))
        recorded = {r[0]: (r[1], r[2]) for r in rows}
        assert set(recorded) == names
        for name in names - {"ray-9.9.dist-info/RECORD"}:
            data = z.read(name)
            assert recorded[name] == (_digest(data), str(len(data)))
