"""The verifier's child process is a sandbox (uft_ray.tasks.verifier): a user's verifier that allocates without
bound, starts processes, reads the environment, or whose process is compromised and answers with a pickle scores 0
with its reason, the trainer (this process) carries on, and no secret of the trainer's environment reaches it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures.verifiers import SECRETS, misbehaves

from uft_ray.tasks.verifier import MAX_OPEN_FILES, VerifierProcess


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {k: f"secret-{k.lower()}-value" for k in SECRETS}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def test_misbehaving_verifiers_score_0_with_their_reason_and_the_next_item_is_scored(
    tmp_path: Path, secrets: dict[str, str]
) -> None:
    marker = tmp_path / "pwned"
    row = {"marker": str(marker)}
    v = VerifierProcess(misbehaves, timeout_s=30, memory_mb=1024)
    texts = ["ok", "allocate", "ok", "fork", "subprocess", "system", "ok", "env", "compromised", "ok", "object", "ok"]
    try:
        rewards = v.score([row] * len(texts), texts)
    finally:
        v.close()
    assert dict(zip(texts, rewards, strict=True)) == {
        "ok": 0.5, "allocate": 0.0, "fork": 0.0, "subprocess": 0.0, "system": 0.0, "env": 0.0,
        "compromised": 0.0, "object": 0.0,
    }  # fmt: skip
    assert rewards[2] == rewards[6] == rewards[9] == rewards[11] == 0.5  # a fresh child after each failure
    assert dict(v.failures) == {"memory": 1, "process": 3, "bad_reply": 1, "bad_reward": 1}
    assert not marker.exists()  # the pickle was never unpickled here


def test_the_child_runs_under_its_limits_with_an_allow_listed_environment(secrets: dict[str, str]) -> None:
    v = VerifierProcess(misbehaves, timeout_s=5, memory_mb=1536)
    try:
        assert v.score([{}], ["ok"]) == [0.5]
        pid = v._proc.pid
        limits = {
            line[:26].strip(): line[26:].split()[:2] for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        }
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert os.getpgid(pid) == pid != os.getpgid(0)  # its own process group, killed as one
    finally:
        v.close()
    assert limits["Max address space"] == [str(1536 << 20)] * 2
    assert limits["Max processes"] == ["0", "0"]
    assert limits["Max open files"] == [str(MAX_OPEN_FILES)] * 2
    assert limits["Max core file size"] == ["0", "0"]
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert not names & set(SECRETS) and not any(s.encode() in b"\0".join(environ) for s in secrets.values())
    assert "PYTHONPATH" in names and not any(n.startswith(("AWS_", "RAY_", "HF_", "WANDB_")) for n in names)
