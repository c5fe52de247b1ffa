"""Normalization: raw source rows -> unified rows (docs/design.md "Unified rows and tokenization"), or a quarantine reason.

Pure Python, no Ray: each per-format function takes one raw row and returns its unified rows, or raises
`Reject(reason, detail)`. `Normalizer` feeds a file's records through them in order and adds what needs more
than one row (HelpSteer2's response pairs).

Decisions:
- Conversations (UltraChat, TRL `messages`) are *unfolded*: each assistant turn k becomes one `sft` row whose
  prompt is every turn before it. This is the design's rule for UltraChat, and TRL's conversational
  `messages` get the same treatment so that every assistant turn is a target exactly once (TRL trains all
  assistant turns of one sequence; unfolding gives each its own row, its own reward and its own mixture count).
  A leading system message is allowed and stays in every prompt; after it, roles alternate user/assistant
  starting with the user. A trailing user turn is no target and is simply left out.
- Any problem in a conversation quarantines the whole conversation: a later turn's prompt would contain the
  broken turn.
- TRL prompts may be a string (one user message) or a message list ending with a user turn; completions a
  string or a one-message assistant list. `preference` rows without `prompt` use the shared message prefix
  of `chosen` and `rejected` (TRL's implicit prompt).
- Row ids (`make_row_id`) are sha1 of the source name and the row's identity in its source: UltraChat's
  `prompt_id` + turn; the original UltraChat's file + `id` + turn; everything else file + position (+ turn),
  where the file is relative to the source's root, so moving a dataset (local -> s3) keeps its ids.
- HelpSteer2 `binary` / `pair` pair consecutive rows with the same prompt (how the dataset is laid out). A
  tie drops both rows (`tie`); a row whose partner is malformed or missing cannot be paired (`no_pair`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from uft_ray.config import SourceConfig
from uft_ray.data import quarantine as q
from uft_ray.data.formats import HELPSTEER2_ATTRIBUTES
from uft_ray.data.quarantine import Quarantined, Reject
from uft_ray.data.sources import RawRecord

Row = dict[str, Any]
Outcome = Row | Quarantined
ROLES = ("system", "user", "assistant")

# UNA/UFT papers: s = (0.65 h + 0.8 c + 0.45 coh) / 7.6
DEFAULT_SCORE_WEIGHTS: dict[str, float] = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45}
RATING_MAX = 4
PREFERENCE_MAX = 3  # HelpSteer2-Preference strengths are -3..3

_HS2_MARKER = re.compile(r"\n<extra_id_1>(User|Assistant)\n")


def make_row_id(source: str, *identity: object) -> str:
    """Stable row id: sha1 of the source name and the row's identity in its source."""
    return hashlib.sha1("\x1f".join(map(str, (source, *identity))).encode()).hexdigest()


def unified_row(
    row_id: str,
    source: str,
    kind: str,
    prompt: list[dict[str, str]],
    response: str,
    *,
    rejected: str | None = None,
    score: float = 1.0,
) -> Row:
    return {
        "row_id": row_id,
        "source": source,
        "kind": kind,
        "prompt": prompt,
        "response": response,
        "rejected": rejected,
        "score": float(score),
    }


# ---------------------------------------------------------------------------------------------------------
# Field checks


def _field(rec: Any, name: str) -> Any:
    if not isinstance(rec, dict):
        raise Reject(q.WRONG_TYPE, f"a row must be a JSON object, got {type(rec).__name__}")
    value = rec.get(name)
    if value is None:
        raise Reject(q.MISSING_FIELD, f"`{name}` is missing")
    return value


def _text(rec: Any, name: str) -> str:
    value = _field(rec, name)
    if not isinstance(value, str):
        raise Reject(q.WRONG_TYPE, f"`{name}` must be a string, got {type(value).__name__}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """A value for a quarantine detail: scalars as repr, cut; containers by type and size only (a huge or deeply
    nested value must not make a huge detail, or recurse)."""
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else f"<{value.bit_length()}-bit int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Reject(q.WRONG_TYPE, f"`{name}` must be a number, got {type(value).__name__} {_short(value)}")
    try:
        number = float(value)  # an integer past float's range (a 400-digit rating) overflows
    except OverflowError:
        raise Reject(q.RATING_OUT_OF_RANGE, f"`{name}` is {_short(value)}, past any range") from None
    if math.isnan(number):
        raise Reject(q.RATING_OUT_OF_RANGE, f"`{name}` is NaN")
    return number


def _blank(s: str) -> bool:
    return not s.strip()


def message_list(value: Any, name: str) -> list[dict[str, str]]:
    """A list of {role, content} with known roles (types only; the order is checked by the callers)."""
    if value is None:
        raise Reject(q.MISSING_FIELD, f"`{name}` is missing")
    if not isinstance(value, list):
        raise Reject(q.WRONG_TYPE, f"`{name}` must be a list of {{role, content}}, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise Reject(q.WRONG_TYPE, f"`{name}[{i}]` must be an object {{role, content}}, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            raise Reject(q.MISSING_FIELD, f"`{name}[{i}]` needs role and content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise Reject(q.WRONG_TYPE, f"`{name}[{i}]`: role and content must be strings")
        if role not in ROLES:
            raise Reject(q.BAD_ROLE, f"`{name}[{i}]`: role {role!r}; allowed: {', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    return out


def _check_alternation(msgs: list[dict[str, str]], name: str, *, last: str | None) -> None:
    """Optional leading system turn, then user/assistant alternating from user; `last`: the required last role."""
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    for i in range(start, len(msgs)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msgs[i]["role"] != expected:
            raise Reject(
                q.ROLES_NOT_ALTERNATING,
                f"`{name}[{i}]` is {msgs[i]['role']!r}, expected {expected!r} (user/assistant must alternate, "
                "after an optional leading system turn)",
            )
    for i in range(start, len(msgs)):
        if _blank(msgs[i]["content"]):
            reason = q.EMPTY_PROMPT if msgs[i]["role"] == "user" else q.EMPTY_RESPONSE
            raise Reject(reason, f"`{name}[{i}]` ({msgs[i]['role']}) is empty")
    if last is not None and len(msgs) > start and msgs[-1]["role"] != last:
        raise Reject(q.ROLES_NOT_ALTERNATING, f"`{name}` must end with a {last} turn")


def check_conversation(msgs: list[dict[str, str]], name: str = "messages") -> None:
    """A conversation to unfold: alternating roles and at least one assistant turn."""
    start = 1 if msgs and msgs[0]["role"] == "system" else 0
    if len(msgs) <= start:
        raise Reject(q.NO_ASSISTANT_TURN, f"`{name}` has no user/assistant turns")
    # the role order first: a conversation of two user turns is "not alternating", not "no assistant"
    _check_alternation(msgs, name, last=None)
    if not any(m["role"] == "assistant" for m in msgs):
        raise Reject(q.NO_ASSISTANT_TURN, f"`{name}` has no assistant turn")


def unfold(source: str, identity: tuple[object, ...], msgs: list[dict[str, str]]) -> list[Row]:
    """One `sft` row per assistant turn k: prompt = every earlier turn. `msgs` must pass `check_conversation`."""
    rows = []
    k = 0
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            rows.append(unified_row(make_row_id(source, *identity, k), source, "sft", msgs[:i], m["content"]))
            k += 1
    return rows


# ---------------------------------------------------------------------------------------------------------
# UltraChat


def ultrachat_200k(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """HuggingFaceH4/ultrachat_200k: {prompt, prompt_id, messages: [{role, content}]}."""
    msgs = message_list(_field(rec, "messages"), "messages")
    check_conversation(msgs)
    pid = rec.get("prompt_id")
    identity: tuple[object, ...] = (pid,) if isinstance(pid, str) and pid else (relpath, pos)
    return unfold(src.name, identity, msgs)


def ultrachat_raw(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """The original UltraChat release: {id, data: [user, assistant, user, ...]}."""
    data = _field(rec, "data")
    if not isinstance(data, list):
        raise Reject(q.WRONG_TYPE, f"`data` must be a list of strings, got {type(data).__name__}")
    for i, t in enumerate(data):
        if not isinstance(t, str):
            raise Reject(q.WRONG_TYPE, f"`data[{i}]` must be a string, got {type(t).__name__}")
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(data)]
    check_conversation(msgs, "data")
    # the file is part of the identity: the original release may number each file from 0
    rid = rec.get("id")
    if isinstance(rid, (list, dict)):
        raise Reject(q.WRONG_TYPE, f"`id` must be a string or a number, got {type(rid).__name__}")
    identity: tuple[object, ...] = (relpath, f"id={rid}") if rid is not None else (relpath, pos)
    return unfold(src.name, identity, msgs)


# ---------------------------------------------------------------------------------------------------------
# HelpSteer2


def score_range(weights: Mapping[str, float]) -> tuple[float, float]:
    """(min, max) of w . a over ratings a in [0, 4]^n: negative weights take their minimum at 4."""
    lo = sum(RATING_MAX * w for w in weights.values() if w < 0)
    hi = sum(RATING_MAX * w for w in weights.values() if w > 0)
    return lo, hi


def helpsteer2_score(ratings: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
    """s = (w . a - min) / (max - min) over the attainable range, in [0, 1].

    With the default weights (0.65, 0.8, 0.45) this is the papers' (0.65 h + 0.8 c + 0.45 coh) / 7.6.
    """
    w = dict(weights or DEFAULT_SCORE_WEIGHTS)
    lo, hi = score_range(w)
    if hi <= lo:
        raise ValueError(f"score weights {w} have an empty range")
    s = (sum(wk * float(ratings[k]) for k, wk in w.items() if wk) - lo) / (hi - lo)
    return min(1.0, max(0.0, s))


def parse_helpsteer2_prompt(text: str) -> list[dict[str, str]]:
    """Split a HelpSteer2 prompt on its `\\n<extra_id_1>User\\n` / `...Assistant\\n` markers into messages."""
    if _blank(text):
        raise Reject(q.EMPTY_PROMPT, "`prompt` is empty")
    parts = _HS2_MARKER.split(text)
    msgs = [{"role": "user", "content": parts[0]}]
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        msgs.append({"role": role.lower(), "content": content})
    _check_alternation(msgs, "prompt", last="user")
    return msgs


@dataclass
class _HS2:
    """A validated HelpSteer2 row, waiting for its pair partner."""

    pos: int
    raw: str
    where: str
    prompt_text: str
    prompt: list[dict[str, str]]
    response: str
    score: float


def _ratings(rec: dict[str, Any], weights: Mapping[str, float]) -> dict[str, float]:
    ratings = {}
    for a in HELPSTEER2_ATTRIBUTES:
        v = rec.get(a)
        if v is None:
            if weights.get(a):
                raise Reject(q.MISSING_FIELD, f"`{a}` is missing")
            continue
        v = _number(v, a)
        if not 0 <= v <= RATING_MAX:
            raise Reject(q.RATING_OUT_OF_RANGE, f"`{a}` is {v:g}, ratings are 0..{RATING_MAX}")
        ratings[a] = v
    return ratings


def helpsteer2_fields(src: SourceConfig, rec: Any) -> tuple[str, list[dict[str, str]], str, float]:
    """Validate a nvidia/HelpSteer2 row: (prompt text, prompt messages, response, weighted score)."""
    prompt_text = _text(rec, "prompt")
    response = _text(rec, "response")
    weights = src.score_weights or DEFAULT_SCORE_WEIGHTS
    ratings = _ratings(rec, weights)
    prompt = parse_helpsteer2_prompt(prompt_text)
    if _blank(response):
        raise Reject(q.EMPTY_RESPONSE, "`response` is empty")
    return prompt_text, prompt, response, helpsteer2_score(ratings, weights)


def helpsteer2(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """HelpSteer2 under kind `score`: one row per response with its weighted, normalized rating."""
    _, prompt, response, s = helpsteer2_fields(src, rec)
    return [unified_row(make_row_id(src.name, relpath, pos), src.name, "score", prompt, response, score=s)]


def helpsteer2_preference(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """HelpSteer2-Preference: strength < 0 -> response_1 is chosen, > 0 -> response_2, 0 -> dropped."""
    prompt_text = _text(rec, "prompt")
    r1, r2 = _text(rec, "response_1"), _text(rec, "response_2")
    strength = _field(rec, "preference_strength")
    strength = _number(strength, "preference_strength")
    if not -PREFERENCE_MAX <= strength <= PREFERENCE_MAX:
        raise Reject(q.RATING_OUT_OF_RANGE, f"`preference_strength` is {strength:g}, allowed -3..3")
    prompt = parse_helpsteer2_prompt(prompt_text)
    for name, r in (("response_1", r1), ("response_2", r2)):
        if _blank(r):
            raise Reject(q.EMPTY_RESPONSE, f"`{name}` is empty")
    if strength == 0:
        raise Reject(q.ZERO_PREFERENCE, "`preference_strength` is 0: neither response is preferred")
    chosen, rejected = (r1, r2) if strength < 0 else (r2, r1)
    return [unified_row(make_row_id(src.name, relpath, pos), src.name, "pair", prompt, chosen, rejected=rejected)]


def pair_rows(src: SourceConfig, relpath: str, a: _HS2, b: _HS2) -> list[Outcome]:
    """Two responses to one prompt -> `binary` rows (higher 1, lower 0) or one `pair` row; a tie drops both.

    Rows carry `_origin` (file:line) like every row out of `Normalizer`.
    """
    if math.isclose(a.score, b.score, rel_tol=0, abs_tol=1e-9):
        detail = f"both responses score {a.score:.4f}"
        return [Quarantined(q.TIE, src.name, f"{x.where}: {detail}", x.raw) for x in (a, b)]
    hi, lo = (a, b) if a.score > b.score else (b, a)
    if src.resolved_kind == "pair":
        rid = make_row_id(src.name, relpath, a.pos, b.pos)
        row = unified_row(rid, src.name, "pair", hi.prompt, hi.response, rejected=lo.response)
        row["_origin"] = f"{relpath}:{a.pos}+{b.pos}"
        return [row]
    rows: list[Outcome] = []
    for x in (a, b):
        rid = make_row_id(src.name, relpath, x.pos)
        row = unified_row(rid, src.name, "binary", x.prompt, x.response, score=1.0 if x is hi else 0.0)
        row["_origin"] = f"{relpath}:{x.pos}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# TRL's standard formats


def _trl_prompt(rec: Any, name: str = "prompt") -> list[dict[str, str]]:
    value = _field(rec, name)
    if isinstance(value, str):
        if _blank(value):
            raise Reject(q.EMPTY_PROMPT, f"`{name}` is empty")
        return [{"role": "user", "content": value}]
    msgs = message_list(value, name)
    if not msgs or all(m["role"] == "system" for m in msgs):
        raise Reject(q.EMPTY_PROMPT, f"`{name}` has no user turn")
    _check_alternation(msgs, name, last="user")
    return msgs


def _trl_completion(rec: Any, name: str) -> str:
    value = _field(rec, name)
    if isinstance(value, list):
        msgs = message_list(value, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise Reject(q.WRONG_TYPE, f"`{name}` as a message list must hold exactly one assistant message")
        value = msgs[0]["content"]
    if not isinstance(value, str):
        raise Reject(q.WRONG_TYPE, f"`{name}` must be a string or one assistant message, got {type(value).__name__}")
    if _blank(value):
        raise Reject(q.EMPTY_RESPONSE, f"`{name}` is empty")
    return value


def trl_messages(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """TRL conversational `messages`: unfolded like UltraChat (one sft row per assistant turn)."""
    msgs = message_list(_field(rec, "messages"), "messages")
    check_conversation(msgs)
    return unfold(src.name, (relpath, pos), msgs)


def trl_prompt_completion(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    prompt = _trl_prompt(rec)
    response = _trl_completion(rec, "completion")
    return [unified_row(make_row_id(src.name, relpath, pos), src.name, "sft", prompt, response)]


def trl_unpaired(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """TRL unpaired preference: prompt, completion, label (bool) -> binary row with score 1 or 0."""
    prompt = _trl_prompt(rec)
    response = _trl_completion(rec, "completion")
    label = _field(rec, "label")
    if not isinstance(label, bool):
        raise Reject(q.WRONG_TYPE, f"`label` must be true or false, got {type(label).__name__} {_short(label)}")
    score = 1.0 if label else 0.0
    return [unified_row(make_row_id(src.name, relpath, pos), src.name, "binary", prompt, response, score=score)]


def _implicit_prompt(rec: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """TRL's implicit-prompt preference rows: chosen/rejected are whole conversations sharing a prefix."""
    chosen, rejected = message_list(_field(rec, "chosen"), "chosen"), message_list(_field(rec, "rejected"), "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    tails = chosen[n:], rejected[n:]
    if any(len(t) != 1 or t[0]["role"] != "assistant" for t in tails):
        raise Reject(q.WRONG_TYPE, "without `prompt`, chosen and rejected must differ only in a last assistant turn")
    prompt = chosen[:n]
    if not prompt:
        raise Reject(q.MISSING_FIELD, "`prompt` is missing")
    _check_alternation(prompt, "prompt", last="user")
    return prompt, tails[0][0]["content"], tails[1][0]["content"]


def trl_preference(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """TRL preference: prompt, chosen, rejected -> one pair row."""
    if isinstance(rec, dict) and rec.get("prompt") is None and isinstance(rec.get("chosen"), list):
        prompt, chosen, rejected = _implicit_prompt(rec)
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if _blank(text):
                raise Reject(q.EMPTY_RESPONSE, f"`{name}` is empty")
    else:
        prompt = _trl_prompt(rec)
        chosen, rejected = _trl_completion(rec, "chosen"), _trl_completion(rec, "rejected")
    rid = make_row_id(src.name, relpath, pos)
    return [unified_row(rid, src.name, "pair", prompt, chosen, rejected=rejected)]


def trl_scored(src: SourceConfig, rec: Any, relpath: str, pos: int) -> list[Row]:
    """prompt, completion and an explicit `score` in [0, 1] -> score row."""
    prompt = _trl_prompt(rec)
    response = _trl_completion(rec, "completion")
    score = _number(_field(rec, "score"), "score")
    if not 0.0 <= score <= 1.0:
        raise Reject(q.RATING_OUT_OF_RANGE, f"`score` is {score:g}, must be in [0, 1]")
    return [unified_row(make_row_id(src.name, relpath, pos), src.name, "score", prompt, response, score=score)]


RowFn = Callable[[SourceConfig, Any, str, int], list[Row]]
FORMAT_FUNCTIONS: dict[str, RowFn] = {
    "ultrachat_200k": ultrachat_200k,
    "ultrachat_raw": ultrachat_raw,
    "helpsteer2": helpsteer2,
    "helpsteer2_preference": helpsteer2_preference,
    "messages": trl_messages,
    "prompt_completion": trl_prompt_completion,
    "unpaired": trl_unpaired,
    "preference": trl_preference,
    "scored": trl_scored,
}


# ---------------------------------------------------------------------------------------------------------
# A file's records in order


class Normalizer:
    """Normalizes one file's records in file order. Rows come out with an extra `_origin` ("file:position").

    Use: `out = n.add(rec, relpath, where)` for each record, then `n.finish()`; each returns unified rows and
    `Quarantined` records. Only HelpSteer2 `binary`/`pair` holds rows back (until its partner arrives).
    """

    def __init__(self, src: SourceConfig):
        self.src = src
        self.fn = FORMAT_FUNCTIONS[src.format]
        self.pairing = src.format == "helpsteer2" and src.resolved_kind in ("binary", "pair")
        self._group: list[_HS2] = []
        self._relpath = ""

    def _bad(self, reason: str, detail: str, where: str, raw: str) -> Quarantined:
        return Quarantined(reason, self.src.name, f"{where}: {detail}", raw)

    def _unexpected(self, e: Exception, where: str, rec: RawRecord) -> Quarantined:
        detail = f"cannot be read as a {self.src.format} row: {type(e).__name__}: {_short(str(e), 200)}"
        return self._bad(q.WRONG_TYPE, detail, where, rec.raw())

    def add(self, rec: RawRecord, relpath: str, where: str) -> list[Outcome]:
        if rec.error is not None:
            return [self._bad(rec.kind, rec.error, where, rec.raw())]
        if self.pairing:
            return self._add_pairing(rec, relpath, where)
        try:
            rows = self.fn(self.src, rec.value, relpath, rec.pos)
        except Reject as e:
            return [self._bad(e.reason, e.detail, where, rec.raw())]
        except Exception as e:  # noqa: BLE001  # no single row may end the read: whatever it is, it is quarantined
            return [self._unexpected(e, where, rec)]
        origin = f"{relpath}:{rec.pos}"
        for r in rows:
            r["_origin"] = origin
        return rows

    def _add_pairing(self, rec: RawRecord, relpath: str, where: str) -> list[Outcome]:
        try:
            prompt_text, prompt, response, s = helpsteer2_fields(self.src, rec.value)
        except Reject as e:
            return [self._bad(e.reason, e.detail, where, rec.raw())]
        except Exception as e:  # noqa: BLE001  # as in `add`
            return [self._unexpected(e, where, rec)]
        item = _HS2(rec.pos, rec.raw(), where, prompt_text, prompt, response, s)
        out: list[Outcome] = []
        if self._group and (self._group[0].prompt_text != prompt_text or relpath != self._relpath):
            out = self._flush()
        self._relpath = relpath
        self._group.append(item)
        if len(self._group) == 2:  # pairs are complete at two: emit early, keep memory flat
            out += self._flush()
        return out

    def _flush(self) -> list[Outcome]:
        group, self._group = self._group, []
        if len(group) == 2:
            return pair_rows(self.src, self._relpath, *group)
        return [
            self._bad(
                q.NO_PAIR,
                "no second response to the same prompt next to it (partner missing or malformed)",
                x.where,
                x.raw,
            )
            for x in group
        ]

    def finish(self) -> list[Outcome]:
        return self._flush() if self._group else []


def normalize_records(src: SourceConfig, records: Iterable[RawRecord], relpath: str = "file") -> Iterator[Outcome]:
    """Every outcome of one file's records (a convenience over `Normalizer` for tests and small data)."""
    n = Normalizer(src)
    for rec in records:
        yield from n.add(rec, relpath, f"{relpath}:{rec.pos}")
    yield from n.finish()
