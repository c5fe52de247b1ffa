"""Hint-guided RFT's tasks (no Ray): generators give only solvable instances whose full hint is accepted, the
verifiers reject wrong and hostile answers without `eval`, a crash or a hang, and the hint schedule is the
authors' cosine, a pure function of (seed, step, row_id)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections import Counter

import pytest
from fixtures.verifiers import hostile

from uft_ray.tasks import countdown, knights_knaves
from uft_ray.tasks.arith import ArithError, evaluate
from uft_ray.tasks.hints import HintSchedule, with_hint
from uft_ray.tasks.verifier import VerifierProcess, extract_answer

HOSTILE = {
    "huge exponent": "9**9**9**9",
    "deep nesting": "(" * 5000 + "1" + ")" * 5000,
    "import": "__import__('os').system('touch /tmp/uft-hostile')",
    "1 MB": "1+" * 500_000 + "1",
    "division by zero": "5 / (3 - 3)",
    "huge product": "*".join(["99999999"] * 40),
}


# --- arithmetic without eval -------------------------------------------------------------------------------


def test_arith_is_exact_and_lists_the_numbers():
    value, used = evaluate("(76 - 47) * 2 / 4")
    assert value == pytest.approx(14.5) and value.denominator == 2  # a Fraction, not a float
    assert used == [76, 47, 2, 4]
    assert evaluate("6 / 4 * 2")[0] == 3
    assert evaluate("-3 + 5")[0] == 2


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_arith_refuses_hostile_input_quickly(text):
    t0 = time.perf_counter()
    with pytest.raises(ArithError):
        evaluate(text)
    assert time.perf_counter() - t0 < 0.5


# --- Countdown ---------------------------------------------------------------------------------------------


def test_countdown_instances_are_solvable_and_their_full_hint_is_accepted():
    rows = countdown.generate(300, seed=3)
    assert rows == countdown.generate(300, seed=3)  # the same seed, the same rows
    assert rows[:5] != countdown.generate(5, seed=4)
    assert len({r["row_id"] for r in rows}) == 300
    for r in rows:
        assert len(r["nums"]) in (3, 4) and all(1 <= v <= 99 for v in r["nums"]) and 10 <= r["target"] <= 100
        assert len(r["hint"]) == len(r["nums"])  # one step per combination, then the equation (as the authors')
        assert r["prompt"].endswith("<think> ") and str(r["nums"]) in r["prompt"] and str(r["target"]) in r["prompt"]
        assert countdown.verify(r, r["answer"]) == 1.0
        assert r["hint"][-2].endswith(f"= {r['target']}\n")
        assert r["hint"][-1].startswith("Therefore, the final equation is ")
    assert Counter(len(r["nums"]) for r in rows).keys() == {3, 4}


def test_countdown_rejects_wrong_reused_and_missing_numbers():
    row = {"nums": [76, 47, 2], "target": 58}
    assert countdown.verify(row, "<answer> (76 - 47) * 2 </answer>") == 1.0
    assert countdown.verify(row, "thinking...</think>\n<answer>(76-47)*2</answer>") == 1.0
    assert countdown.verify(row, "<answer> 76 - 47 * 2 </answer>") == 0.1  # the numbers, the wrong value
    assert countdown.verify(row, "<answer> (76 - 47) * 2 + 2 - 2 </answer>") == 0.1  # 2 used three times
    assert countdown.verify(row, "<answer> 29 * 2 </answer>") == 0.1  # 76 and 47 not used
    assert countdown.verify(row, "<answer> 1 </answer> then <answer> (76 - 47) * 2 </answer>") == 1.0  # the last
    assert countdown.verify(row, "<answer> (76 - 47) * 2 </answer> <answer> 1 </answer>") == 0.1
    assert countdown.verify(row, "(76 - 47) * 2") == 0.0  # no answer tag
    assert countdown.verify(row, "<answer> (76 - 47) * 2") == 0.0


@pytest.fixture(scope="module")
def countdown_process():
    v = VerifierProcess(countdown.verify, timeout_s=5)
    yield v
    v.close()


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_countdown_scores_hostile_answers_0(text, countdown_process):
    row = {"nums": [9, 9, 9, 9], "target": 10}
    assert countdown.verify(row, f"<answer> {text} </answer>") == 0.0
    assert countdown_process.score([row], [f"<answer>{text}</answer>" * 2]) == [0.0]
    assert countdown_process.timeouts == 0  # rejected by the verifier itself, not by the time limit


# --- Knights and Knaves ------------------------------------------------------------------------------------


def test_knights_knaves_puzzles_have_one_solution_and_their_full_hint_is_accepted():
    rows = knights_knaves.generate(60, seed=1)
    assert rows == knights_knaves.generate(60, seed=1)
    sizes = Counter(len(r["names"]) for r in rows)
    assert set(sizes) <= set(range(3, 8)) and len(sizes) >= 4
    for r in rows:
        statements = [tuple(s) for s in r["statements"]]
        solutions = knights_knaves._solutions(statements, len(r["names"]))
        assert [[knights_knaves._role(x) for x in s] for s in solutions] == [r["roles"]]  # exactly one, the one
        n = len(r["names"])  # three sentences a person, then one "(i) X is a ..." line a person
        assert len(r["hint"]) == 4 * n and all(c.startswith("Assume ") for c in r["hint"][: 3 * n : 3])
        assert knights_knaves.verify(r, r["answer"]) == 1.0


def test_knights_knaves_rejects_a_wrong_role_and_scores_no_answer_0():
    row = knights_knaves.generate(1, seed=2)[0]
    names, roles = row["names"], row["roles"]
    flip = {"knight": "knave", "knave": "knight"}
    wrong = "\n".join(
        f"{n} is a {flip[r] if i == 0 else r}" for i, (n, r) in enumerate(zip(names, roles, strict=True))
    )
    assert knights_knaves.verify(row, f"<answer> {wrong} </answer>") == 0.1
    partial = "\n".join(f"{n} is a {r}" for n, r in zip(names[1:], roles[1:], strict=True))
    assert knights_knaves.verify(row, f"<answer> {partial} </answer>") == 0.1  # someone left out
    assert knights_knaves.verify(row, "<answer> everyone is a knight </answer>") == 0.0
    assert knights_knaves.verify(row, "<answer>" + "x" * 1_000_000 + "</answer>") == 0.0
    assert knights_knaves.verify(row, row["answer"].replace("<answer>", "")) == 0.0


# --- verifiers under a time limit ----------------------------------------------------------------------------


def test_a_verifier_that_hangs_raises_or_misbehaves_scores_0_within_its_limit():
    v = VerifierProcess(hostile, timeout_s=1.0)
    try:
        texts = ["a", "raise", "b", "out of range", "nan", "c", "loop", "d", "e"]
        t0 = time.perf_counter()
        rewards = v.score([{}] * len(texts), texts)
        elapsed = time.perf_counter() - t0
        # one child scores everything up to the hang (its count goes on past a raise and a bad reward); the
        # hang is killed at the limit and a fresh child, counting from 0 again, takes the rest
        assert rewards == [0.01, 0.0, 0.02, 0.0, 0.0, 0.03, 0.0, 0.01, 0.02]
        assert v.timeouts == 1
        assert elapsed < 1.0 + 15  # killed at the limit, not waited for (15 s: a fresh interpreter's start)
        t0 = time.perf_counter()
        assert v.score([{}, {}], ["loop", "loop"]) == [0.0, 0.0] and v.timeouts == 3
        assert time.perf_counter() - t0 < 2 * 1.0 + 30
        assert v.score([{}], ["f"]) == [0.01]  # restarted after the last kill
    finally:
        v.close()
    v = VerifierProcess(countdown.verify)
    try:
        row = {"nums": [76, 47, 2], "target": 58}
        assert v.score([row, row], ["<answer> (76 - 47) * 2 </answer>", "<answer> 9**9**9**9 </answer>"]) == [1.0, 0.0]
    finally:
        v.close()


def test_extract_answer_takes_the_last_complete_tag():
    assert extract_answer("<answer> a </answer> <answer> b </answer>") == "b"
    assert extract_answer("<answer> a </answer> <answer> b") == "a"
    assert extract_answer("no tags") is None and extract_answer(None) is None  # type: ignore[arg-type]


# --- the hint schedule ----------------------------------------------------------------------------------------


def test_cosine_schedule_starts_near_095_and_ends_at_005():
    s = HintSchedule()
    assert s.p(1) == pytest.approx(0.95, abs=1e-3)
    assert s.p(300) == pytest.approx(0.05, abs=1e-12)
    assert s.p(150) == pytest.approx(0.5, abs=1e-12)
    assert s.buckets(12) == [0, 2, 5, 7, 10, 12]  # K = 5: s_k = round(k L / K)
    assert s.buckets(3) == [0, 1, 2, 3]  # K = min(5, L)
    assert s.revealed(301, "r", 12) == 0  # no hint after T_hint
    assert s.revealed(1, "r", 12, evaluation=True) == 0
    assert HintSchedule(mode="rft").revealed(1, "r", 12) == 0


@pytest.mark.parametrize("step", [1, 100, 200, 290])
def test_mean_revealed_share_matches_the_binomial_expectation(step):
    s, n_chunks, rows = HintSchedule(seed=7), 12, 20_000
    shares = [s.revealed(step, f"row-{i}", n_chunks) / n_chunks for i in range(rows)]
    b, p, K = s.buckets(n_chunks), s.p(step), 5
    pmf = [math.comb(K, k) * p**k * (1 - p) ** (K - k) for k in range(K + 1)]
    mean = sum(w * b[k] / n_chunks for k, w in enumerate(pmf))
    var = sum(w * (b[k] / n_chunks - mean) ** 2 for k, w in enumerate(pmf))
    assert abs(sum(shares) / rows - mean) < 4 * math.sqrt(var / rows) + 1e-9


def test_the_same_seed_step_and_row_give_the_same_hint_in_any_process():
    code = (
        "from uft_ray.tasks.hints import HintSchedule; s = HintSchedule(seed=11); "
        "print([s.revealed(t, f'r{i}', 9) for t in (1, 50, 250) for i in range(20)])"
    )
    here = [HintSchedule(seed=11).revealed(t, f"r{i}", 9) for t in (1, 50, 250) for i in range(20)]
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert there.strip() == str(here)
    assert here != [HintSchedule(seed=12).revealed(t, f"r{i}", 9) for t in (1, 50, 250) for i in range(20)]


def test_staged_and_r3_modes():
    staged = HintSchedule(mode="staged", t_hint=300)  # K = 5: k falls by one every 300 / 6 = 50 steps
    assert [staged.revealed(t, "r", 10) for t in (1, 49, 50, 120, 260, 299)] == [10, 10, 8, 6, 0, 0]
    r3 = HintSchedule(mode="r3", seed=1)
    counts = Counter(r3.revealed(10, f"r{i}", 5) for i in range(6000))
    assert set(counts) == {0, 1, 2, 3, 4, 5} and min(counts.values()) > 850  # uniform over K + 1 buckets
    with pytest.raises(ValueError, match="hint mode"):
        HintSchedule(mode="bogus")


def test_with_hint_reveals_a_prefix_of_the_chunks():
    assert with_hint("P<think> ", ["a = 1\n", "b = 2"], 0) == "P<think> "
    assert with_hint("P<think> ", ["a = 1\n", "b = 2"], 1) == "P<think> a = 1\n"  # chunks carry their separators
    row = countdown.generate(1, seed=0)[0]
    # The whole hint revealed, then the closing: exactly the reference solution after the prompt.
    expression = row["answer"].split("<answer>")[1].split("</answer>")[0].strip()
    full = with_hint(row["prompt"], row["hint"], len(row["hint"]))
    assert full + countdown.closing(expression) == row["prompt"] + row["answer"]
