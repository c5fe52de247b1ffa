"""The project's own sample data, in the exact published layouts of the sources uft-ray reads.

Nothing here touches a network: every file is generated from small word lists with a seeded
``random.Random``, so the same seed gives byte-identical files (gzip headers carry no mtime or name).

Layout written by :func:`write_samples` under ``out``::

    ultrachat_200k/data/train_sft-00000-of-00001.parquet   HuggingFaceH4/ultrachat_200k: prompt, prompt_id,
    ultrachat_200k/data/test_sft-00000-of-00001.parquet      messages list<struct<content, role>>
    ultrachat_raw/train_0.jsonl                             original UltraChat: {"id": "0", "data": [u, a, ...]}
    helpsteer2/train.jsonl.gz                               nvidia/HelpSteer2: prompt, response and five 0-4 ratings,
    helpsteer2/validation.jsonl.gz                           two consecutive rows per prompt
    helpsteer2/preference/preference.jsonl.gz               HelpSteer2-Preference: split, prompt, response_1/2, ...
    trl/messages.jsonl                                      TRL standard formats (string prompt / completion)
    trl/prompt_completion.jsonl
    trl/unpaired.jsonl
    trl/preference.jsonl
    trl/scored.jsonl
    uft_samples.json                                        stamp: the parameters the files were written with

With ``scale`` > 1 the UltraChat sources are split into shards of at most ``SHARD_ROWS`` conversations
(``train_sft-00000-of-00004.parquet`` ..., ``train_0.jsonl``, ``train_1.jsonl`` ...); use the globs from
:func:`sample_paths`. Everything is written streaming (parquet row groups, jsonl line by line).

Malformed-row fixtures in the same layouts, with the quarantine reason each must get, are test fixtures:
``tests/fixtures/bad_samples.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# --- the sources' own vocabulary -------------------------------------------------------------------

# HelpSteer2 multi-turn prompts: earlier turns are joined with these markers, no marker before the first user turn
# (dataset card of nvidia/HelpSteer2, "For multi-turn prompts, the structure of prompts look like below").
HS2_ASSISTANT_MARKER = "\n<extra_id_1>Assistant\n"
HS2_USER_MARKER = "\n<extra_id_1>User\n"
HS2_ATTRIBUTES: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

SHARD_ROWS = 50_000  # conversations per UltraChat shard once scale makes a source bigger than this
ROW_GROUP_ROWS = 1_000  # parquet row group size: lets readers split a shard into parallel tasks
SAMPLES_FORMAT_VERSION = 1  # bump when the generator changes so stamped sample dirs are rebuilt

ULTRACHAT_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string()),
        pa.field("prompt_id", pa.string()),
        # field order content, role as in the published dataset_info features
        pa.field("messages", pa.list_(pa.struct([pa.field("content", pa.string()), pa.field("role", pa.string())]))),
    ]
)

# --- text generator ------------------------------------------------------------------------------------------

_NOUNS = tuple(
    """garden river market engine bridge library kitchen teacher student doctor farmer painter musician
    computer network database server city village forest mountain ocean island planet battery camera bicycle
    recipe budget project meeting report museum festival language history science climate energy harbor castle
    window letter story poem song movie company customer product team coach athlete runner swimmer recipe
    vegetable bakery office hospital school journey holiday weather storm desert valley theory method system""".split()
)
_VERBS = tuple(
    """build improve explain describe design repair measure compare collect protect support organize visit
    study paint cook plan travel learn teach train record share observe follow change create develop manage
    clean watch test count""".split()
)
_ADJS = tuple(
    """small large quiet busy bright dark ancient modern simple complex careful curious friendly gentle
    strong warm cold green golden silver local global healthy useful famous rare common early late quick
    patient honest creative practical efficient detailed""".split()
)
_ADVS = tuple(
    """quickly slowly carefully often rarely always gently easily clearly quietly openly together
    safely daily""".split()
)
_PREPS = ("in", "near", "around", "behind", "across", "inside", "beyond", "under", "along", "for")
_PRONOUNS = ("We", "They", "You", "People", "Many experts", "Most teams", "Good planners", "Students")
_CONNECTORS = ("However,", "In addition,", "For example,", "As a result,", "First,", "Finally,", "Also,", "Then")
_GENRES = ("story", "poem", "letter", "summary", "speech", "review", "guide", "report")
_FOLLOWUPS = (
    "Can you tell me more about the {noun}?",
    "That is helpful. How does the {adj} {noun} fit into this?",
    "Could you give an example with {a_noun}?",
    "Why is the {noun} so important here?",
    "What should I avoid when I {verb} the {noun}?",
    "Thanks! Can you make it shorter?",
)
_QUESTIONS = (
    "How can I {verb} {a_adj} {noun} {prep} the {noun2}?",
    "What is the best way to {verb} the {noun}?",
    "Can you explain why {a_adj} {noun} needs to {verb} {adv}?",
    "Write a short {genre} about {a_adj} {noun} {prep} the {noun2}.",
    "Describe how {pronoun_l} {verb} the {noun} {prep} {a_adj} {noun2}.",
    "What are the main steps to {verb} and {verb2} {a_noun}?",
    "Give me three tips to {verb} my {noun} {adv}.",
    "Compare the {adj} {noun} with the {adj2} {noun2}.",
)
_LOW_QUALITY = (
    "I am not sure.",
    "It depends.",
    "The {noun} is {a_noun}.",
    "Yes.",
    "Maybe you can {verb} it.",
)


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


_VERBS3 = tuple(_third_person(v) for v in _VERBS)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeioAEIO" else "a ") + word


# "a"/"an" decided once per word, not per sentence
_A_ADJS = tuple(_a(w) for w in _ADJS)
_A_NOUNS = tuple(_a(w) for w in _NOUNS)
_CAP_A_ADJS = tuple(w[0].upper() + w[1:] for w in _A_ADJS)


class TextGen:
    """Deterministic English-like text from small word lists (enough structure for a BPE to learn).

    Every pick is one ``random()`` call on a seeded ``random.Random``: same seed, same text, on any platform.
    """

    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(seed)
        self._r = self.rng.random

    def pick(self, seq: tuple[str, ...]) -> str:
        # cheaper than rng.choice (no rejection sampling); large scales generate millions of words
        return seq[int(self._r() * len(seq))]

    def _slots(self, topic: str | None = None) -> dict[str, str]:
        p = self.pick
        noun = topic or p(_NOUNS)
        return {
            "noun": noun,
            "a_noun": _a(noun),
            "noun2": p(_NOUNS),
            "verb": p(_VERBS),
            "verb2": p(_VERBS),
            "adj": p(_ADJS),
            "a_adj": p(_A_ADJS),
            "adj2": p(_ADJS),
            "adv": p(_ADVS),
            "prep": p(_PREPS),
            "genre": p(_GENRES),
            "pronoun_l": p(_PRONOUNS).lower(),
        }

    def sentence(self, topic: str | None = None) -> str:
        p = self.pick
        noun = topic or p(_NOUNS)
        form = int(self._r() * 6)
        if form == 0:
            return f"The {p(_ADJS)} {noun} {p(_VERBS3)} the {p(_NOUNS)} {p(_ADVS)}."
        if form == 1:
            return f"{p(_PRONOUNS)} {p(_VERBS)} {p(_A_ADJS)} {noun} {p(_PREPS)} the {p(_NOUNS)}."
        if form == 2:
            return f"{p(_CONNECTORS)} {_a(noun)} can {p(_VERBS)} the {p(_ADJS)} {p(_NOUNS)} {p(_ADVS)}."
        if form == 3:
            return f"It is {p(_ADJS)} to {p(_VERBS)} the {noun} before you {p(_VERBS)} the {p(_NOUNS)}."
        if form == 4:
            head = f"Every {p(_ADJS)} {noun} {p(_VERBS3)} {p(_ADVS)}"
            return f"{head}, so {p(_PRONOUNS).lower()} {p(_VERBS)} it {p(_ADVS)}."
        return f"{p(_CAP_A_ADJS)} {p(_NOUNS)} and {p(_A_ADJS)} {noun} {p(_VERBS)} {p(_PREPS)} the {p(_NOUNS)}."

    def question(self) -> tuple[str, str]:
        """A user request and its topic noun."""
        slots = self._slots()
        return self.pick(_QUESTIONS).format(**slots), slots["noun"]

    def followup(self, topic: str) -> str:
        return self.pick(_FOLLOWUPS).format(**self._slots(topic))

    def response(self, topic: str, quality: int = 4, long: bool | None = None) -> str:
        """A response about `topic`; low quality gives short, off-topic text, `long` gives 10-16 sentences."""
        rng = self.rng
        if quality <= 0:
            return self.pick(_LOW_QUALITY).format(**self._slots())
        if long is None:
            long = rng.random() < 0.15  # ~15% long: a 128-token budget drops some rows
        n = rng.randint(10, 16) if long else rng.randint(1, 2 + quality)
        on_topic = quality >= 2
        sents = [self.sentence(topic if on_topic and rng.random() < 0.6 else None) for _ in range(n)]
        if n >= 4 and rng.random() < 0.3:  # sometimes a numbered list, sometimes paragraphs
            head = sents[0]
            return head + "\n\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(sents[1:], 1))
        if n >= 6:
            cut = n // 2
            return " ".join(sents[:cut]) + "\n\n" + " ".join(sents[cut:])
        return " ".join(sents)

    def conversation(self, n_turns: int, long: bool | None = None) -> list[str]:
        """Alternating user/assistant texts, `n_turns` of each, starting with the user."""
        q, topic = self.question()
        turns = [q, self.response(topic, long=long)]
        for _ in range(n_turns - 1):
            turns += [self.followup(topic), self.response(topic, long=long)]
        return turns


def corpus_lines(seed: int = 0, n: int = 3000) -> Iterator[str]:
    """Text in the style of every sample file (and the chat roles): the tokenizer's training corpus."""
    gen = TextGen(f"{seed}:corpus")
    roles = ("system", "user", "assistant")
    for i in range(n):
        turns = gen.conversation(gen.rng.randint(1, 3))
        yield "\n".join(f"{roles[1 + (j % 2)]}\n{t}" for j, t in enumerate(turns))
        if i % 10 == 0:
            yield f"system\nYou are a helpful assistant. {gen.sentence()}"


# --- small writers -------------------------------------------------------------------------------------------


def _gzip_writer(path: Path) -> io.TextIOWrapper:
    # mtime=0 and an empty name: identical bytes for identical content
    raw = open(path, "wb")  # closed through the wrapper
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
    gz.myfileobj = raw  # GzipFile closes it with itself
    return io.TextIOWrapper(gz, encoding="utf-8", newline="\n")


def _open_text(path: Path) -> io.TextIOBase:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        return _gzip_writer(path)
    return open(path, "w", encoding="utf-8", newline="\n")


def _dump(row: Any) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_jsonl(path: Path, rows: Iterator[Any]) -> int:
    n = 0
    with _open_text(path) as f:
        for row in rows:
            # a str is written as is: lets bad files hold lines that are not JSON
            f.write((row if isinstance(row, str) else _dump(row)) + "\n")
            n += 1
    return n


def write_parquet(path: Path, rows: Iterator[dict[str, Any]], schema: pa.Schema = ULTRACHAT_SCHEMA) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as w:
        for row in rows:
            batch.append(row)
            if len(batch) >= ROW_GROUP_ROWS:
                w.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=ROW_GROUP_ROWS)
                n += len(batch)
                batch = []
        if batch or n == 0:
            w.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=ROW_GROUP_ROWS)
            n += len(batch)
    return n


def prompt_id(seed: int, split: str, index: int, prompt: str) -> str:
    # 64-hex sha256 like the published ids; hashing the position too keeps ids unique when prompts repeat
    return hashlib.sha256(f"{seed}:{split}:{index}:{prompt}".encode()).hexdigest()


def _messages(turns: list[str]) -> list[dict[str, str]]:
    return [{"content": t, "role": "user" if i % 2 == 0 else "assistant"} for i, t in enumerate(turns)]


def _shards(total: int) -> list[tuple[int, int]]:
    """(start, count) per shard, at most SHARD_ROWS each, at least one shard."""
    n = max(1, math.ceil(total / SHARD_ROWS))
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        cnt = base + (1 if i < extra else 0)
        out.append((start, cnt))
        start += cnt
    return out


# --- the good samples ----------------------------------------------------------------------------------------


def _ultrachat_rows(seed: int, split: str, shard: int, start: int, count: int) -> Iterator[dict[str, Any]]:
    gen = TextGen(f"{seed}:ultrachat_200k:{split}:{shard}")
    for i in range(start, start + count):
        turns = gen.conversation(gen.rng.choice((1, 1, 2, 2, 3)))
        yield {"prompt": turns[0], "prompt_id": prompt_id(seed, split, i, turns[0]), "messages": _messages(turns)}


def _raw_rows(seed: int, shard: int, start: int, count: int) -> Iterator[dict[str, Any]]:
    gen = TextGen(f"{seed}:ultrachat_raw:{shard}")
    for i in range(start, start + count):
        # ids are strings in the original release ({"id": "0", ...})
        yield {"id": str(i), "data": gen.conversation(gen.rng.choice((1, 2, 2, 3, 3)))}


def _hs2_ratings(rng: random.Random, quality: int) -> dict[str, int]:
    def near(x: int) -> int:
        return min(4, max(0, x + rng.choice((-1, 0, 0, 0, 1))))

    return {
        "helpfulness": quality,
        "correctness": near(quality),
        "coherence": near(min(4, quality + 1)),
        "complexity": rng.randint(0, 3),
        "verbosity": rng.randint(0, 3),
    }


def _hs2_prompt(gen: TextGen) -> tuple[str, str]:
    """A HelpSteer2 prompt (about 29% multi-turn in the real data) and its topic."""
    q, topic = gen.question()
    if gen.rng.random() >= 0.3:
        return q, topic
    parts = [q]
    for _ in range(gen.rng.randint(1, 2)):
        parts += [HS2_ASSISTANT_MARKER, gen.response(topic, long=False), HS2_USER_MARKER, gen.followup(topic)]
    return "".join(parts), topic


def _hs2_pair(gen: TextGen, prompt: str, topic: str, tie: bool) -> list[dict[str, Any]]:
    rng = gen.rng
    q1 = rng.randint(0, 4)
    r1 = _hs2_ratings(rng, q1)
    if tie:
        r2 = dict(r1)  # all five attributes equal: a tie under any weights
    else:
        q2 = rng.choice([q for q in range(5) if q != q1])
        r2 = _hs2_ratings(rng, q2)
    return [{"prompt": prompt, "response": gen.response(topic, quality=r["helpfulness"]), **r} for r in (r1, r2)]


def _hs2_rows(seed: int, split: str, n_prompts: int) -> Iterator[dict[str, Any]]:
    gen = TextGen(f"{seed}:helpsteer2:{split}")
    for i in range(n_prompts):
        prompt, topic = _hs2_prompt(gen)
        yield from _hs2_pair(gen, prompt, topic, tie=(i % 6 == 3))  # one pair in six ties


_STRENGTH_WORDS = {1: "slightly better than", 2: "better than", 3: "much better than"}


def _preference_statement(strength: int, gen: TextGen) -> tuple[str, str]:
    if strength == 0:
        statement = "@Response 1 is about the same as @Response 2."
    else:
        better, worse = (1, 2) if strength < 0 else (2, 1)
        statement = f"@Response {better} is {_STRENGTH_WORDS[abs(strength)]} @Response {worse}."
    return statement, " ".join(gen.sentence() for _ in range(gen.rng.randint(1, 3)))


def _preference_rows(seed: int, n: int) -> Iterator[dict[str, Any]]:
    gen = TextGen(f"{seed}:helpsteer2_preference")
    rng = gen.rng
    for i in range(n):
        prompt, topic = _hs2_prompt(gen)
        strength = 0 if i % 7 == 2 else rng.choice((-3, -2, -1, 1, 2, 3))  # includes strength-0 rows
        # the preferred response gets the higher quality
        q_hi, q_lo = rng.randint(2, 4), rng.randint(0, 2)
        q1, q2 = (q_hi, q_lo) if strength < 0 else (q_lo, q_hi)
        if strength == 0:
            q1 = q2 = rng.randint(1, 4)
        statement, elaboration = _preference_statement(strength, gen)
        similar = [{"statement": statement, "elaboration": elaboration, "strength": strength}]
        for _ in range(2):
            s = max(-3, min(3, strength + rng.choice((-1, 0, 0, 1)))) if strength else 0
            st, el = _preference_statement(s, gen)
            similar.append({"statement": st, "elaboration": el, "strength": s})
        unprocessed = [
            {"strength": p["strength"], "justification": f"{p['statement']} {p['elaboration']}"} for p in similar
        ]
        if rng.random() < 0.3:  # an outlier annotation the three most similar leave out
            st, el = _preference_statement(-strength if strength else 3, gen)
            unprocessed.append({"strength": -strength if strength else 3, "justification": f"{st} {el}"})
        yield {
            "split": "val" if i % 10 == 9 else "train",
            "prompt": prompt,
            "response_1": gen.response(topic, quality=q1),
            "response_2": gen.response(topic, quality=q2),
            "preference_strength": strength,
            "preference_statement": statement,
            "preference_elaboration": elaboration,
            "three_most_similar_preferences": similar,
            "all_preferences_unprocessed": unprocessed,
        }


def _trl_rows(seed: int, fmt: str, n: int) -> Iterator[dict[str, Any]]:
    gen = TextGen(f"{seed}:trl:{fmt}")
    rng = gen.rng
    for i in range(n):
        prompt, topic = gen.question()
        if fmt == "messages":
            turns = gen.conversation(rng.choice((1, 1, 2)))
            msgs = [{"role": m["role"], "content": m["content"]} for m in _messages(turns)]
            if i % 4 == 0:  # the generic format allows a system turn
                msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
            yield {"messages": msgs}
        elif fmt == "prompt_completion":
            yield {"prompt": prompt, "completion": gen.response(topic)}
        elif fmt == "unpaired":
            good = i % 2 == 0
            yield {"prompt": prompt, "completion": gen.response(topic, quality=4 if good else 0), "label": good}
        elif fmt == "preference":
            yield {
                "prompt": prompt,
                "chosen": gen.response(topic, quality=rng.randint(3, 4)),
                "rejected": gen.response(topic, quality=rng.randint(0, 1)),
            }
        elif fmt == "scored":
            q = rng.randint(0, 4)
            score = (0.0, 1.0)[i % 2] if i < 2 else round(min(1.0, max(0.0, q / 4 + rng.uniform(-0.1, 0.1))), 4)
            yield {"prompt": prompt, "completion": gen.response(topic, quality=q), "score": float(score)}
        else:  # pragma: no cover - internal
            raise ValueError(fmt)


TRL_FORMATS: tuple[str, ...] = ("messages", "prompt_completion", "unpaired", "preference", "scored")


def sample_paths(out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Where :func:`write_samples` puts each source (globs for the sharded UltraChat sources)."""
    out = Path(out_dir)
    paths = {
        "root": str(out),
        "ultrachat_200k": str(out / "ultrachat_200k"),
        "ultrachat_200k_train": str(out / "ultrachat_200k/data/train_sft-*.parquet"),
        "ultrachat_200k_test": str(out / "ultrachat_200k/data/test_sft-*.parquet"),
        "ultrachat_raw": str(out / "ultrachat_raw/train_*.jsonl"),
        "helpsteer2_train": str(out / "helpsteer2/train.jsonl.gz"),
        "helpsteer2_validation": str(out / "helpsteer2/validation.jsonl.gz"),
        "helpsteer2_preference": str(out / "helpsteer2/preference/preference.jsonl.gz"),
    }
    for fmt in TRL_FORMATS:
        paths[f"trl_{fmt}"] = str(out / f"trl/{fmt}.jsonl")
    return paths


def write_samples(
    out_dir: str | os.PathLike[str],
    *,
    n_ultrachat: int = 64,
    n_helpsteer_prompts: int = 48,
    n_preference: int = 32,
    n_trl: int = 32,
    seed: int = 0,
    scale: int = 1,
) -> dict[str, str]:
    """Write every sample source under `out_dir` (see the module docstring); returns paths by name.

    `scale` multiplies every count. Same arguments -> byte-identical files.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    out = Path(out_dir)
    n_uc = n_ultrachat * scale
    n_uc_test = max(4, n_uc // 8)  # the published test_sft is ~11% of train_sft
    n_hs = n_helpsteer_prompts * scale
    counts: dict[str, int] = {}

    data = out / "ultrachat_200k" / "data"
    # shards of an earlier write with another shard count would join the globs: remove them first
    for stale in [*data.glob("train_sft-*-of-*.parquet"), *data.glob("test_sft-*-of-*.parquet")]:
        stale.unlink()
    for stale in (out / "ultrachat_raw").glob("train_*.jsonl"):
        stale.unlink()
    for split, total in (("train_sft", n_uc), ("test_sft", n_uc_test)):
        shards = _shards(total)
        for k, (start, cnt) in enumerate(shards):
            name = f"{split}-{k:05d}-of-{len(shards):05d}.parquet"
            counts[f"ultrachat_200k/data/{name}"] = write_parquet(
                data / name, _ultrachat_rows(seed, split, k, start, cnt)
            )
    for k, (start, cnt) in enumerate(_shards(n_uc)):
        counts[f"ultrachat_raw/train_{k}.jsonl"] = write_jsonl(
            out / f"ultrachat_raw/train_{k}.jsonl", _raw_rows(seed, k, start, cnt)
        )
    hs = out / "helpsteer2"
    counts["helpsteer2/train.jsonl.gz"] = write_jsonl(hs / "train.jsonl.gz", _hs2_rows(seed, "train", n_hs))
    counts["helpsteer2/validation.jsonl.gz"] = write_jsonl(
        hs / "validation.jsonl.gz", _hs2_rows(seed, "validation", max(2, n_hs // 8))
    )
    counts["helpsteer2/preference/preference.jsonl.gz"] = write_jsonl(
        hs / "preference/preference.jsonl.gz", _preference_rows(seed, n_preference * scale)
    )
    for fmt in TRL_FORMATS:
        counts[f"trl/{fmt}.jsonl"] = write_jsonl(out / f"trl/{fmt}.jsonl", _trl_rows(seed, fmt, n_trl * scale))

    stamp = {
        "format_version": SAMPLES_FORMAT_VERSION,
        "params": sample_params(n_ultrachat, n_helpsteer_prompts, n_preference, n_trl, seed, scale),
        "rows": counts,
    }
    (out / "uft_samples.json").write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return sample_paths(out)


def sample_params(
    n_ultrachat: int, n_helpsteer_prompts: int, n_preference: int, n_trl: int, seed: int, scale: int
) -> dict[str, int]:
    """The parameters `write_samples` stamps into `uft_samples.json` (a rerun with the same ones is a no-op)."""
    return {
        "n_ultrachat": n_ultrachat,
        "n_helpsteer_prompts": n_helpsteer_prompts,
        "n_preference": n_preference,
        "n_trl": n_trl,
        "seed": seed,
        "scale": scale,
    }
