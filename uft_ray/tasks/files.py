"""Task files: rows for hint_rft from parquet or JSON lines in every supported layout, and the public checks a user
runs on their own data (`read_rows`, `verify`; `uft-ray tasks check`).

Layouts, told apart per record:

- veRL's, as the UFT authors publish their data (github liumy2010/UFT, data/{countdown,kk_logic,math}/*.parquet):
  `prompt` a one-message list whose `content` is the whole prompt text (no chat template is applied to it, as the
  authors' fork tokenizes it as given), `hint` the chunks (each carries its own separator: the revealed hint is
  their plain concatenation), `answer` the reference response (`''.join(hint) + " </think>\\n<answer> X </answer>"`),
  `reward_model.ground_truth` (`numbers` / `target` for Countdown; `names` / `solution` (bools, True a knight) /
  `solution_text_format` for Knights and Knaves; `target` for MATH), `data_source`, `extra_info`. `hint` and
  `answer` may be missing (TinyZero's Countdown files have neither): no hint is revealed, and no reference answer
  can be checked.
- this project's task rows, as the generators make them (`prompt` a string, `hint`, `answer` and the task's fields:
  `nums` / `target`, `names` / `roles`, `truth`);
- MATH-lighteval's (`problem`, `solution`, `level`, `type`; uft_ray.tasks.math_answers), for `math` only;
- a generic task's records (`prompt`, `hint` or `solution`, `answer`; uft_ray.tasks.generic), for a
  `module:function` task.

A record that cannot be a row is quarantined with its reason (`malformed`, `missing_field`, `wrong_type`,
`duplicate`, `out_of_scope`, `unreadable_file`, `too_long`, `invalid_text`), the file and its index there, never
dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from uft_ray.data.sources import FilePart, SourceError, file_type, iter_records, list_files
from uft_ray.tasks import countdown, generic, knights_knaves, math_answers
from uft_ray.tasks.rules import verifier_for

MALFORMED, UNREADABLE, OUT_OF_SCOPE = "malformed", "unreadable_file", "out_of_scope"
MISSING_FIELD, WRONG_TYPE, DUPLICATE = "missing_field", "wrong_type", "duplicate"
TOO_LONG, INVALID_TEXT = "too_long", "invalid_text"  # a record over the readers' size limit; a string not Unicode
# the data plane readers' record kinds, as this module's reasons
_READ_REASONS = {"json_parse_error": MALFORMED, "unreadable_file": UNREADABLE, "too_long": TOO_LONG,
                 "invalid_text": INVALID_TEXT}  # fmt: skip
BUILTIN = (countdown.NAME, knights_knaves.NAME, math_answers.NAME)


class RowError(ValueError):
    """A record that cannot be a row: its quarantine reason and a detail naming the field."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def records(path: str, quarantined: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """`(file, index in it, record)` of every task file `path` names (a file, directory or glob, local or a URI: the
    data plane's listing rule), read by the data plane's readers (uft_ray.data.sources: linear in the file, a record
    size limit, nesting and text checks); unreadable files and records quarantined with their reason."""
    out: list[tuple[str, int, dict[str, Any]]] = []
    for f in list_files(path)[0]:
        kind, compression = file_type(f)  # type: ignore[misc]  # list_files keeps known types only
        parquet = kind == "parquet"
        try:
            for rec in iter_records(FilePart(f, f, kind, compression)):
                at = {"index": rec.pos} if parquet else {"line": rec.pos}
                if rec.error is not None:
                    reason = _READ_REASONS.get(rec.kind, MALFORMED)
                    quarantined.append({"file": f, **({} if reason == UNREADABLE else at), "reason": reason,
                                        "detail": rec.error[:200]})  # fmt: skip
                elif not isinstance(rec.value, dict):
                    quarantined.append({"file": f, **at, "reason": MALFORMED, "detail": "not an object"})
                else:
                    out.append((f, rec.pos if parquet else rec.pos - 1, rec.value))
        except SourceError as e:
            quarantined.append({"file": f, "reason": UNREADABLE, "detail": str(e)[:200]})
    return out


# --- fields -------------------------------------------------------------------------------------------------


def _get(rec: dict[str, Any], dotted: str) -> Any:
    value: Any = rec
    for part in dotted.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise RowError(MISSING_FIELD, f"{dotted}: missing")
        value = value[part]
    return value


def _typed(rec: dict[str, Any], dotted: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = _get(rec, dotted)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RowError(WRONG_TYPE, f"{dotted}: {what}, got {type(value).__name__}")
    return value


def _list_of(rec: dict[str, Any], dotted: str, kind: type, what: str) -> list[Any]:
    value = _typed(rec, dotted, (list, tuple), what)
    if not value or not all(isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) for v in value):
        raise RowError(WRONG_TYPE, f"{dotted}: {what}")
    return list(value)


def _hint(rec: dict[str, Any]) -> list[str]:
    hint = rec.get("hint")
    if hint is None:
        return []
    if not isinstance(hint, (list, tuple)) or not all(isinstance(c, str) for c in hint):
        raise RowError(WRONG_TYPE, "hint: a list of strings (the chunks, each with its own separator)")
    return list(hint)


def _answer(rec: dict[str, Any]) -> str | None:
    answer = rec.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise RowError(WRONG_TYPE, f"answer: a string, got {type(answer).__name__}")
    return answer


def _task_fields(task: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The task's own fields from a veRL record's `reward_model.ground_truth`, checked."""
    gt = "reward_model.ground_truth"
    _typed(rec, gt, dict, "a struct")
    if task == countdown.NAME:
        nums = _list_of(rec, f"{gt}.numbers", int, "a list of integers")
        target = _typed(rec, f"{gt}.target", (int, float), "a number")
        if isinstance(target, float) and (not math.isfinite(target) or target != int(target)):
            raise RowError(WRONG_TYPE, f"{gt}.target: an integer, got {target!r}")
        return {"nums": nums, "target": int(target)}
    if task == knights_knaves.NAME:
        names = _list_of(rec, f"{gt}.names", str, "a list of names")
        solution = _list_of(rec, f"{gt}.solution", bool, "a list of booleans (True: a knight)")
        if len(solution) != len(names):
            raise RowError(WRONG_TYPE, f"{gt}.solution: {len(solution)} roles for {len(names)} names")
        out = {"names": names, "roles": ["knight" if s else "knave" for s in solution]}
        text = rec["reward_model"]["ground_truth"].get("solution_text_format")
        return {**out, "solution_text_format": text} if isinstance(text, str) else out
    return {"truth": str(_typed(rec, f"{gt}.target", (str, int, float), "the answer as text"))}


def _level(value: Any) -> int | None:
    m = re.search(r"(\d+)", str(value)) if value is not None else None
    return int(m.group(1)) if m else None


# --- layouts ------------------------------------------------------------------------------------------------


def from_verl(rec: dict[str, Any], task: str, row_id: str) -> dict[str, Any]:
    """A record in veRL's layout as a task row (module docstring); RowError names what is wrong."""
    messages = _get(rec, "prompt")
    if isinstance(messages, str):
        prompt = messages
    elif isinstance(messages, (list, tuple)) and len(messages) == 1 and isinstance(messages[0], dict):
        prompt = _typed({"prompt": messages[0]}, "prompt.content", str, "the prompt text")
    else:
        raise RowError(WRONG_TYPE, "prompt: a one-message list [{'role': 'user', 'content': TEXT}]")
    if not prompt.strip():
        raise RowError(WRONG_TYPE, "prompt: empty")
    row: dict[str, Any] = {
        "row_id": row_id,
        "task": task,
        "prompt": prompt,
        "hint": _hint(rec),
        "answer": _answer(rec),
    }
    if task in BUILTIN:
        row.update(_task_fields(task, rec))
    else:  # a generic task's verifier reads what it needs from the record
        row.update({k: v for k, v in rec.items() if k not in row and k != "prompt"})
    if task == math_answers.NAME:
        row.update({"level": _level(rec.get("level")), "type": rec.get("type")})
    for key in ("data_source", "extra_info"):
        if rec.get(key) is not None:
            row[key] = rec[key]
    return row


def from_rows(rec: dict[str, Any], task: str, row_id: str) -> dict[str, Any]:
    """A record in this project's row layout (as `generate` makes them), checked."""
    _typed(rec, "prompt", str, "the prompt text")
    row = {**rec, "row_id": str(rec.get("row_id") or row_id), "task": task, "hint": _hint(rec), "answer": _answer(rec)}
    if task == countdown.NAME:
        row["nums"] = _list_of(rec, "nums", int, "a list of integers")
        row["target"] = _typed(rec, "target", int, "an integer")
    elif task == knights_knaves.NAME:
        names, roles = _list_of(rec, "names", str, "a list of names"), _list_of(rec, "roles", str, "knight | knave")
        if len(roles) != len(names) or not set(roles) <= {"knight", "knave"}:
            raise RowError(WRONG_TYPE, "roles: one of knight | knave per name")
    else:
        row["truth"] = str(_typed(rec, "truth", (str, int, float), "the answer as text"))
    return row


def content_id(rec: dict[str, Any]) -> str:
    """16 hex digits of the record's canonical JSON: the same record gives the same id wherever it sits in its file
    (two identical records are one row, the second quarantined as a duplicate)."""
    canonical = json.dumps(rec, sort_keys=True, default=str, ensure_ascii=True)  # lone surrogates escaped, not raised
    return hashlib.sha1(canonical.encode()).hexdigest()[:16]


def layout(rec: dict[str, Any]) -> str:
    """`verl`, `lighteval` (MATH-lighteval), or `rows` (this project's rows, or a generic task's records)."""
    if "reward_model" in rec or isinstance(rec.get("prompt"), (list, tuple)):
        return "verl"
    if "problem" in rec and "solution" in rec and "prompt" not in rec:
        return "lighteval"
    return "rows"


def read_rows(
    path: str,
    task: str,
    *,
    split: str = "",
    quarantined: list[dict[str, Any]] | None = None,
    levels: tuple[int, ...] = math_answers.LEVELS,
) -> list[dict[str, Any]]:
    """The task rows of the file(s) `path` names (local or a URI), for `task` (`countdown`, `knights_knaves`, `math`
    or a generic task's `module:function`), in any layout of the module docstring. Records that cannot be rows go to
    `quarantined` (when given) with their reason. A row's id is its record's content (`{task}-{split}-{digest}`,
    `content_id`; a record's own `row_id` where it has one), never its position: an edited or reshuffled file gives
    other ids, so a rerun cannot resume its plan on other prompts; `split` keeps the train and test files of one
    layout apart. MATH-lighteval records keep `levels` (the paper's 3-5)."""
    found: list[dict[str, Any]] = [] if quarantined is None else quarantined
    base = task if task in BUILTIN else "task"  # a generic task's rows are named as generic.task_row names them
    prefix = f"{base}-{split}" if split else base
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    out_of_scope = 0
    for i, (f, index, rec) in enumerate(records(path, found)):
        row_id = f"{prefix}-{content_id(rec)}"
        try:
            kind = layout(rec)
            if kind == "verl":
                row = from_verl(rec, task, row_id)
                row["task"] = task if task in BUILTIN else prefix
            elif task == math_answers.NAME and kind == "lighteval":
                made = math_answers.rows([rec], levels)
                if not made:  # MATH rows the paper leaves out: levels 1-2, or no boxed answer
                    out_of_scope += 1
                    continue
                row = {**made[0], "row_id": row_id}
            elif task in BUILTIN:
                row = from_rows(rec, task, row_id)
            else:
                try:
                    row = generic.task_row({"row_id": row_id, **rec}, i, name=prefix)
                except ValueError as e:
                    raise RowError(MALFORMED, str(e)) from None
        except RowError as e:
            found.append({"file": f, "index": index, "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # noqa: BLE001  # no single record may end the read: it is quarantined
            detail = f"cannot be a {task} row: {type(e).__name__}: {str(e)[:200]}"
            found.append({"file": f, "index": index, "reason": MALFORMED, "detail": detail})
            continue
        if row["row_id"] in seen:
            found.append({"file": f, "index": index, "reason": DUPLICATE, "detail": f"row_id {row['row_id']!r}"})
            continue
        seen.add(row["row_id"])
        out.append(row)
    if out_of_scope:
        found.append({"reason": OUT_OF_SCOPE, "rows": out_of_scope, "detail": "not level 3-5, or no \\boxed{}"})
    return out


def verify(row: dict[str, Any], text: str, rules: str = "paper") -> float:
    """The reward of `text` (what follows the row's prompt: revealed hint + response) for a built-in task's row,
    dispatched on `row["task"]` under `rules` (`paper`, the default of `rft.reward_rules`, or `strict`)."""
    return verifier_for(str(row.get("task")), rules)(row, text)
