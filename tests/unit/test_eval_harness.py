"""Benchmarks with lm-evaluation-harness, without Ray: what a run or an adapter resolves to, lm_eval's model
arguments, the paper's preset, local tasks on the tiny model with a LoRA adapter (the worker in this process),
the files and summary.json, one-line failures for data a machine without a network lacks, and `uft-ray eval`'s
bad-input exits (2) before any Ray work.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from fixtures.eval_tasks import GEN, HUB, HUB_DATASET, MC, PAIRS, make_adapter, make_run_dir, write_local_tasks

from uft_ray import cli
from uft_ray.evaluation import harness
from uft_ray.evaluation.harness import EvalError, EvalTarget, TaskSpec
from uft_ray.evaluation.presets import DERIVED, UFT_PAPER
from uft_ray.evaluation.worker import EvalWorker
from uft_ray.run_dir import RunDir


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from uft_ray.demo.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("eval")
    base = make_tiny_model(root / "tiny")
    return {
        "root": root,
        "base": Path(base),
        "adapter": make_adapter(base, root / "adapter", nonzero=True),
        "zero_adapter": make_adapter(base, root / "zero-adapter", nonzero=False),
        "run": make_run_dir(root / "runs" / "r1", base, root / "adapter"),
        "tasks": write_local_tasks(root / "tasks"),
    }


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF offline mode for this test only: the env and the flags `datasets` / `huggingface_hub` read at import."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", hc.HF_HUB_OFFLINE)  # restored after; apply_offline sets them
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", dc.HF_HUB_OFFLINE)
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", dc.HF_DATASETS_OFFLINE)


def _worker(target: EvalTarget, tasks: Path) -> EvalWorker:
    w = EvalWorker(
        target, backend="hf", include_path=str(tasks), task_names=[MC, GEN, HUB], offline=True, device="cpu"
    )
    assert w.load() is None
    return w


# ---------------------------------------------------------------------------------------------------------
# The preset


def test_uft_paper_preset_has_the_papers_shots_and_no_chat_template():
    shots = {t.task: t.num_fewshot for t in UFT_PAPER.tasks}
    assert shots == {
        "leaderboard_ifeval": 0,
        "truthfulqa_mc1": 0,
        "truthfulqa_mc2": 0,
        "gsm8k": 5,
        "leaderboard_bbh": 3,
        "leaderboard_mmlu_pro": 5,
        "leaderboard_musr": 0,
        "leaderboard_math_hard": 4,
        "leaderboard_gpqa": 0,
        "arc_challenge": 25,
        "hellaswag": 10,
        "winogrande": 5,
        "mmlu": 5,
    }
    assert UFT_PAPER.apply_chat_template is False
    assert [d.name for d in DERIVED] == ["ifeval_mean", "truthfulqa_mean"]


def test_uft_paper_tasks_are_lm_evals_own_names():
    tm = harness.task_manager()
    harness.check_tasks([t.task for t in UFT_PAPER.tasks], tm)  # raises on a name lm_eval does not know


def test_derived_means_average_lm_evals_metrics():
    """ifeval: (0.2 + 0.4 + 0.6 + 0.8) / 4 = 0.5; truthfulqa: (0.25 + 0.45) / 2 = 0.35."""
    ifeval = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
    tasks = {
        "leaderboard_ifeval": {f"{m},none": v for m, v in zip(ifeval, (0.2, 0.4, 0.6, 0.8), strict=True)},
        "truthfulqa_mc1": {"acc,none": 0.25},
        "truthfulqa_mc2": {"acc,none": 0.45},
    }
    d = harness.derived_metrics(tasks)
    assert d["ifeval_mean"]["value"] == pytest.approx(0.5)
    assert d["truthfulqa_mean"]["value"] == pytest.approx(0.35)
    assert d["truthfulqa_mean"]["mean_of"] == ["truthfulqa_mc1/acc,none", "truthfulqa_mc2/acc,none"]
    assert harness.derived_metrics({"truthfulqa_mc1": {"acc,none": 0.25}}) == {}  # mc2 missing: no mean


# ---------------------------------------------------------------------------------------------------------
# Targets and model arguments


def test_run_dir_resolves_to_base_adapter_and_its_eval_folder(assets):
    t = harness.resolve_target(str(assets["run"]))
    rd = RunDir(assets["run"])
    assert (t.base, t.adapter, t.out_dir, t.run_dir) == (str(assets["base"]), rd.adapter, rd.eval, str(assets["run"]))
    assert rd.eval_summary == os.path.join(rd.eval, "summary.json")
    assert t.lora_r == 8 and t.tokenizer == rd.adapter and t.dtype == "float32"
    # the run's own adapter/ counts as the run
    assert harness.resolve_target(rd.adapter).out_dir == rd.eval


def test_adapter_dir_resolves_through_adapter_config_and_writes_beside_it(assets):
    t = harness.resolve_target(str(assets["adapter"]))
    assert t.base == str(assets["base"]) and t.adapter == str(assets["adapter"]) and t.run_dir is None
    assert t.out_dir == os.path.join(str(assets["adapter"]), "eval")
    assert harness.resolve_target(str(assets["adapter"]), out_dir="rel/out").out_dir == os.path.abspath("rel/out")


def test_unfinished_run_and_bad_paths_are_eval_errors(assets, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {{path: {assets['base']}}}\n")
    with pytest.raises(EvalError, match="no final adapter"):
        harness.resolve_target(str(run))
    with pytest.raises(EvalError, match="neither a run directory"):
        harness.resolve_target(str(tmp_path))
    with pytest.raises(EvalError, match="not a directory"):
        harness.resolve_target(str(tmp_path / "absent"))
    moved = tmp_path / "moved-adapter"
    shutil.copytree(assets["adapter"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/nowhere/base"}))
    with pytest.raises(EvalError, match="--base"):
        harness.resolve_target(str(moved))
    assert harness.resolve_target(str(moved), base=str(assets["base"])).base == str(assets["base"])


def test_model_args_hf_takes_peft_vllm_takes_lora_path_with_rank_room():
    t = EvalTarget(base="/m/base", adapter="/m/adapter", out_dir="/o", lora_r=64, tokenizer="/m/adapter")
    hf = harness.model_args(t, "hf", "cpu")
    assert hf == {"pretrained": "/m/base", "peft": "/m/adapter", "tokenizer": "/m/adapter", "dtype": "float32",
                  "device": "cpu"}  # fmt: skip
    vllm = harness.model_args(t, "vllm", "cuda")
    assert vllm["lora_local_path"] == "/m/adapter" and vllm["max_lora_rank"] == 64 and vllm["dtype"] == "bfloat16"
    assert "peft" not in vllm and "device" not in vllm
    # vLLM's default max_lora_rank is 16 and it takes only some values: round the adapter's r up
    assert [harness.vllm_lora_rank(r) for r in (None, 8, 16, 20, 200)] == [16, 16, 16, 32, 256]
    assert "peft" not in harness.model_args(EvalTarget(base="/b", adapter=None, out_dir="/o"), "hf", "cpu")
    assert harness.resolve_backend("auto", "cpu") == "hf"


# ---------------------------------------------------------------------------------------------------------
# Local tasks on the tiny model + adapter


def test_local_tasks_report_and_summary_matches_lm_evals_json(assets, offline):
    """An mc task (1-shot) and a generate_until task report; the hub-only task fails in one line; summary.json
    has every metric exactly as lm_eval's per-task JSON says."""
    target = harness.resolve_target(str(assets["adapter"]))  # a bare adapter: results in ADAPTER/eval/
    w = _worker(target, assets["tasks"])
    outcomes = [w.run(TaskSpec(MC, 1), log_samples=True), w.run(TaskSpec(GEN)), w.run(TaskSpec(HUB))]
    mc, gen, hub = outcomes
    assert mc["ok"] and gen["ok"], (mc.get("error"), gen.get("error"))
    assert mc["results"]["n-shot"][MC] == 1 and mc["results"]["config"]["model_dtype"] == "torch.float32"
    assert mc["results"]["config"]["model_args"]["peft"] == target.adapter  # the JSON says what was evaluated
    assert not hub["ok"]
    assert "\n" not in hub["error"] and HUB_DATASET in hub["error"] and hub["error"].startswith(f"{HUB}: ")
    assert "its dataset is not here" in hub["error"]

    for o in outcomes:
        harness.write_task_result(target.out_dir, o)
    summary = harness.write_summary(target.out_dir, {HUB: hub["error"]}, {"adapter": target.adapter})
    on_disk = json.loads((assets["adapter"] / "eval" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk["tasks"]) == {MC, GEN} and on_disk["failed"] == {HUB: hub["error"]}
    for task in (MC, GEN):
        lm_eval_json = json.loads((Path(target.out_dir) / f"results_{task}.json").read_text())
        assert lm_eval_json["results"][task]["alias"] == task  # lm_eval's dict, unchanged
        for metric, value in on_disk["tasks"][task].items():
            assert value == lm_eval_json["results"][task][metric]
    acc = on_disk["tasks"][MC]["acc,none"]
    assert 0 <= acc <= 1 and 0 <= on_disk["tasks"][MC]["acc_norm,none"] <= 1
    assert 0 <= on_disk["tasks"][GEN]["exact_match,none"] <= 1
    samples = [json.loads(line) for line in (Path(target.out_dir) / f"samples_{MC}.jsonl").read_text().splitlines()]
    assert len(samples) == len(PAIRS)
    assert acc == pytest.approx(sum(s["acc"] for s in samples) / len(samples))  # the mean of its per-doc scores


def _loglikelihoods(target: EvalTarget, tasks: Path) -> list[list[float]]:
    out = _worker(target, tasks).run(TaskSpec(MC, 0), log_samples=True)
    assert out["ok"], out.get("error")
    return [[r[0][0] for r in s["resps"]] for s in sorted(out["samples"][MC], key=lambda s: s["doc_id"])]


def test_adapter_is_loaded_it_changes_the_loglikelihoods(assets, offline):
    """The nonzero adapter against the same adapter with B = 0 (both through peft; lm_eval resizes the
    embeddings to the tokenizer for either) and against the bare base."""
    t = harness.resolve_target(str(assets["adapter"]))
    zero = harness.resolve_target(str(assets["zero_adapter"]))
    bare = EvalTarget(base=t.base, adapter=None, out_dir=t.out_dir)
    with_adapter, with_zero, without = (_loglikelihoods(x, assets["tasks"]) for x in (t, zero, bare))
    flat = [v for doc in with_adapter for v in doc]
    assert all(v < 0 for v in flat) and len(flat) == 3 * len(PAIRS)
    diff = max(abs(a - b) for da, db in zip(with_adapter, with_zero, strict=True) for a, b in zip(da, db, strict=True))
    assert diff > 1e-3, "the adapter's weights did not change the log-likelihoods"
    assert with_adapter != without


# ---------------------------------------------------------------------------------------------------------
# Failures in one line


def test_gated_dataset_failure_names_hf_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    e = ConnectionError("Couldn't reach 'Idavidrein/gpqa' on the Hub (LocalEntryNotFoundError)")
    line = harness.failure_line("leaderboard_gpqa", e)
    assert "Idavidrein/gpqa" in line and "HF_TOKEN" in line and "\n" not in line
    monkeypatch.setenv("HF_TOKEN", "x")
    assert "HF_TOKEN" not in harness.failure_line("leaderboard_gpqa", e)
    multi = harness.failure_line("t", RuntimeError("first\n  Traceback (most recent call last):\n  second"))
    assert "\n" not in multi and multi.startswith("t: RuntimeError: first")


def test_ifeval_offline_without_punkt_tab_fails_in_one_line(monkeypatch):
    import nltk

    def not_found(resource, *a, **k):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", not_found)
    line = harness.check_nltk("leaderboard_ifeval", offline=True)
    assert line and "punkt_tab" in line and "\n" not in line and line.startswith("leaderboard_ifeval: ")
    assert harness.check_nltk("leaderboard_ifeval", offline=False) is None  # lm_eval may still download it
    assert harness.check_nltk("arc_challenge", offline=True) is None


# ---------------------------------------------------------------------------------------------------------
# The command: bad input exits 2 before any Ray work


def _eval(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["eval", *argv])
    return rc, capsys.readouterr().err


def test_eval_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "uft-ray eval" in out and "--include-path" in out


def test_bad_eval_input_exits_2_with_one_clear_message(assets, tmp_path, capsys, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("Ray started for bad input")

    monkeypatch.setattr("uft_ray.ray_utils.init_ray", no_ray)
    tasks = ["--include-path", str(assets["tasks"])]
    rc, err = _eval(capsys, str(tmp_path), "--tasks", MC, *tasks)
    assert rc == 2 and "neither a run directory" in err
    rc, err = _eval(capsys, str(assets["run"]), "--tasks", f"{MC},uft_local_mcc", *tasks)
    assert rc == 2 and "unknown task: uft_local_mcc" in err and f"did you mean {MC}" in err
    rc, err = _eval(capsys, str(assets["run"]), *tasks)
    assert rc == 2 and "--tasks" in err
    rc, err = _eval(capsys, str(assets["run"]), "--preset", "uft-paper", "--num-fewshot", "3")
    assert rc == 2 and "fixes the shots" in err
    rc, err = _eval(capsys, str(assets["run"]), "--preset", "uft-paper", "--tasks", MC)
    assert rc == 2 and f"not in preset uft-paper: {MC}" in err
    rc, err = _eval(capsys, str(assets["run"]), "--tasks", MC, "--include-path", str(tmp_path / "absent"))
    assert rc == 2 and "--include-path" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(assets["run"]), "--preset", "no-such-preset"])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_importing_the_package_loads_no_lm_eval():
    import subprocess

    code = "import uft_ray.evaluation, uft_ray.evaluation.presets, sys; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
