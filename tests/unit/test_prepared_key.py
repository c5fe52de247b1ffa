"""Rows prepared for one config are not trained by another (`uft_ray.driver.run(cfg, prepared_dir=DIR)`): the key
written at prepare time, checked against the run's config, naming the fields that differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.run_dir import PREPARED_KEY
from uft_ray.uft import driver


def _cfg(tmp_path: Path, overrides: list[str] | None = None):
    model = tmp_path / "model"
    if not model.exists():
        model.mkdir()
        (model / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
        (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    for name in ("uc.parquet", "hs.jsonl.gz"):
        (tmp_path / name).touch()
    base = {
        "model": {"path": str(model)},
        "data": {"sources": [
            {"name": "ultrachat", "format": "ultrachat_200k", "path": str(tmp_path / "uc.parquet")},
            {"name": "helpsteer2", "format": "helpsteer2", "path": str(tmp_path / "hs.jsonl.gz"), "kind": "score"},
        ]},
        "mixture": {"counts": {"ultrachat": 20, "helpsteer2": 20}},
    }  # fmt: skip
    return load_config(base, overrides)


def test_the_same_config_takes_the_rows(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    driver.write_prepared_key(_cfg(tmp_path), str(out))
    assert json.loads((out / PREPARED_KEY).read_text())["key"] == driver.prepare_key(_cfg(tmp_path))
    driver.check_prepared_key(_cfg(tmp_path, ["loss.beta=0.5", "train.lr=1e-4"]), str(out))  # not the rows' inputs


def test_rows_of_another_config_are_refused_naming_each_field(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    driver.write_prepared_key(_cfg(tmp_path), str(out))
    other = _cfg(tmp_path, ["tokenize.max_len=1536", "mixture.counts.ultrachat=10", "data.sources.1.kind=binary"])
    with pytest.raises(ConfigError) as e:
        driver.check_prepared_key(other, str(out))
    msgs = e.value.messages
    for field in ("tokenize.max_len", "mixture.counts.ultrachat", "data.sources"):
        assert any(m.startswith(field) for m in msgs), (field, msgs)
    assert "uft-ray prepare CONFIG --out NEW_DIR" in msgs[-1]


def test_another_tokenizer_under_the_same_path_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    driver.write_prepared_key(_cfg(tmp_path), str(out))
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"b": 0}}}))
    with pytest.raises(ConfigError, match=r"^invalid config:\n  - tokenizer\.tokenizer\.json: "):
        driver.check_prepared_key(_cfg(tmp_path), str(out))


def test_rows_without_a_key_are_trusted_with_a_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "prepared").mkdir()
    driver.check_prepared_key(_cfg(tmp_path), str(tmp_path / "prepared"))
    assert "cannot check" in caplog.text
