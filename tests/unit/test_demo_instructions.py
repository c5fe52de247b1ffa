"""The real-model demo's data: the exact checkers on hand-worked answers, the transforms that make every training
answer pass its own checker, the held-out split (unseen questions and values), the files in the real layouts
read back through the project's own readers, and the before/after table made from a recorded result."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uft_ray.data.formats import FORMATS
from uft_ray.demo import before_after, instructions
from uft_ray.demo.instructions import (
    at_most_words,
    ends_with_phrase,
    in_double_quotes,
    one_sentence,
    starts_with_word,
)
from uft_ray.tasks import sum3


@pytest.mark.parametrize(
    ("check", "value", "response", "passes"),
    [
        (ends_with_phrase, "I hope this helps.", "Ice is less dense than water. I hope this helps.", True),
        (ends_with_phrase, "I hope this helps.", "  Ice floats because it is light. I hope this helps.\n", True),
        (ends_with_phrase, "I hope this helps.", "I hope this helps.", False),  # the phrase alone answers nothing
        (ends_with_phrase, "I hope this helps.", "Two words I hope this helps.", False),  # under 3 words before it
        (ends_with_phrase, "I hope this helps.", "Ice floats on water. I hope this helps!", False),
        (ends_with_phrase, "I hope this helps.", '"Ice floats on water. I hope this helps."', False),  # quoted
        (starts_with_word, "Indeed", "Indeed, ice floats.", True),
        (starts_with_word, "Indeed", "indeed ice floats.", True),  # case does not matter
        (starts_with_word, "Indeed", '"Indeed, ice floats."', True),  # leading punctuation is skipped
        (starts_with_word, "Indeed", "Indeedly, ice floats.", False),  # a whole word
        (starts_with_word, "Indeed", "Ice floats. Indeed.", False),
        (starts_with_word, "Indeed", "", False),
        (in_double_quotes, None, '"Ice floats."', True),
        (in_double_quotes, None, '  "Ice floats."  ', True),
        (in_double_quotes, None, '"Ice floats.', False),
        (in_double_quotes, None, "'Ice floats.'", False),
        (in_double_quotes, None, '"', False),
        (at_most_words, 5, "Ice is lighter than water.", True),  # 5 words
        (at_most_words, 4, "Ice is lighter than water.", False),
        (at_most_words, 5, "   ", False),  # no answer at all
        (one_sentence, None, "Ice is lighter than water.", True),
        (one_sentence, None, "Is ice lighter than water?", True),
        (one_sentence, None, "It weighs 0.9 grams per cubic centimetre.", True),  # a decimal point is no end
        (one_sentence, None, '"Ice is lighter than water."', True),
        (one_sentence, None, "Ice floats. It is light.", False),
        (one_sentence, None, "Ice floats", False),  # no end mark
        (one_sentence, None, "Ice floats! Really.", False),
    ],
)
def test_each_checker_on_hand_worked_answers(check, value, response: str, passes: bool) -> None:
    assert check(response, value) is passes


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_compliant_answer_passes_and_every_plain_answer_of_a_strict_family_fails(split: str) -> None:
    rows = instructions.examples(split)
    assert len(rows) == len(instructions.FAMILIES) * (
        len(instructions.QA) - instructions.HELDOUT_QUESTIONS if split == "train" else instructions.HELDOUT_QUESTIONS
    )
    for ex in rows:
        assert ex.check(ex.answer), ex
        assert not ex.check(ex.plain), ex  # the plain answer ignores the instruction (every plain answer has 2+
        # sentences, so it fails one_sentence and max_words too)


def test_held_out_rows_share_no_question_and_no_value_with_training() -> None:
    train, held = instructions.examples("train"), instructions.examples("heldout")
    assert not {ex.question for ex in train} & {ex.question for ex in held}
    for family in ("end_phrase", "start_word", "max_words"):
        seen = {ex.value for ex in train if ex.family == family}
        unseen = {ex.value for ex in held if ex.family == family}
        assert unseen and not seen & unseen, family


def test_every_plain_answers_first_sentence_fits_its_word_limits() -> None:
    for question, plain in instructions.QA:
        first = instructions.first_sentence(plain)
        assert len(first.split()) <= 12, question
        assert len(first.split()) < len(plain.split()), question  # at most N words needs the shortening


def test_the_shards_are_deterministic_and_read_back_in_their_real_layouts(tmp_path: Path) -> None:
    a = instructions.write_shards(tmp_path / "a", seed=0)
    b = instructions.write_shards(tmp_path / "b", seed=0)
    for key in a:
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes(), key
    sft, pref = instructions.split_train(0)
    table = pq.read_table(a["ultrachat_200k_train"])
    assert table.schema.names == ["prompt", "prompt_id", "messages"]  # UltraChat-200k's columns
    first = table.slice(0, 1).to_pylist()[0]
    assert first["messages"] == [{"content": sft[0].prompt, "role": "user"},
                                 {"content": sft[0].answer, "role": "assistant"}]  # fmt: skip
    with gzip.open(a["helpsteer2_train"], "rt") as f:
        hs = [json.loads(line) for line in f]
    assert len(hs) == 2 * len(pref)
    assert set(hs[0]) == {"prompt", "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"}
    # HelpSteer2's score: (0.65 h + 0.8 c + 0.45 coh) / 7.6, hand-worked for the two ratings the demo uses
    follows, ignores = hs[0], hs[1]
    assert follows["prompt"] == ignores["prompt"]
    assert (0.65 * 4 + 0.8 * 4 + 0.45 * 4) / 7.6 == pytest.approx(1.0)
    assert (0.65 * 1 + 0.8 * 2 + 0.45 * 3) / 7.6 == pytest.approx(0.4737, abs=1e-4)
    assert "helpsteer2" in FORMATS and "ultrachat_200k" in FORMATS
    held = instructions.read_heldout(a["heldout"])
    assert held == instructions.examples("heldout", 0)


def _result(before: dict[str, float], after: dict[str, float]) -> dict:
    fams = {f: {"n": 4, "before": before[f], "after": after[f]} for f in before}
    return {
        "families": fams,
        "overall": {"before": sum(before.values()) / len(before), "after": sum(after.values()) / len(after)},
        "nll": {"before": 2.5, "after": 2.75},
        "answers": [],
    }


def test_the_table_says_plainly_when_a_family_does_not_improve() -> None:
    text = before_after.table(_result({"quotes": 0.0, "end_phrase": 0.5, "max_words": 0.25},
                                      {"quotes": 0.75, "end_phrase": 0.25, "max_words": 0.25}))  # fmt: skip
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert lines["quotes"].split()[-3:] == ["0%", "75%", "improved"]
    assert lines["end_phrase"].split()[-4:] == ["50%", "25%", "got", "worse"]
    assert lines["max_words"].split()[-4:] == ["25%", "25%", "no", "change"]
    assert lines["held-out"].endswith("did not improve")  # NLL 2.5 -> 2.75


def test_sum3_rows_and_verifier() -> None:
    train, held = sum3.generate(40, 10, seed=0)
    assert not {r["row_id"] for r in train} & {r["row_id"] for r in held}
    row = sum3.row(4, 7, 2)
    assert row["hint"] == ["4 + 7 = 11\n", "11 + 2 = 13\n", "<answer>13</answer>"]
    assert row["answer"].endswith("<answer>13</answer>") and row["prompt"].endswith("<|im_start|>assistant\n")
    assert sum3.verify(row, row["answer"]) == 1.0
    assert sum3.verify(row, "4 + 7 = 11\n<answer> 13 </answer>") == 1.0
    assert sum3.verify(row, "<answer>14</answer>") == 0.1
    assert sum3.verify(row, "<answer>thirteen</answer>") == 0.0
    assert sum3.verify(row, "<answer>13") == 0.0  # the tag not closed: what the base model does
    assert sum3.verify(row, "<answer>" + "9" * 400 + "</answer>") == 0.0
    assert sum3.verify(row, "<answer>__import__('os')</answer>") == 0.0


def test_the_report_shows_the_recorded_before_after_figures(tmp_path: Path) -> None:
    from uft_ray.report import write_report

    result = _result({"quotes": 0.0, "end_phrase": 0.5}, {"quotes": 0.75, "end_phrase": 0.25})
    result["n"] = 8
    before_after.write(str(tmp_path), result)
    page = Path(write_report(tmp_path)).read_text()
    section = page[page.index("id='before-after'") :]
    for cells in (
        "<td>quotes (n=4)</td><td>0%</td><td>75%</td><td>improved</td>",
        "<td>end_phrase (n=4)</td><td>50%</td><td>25%</td><td>got worse</td>",
        "<td>all families</td><td>25%</td><td>50%</td><td>improved</td>",
        "<td>held-out NLL per token</td><td>2.500</td><td>2.750</td><td>got worse</td>",
    ):
        assert cells in section, cells
