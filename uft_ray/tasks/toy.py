"""A toy task small enough for the demo's tiny random-init model to learn on a CPU in minutes, and that it cannot
hit by chance: copy the prompt's digit into the Countdown answer format (the toy evidence for Liu et al.: `uft-ray evidence hints`).

    prompt  "echo 7 :"
    answer  "<answer> 7 </answer>"     hint chunks: "<answer>", " 7", " </answer>"

The answer is about 12 of the tiny tokenizer's tokens (`<answer>` alone is 6), so a random policy over its ~1000
tokens never writes it: plain RL sees reward 0 at every step. The skill, copying the digit two tokens back, is one
attention lookup, which LoRA on the 2-layer model learns in a few hundred SFT steps once its output head is
adapted too (a random head's logits are too flat for any confident answer: the recipes add `lm_head` to the LoRA
targets). Prompts pair one of 20 verbs with a digit: held-out rows are pairs no training row has (every digit and
every verb is seen in training, never together). Rows are a generic task's (`prompt`, `hint`, `answer`,
uft_ray.tasks.generic), scored by `verify` named as `uft_ray.tasks.toy:verify`.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

from uft_ray.demo.samples import prompt_id, write_jsonl, write_parquet
from uft_ray.tasks.verifier import CORRECT, FORMATTED, NO_ANSWER, extract_answer

NAME = "copy_digit"
VERIFIER = "uft_ray.tasks.toy:verify"
VERBS = ("copy", "echo", "say", "repeat", "give", "write", "print", "show", "tell", "state",
         "read", "type", "name", "send", "mark", "note", "list", "put", "find", "take")  # fmt: skip


def _row(verb: str, digit: int, index: int, split: str) -> dict[str, Any]:
    hint = ["<answer>", f" {digit}", " </answer>"]
    return {
        "row_id": f"{NAME}-{split}-{index}",
        "prompt": f"{verb} {digit} :",
        "hint": hint,
        "answer": "".join(hint),
        "digits": str(digit),
    }


def generate(n_train: int, n_eval: int, *, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows over disjoint (verb, digit) prompts (200 in all), drawn with `seed`."""
    pool = list(itertools.product(VERBS, range(10)))
    if n_train + n_eval > len(pool):
        raise ValueError(f"{n_train} + {n_eval} rows need more than the {len(pool)} prompts")
    random.Random(f"{NAME}:{seed}").shuffle(pool)
    train = [_row(v, d, i, "train") for i, (v, d) in enumerate(pool[:n_train])]
    held = [_row(v, d, i, "eval") for i, (v, d) in enumerate(pool[n_train : n_train + n_eval])]
    return train, held


def write(rows: list[dict[str, Any]], path: str | Path) -> str:
    """The rows as JSON lines (a generic task's file, read by uft_ray.tasks.files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def verify(row: dict[str, Any], text: str) -> float:
    """1.0 when the last `<answer> ... </answer>` of what follows the prompt holds the row's digit(s) (spacing
    free), 0.1 for another answer, 0.0 for none."""
    answer = extract_answer(text)
    if answer is None:
        return NO_ANSWER
    return CORRECT if answer.split() == str(row["digits"]).split() else FORMATTED


# ---------------------------------------------------------------------------------------------------------
# The forgetting toy (the evidence for Wang et al.): a skill taught by SFT, and alignment data on other prompts
# that prefers a different answer to a look-alike prompt, written in the real datasets' layouts.

SKILL_PROMPT = "copy {digits} :"  # the skill: the digits back, in answer tags
ALIGN_PROMPT = "next {digits} :"  # alignment prompts: the preferred answer moves the last digit on by one


def _digits(d: tuple[int, ...]) -> str:
    return " ".join(str(x) for x in d)


def write_forgetting_data(out: str | Path, *, n_skill: int = 400, n_skill_eval: int = 40, n_align: int = 200,
                          n_align_eval: int = 20, length: int = 3, seed: int = 0) -> dict[str, str]:  # fmt: skip
    """The skill as UltraChat (HuggingFaceH4/ultrachat_200k's parquet: train_sft / test_sft, over disjoint digit
    strings) and the alignment data as HelpSteer2 (two rated responses per prompt, jsonl.gz: train / validation):
    to `next 4 7 1 :` the answer `<answer> 4 7 2 </answer>` is rated 4 on every attribute, the copy
    `<answer> 4 7 1 </answer>` 0. Pairs prefer moving on; scores say the same. Returns the paths by name."""
    out = Path(out)
    pool = list(itertools.product(range(10), repeat=length))
    need = n_skill + n_skill_eval
    if need > len(pool) or n_align + n_align_eval > len(pool):
        raise ValueError(f"more rows than the {len(pool)} strings of {length} digits")
    rng = random.Random(f"forgetting:{seed}")
    rng.shuffle(pool)

    def skill(rows: list[tuple[int, ...]], split: str) -> list[dict[str, Any]]:
        out_rows = []
        for i, d in enumerate(rows):
            prompt = SKILL_PROMPT.format(digits=_digits(d))
            answer = f"<answer> {_digits(d)} </answer>"
            messages = [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]
            out_rows.append({"prompt": prompt, "prompt_id": prompt_id(seed, split, i, prompt), "messages": messages})
        return out_rows

    def align(rows: list[tuple[int, ...]]) -> list[dict[str, Any]]:
        out_rows = []
        for d in rows:
            moved = (*d[:-1], (d[-1] + 1) % 10)
            prompt = ALIGN_PROMPT.format(digits=_digits(d))
            for response, rating in (
                (f"<answer> {_digits(moved)} </answer>", 4),
                (f"<answer> {_digits(d)} </answer>", 0),
            ):
                out_rows.append({"prompt": prompt, "response": response, "helpfulness": rating, "correctness": rating,
                                 "coherence": rating, "complexity": 1, "verbosity": 1})  # fmt: skip
        return out_rows

    align_pool = pool[:]
    rng.shuffle(align_pool)
    paths = {
        "skill_train": str(out / "ultrachat_200k" / "data" / "train_sft-00000-of-00001.parquet"),
        "skill_test": str(out / "ultrachat_200k" / "data" / "test_sft-00000-of-00001.parquet"),
        "align_train": str(out / "helpsteer2" / "train.jsonl.gz"),
        "align_validation": str(out / "helpsteer2" / "validation.jsonl.gz"),
    }
    write_parquet(Path(paths["skill_train"]), iter(skill(pool[:n_skill], "train_sft")))
    write_parquet(Path(paths["skill_test"]), iter(skill(pool[n_skill:need], "test_sft")))
    write_jsonl(Path(paths["align_train"]), iter(align(align_pool[:n_align])))
    write_jsonl(Path(paths["align_validation"]), iter(align(align_pool[n_align : n_align + n_align_eval])))
    return paths
