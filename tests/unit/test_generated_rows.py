"""Generated rows like the authors' (tests/fixtures/uft_authors holds a few of theirs): the prompt template, hint
chunks that carry their separators and end as theirs end, the mix of sizes, and the training set of `rft.n_train`
prompts drawn once and repeated over epochs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray.config import load_config
from uft_ray.rft.prompts import draw_train, make_rft_plan, read_prompts, write_prompts
from uft_ray.run_dir import RunDir
from uft_ray.tasks import countdown, knights_knaves, math_answers, verify
from uft_ray.tasks.hints import with_hint

AUTHORS = Path(__file__).resolve().parents[1] / "fixtures" / "uft_authors"


def _raw(name: str) -> list[dict]:
    return pq.read_table(AUTHORS / name).to_pylist()


# --- Countdown ----------------------------------------------------------------------------------------------


def test_countdown_prompt_is_the_authors_template() -> None:
    for rec in _raw("countdown_train.parquet"):
        gt = rec["reward_model"]["ground_truth"]
        assert countdown.PROMPT.format(nums=gt["numbers"], target=gt["target"]) == rec["prompt"][0]["content"]


def test_a_generated_countdown_row_hand_checked() -> None:
    row = countdown.generate(1, seed=0)[0]
    assert (row["nums"], row["target"]) == ([87, 44, 86], 45)
    # 44 + 87 = 131, 131 - 86 = 45: two steps for three numbers, then the equation chunk (K = 3)
    assert row["hint"] == ["44 + 87 = 131\n", "131 - 86 = 45\n", "Therefore, the final equation is (44 + 87) - 86"]
    assert row["answer"] == (
        "44 + 87 = 131\n131 - 86 = 45\nTherefore, the final equation is (44 + 87) - 86"
        " </think>\n<answer> (44 + 87) - 86 </answer>"
    )
    assert row["prompt"].endswith("Let me solve this step by step.\n<think> ")
    full = with_hint(row["prompt"], row["hint"], 3) + countdown.closing("(44 + 87) - 86")
    assert full == row["prompt"] + row["answer"]


def test_countdown_hints_end_with_the_equation_and_the_mix_is_even() -> None:
    rows = countdown.generate(1000, seed=7)
    for r in rows:
        expression = r["answer"].split("<answer> ")[1].split(" </answer>")[0]
        assert r["hint"][-1] == f"Therefore, the final equation is {expression}"
        assert len(r["hint"]) == len(r["nums"]) and all(c.endswith("\n") for c in r["hint"][:-1])
        assert r["answer"] == "".join(r["hint"]) + f" </think>\n<answer> {expression} </answer>"
    sizes = Counter(len(r["nums"]) for r in rows)  # the count drawn first: about half and half, as the authors'
    assert set(sizes) == {3, 4} and 450 <= sizes[4] <= 550
    assert all(verify(r, r["answer"]) == 1.0 for r in rows)


# --- Knights and Knaves -------------------------------------------------------------------------------------


def _kk_tail(names: list[str], roles: list[str]) -> list[str]:
    lines = [f"({i + 1}) {n} is a {r}" for i, (n, r) in enumerate(zip(names, roles, strict=True))]
    return [f"Therefore, {lines[0]}\n"] + [f"{line}\n" for line in lines[1:-1]] + [lines[-1]]


def test_kk_hints_end_with_the_answer_lines_as_the_authors() -> None:
    for rec in _raw("kk_logic_train.parquet"):  # theirs, to check the tail rule against
        gt = rec["reward_model"]["ground_truth"]
        roles = ["knight" if s else "knave" for s in gt["solution"]]
        assert rec["hint"][-len(gt["names"]) :] == _kk_tail(gt["names"], roles)
    rows = knights_knaves.generate(200, seed=3)
    for r in rows:
        assert r["hint"][-len(r["names"]) :] == _kk_tail(r["names"], r["roles"])
        assert all(c.endswith((". ", ".\n")) for c in r["hint"][: -len(r["names"])])  # a sentence a chunk
        lines = knights_knaves.answer_text(r["names"], [x == "knight" for x in r["roles"]])
        assert r["answer"] == "".join(r["hint"]) + f" </think>\n<answer> {lines} </answer>"
        assert r["prompt"].endswith("(3)... </answer>.\nAssistant: Let me solve this step by step.\n<think> ")
    sizes = Counter(len(r["names"]) for r in rows)
    assert set(sizes) == {3, 4, 5, 6, 7} and min(sizes.values()) >= 25
    assert all(verify(r, r["answer"]) == 1.0 for r in rows)


def test_a_generated_kk_row_hand_checked() -> None:
    row = knights_knaves.generate(1, seed=5)[0]
    assert row["names"] == ["Nora", "Aria", "Mia"] and row["roles"] == ["knave", "knight", "knave"]
    assert "You meet 3 inhabitants: Nora, Aria, and Mia. " in row["prompt"]
    assert row["hint"][:3] == [
        "Assume Nora is a knight. ",  # then Aria, a knight, would say a falsehood: "Nora is a knave"
        'Then Aria, who tells the truth, could not say "Nora is a knave" with the others as they are: '
        "a contradiction. ",
        "So Nora is a knave.\n",
    ]
    assert row["hint"][-3:] == ["Therefore, (1) Nora is a knave\n", "(2) Aria is a knight\n", "(3) Mia is a knave"]


# --- MATH ---------------------------------------------------------------------------------------------------


def test_math_chunks_are_cut_as_the_authors_and_join_back_exactly() -> None:
    for rec in _raw("math_test.parquet"):
        solution = "".join(rec["hint"])
        assert math_answers.split_solution(solution) == rec["hint"]  # their chunks, reproduced
        problem = rec["reward_model"]["ground_truth"]["question"]
        assert math_answers.PROMPT.format(problem=problem) == rec["prompt"][0]["content"]
        made = math_answers.rows([{"problem": "p", "solution": solution, "level": rec["level"]}])[0]
        assert "".join(made["hint"]) == solution and made["truth"] == rec["reward_model"]["ground_truth"]["target"]
        assert made["answer"] == rec["answer"]
    chunks = math_answers.split_solution("A.\tB. C\n\nD.$$E. F")
    assert chunks == ["A.\t", "B. ", "C\n", "\n", "D.$$E. ", "F"]


# --- the training set: n_train prompts, drawn once ----------------------------------------------------------


def test_draw_train_keeps_n_in_file_order_the_same_for_the_same_seed() -> None:
    table = pa.table({"row_id": [f"r{i}" for i in range(20)], "prompt_ids": [[1]] * 20})
    drawn = draw_train(table, 8, seed=0).column("row_id").to_pylist()
    assert len(set(drawn)) == 8 and drawn == sorted(drawn, key=lambda r: int(r[1:]))
    assert draw_train(table, 8, seed=0).column("row_id").to_pylist() == drawn
    assert draw_train(table, 8, seed=1).column("row_id").to_pylist() != drawn
    assert draw_train(table, None, seed=0).num_rows == 20 and draw_train(table, 50, seed=0).num_rows == 20


class CharTokenizer:
    def __call__(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) % 5000 for c in t] for t in texts]}


def test_the_plan_repeats_the_same_n_train_prompts_every_epoch(tmp_path: Path) -> None:
    path = tmp_path / "cd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in countdown.generate(20, seed=2)))
    cfg = load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        ["model.path=/tmp", f"rft.path={path}", "rft.n_train=8", "train.max_steps=8", "rft.max_prompt_len=1000"],
        check_paths=False,
    )
    run = RunDir(tmp_path / "run")
    counts = write_prompts(cfg, run, CharTokenizer())
    assert counts["train"] == 8 and counts["train_usable"] == 20
    table = read_prompts(run, "train")
    plan = make_rft_plan(table, cfg).table.to_pylist()  # 4 prompts a step: 2 steps an epoch, 4 epochs
    by_epoch: dict[int, list[str]] = {}
    for p in plan:
        by_epoch.setdefault(p["epoch"], []).append(p["row_id"])
    assert sorted(by_epoch) == [0, 1, 2, 3]
    assert all(sorted(ids) == sorted(table.column("row_id").to_pylist()) for ids in by_epoch.values())


@pytest.mark.parametrize("task", ["countdown", "knights_knaves"])
def test_generated_training_rows_are_n_train(task: str, tmp_path: Path) -> None:
    cfg = load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        ["model.path=/tmp", f"rft.task={task}", "rft.n_train=12", "rft.max_prompt_len=4000"],
        check_paths=False,
    )
    counts = write_prompts(cfg, RunDir(tmp_path / "run"), CharTokenizer())
    assert counts["train"] == counts["train_usable"] == 12 and counts["eval"] == 8
