"""The demo's held-out evaluation: the base model and the trained adapter on prompts no training row contains.

`evaluate(model_path, adapter_dir, examples)` loads the base once, puts the adapter on it, and for each of the
two ("before" with the adapter disabled, "after" with it on) generates a greedy answer to every held-out prompt
(the model's chat template, generation prompt added), scores it with its family's exact checker, and computes
the held-out NLL: the mean per-token negative log-likelihood of the compliant answers (teacher-forced). The
result is a plain dict, written as `{run_dir}/before_after.json`; the table printed and the report's section
are made from that file, so what the demo prints is what the run directory records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from uft_ray import storage
from uft_ray.demo.instructions import FAMILIES, Example, read_heldout
from uft_ray.model_store import local_model
from uft_ray.report import write_report
from uft_ray.run_dir import RunDir

MAX_NEW_TOKENS = 64  # the longest compliant held-out answer is about 45 tokens
BATCH = 64  # one batch for the demo's 60 prompts: 1.9x faster than batches of 20 on 2 cores
SHOWN = 3  # answers shown side by side


def evaluate(model_path: str, adapter_dir: str, examples: Sequence[Example], *, threads: int | None = None) -> dict:
    """Pass rates per family, held-out NLL and every answer, before (base) and after (base + adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    path = os.path.expanduser(local_model(model_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [_chat_prompt(tokenizer, ex.prompt) for ex in examples]
    out: dict[str, Any] = {"model": model_path, "adapter": adapter_dir, "n": len(examples), "families": {}}
    answers: dict[str, list[str]] = {}
    nll: dict[str, float] = {}
    for phase in ("before", "after"):
        if phase == "after":  # merged: generation then costs what the base's does
            model = PeftModel.from_pretrained(model, os.path.expanduser(local_model(adapter_dir))).merge_and_unload()
        answers[phase] = greedy_answers(model, tokenizer, prompts)
        nll[phase] = answer_nll(model, tokenizer, prompts, [ex.answer for ex in examples])
    for family in FAMILIES:
        idx = [i for i, ex in enumerate(examples) if ex.family == family]
        if idx:
            out["families"][family] = {
                "n": len(idx),
                **{p: sum(examples[i].check(answers[p][i]) for i in idx) / len(idx) for p in answers},
            }
    out["overall"] = {p: sum(ex.check(a) for ex, a in zip(examples, answers[p], strict=True)) / len(examples)
                      for p in answers}  # fmt: skip
    out["nll"] = nll
    out["answers"] = [
        {"family": ex.family, "prompt": ex.prompt, "before": answers["before"][i], "after": answers["after"][i],
         "passed_before": ex.check(answers["before"][i]), "passed_after": ex.check(answers["after"][i])}
        for i, ex in enumerate(examples)
    ]  # fmt: skip
    out["seconds"] = round(time.time() - started, 1)
    return out


def _chat_prompt(tokenizer: Any, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str]) -> list[str]:
    import torch

    texts: list[str] = []
    for i in range(0, len(prompts), BATCH):
        batch = tokenizer(prompts[i : i + BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        texts += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def answer_nll(model: Any, tokenizer: Any, prompts: list[str], answers: list[str]) -> float:
    """Mean per-token NLL of `answers` after `prompts` (each answer closed by the template's end-of-turn token)."""
    import torch

    total, count = 0.0, 0
    end = tokenizer.eos_token or ""
    for prompt, answer in zip(prompts, answers, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum").item()
        count += len(a)
    return total / count


def path_in(run_dir: str) -> str:
    return RunDir(run_dir).before_after


def write(run_dir: str, result: dict) -> str:
    storage.write_json(path_in(run_dir), result, indent=1)
    return path_in(run_dir)


def read(run_dir: str) -> dict | None:
    found = storage.read_json(path_in(run_dir))
    return found if isinstance(found, dict) else None


def table(result: dict) -> str:
    """The before/after table as text, from the recorded result (what the demo prints)."""
    lines = [f"{'held-out check':<22}{'before':>8}{'after':>8}"]
    for family, r in result["families"].items():
        label = f"{family} (n={r['n']})"
        lines.append(f"{label:<22}{r['before']:>8.0%}{r['after']:>8.0%}   {_verdict(r)}")
    o = result["overall"]
    lines.append(f"{'all families':<22}{o['before']:>8.0%}{o['after']:>8.0%}   {_verdict(o)}")
    nll = result["nll"]
    better = "lower is better: improved" if nll["after"] < nll["before"] else "did not improve"
    lines.append(f"{'held-out NLL/token':<22}{nll['before']:>8.3f}{nll['after']:>8.3f}   {better}")
    return "\n".join(lines)


def _verdict(r: dict) -> str:
    if r["after"] > r["before"]:
        return "improved"
    return "no change" if r["after"] == r["before"] else "got worse"


def examples_text(result: dict, n: int = SHOWN) -> str:
    """`n` held-out answers side by side, one per family where possible, preferring ones the training changed."""
    shown, seen = [], set()
    for row in sorted(result["answers"], key=lambda r: (r["passed_before"] == r["passed_after"], r["family"])):
        if row["family"] in seen:
            continue
        seen.add(row["family"])
        shown.append(row)
        if len(shown) == n:
            break
    parts = []
    for row in shown:
        parts.append(
            f"  prompt: {row['prompt']}\n"
            f"    before ({'pass' if row['passed_before'] else 'fail'}): {row['before']}\n"
            f"    after  ({'pass' if row['passed_after'] else 'fail'}): {row['after']}"
        )
    return "\n".join(parts)


def instruction_checks(cfg: Any, heldout_path: str) -> int:
    """After a successful real-model UFT demo run: the held-out before/after table of the formatting instructions
    (written to the run directory, printed from that file, added to the report). Returns the exit code (a failed
    check fails the demo); hint_rft's demo prints `rft_table` instead (uft_ray.rft.method)."""
    run = RunDir(cfg.output.run_dir)
    heldout = read_heldout(heldout_path)
    print(f"uft-ray demo: held-out check of {len(heldout)} prompts (unseen questions and values), base model "
          "against base + adapter ...", flush=True)  # fmt: skip
    write(run.path, evaluate(cfg.model.path, run.adapter, heldout))
    recorded = read(run.path)
    assert recorded is not None
    print(table(recorded), flush=True)
    print("Answers side by side:\n" + examples_text(recorded), flush=True)
    print(f"  (recorded in {path_in(run.path)} and the report; {recorded['seconds']:.0f} s)", flush=True)
    write_report(run.path)
    return 0


def rft_table(rows: list[dict[str, Any]]) -> str:
    """Held-out accuracy and mean reward before the first step (step 0) and after the last evaluation."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        return "uft-ray demo: the run logged no held-out evaluation"
    first, last = evals[0], evals[-1]
    keys = sorted(k for k in first if k.startswith("eval/") and isinstance(first[k], int | float))
    lines = [
        f"{'held-out (greedy)':<32}{'step ' + str(first.get('step', 0)):>10}{'step ' + str(last.get('step')):>10}"
    ]
    for k in keys:
        lines.append(f"{k:<32}{first[k]:>10.3f}{last.get(k, float('nan')):>10.3f}")
    return "\n".join(lines)
