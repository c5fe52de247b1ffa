"""Numbers that are not numbers, or not in range, fail at load naming the field and what is allowed.

The NaN / Inf sweep is generated from the config dataclasses: every field that can hold a float (a scalar, a
mapping of floats, inside a list of sources) gets .nan, .inf and -.inf, so a field added later is covered too.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml

from uft_ray import cli
from uft_ray.config import Config, ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("ultrachat", "helpsteer2")


def _uft(tmp_path: Path) -> dict:
    data = tmp_path / "uc.parquet"
    data.write_bytes(b"")
    hs = tmp_path / "hs.jsonl.gz"
    hs.write_bytes(b"")
    return {
        "model": {"path": str(tmp_path)},
        "data": {
            "sources": [
                {"name": "ultrachat", "format": "ultrachat_200k", "path": str(data)},
                {"name": "helpsteer2", "format": "helpsteer2", "path": str(hs), "kind": "score"},
            ]
        },
        "mixture": {"counts": {"ultrachat": 20, "helpsteer2": 20}},
    }


def _hint_rft(tmp_path: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "jobs/configs/demo_hint_rft_tiny.yaml").read_text())
    cfg["model"]["path"] = str(tmp_path)
    return cfg


def _messages(cfg: dict, overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(cfg, overrides)
    return e.value.messages


def _holds_float(tp: typing.Any) -> bool:
    if tp is float:
        return True
    return any(_holds_float(a) for a in typing.get_args(tp))


def _float_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, how to set it) for every float the schema can hold: `scalar`, or `mapping` (a float per
    key), walking nested sections and the first entry of a list of sections."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where, tp = f"{prefix}{f.name}", hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0] if len(args) == 1 else None
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, where + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += _float_fields(typing.get_args(tp)[0], where + ".0.")
        elif inner is not None and typing.get_origin(inner) is dict and _holds_float(typing.get_args(inner)[1]):
            out.append((where, "mapping"))
        elif _holds_float(tp) and typing.get_origin(tp) not in (dict,):
            out.append((where, "scalar"))
    return out


FLOAT_FIELDS = _float_fields()


def test_the_sweep_finds_the_schemas_floats() -> None:
    """The generator itself: the fields the issue names are among those it found (a broken walk fails here)."""
    found = dict(FLOAT_FIELDS)
    for name in ("train.lr", "loss.beta", "rft.clip", "rft.temperature", "rft.kl_coef", "rft.verifier_timeout_s",
                 "reference.gpus_per_actor", "eval.limit", "loss.kto_desirable_weight", "lora.dropout",
                 "train.cpus_per_worker", "rft.rollout.gpu_memory_utilization"):  # fmt: skip
        assert found.get(name) == "scalar", name
    for name in ("loss.source_weights", "mixture.ratios", "data.sources.0.score_weights"):
        assert found.get(name) == "mapping", name
    assert len(FLOAT_FIELDS) >= 30


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(("field", "how"), FLOAT_FIELDS, ids=[f for f, _ in FLOAT_FIELDS])
def test_every_float_field_rejects_nan_and_inf(tmp_path: Path, field: str, how: str, value: str) -> None:
    base = _uft(tmp_path)
    if how == "scalar":
        override, named = f"{field}={value}", field
    else:
        key = "helpfulness" if field.endswith("score_weights") else "ultrachat"
        override, named = (
            f"{field}={{{key}: {value}, {SOURCES[1] if key == 'ultrachat' else 'correctness'}: 1}}",
            (f"{field}.{key}"),
        )
    msgs = _messages(base, [override])
    mine = [m for m in msgs if m.startswith(f"{named}:")]
    assert mine, msgs
    assert all("finite" in m for m in mine), mine


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_hint_rft_floats_reject_nan_and_inf(tmp_path: Path, value: str) -> None:
    rft = [f for f, how in FLOAT_FIELDS if f.startswith("rft.") and how == "scalar"]
    msgs = _messages(_hint_rft(tmp_path), [f"{f}={value}" for f in rft])
    for f in rft:
        assert any(m.startswith(f"{f}: must be a finite number") for m in msgs), (f, msgs)


def test_a_float_too_large_for_a_double_is_infinite_and_refused(tmp_path: Path) -> None:
    """`1e999` (read as a string by YAML 1.1 and parsed as a float) is inf."""
    assert _messages(_uft(tmp_path), ["train.lr=1e999"]) == ["train.lr: must be a finite number, got inf"]


def test_a_config_built_in_python_is_checked_the_same(tmp_path: Path) -> None:
    cfg = load_config(_uft(tmp_path))
    cfg.loss.beta = math.nan
    cfg.loss.source_weights = {"ultrachat": math.inf}
    problems = validate(cfg)
    assert "loss.beta: must be a finite number, got nan" in problems
    assert "loss.source_weights.ultrachat: must be a finite number, got inf" in problems
    assert len(problems) == 2, problems  # one message per field, not one per check that trips on it


@pytest.mark.parametrize(
    ("method", "overrides", "expected"),
    [
        ("uft", ["loss.kto_desirable_weight=-1"], "loss.kto_desirable_weight: must be >= 0, got -1.0"),
        ("uft", ["loss.kto_undesirable_weight=-0.5"], "loss.kto_undesirable_weight: must be >= 0, got -0.5"),
        (
            "uft",
            [
                "loss.type=kto",
                "data.sources.1.kind=binary",
                "loss.kto_desirable_weight=0",
                "loss.kto_undesirable_weight=0",
            ],
            "loss.kto_desirable_weight / loss.kto_undesirable_weight: ",
        ),  # fmt: skip
        ("uft", ["train.seed=-1"], "train.seed: must be in [0, 2**32), got -1"),
        ("uft", ["data.seed=-3"], "data.seed: must be in [0, 2**32), got -3"),
        ("uft", ["train.seed=4294967296"], "train.seed: must be in [0, 2**32), got 4294967296"),
        ("uft", ["train.gpus_per_worker=0"], "train.gpus_per_worker: must be > 0 with train.use_gpu: true"),
        ("uft", ["eval.limit=2.5"], "eval.limit: a fraction in (0, 1) or a whole number of rows, got 2.5"),
        ("uft", ["ray.num_cpus=0"], "ray.num_cpus: must be > 0, got 0"),
        ("uft", ["ray.num_cpus=-2"], "ray.num_cpus: must be > 0, got -2"),
        ("hint_rft", ["rft.n=1"], "rft.n: GRPO needs at least 2 rollouts per prompt"),
    ],
)
def test_out_of_range_numbers_fail_at_load(tmp_path: Path, method: str, overrides: list[str], expected: str) -> None:
    base = _uft(tmp_path) if method == "uft" else _hint_rft(tmp_path)
    msgs = _messages(base, overrides)
    assert any(m.startswith(expected) for m in msgs), msgs


def test_in_range_numbers_still_load(tmp_path: Path) -> None:
    """The boundaries the checks allow: a zero KTO side, seed 0 and 2**32 - 1, CPU workers without GPUs, an
    eval.limit of whole rows or a fraction, GRPO with rft.n 2, rft.objective sft with rft.n 1."""
    load_config(_uft(tmp_path), ["loss.kto_undesirable_weight=0", "train.seed=0", "data.seed=4294967295",
                                 "train.use_gpu=false", "train.gpus_per_worker=0", "eval.limit=10"])  # fmt: skip
    load_config(_uft(tmp_path), ["eval.limit=0.5", "ray.num_cpus=4"])
    load_config(_hint_rft(tmp_path), ["rft.n=2", "train.grad_accum=1"])  # 2 prompts x 2 rollouts a rank
    load_config(_hint_rft(tmp_path), ["rft.objective=sft", "rft.n=1", "train.micro_batch_size=1"])


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "",
        "a/b",
        "/abs",
        "a\\b",
        ".hidden",
        "-flag",
        "a b",
        "tab\tname",
        "nul\x00",
        "new\nline",
        "~",
        "é",
        "a?b",
        "a#b",
        "a%2fb",
        "x" * 129,
    ],  # fmt: skip
)
def test_run_name_is_one_safe_path_segment(tmp_path: Path, name: str) -> None:
    """A run name is joined under storage_path and its outputs are deleted and replaced there: `..` or a separator
    would put them beside (or above) it."""
    msgs = _messages(_uft(tmp_path), [f"output.run_name={yaml.safe_dump(name).strip()}"] if name else
                     ["output.run_name="])  # fmt: skip
    assert any(m.startswith("output.run_name: one path segment") for m in msgs), msgs


@pytest.mark.parametrize("name", ["uft-run", "lr1e-5", "hints-sft_then_rft-s0", "Qwen2.5_0.5B", "a=b+c@d", "x" * 128])
def test_ordinary_run_names_load(tmp_path: Path, name: str) -> None:
    assert load_config(_uft(tmp_path), [f"output.run_name={name}"]).output.run_name == name


def test_a_bad_run_name_exits_2_from_the_cli(tmp_path: Path, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_uft(tmp_path)))
    assert cli.main(["validate", str(path), "output.run_name=.."]) == 2
    assert "output.run_name: one path segment" in capsys.readouterr().err
