"""Config: every kind of bad config fails at load with one line that names the field; overrides; round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from uft_ray.config import ConfigError, load_config


def base(tmp_path: Path) -> dict:
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


def messages(cfg: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(cfg, overrides)
    return e.value.messages


def test_base_is_valid(tmp_path: Path) -> None:
    cfg = load_config(base(tmp_path))
    assert cfg.data.sources[1].resolved_kind == "score"
    assert cfg.mixture.counts == {"ultrachat": 20, "helpsteer2": 20}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # unknown key, with the allowed ones
        (["modell.path=x"], "modell: unknown key; allowed: data, eval, logging, lora, loss, method"),
        (["train.learning_rate=1.0"], "train.learning_rate: unknown key; allowed:"),
        # wrong type
        (["lora.r=sixteen"], "lora.r: expected int, got 'sixteen'"),
        (["mixture.allow_upsample=[1]"], "mixture.allow_upsample: expected bool"),
        # negative / all-zero counts and ratios
        (["mixture.counts.ultrachat=-5"], "mixture.counts.ultrachat: must be >= 0, got -5"),
        (["mixture.counts.ultrachat=0", "mixture.counts.helpsteer2=0"], "mixture.counts: all zero"),
        (["mixture.counts=null", "mixture.ratios={ultrachat: 1}"], "mixture.total: required with mixture.ratios"),
        (["mixture.counts=null", "mixture.ratios={ultrachat: -1, helpsteer2: 1}", "mixture.total=10"],
         "mixture.ratios.ultrachat: must be >= 0"),  # fmt: skip
        (["mixture.counts.nosuch=3"], "mixture.counts.nosuch: no source named 'nosuch'; sources: ultrachat, helpsteer2"),
        # a source the mixture does not mention would silently never be read
        (["mixture.counts={ultrachat: 5}"], "mixture.counts.helpsteer2: source 'helpsteer2' has no entry"),
        # missing source path
        (["data.sources.0.path=/no/such/file.parquet"], "data.sources.0.path: '/no/such/file.parquet' does not exist"),
        # unknown format / kind the format cannot make
        (["data.sources.0.format=sharegpt"], "data.sources.0.format: 'sharegpt' is not allowed; use one of: ultrachat_200k"),
        (["data.sources.0.kind=pair"], "data.sources.0.kind: 'pair' is not allowed for format ultrachat_200k"),
        # unknown loss type; a loss that cannot train a source's kind
        (["loss.type=ppo"], "loss.type: 'ppo' is not allowed; use one of: uft, una_bce, dpo, kto, sft"),
        (["loss.type=dpo"], "loss.type dpo cannot train 'sft' rows (source ultrachat)"),
        # tokenize limits and policy
        (["tokenize.max_prompt_len=4096"], "tokenize.max_prompt_len: must be < tokenize.max_len (2048), got 4096"),
        (["tokenize.overflow=truncate"], "tokenize.overflow: 'truncate' is not allowed; use one of: drop, truncate_prompt_left"),
        # score weights
        (["data.sources.1.score_weights={helpfulness: 1, style: 2}"], "data.sources.1.score_weights.style: unknown attribute"),
        (["data.sources.1.score_weights={helpfulness: 0}"], "data.sources.1.score_weights: at least one weight must be non-zero"),
        # duplicate source names
        (["data.sources.1.name=ultrachat"], "data.sources.1.name: 'ultrachat' is used by more than one source"),
    ],
)  # fmt: skip
def test_bad_config_message_names_the_field(tmp_path: Path, overrides: list[str], expected: str) -> None:
    msgs = messages(base(tmp_path), overrides)
    assert any(expected in m for m in msgs), msgs
    assert all("\n" not in m for m in msgs)  # one line per problem


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    msgs = messages(base(tmp_path), ["loss.type=ppo", "lora.r=-1", "train.warmup_ratio=1.5"])
    assert len(msgs) == 3
    assert [m.split(":")[0] for m in msgs] == ["lora.r", "loss.type", "train.warmup_ratio"]


def test_override_errors(tmp_path: Path) -> None:
    assert messages(base(tmp_path), ["data.sources.7.name=x"]) == [
        "data.sources.7: index 7 out of range (list has 2 items)"
    ]
    assert messages(base(tmp_path), ["data.sources.x.name=y"]) == ["data.sources.x: list index must be an integer"]
    assert "overrides look like key.path=value" in messages(base(tmp_path), ["train.lr"])[0]


def test_overrides_by_list_index_and_yaml_values(tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    other.write_bytes(b"")
    cfg = load_config(
        base(tmp_path),
        [
            f"data.sources.0.path={other}",
            "data.sources.1.kind=binary",
            "train.lr=1e-4",  # YAML 1.1 reads this as a string; the config still takes it as a float
            "lora.target_modules=[q_proj, v_proj]",
            "mixture.counts.helpsteer2=7",
            "data.seed=3",
        ],
    )
    assert cfg.data.sources[0].path == str(other)
    assert cfg.data.sources[1].resolved_kind == "binary"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.mixture.counts == {"ultrachat": 20, "helpsteer2": 7}
    assert cfg.data.seed == 3


def test_override_appends_a_source(tmp_path: Path) -> None:
    extra = tmp_path / "pref.jsonl"
    extra.write_text("")
    cfg = load_config(
        base(tmp_path),
        [
            "data.sources.2.name=pref",
            "data.sources.2.format=preference",
            f"data.sources.2.path={extra}",
            "mixture.counts.pref=5",
            "loss.type=sft",
        ],
    )
    assert [s.name for s in cfg.data.sources] == ["ultrachat", "helpsteer2", "pref"]
    assert cfg.source("pref").resolved_kind == "pair"


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(base(tmp_path), ["train.num_workers=2", "reference.actors=[1, 3]", "loss.beta=0.1"])
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(cfg.to_yaml())  # as the runner writes {run_dir}/config.yaml
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == yaml.safe_load(path.read_text())
    assert again.reference.actors == [1, 3]


def test_relative_paths_resolve_against_the_yaml_file(tmp_path: Path) -> None:
    d = base(tmp_path)
    d["data"]["sources"][0]["path"] = "uc.parquet"
    d["data"]["sources"][1]["path"] = "hs.jsonl.gz"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    cfg = load_config(tmp_path / "cfg.yaml")
    assert cfg.data.sources[0].path == str((tmp_path / "uc.parquet").resolve())


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "the top level must be a mapping" in messages(str(tmp_path / "list.yaml"))[0]  # type: ignore[arg-type]
    assert "does not exist" in messages(str(tmp_path / "nope.yaml"))[0]  # type: ignore[arg-type]


# --- paths: checked before any cluster work, `~` and relative paths resolved in one place ------------------


def test_a_local_model_path_that_does_not_exist_fails_validation(tmp_path: Path) -> None:
    cfg = base(tmp_path)
    cfg["model"]["path"] = "/nope"
    assert messages(cfg) == ["model.path: '/nope' does not exist (a local model directory or GGUF file)"]
    cfg["model"]["adapter"] = str(tmp_path / "no-adapter")
    cfg["reference"] = {"model_path": "~/no-such-model-dir", "adapter": "./missing-adapter"}
    got = messages(cfg)
    assert len(got) == 4 and got[0].startswith("model.path:") and got[1].startswith("model.adapter:")
    assert got[2].startswith("reference.model_path:") and got[3].startswith("reference.adapter:")
    # skipped where the path is another machine's, and for URIs and hub ids
    load_config(cfg, check_paths=False)
    cfg = base(tmp_path)
    for path in ("s3://bucket/models/x", "Qwen/Qwen2.5-0.5B"):
        cfg["model"]["path"] = path
        assert load_config(cfg).model.path == path


def test_tilde_is_expanded_in_every_path_field_before_anything_loads(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    (home / "models/x").mkdir(parents=True)
    (home / "adapter").mkdir()
    (home / "data").mkdir()
    (home / "data/uc.parquet").write_bytes(b"")
    monkeypatch.setenv("HOME", str(home))
    cfg = base(tmp_path)
    cfg["model"] = {"path": "~/models/x", "adapter": "~/adapter"}
    cfg["data"]["sources"][0]["path"] = "~/data/*.parquet"
    cfg["reference"] = {"model_path": "~/models/x", "cache_dir": "~/.cache/uft-ray"}
    cfg["output"] = {"storage_path": "~/runs", "run_name": "r"}
    c = load_config(cfg)
    assert c.model.path == c.reference.model_path == str(home / "models/x")
    assert c.model.adapter == str(home / "adapter")
    assert c.data.sources[0].path == str(home / "data/*.parquet")
    assert c.reference.cache_dir == str(home / ".cache/uft-ray")
    assert c.output.run_dir == str(home / "runs" / "r")


def test_relative_paths_resolve_against_the_yaml_then_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    (conf / "models/tiny").mkdir(parents=True)
    (tmp_path / "work/data").mkdir(parents=True)
    (tmp_path / "work/data/uc.parquet").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "work")
    cfg = base(tmp_path)
    cfg["model"]["path"] = "models/tiny"  # beside the YAML
    cfg["data"]["sources"][0]["path"] = "data/uc.parquet"  # in the working directory only
    (conf / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(conf / "c.yaml")
    assert c.model.path == str(conf / "models/tiny")
    assert c.data.sources[0].path == str(tmp_path / "work/data/uc.parquet")
    raw = load_config(conf / "c.yaml", check_paths=False, resolve_paths=False)  # a config shipped elsewhere
    assert raw.model.path == "models/tiny"


# --- one dtype for the policy and the reference -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "use_gpu", "expected"),
    [
        ("bfloat16", False, "float32"),  # a CPU run computes in fp32 on both sides, whatever model.dtype says
        ("auto", False, "float32"),
        ("auto", True, "bfloat16"),
        ("float16", True, "float16"),
        ("float32", True, "float32"),
    ],
)
def test_policy_and_reference_compute_in_one_dtype(tmp_path: Path, dtype: str, use_gpu: bool, expected: str) -> None:
    """A bf16 reference against an fp32 policy makes r != 0 before the first step: both sides use one rule."""
    import torch

    from uft_ray.reference.scorer import scorer_kwargs
    from uft_ray.train.engine import deepspeed_config, resolve_dtype

    cfg = base(tmp_path)
    cfg["model"]["dtype"] = dtype
    cfg["train"] = {"use_gpu": use_gpu}
    c = load_config(cfg)
    assert scorer_kwargs(c)["dtype"] == expected
    assert resolve_dtype(c, use_gpu) == getattr(torch, expected)
    ds = deepspeed_config(c, use_gpu, zero_stage=3)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (expected == "bfloat16", expected == "float16")


def test_hint_rfts_reference_adapter_is_checked_at_load(tmp_path: Path) -> None:
    """hint_rft's trainer loads reference.adapter as its KL reference: a missing one fails before any Ray work."""
    cfg = yaml.safe_load(Path("jobs/configs/demo_hint_rft_tiny.yaml").read_text())
    cfg["model"]["path"] = str(tmp_path)
    cfg["reference"] = {"adapter": str(tmp_path / "no-adapter")}
    assert messages(cfg) == [f"reference.adapter: '{tmp_path}/no-adapter' does not exist (a peft adapter directory)"]
    cfg["reference"]["adapter"] = str(tmp_path)
    assert load_config(cfg).reference.adapter == str(tmp_path)


def test_hint_rft_task_files_resolve_against_the_yaml_like_every_input(tmp_path: Path, monkeypatch) -> None:
    """rft.path / rft.eval_path are inputs too: relative to the YAML's folder, then the working directory."""
    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs/configs/demo_hint_rft_tiny.yaml").read_text())
    folder = tmp_path / "exp"
    (folder / "task").mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl"):
        (folder / "task" / name).write_text('{"prompt": "echo 1 :", "answer": "1"}\n')
    recipe["model"] = {"path": str(tmp_path)}
    recipe["rft"] |= {"task": "uft_ray.tasks.toy:verify", "path": "task/train.jsonl", "eval_path": "task/*.jsonl",
                      "n_train": None}  # fmt: skip
    (folder / "cfg.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    cfg = load_config(folder / "cfg.yaml")
    assert cfg.rft.path == str(folder / "task" / "train.jsonl")
    assert cfg.rft.eval_path == str(folder / "task" / "*.jsonl")
