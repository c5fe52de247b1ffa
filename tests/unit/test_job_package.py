"""What `uft-ray submit` packs (uft_ray.api.pack_working_dir, the real packer): never a link that leaves the working
dir, no secret-bearing files unless explicitly included, and one line saying what was left out."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from uft_ray import api, cli


def _tree(tmp_path: Path) -> Path:
    home = tmp_path / "home"  # stands in for the user's home, outside the working dir
    (home / ".aws").mkdir(parents=True)
    (home / ".aws/credentials").write_text("aws_secret_access_key = AKIAOUTSIDE\n")
    (home / "keys").mkdir()
    (home / "keys/key.txt").write_text("OUTSIDE KEY\n")
    wd = tmp_path / "wd"
    (wd / "jobs").mkdir(parents=True)
    (wd / "jobs/train.py").write_text("print('hi')\n")
    (wd / "data").mkdir()
    (wd / "data/rows.jsonl").write_text('{"a": 1}\n')
    (wd / "creds").symlink_to(home / ".aws/credentials")  # a file link leaving the root
    (wd / "keys").symlink_to(home / "keys")  # a directory link leaving the root
    (wd / "data/escape").symlink_to("../../home/.aws/credentials")  # relative, leaving the root
    (wd / "rows_link.jsonl").symlink_to("data/rows.jsonl")  # stays inside: packed as the file it names
    (wd / "loop").symlink_to(wd)  # a link to the root itself
    secrets = {
        ".env": "HF_TOKEN=hf_x\n",
        ".env.production": "X=1\n",
        "deploy/tls.pem": "-----BEGIN PRIVATE KEY-----\n",
        "deploy/server.key": "k\n",
        "id_rsa": "k\n",
        "sub/id_ed25519.pub": "k\n",
        ".aws/config": "[default]\n",
        ".ssh/known_hosts": "h\n",
        "wandb/run-1/files/config.yaml": "k: v\n",
        "mlruns/0/meta.yaml": "k: v\n",
        ".netrc": "machine x password y\n",
        ".git-credentials": "https://u:p@x\n",
    }
    for rel, text in secrets.items():
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text(text)
    return wd


def _names(zip_path: Path) -> set[str]:
    return set(zipfile.ZipFile(zip_path).namelist())


def test_no_link_out_of_the_root_and_no_secret_bearing_file_is_packed(tmp_path: Path) -> None:
    wd = _tree(tmp_path)
    with pytest.warns(UserWarning) as caught:
        api.pack_working_dir(wd, tmp_path / "p.zip", extra_files={api.JOB_CONFIG: "a: 1\n"})
    names = _names(tmp_path / "p.zip")
    assert names == {"jobs/train.py", "data/rows.jsonl", "rows_link.jsonl", api.JOB_CONFIG}
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        assert zf.read("rows_link.jsonl") == b'{"a": 1}\n'
        assert not any(b"OUTSIDE" in zf.read(n) for n in zf.namelist())
    (message,) = [str(w.message) for w in caught]
    assert "\n" not in message and "--include" in message
    for shown in (".env", "deploy/tls.pem", "id_rsa", ".aws/", ".ssh/", "wandb/", "mlruns/", "creds", "keys"):
        assert shown in message, shown
    assert "12 secret-bearing" in message and "4 links" in message


def test_an_explicit_include_packs_a_secret_bearing_name_but_never_a_link_out(tmp_path: Path) -> None:
    wd = _tree(tmp_path)
    with pytest.warns(UserWarning):
        api.pack_working_dir(wd, tmp_path / "p.zip", includes=["deploy/tls.pem", "wandb/", "creds"])
    names = _names(tmp_path / "p.zip")
    assert {"deploy/tls.pem", "wandb/run-1/files/config.yaml"} <= names
    assert not {"creds", "deploy/server.key", ".env"} & names


def test_a_clean_tree_packs_without_a_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    (tmp_path / "wd/jobs").mkdir(parents=True)
    (tmp_path / "wd/jobs/train.py").write_text("print('hi')\n")
    api.pack_working_dir(tmp_path / "wd", tmp_path / "p.zip")
    assert _names(tmp_path / "p.zip") == {"jobs/train.py"} and not recwarn.list


def test_submit_takes_include_on_the_command_line() -> None:
    args = cli.build_parser().parse_args(["submit", "c.yaml", "--include", "deploy/tls.pem", "--include", ".env"])
    assert args.include == ["deploy/tls.pem", ".env"]
