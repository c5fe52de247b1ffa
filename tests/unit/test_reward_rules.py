"""`rft.reward_rules`: the authors' rules (`paper`, the default) and this project's own (`strict`), worked case by
case for each built-in task, with the edge cases where they differ and hostile answers scored fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from uft_ray.config import ConfigError, load_config
from uft_ray.tasks import countdown, knights_knaves, math_answers, rules
from uft_ray.tasks.generic import load_verifier
from uft_ray.tasks.names import REWARD_RULES
from uft_ray.tasks.verifier import VerifierProcess

ROOT = Path(__file__).resolve().parents[2]

CD = {"nums": [76, 47, 2], "target": 58, "prompt": countdown.PROMPT.format(nums=[76, 47, 2], target=58)}
CD_BARE = {"nums": [76, 47, 2], "target": 58}  # no prompt: nothing to cut at but the text's own "Assistant:"
CD_POW = {"nums": [2, 3, 5], "target": 13, "prompt": countdown.PROMPT.format(nums=[2, 3, 5], target=13)}
CD_9 = {"nums": [9, 9, 9, 9], "target": 10, "prompt": countdown.PROMPT.format(nums=[9, 9, 9, 9], target=10)}
OK = "</think>\n<answer> (76 - 47) * 2 </answer>"


def parens(k: int) -> str:
    return "(" * k + "(9*9+9)/9" + ")" * k  # = 10 from four 9s


# (case, row, text, paper, strict)
COUNTDOWN = [
    ("correct", CD, "76 - 47 = 29\n29 * 2 = 58" + OK, 1.0, 1.0),
    ("no spaces", CD, "</think>\n<answer>(76-47)*2</answer>", 1.0, 1.0),
    ("trailing newline", CD, OK + "\n", 0.0, 1.0),
    ("text after the answer, next line", CD, OK + "\nSo 58 it is.", 0.0, 1.0),
    ("text after the answer, same line", CD, OK + " So 58 it is.", 1.0, 1.0),
    ("the last of two on the last line", CD, "<answer> 1 </answer> <answer> (76-47)*2 </answer>", 1.0, 1.0),
    ("right on an earlier line, wrong on the last", CD, OK + "\n<answer> 1 </answer>", 0.1, 0.1),
    ("an open tag inside: non-greedy from the first", CD, "<answer> 1 <answer> (76-47)*2 </answer>", 0.1, 1.0),
    ("words", CD, "\n<answer> fifty-eight </answer>", 0.1, 0.0),
    ("words around the right numbers", CD, "<answer> (76 minus 47) * 2 </answer>", 0.1, 0.0),
    ("an equation with its result", CD, "<answer> (76 - 47) * 2 = 58 </answer>", 0.1, 0.0),
    ("empty answer", CD, "<answer></answer>", 0.1, 0.0),
    ("right numbers, wrong value", CD, "<answer> 76 - 47 * 2 </answer>", 0.1, 0.1),
    ("a number used twice", CD, "<answer> (76 - 47) * 2 + 2 - 2 </answer>", 0.1, 0.1),
    ("numbers missing", CD, "<answer> 29 * 2 </answer>", 0.1, 0.1),
    ("2.0 is the digit runs 2 and 0", CD, "<answer> (76 - 47) * 2.0 </answer>", 0.1, 1.0),
    ("no tag", CD, "(76 - 47) * 2", 0.0, 0.0),
    ("unclosed tag", CD, "<answer> (76 - 47) * 2", 0.0, 0.0),
    ("Python's ** counts for the authors", CD_POW, "<answer> 2**3 + 5 </answer>", 1.0, 0.0),
    ("Python's // too", CD_9, "<answer> (9*9+9)//9 </answer>", 1.0, 0.0),
    # The prompt ends in "Assistant: ...": all the text is after the cut, its own "Assistant:" included.
    ("an 'Assistant:' in the text, prompt cut", CD, "<answer> (76-47)*2 </answer> Assistant: done", 1.0, 1.0),
    ("an 'Assistant:' in the text, no prompt", CD_BARE, "<answer> (76-47)*2 </answer> Assistant: done", 0.0, 1.0),
    ("the text cut at its 'Assistant:'", CD_BARE, "User: again\nAssistant: <answer> (76-47)*2 </answer>", 1.0, 1.0),
    ("no marker anywhere: the whole text", CD_BARE, "<answer> (76 - 47) * 2 </answer>", 1.0, 1.0),
    # Hostile arithmetic with the right numbers: `eval` would hang or raise; the format score, at once.
    ("a tower of powers", CD_9, "<answer> 9**9**9**9 </answer>", 0.1, 0.0),
    ("division by zero", CD_9, "<answer> 9 / (9 - 9) + 9 </answer>", 0.1, 0.0),
    ("150 redundant parentheses: eval reads them", CD_9, f"<answer>{parens(150)}</answer>", 1.0, 1.0),
    ("600 spaces: eval reads them", CD_9, "<answer> (9*9+9)" + " " * 600 + "/9 </answer>", 1.0, 0.0),
    ("250: past Python's parser limit", CD_9, f"<answer>{parens(250)}</answer>", 0.1, 0.0),
    ("5000 nested parentheses", CD_9, "<answer>" + "(" * 5000 + "9+9+9+9" + ")" * 5000 + "</answer>", 0.1, 0.0),
    ("3000 signs", CD_9, "<answer>" + "-" * 3000 + "9+9+9+9 </answer>", 0.1, 0.0),
    ("a 400-digit float (inf to Python)", CD_9, "<answer> 9+9+9*" + "9" * 400 + ".0 </answer>", 0.1, 0.0),
]

ZOA = {"names": ["Zoey", "Oliver", "Ava"], "roles": ["knight", "knave", "knight"]}
KK = {**ZOA, "prompt": knights_knaves.PROMPT.format(n=3, names="Zoey, Oliver, Ava", statements="")}
RIGHT = "(1) Zoey is a knight\n(2) Oliver is a knave\n(3) Ava is a knight"

KNIGHTS_KNAVES = [
    ("correct", KK, f"</think>\n<answer> {RIGHT} </answer>", 1.0, 1.0),
    ("text after the answer, next lines", KK, f"<answer> {RIGHT} </answer>\nDone.\n", 1.0, 1.0),
    ("any case", KK, "<answer> zoey IS A Knight, OLIVER is a KNAVE, ava is  a\nknight </answer>", 1.0, 0.0),
    ("a wrong role", KK, f"<answer> {RIGHT.replace('knave', 'knight')} </answer>", 0.1, 0.1),
    ("someone left out", KK, "<answer> Zoey is a knight\nOliver is a knave </answer>", 0.1, 0.1),
    ("a fourth role word", KK, f"<answer> {RIGHT}\n(the knights tell the truth) </answer>", 0.1, 1.0),
    ("no 'X is a' phrases", KK, "<answer> Zoey: knight, Oliver: knave, Ava: knight </answer>", 0.1, 0.0),
    ("a count that is not the people", KK, "<answer> everyone is a knight </answer>", 0.1, 0.0),
    ("the last answer counts", KK, f"<answer> {RIGHT} </answer>\n<answer> Zoey is a knave </answer>", 0.1, 0.1),
    ("empty answer", KK, "<answer>   </answer>", 0.0, 0.0),
    ("no tag", KK, RIGHT, 0.0, 0.0),
    ("1 MB answer", KK, "<answer>" + "x" * 1_000_000 + "</answer>", 0.1, 0.0),
    ("200k open tags", KK, "<answer>" * 200_000, 0.0, 0.0),
]

HALF = {"truth": "\\frac{1}{2}", "prompt": math_answers.PROMPT.format(problem="Halve 1.")}
FIFTY = {"truth": "50", "prompt": math_answers.PROMPT.format(problem="What percent?")}
FIVE = {"truth": "5", "prompt": math_answers.PROMPT.format(problem="Solve.")}
A_B = {"truth": "a/b", "prompt": math_answers.PROMPT.format(problem="Write it.")}

MATH = [
    ("correct", HALF, "So it is half.\n</think>\n<answer> \\frac{1}{2} </answer>", 1.0, 1.0),
    ("\\boxed{} is not unwrapped", HALF, "<answer> \\boxed{\\frac{1}{2}} </answer>", 0.1, 1.0),
    ("1/2", HALF, "<answer> 1/2 </answer>", 1.0, 1.0),
    ("\\dfrac12", HALF, "<answer> \\dfrac12 </answer>", 1.0, 1.0),
    ("0.5", HALF, "<answer> 0.5 </answer>", 1.0, 1.0),
    ("trailing newline", HALF, "<answer> \\frac{1}{2} </answer>\n", 0.0, 1.0),
    ("text after the answer, next line", HALF, "<answer> \\frac{1}{2} </answer>\nDone.", 0.0, 1.0),
    ("empty answer", HALF, "<answer> </answer>", 0.1, 0.0),
    ("words", HALF, "<answer> one half </answer>", 0.1, 0.1),
    ("no tag", HALF, "\\boxed{\\frac{1}{2}}", 0.0, 0.0),
    ("\\% is removed", FIFTY, "<answer> 50\\% </answer>", 1.0, 1.0),
    ("a bare % is not", FIFTY, "<answer> 50% </answer>", 0.1, 1.0),
    ("k = 5", FIVE, "<answer> k = 5 </answer>", 1.0, 1.0),
    ("ab = 5: a left side of 3 characters stays", FIVE, "<answer> ab = 5 </answer>", 0.1, 1.0),
    ("units twice: raw strings compared", FIVE, "<answer> 5\\text{ cm}\\text{ m} </answer>", 0.1, 1.0),
    ("a/b: raw strings compared", A_B, "<answer> a/b </answer>", 1.0, 1.0),
    ("a / b: raw strings differ", A_B, "<answer> a / b </answer>", 0.1, 1.0),
    ("100k open braces", HALF, "<answer>" + "{" * 100_000 + "</answer>", 0.1, 0.0),
    ("5000 \\frac", HALF, "<answer>" + "\\frac" * 5000 + "</answer>", 0.1, 0.1),
]

TABLES = [
    (countdown.NAME, COUNTDOWN),
    (knights_knaves.NAME, KNIGHTS_KNAVES),
    (math_answers.NAME, MATH),
]
CASES = [
    pytest.param(task, rule, row, text, (paper, strict)[i], id=f"{task}-{rule}-{case}")
    for task, table in TABLES
    for case, row, text, paper, strict in table
    for i, rule in enumerate(("paper", "strict"))
]


@pytest.mark.parametrize(("task", "rule", "row", "text", "expected"), CASES)
def test_reward_tables(task: str, rule: str, row: dict, text: str, expected: float) -> None:
    fn = rules.verifier_for(task, rule)
    assert fn(row, text) == expected
    # Hostile answers included: refused, not computed. The best of three, so a busy machine's pause is not counted.
    assert min(_seconds(fn, row, text) for _ in range(3)) < 0.05


def _seconds(fn, row: dict, text: str) -> float:
    t0 = time.perf_counter()
    fn(row, text)
    return time.perf_counter() - t0


def test_every_generated_answer_scores_1_under_both_rules() -> None:
    rows = {
        countdown.NAME: countdown.generate(100, seed=5),
        knights_knaves.NAME: knights_knaves.generate(30, seed=5),
        math_answers.NAME: math_answers.rows(
            [{"problem": "Halve 1.", "solution": "Divide. It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3"}]
        ),
    }
    for task, task_rows in rows.items():
        for rule in REWARD_RULES:
            assert all(rules.verifier_for(task, rule)(r, r["answer"]) == 1.0 for r in task_rows), (task, rule)


def test_math_prompt_and_answer_carry_the_bare_answer_as_the_authors_data() -> None:
    assert "for example <answer> 12 </answer>." in math_answers.PROMPT
    row = math_answers.rows([{"problem": "p", "solution": "So $\\boxed{8000}$.", "level": "Level 5"}])[0]
    assert row["answer"].endswith("</think>\n<answer> 8000 </answer>")


def test_the_authors_strip_string_step_by_step() -> None:
    strip = rules.hendrycks_strip
    assert strip("\\left( 3, \\dfrac12 \\right)") == "(3,\\frac{1}{2})"
    assert strip("30^\\circ") == "30" and strip("\\$10") == "10" and strip(".75") == "0.75"
    assert strip("\\sqrt3 + \\sqrt{2}") == "\\sqrt{3}+\\sqrt{2}"
    assert strip("\\frac1{72}") == "\\frac{1}{72}" and strip("3 \\frac1") == "3\\frac1"  # gives up, as theirs
    assert strip("") == "" and strip("-3/4") == "\\frac{-3}{4}"
    for raises in ("\\sqrt", "2\\frac", "x/2", "1\\text{ a}\\text{ b}"):
        with pytest.raises(rules._Unparsed):
            strip(raises)


def test_extraction_matches_the_authors_regex() -> None:
    assert rules.last_tagged("<answer> a </answer> <answer> b </answer>") == "b"
    assert rules.last_tagged("<answer> a <answer> b </answer>") == "a <answer> b"
    assert rules.last_tagged("<answer> a </answer> <answer> b") == "a"
    assert rules.last_tagged("<answer></answer>") == "" and rules.last_tagged("none") is None
    assert rules.response_part({"prompt": "User: x\nAssistant: go\n<think>"}, "t") == " go\n<think>t"
    assert rules.response_part({}, "a<|im_start|>assistant\nb") == "\nb"
    assert rules.last_line_answer({}, "<answer> 1 </answer>\r") == "1"  # lines split on \n only, as theirs


def test_load_verifier_picks_by_rules_and_the_config_defaults_to_paper() -> None:
    assert tuple(rules.VERIFIERS) == REWARD_RULES
    assert load_verifier("countdown", "paper") is rules.score_countdown
    assert load_verifier("math", "strict") is math_answers.verify
    with pytest.raises(ValueError, match="reward rules 'lenient'"):
        load_verifier("countdown", "lenient")
    base = [f"model.path={ROOT}"]
    cfg = load_config(ROOT / "jobs/configs/demo_hint_rft_tiny.yaml", base, check_paths=False)
    assert cfg.rft.reward_rules == "paper"
    with pytest.raises(ConfigError) as e:
        load_config(
            ROOT / "jobs/configs/demo_hint_rft_tiny.yaml", [*base, "rft.reward_rules=lenient"], check_paths=False
        )
    assert "rft.reward_rules: 'lenient' is not allowed; use one of: paper, strict" in e.value.messages


def test_a_paper_verifier_runs_in_the_verifier_process() -> None:
    v = VerifierProcess(rules.score_countdown, timeout_s=5)
    try:
        texts = [OK, OK + "\n", "<answer> 9**9**9**9 </answer>"]
        assert v.score([CD, CD, CD_9], texts) == [1.0, 0.0, 0.1] and v.timeouts == 0
    finally:
        v.close()
