"""MATH answers: `\\boxed{}` extraction with nested braces and Hendrycks-style normalization, worked case by case."""

from __future__ import annotations

import pytest

from uft_ray.tasks import math_answers as m


def test_last_boxed_balances_braces():
    assert m.last_boxed("so \\boxed{\\frac{1}{2}} and then \\boxed{3}") == "3"
    assert m.last_boxed("\\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}}{2}"
    assert m.last_boxed("\\fbox{7}") == "7"
    assert m.last_boxed("no box") is None and m.last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    ("given", "truth"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("30^\\circ", "30"),
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("5 \\text{ cm}", "5"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\$10", "10"),
        (".75", "0.75"),
    ],
)
def test_equivalent_forms_normalize_alike(given, truth):
    assert m.normalize(given) == m.normalize(truth)


def test_rows_keep_levels_3_to_5_and_their_full_hint_is_accepted():
    records = [
        {
            "problem": "What is 1 + 1?",
            "solution": "We add. So $1 + 1 = \\boxed{2}$.",
            "level": "Level 1",
            "type": "Algebra",
        },
        {
            "problem": "Simplify $\\frac{2}{4}$.",
            "solution": "Divide both by 2. The result is $\\boxed{\\frac{1}{2}}$.",
            "level": "Level 3",
            "type": "Prealgebra",
        },
        {"problem": "No answer here.", "solution": "It is 4.", "level": "Level 5", "type": "Algebra"},
    ]
    rows = m.rows(records)
    assert [r["truth"] for r in rows] == ["\\frac{1}{2}"] and rows[0]["level"] == 3
    row = rows[0]
    assert row["hint"] == ["Divide both by 2. ", "The result is $\\boxed{\\frac{1}{2}}$."]  # separators kept
    assert m.verify(row, row["answer"]) == 1.0
    assert m.verify(row, "<answer> \\boxed{0.5} </answer>") == 1.0
    assert m.verify(row, "<answer> 1/2 </answer>") == 1.0
    assert m.verify(row, "<answer> \\boxed{2} </answer>") == 0.1
    assert m.verify(row, "\\boxed{\\frac{1}{2}}") == 0.0  # no answer tag
    assert m.verify(row, "<answer>" + "{" * 1000 + "</answer>") == 0.1  # unbalanced: an answer, a wrong one
    assert m.verify(row, "<answer>" + "{" * 100_000 + "</answer>") == 0.0  # beyond the searched tail: none


def test_split_solution_caps_the_chunks():
    text = " ".join(f"Step {i}." for i in range(30))
    chunks = m.split_solution(text, max_chunks=5)
    assert len(chunks) == 5 and chunks[0] == "Step 0. " and chunks[-1].startswith("Step 4.")
    assert "".join(chunks) == text and len(m.split_solution(text)) == 30  # no cap by default, as the authors'
