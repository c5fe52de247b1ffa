"""The real-model experiments through `uft-ray evidence`, each shortened to 2 steps, one seed and a few probes, on
SmolLM2-135M-Instruct (the session's converted model, tests/integration/test_real_model.py's fixtures).

- forgetting-real (Experiment W): the base model and the one-stage `uft-mix` arm: the length-biased data written,
  the run through the compare recipe, both probed (held-out instructions, sums, NLL of the base model's own
  answers, length), the driver's pair accuracy and kappa read back, the tables, plot and results section. The
  sequential arms share the SFT run as the toy's do (tests/integration/test_evidence.py, the same compare code).
- hints-real (Experiment L): the `uft` arm on three-number sums: hints shown, rollouts scored by the sum3
  verifier, held-out accuracy before the first step and after the last, the curves and table.
"""

from __future__ import annotations

import json

import pytest

from uft_ray import evidence
from uft_ray.run_dir import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def real_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The demo's real assets (the packaged GGUF file, converted once into the model cache, and its data)."""
    from uft_ray import model_gguf, model_store
    from uft_ray.demo import ensure_real_demo_assets

    model_store.local_model(model_gguf.packaged_gguf())
    return ensure_real_demo_assets(tmp_path_factory.mktemp("real-evidence"))


def test_experiment_w_probes_the_base_and_a_uft_mix_run_and_writes_its_section(real_assets, tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    out = tmp_path / "ev"
    argv = ["forgetting-real", "--seeds", "0", "--steps", "2", "--arms", "base,uft-mix", "--probe-rows", "5,2,2",
            "--out", str(out), "--assets", real_assets["root"], "--results", str(results)]  # fmt: skip
    assert evidence.main(argv) == 0
    data = json.loads((out / "forgetting-real.json").read_text())
    m = data["metrics"]
    for metric in ("probe/instructions", "probe/length_limited", "probe/sums"):
        assert set(m[metric]) == {"base", "uft-mix"} and all(0.0 <= c["0"][0][1] <= 1.0 for c in m[metric].values())
    assert m["probe/instructions"]["uft-mix"]["0"][0][0] == 2  # measured after the arm's last step
    # the base model's own answers are what the NLL is measured on: it is the base's mean, and positive
    assert m["probe/nll_base_answers"]["base"]["0"][0][1] > 0.0 and m["probe/words"]["base"]["0"][0][1] > 0.0
    assert list(m["eval/pair_accuracy/length_pairs"]) == ["uft-mix"]  # the driver's held-out pairs; base: none
    assert data["kappa"]["0"] > 0.0 and data["sizes"] == [5, 2, 2]
    run = out / "runs" / "seed0" / "uft-mix"
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if "loss" in r] == [1, 2]
    base = json.loads((out / "probes" / "base.json").read_text())
    assert len(base["answers"]["heldout"]) == 5 and set(base["families"]) == {
        "end_phrase", "start_word", "quotes", "max_words", "one_sentence"}  # fmt: skip
    table = (out / "forgetting-real.md").read_text()
    assert "| uft-mix |" in table and "kappa/instr" in table and "| arm | end_phrase |" in table
    text = results.read_text()
    assert "<!-- evidence:forgetting-real -->" in text and "--probe-rows 5,2,2" in text
    assert (tmp_path / "evidence_forgetting-real.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_l_runs_hint_guided_rl_on_sums_and_writes_its_curves(real_assets, tmp_path):
    out = tmp_path / "ev"
    argv = ["hints-real", "--seeds", "0", "--steps", "2", "--arms", "uft", "--out", str(out),
            "--assets", real_assets["root"], "--set", "rft.prompts_per_step=2", "--set", "train.grad_accum=1",
            "--set", "eval.max_rows=4", "--set", "rft.hint.t_hint=1"]  # fmt: skip
    assert evidence.main(argv) == 0
    rows = read_metrics(str(out / "runs" / "hints-uft-s0" / "metrics.jsonl"))
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(0.0 <= r["reward/mean"] <= 1.0 for r in steps)
    task = [json.loads(line) for line in (out / "task" / "train.jsonl").read_text().splitlines()]
    assert len(task) == evidence.SUM3_TRAIN and task[0]["hint"][-1].startswith("<answer>")
    data = json.loads((out / "hints-real.json").read_text())
    assert data["name"] == "hints-real"
    assert [s for s, _ in data["metrics"]["eval/accuracy"]["uft"]["0"]] == [0, 2]
    assert [s for s, _ in data["metrics"]["reward/mean"]["uft"]["0"]] == [1, 2]
    assert "final held-out accuracy (greedy, no hints)" in (out / "hints-real.md").read_text()
