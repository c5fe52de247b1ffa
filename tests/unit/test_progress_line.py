"""The CLI's one line per step (cli._Progress) for every method's metrics rows: a row the display does not expect
(a term a config leaves out, a null, a string) prints what it can and never fails the run that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uft_ray import cli
from uft_ray.run_dir import RunDir
from uft_ray.train.loop import _metrics_row

SOURCES = ["ultrachat", "helpsteer2"]


def _uft_row() -> dict:
    """A row as the offline loop writes it (uft_ray.train.loop._metrics_row), with KTO's reference point."""
    record = {
        "epoch": 0,
        "scaled_loss": 1.5,
        "per_source": {"loss/ultrachat": 1.25, "loss/helpsteer2": 0.5, "rows/ultrachat": [1.0]},
        "rows_by_source": {"ultrachat": 3, "helpsteer2": 1},
        "n_rows": 4,
        "tokens": 400,
        "computed": 380,
        "padded": 400,
        "wait_s": 0.1,
        "lr": 1e-4,
        "kto_z": 0.25,
    }
    state = {"consumed": {"ultrachat": 6, "helpsteer2": 2}}
    config = {"sources": SOURCES, "target_fraction": {"ultrachat": 0.75, "helpsteer2": 0.25}}
    return _metrics_row(record, state, config, step=1, step_time=2.0, loss_divisor=2, grad_norm=0.5)


def _hint_rft_row(kl: bool, hint: bool, heldout: bool) -> dict:
    """A row as hint_rft's loop writes it (uft_ray.rft.metrics.metrics_row_collective): `kl` only with a KL term
    (rft.kl_coef > 0), `hint_nll` only when a hint was revealed, `eval/accuracy` only on evaluation steps."""
    row = {
        "step": 3,
        "time": 0.0,
        "loss": 0.125,
        "pg_loss": 0.1,
        "reward/mean": 0.5,
        "reward/accuracy": 0.25,
        "reward/format": 0.75,
        "hint/share": 0.4,
        "response/length": 12.0,
        "entropy": 1.0,
        "clip_frac": 0.0,
        "time/generate_frac": 0.6,
        "rollout/tokens_per_s": 100.0,
        "tokens_per_s": 250.0,
        "sync/adapter_s": 0.1,
        "sync/adapter_bytes": 1000,
        "data_wait_frac": 0.0,
        "step_time_s": 1.0,
        "lr": 1e-5,
        "grad_norm": 0.3,
    }
    if kl:
        row["kl"] = 0.0123
    if hint:
        row["hint_nll"] = 2.5
    if heldout:
        row["eval/accuracy"] = 0.625
    return row


def test_the_uft_line_shows_the_loss_each_sources_loss_and_share(tmp_path: Path) -> None:
    line = cli._Progress(str(tmp_path), SOURCES).line(_uft_row())
    assert "step 2 | loss 0.7500" in line  # 1.5 / 2
    assert "ultrachat loss 1.2500 share 0.75 (target 0.75)" in line
    assert "helpsteer2 loss 0.5000 share 0.25 (target 0.25)" in line
    assert "200 tok/s" in line


@pytest.mark.parametrize("kl", [True, False])
@pytest.mark.parametrize("hint", [True, False])
@pytest.mark.parametrize("heldout", [True, False])
def test_every_hint_rft_row_shape_has_a_line(tmp_path: Path, kl: bool, hint: bool, heldout: bool) -> None:
    line = cli._Progress(str(tmp_path), []).line(_hint_rft_row(kl, hint, heldout))
    assert "step 3 | loss 0.1250 | reward 0.500 acc 0.250 format 0.750" in line
    assert ("kl 0.0123" in line) == kl
    assert ("nll 2.500" in line) == hint
    assert ("eval/accuracy 0.625" in line) == heldout
    assert "generate 60%" in line


@pytest.mark.parametrize("method", ["uft", "hint_rft"])
def test_a_line_survives_any_key_missing_null_or_not_a_number(tmp_path: Path, method: str) -> None:
    full = _uft_row() if method == "uft" else _hint_rft_row(True, True, True)
    progress = cli._Progress(str(tmp_path), SOURCES)
    for key in full:
        if key == "step":
            continue
        for value in (None, "n/a", float("nan")):
            line = progress.line({**full, key: value})
            assert line.startswith("[uft-ray] step "), (key, value)
        line = progress.line({k: v for k, v in full.items() if k != key})
        assert line.startswith("[uft-ray] step "), key


def test_a_finished_hint_rft_run_without_kl_prints_its_last_line_and_exits_cleanly(tmp_path: Path, capsys) -> None:
    """rft.kl_coef 0 logs no `kl`: the final flush on leaving the progress block printed `KeyError: 'kl'` and
    `uft-ray train` exited 1 after a run that had trained to its end."""
    run = RunDir(tmp_path)
    with cli._Progress(run.path, [], poll_s=3600):
        run.append_metrics(_hint_rft_row(kl=False, hint=False, heldout=False))
    out = capsys.readouterr().out
    assert "[uft-ray] step 3 | loss 0.1250" in out
    assert " kl " not in out


def test_a_display_bug_is_a_warning_never_a_failed_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """Whatever goes wrong in the display (here: the line itself raises), leaving the block does not
    raise and the step lines that could be printed are."""
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_uft_row()) + "\n")

    def broken(self, m):
        raise RuntimeError("display broke")

    progress = cli._Progress(run.path, SOURCES, poll_s=3600)
    monkeypatch.setattr(cli._Progress, "line", broken)
    progress.last = 0
    with progress:
        pass
    err = capsys.readouterr().err
    assert "progress line" in err and "display broke" in err
