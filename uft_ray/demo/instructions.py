"""The demo's task: verifiable formatting instructions, each an exact transform of a plain answer with an exact
checker, written as UltraChat-200k conversations (instruction data) and HelpSteer2 rows (alignment data).

A row is a question from `QA` with one instruction from a family in `FAMILIES` appended; its answer is the plain
answer transformed to satisfy the instruction. Five families, in the spirit of IFEval's verifiable instructions:

    end_phrase    "Finish your answer with this exact phrase: <P>"    answer + " " + P
    start_word    'Start your answer with the word "<W>".'           "W, " + answer
    quotes        "Wrap your entire answer in double quotation marks." '"' + answer + '"'
    max_words     "Answer in at most <N> words."                     the answer's first sentence (<= N words)
    one_sentence  "Answer in exactly one sentence."                  the answer's first sentence

Training rows and held-out rows never share a question, and the held-out rows use values (phrases, words, N)
that no training row uses: passing them needs the rule, not a memorized string. HelpSteer2 rows pair, for the same
prompt, the compliant answer (rated high) with the plain answer that ignores the instruction (rated low), so the
alignment data rewards what the checkers reward. Everything is written text plus transforms: deterministic, no
hub, no model output.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uft_ray.demo.samples import prompt_id, write_jsonl, write_parquet

# (question, plain answer). Each answer's first sentence answers the question on its own, in at most 12 words.
QA: tuple[tuple[str, str], ...] = (
    (
        "Why is the sky blue?",
        "Air scatters blue sunlight more than red sunlight. That scattered blue light reaches "
        "our eyes from every part of the sky.",
    ),
    (
        "Why do leaves change color in autumn?",
        "Trees stop making green chlorophyll as the days get shorter. The "
        "yellow and orange pigments that were hidden underneath then show through.",
    ),
    (
        "How do bees make honey?",
        "Bees turn flower nectar into honey inside their hive. They add enzymes and fan "
        "it with their wings until most of the water evaporates.",
    ),
    (
        "What causes ocean tides?",
        "The pull of the moon's gravity raises the oceans into bulges. The earth turns "
        "under those bulges, so coasts see the water rise and fall twice a day.",
    ),
    (
        "Why do cats purr?",
        "Cats purr to show comfort and to calm themselves. They also purr when they are hurt, "
        "which may help them heal.",
    ),
    (
        "How does a rainbow form?",
        "Raindrops bend and reflect sunlight, splitting it into its colors. Each color "
        "leaves the drops at a slightly different angle, so they spread into an arc.",
    ),
    (
        "Why do we need sleep?",
        "Sleep lets the brain store memories and the body repair itself. Without enough of "
        "it, attention and mood suffer quickly.",
    ),
    (
        "How do plants get energy?",
        "Plants capture sunlight and turn it into sugar. They use water and carbon "
        "dioxide for this, and they release oxygen.",
    ),
    (
        "What is a volcano?",
        "A volcano is an opening where molten rock reaches the surface. Pressure from gas and "
        "magma below can make it erupt.",
    ),
    (
        "Why does ice float on water?",
        "Ice is less dense than liquid water. Its molecules lock into an open pattern that takes up more space.",
    ),
    (
        "How do birds know where to migrate?",
        "Birds navigate using the sun, the stars and the earth's magnetic "
        "field. Young birds also learn routes by following older ones.",
    ),
    (
        "What is a good way to learn a new language?",
        "Practice a little every day with real conversations. "
        "Listening to music and shows in the language also helps a lot.",
    ),
    (
        "Why is exercise good for the heart?",
        "Exercise makes the heart muscle stronger and more efficient. A "
        "stronger heart pumps more blood with each beat.",
    ),
    (
        "How does a compass work?",
        "A compass needle is a magnet that lines up with earth's field. One "
        "end therefore always points roughly north.",
    ),
    (
        "What makes thunder?",
        "Lightning heats the air so fast that it expands with a bang. That shock wave is the "
        "rumble we hear as thunder.",
    ),
    (
        "Why do onions make people cry?",
        "Cutting an onion releases a gas that irritates the eyes. The eyes make tears to wash the gas away.",
    ),
    (
        "How do fish breathe underwater?",
        "Fish pull oxygen from water with their gills. Water flows over thin "
        "gill filaments where oxygen passes into the blood.",
    ),
    (
        "What is the purpose of a seatbelt?",
        "A seatbelt keeps you in place during a sudden stop. It spreads the "
        "force of a crash across the strongest parts of the body.",
    ),
    (
        "Why does bread rise?",
        "Yeast in the dough releases carbon dioxide gas. The gas gets trapped in the dough and makes it puff up.",
    ),
    (
        "How do vaccines work?",
        "Vaccines train the immune system to recognize a germ. The body then fights the "
        "real germ faster if it ever meets it.",
    ),
    (
        "Why do stars twinkle?",
        "Moving layers of air bend starlight in changing directions. That makes the tiny "
        "point of light seem to flicker.",
    ),
    (
        "What is recycling good for?",
        "Recycling turns used materials into new products. It saves energy and keeps waste out of landfills.",
    ),
    (
        "How do bats find food in the dark?",
        "Bats make high sounds and listen for the echoes. The echoes tell them where insects are flying.",
    ),
    (
        "Why is the ocean salty?",
        "Rivers carry dissolved minerals from rocks into the sea. The water evaporates but the salt stays behind.",
    ),
    (
        "How does a refrigerator keep food cold?",
        "A refrigerator pumps heat out of its inside box. A fluid "
        "absorbs the heat inside and releases it through coils at the back.",
    ),
    (
        "Why do we have seasons?",
        "The earth's axis is tilted as it circles the sun. Each half of the planet gets "
        "more direct sunlight for part of the year.",
    ),
    (
        "What does a good night routine look like?",
        "Go to bed at the same time and avoid screens before sleep. A dark, cool room also helps you rest.",
    ),
    (
        "How do airplanes stay in the air?",
        "Wings push air downward, and the air pushes the wings up. The engines "
        "keep the plane moving fast enough for this lift.",
    ),
    (
        "Why do dogs wag their tails?",
        "Dogs wag their tails to communicate their feelings. A loose, wide wag usually means the dog is happy.",
    ),
    (
        "What is a healthy breakfast?",
        "A healthy breakfast combines protein, fiber and some fruit. Oatmeal with "
        "nuts and berries is one easy example.",
    ),
    (
        "How does the moon change shape?",
        "We see more or less of the moon's sunlit side each night. The full cycle of phases takes about a month.",
    ),
    (
        "Why do we sweat?",
        "Sweating cools the body when it gets too warm. The sweat evaporates from the skin and carries heat away.",
    ),
    (
        "How do trees drink water?",
        "Roots pull water from the soil into the tree. Thin tubes carry it up the trunk to the leaves.",
    ),
    (
        "What is the water cycle?",
        "Water evaporates, forms clouds and falls back as rain or snow. It then flows "
        "through rivers and ground back to the sea.",
    ),
    (
        "Why is reading to children helpful?",
        "Reading aloud builds a child's vocabulary and attention. It also creates a calm time to bond together.",
    ),
    (
        "How does soap clean hands?",
        "Soap molecules grab both grease and water. Rinsing then carries the grease and germs away.",
    ),
    (
        "Why do mountains have snow on top?",
        "Air gets colder the higher you go. High peaks stay cold enough for snow to last.",
    ),
    (
        "How do spiders make webs?",
        "Spiders pull silk threads from glands in their bodies. They weave the sticky "
        "threads into a pattern that traps insects.",
    ),
    (
        "What is a good way to save money?",
        "Set aside a fixed amount as soon as you get paid. Tracking your spending shows where else you can cut back.",
    ),
    (
        "Why do we yawn?",
        "Yawning may help cool the brain and keep us alert. It is also contagious among people who see it.",
    ),
    (
        "How does a lighthouse help ships?",
        "A lighthouse shines a bright light to mark dangerous coasts. Sailors "
        "use its pattern of flashes to know where they are.",
    ),
    (
        "Why are carrots orange?",
        "Carrots contain a bright pigment called beta carotene. Farmers bred them for this color centuries ago.",
    ),
    (
        "How do penguins stay warm?",
        "Penguins have thick fat and tightly packed feathers. They also huddle together to share heat.",
    ),
    (
        "Why does metal feel cold to the touch?",
        "Metal pulls heat away from your skin very quickly. Wood at the "
        "same temperature feels warmer because it moves heat slowly.",
    ),
    (
        "What is the job of the lungs?",
        "The lungs move oxygen into the blood and carbon dioxide out. Tiny air sacs make this exchange happen.",
    ),
    (
        "How do earthquakes happen?",
        "Earthquakes happen when rocks along a fault suddenly slip. The released "
        "energy travels through the ground as waves.",
    ),
    (
        "Why should we drink water every day?",
        "Water keeps the body's organs and temperature working well. Even mild thirst can make you tired.",
    ),
    (
        "How do snakes move without legs?",
        "Snakes push against the ground with their muscles and scales. Their "
        "bodies bend in waves that drive them forward.",
    ),
    (
        "What makes a good friend?",
        "A good friend listens and can be trusted. They support you in hard times and celebrate the good ones.",
    ),
    (
        "Why do apples turn brown after cutting?",
        "Cut apple cells meet oxygen in the air. An enzyme then makes brown compounds on the surface.",
    ),
    (
        "How do clouds form?",
        "Warm moist air rises and cools into tiny droplets. Billions of droplets together make a cloud.",
    ),
    (
        "Why do owls hunt at night?",
        "Owls have large eyes and sharp hearing for the dark. Many of their prey animals are active at night too.",
    ),
    (
        "How does a battery store energy?",
        "A battery stores energy in chemicals that can react. The reaction "
        "pushes electrons through a circuit when it is connected.",
    ),
    (
        "Why do people get hiccups?",
        "Hiccups are sudden spasms of the diaphragm. Eating too fast or swallowing air can set them off.",
    ),
    (
        "What is the best way to study for a test?",
        "Study in short sessions over several days. Testing yourself works better than rereading notes.",
    ),
    (
        "How do camels survive in the desert?",
        "Camels store fat in their humps and lose little water. They can go days without drinking.",
    ),
    (
        "Why does the wind blow?",
        "Wind blows because air moves from high pressure to low pressure. The sun heats "
        "the ground unevenly and creates those differences.",
    ),
    (
        "How do frogs catch insects?",
        "Frogs flick out long sticky tongues to grab insects. The whole catch takes less than a second.",
    ),
    (
        "Why is sunscreen important?",
        "Sunscreen blocks ultraviolet rays that damage the skin. It lowers the risk of sunburn and skin cancer.",
    ),
    (
        "How do ants find their way home?",
        "Ants follow scent trails left by other ants. They also count steps and use the sun's position.",
    ),
)
HELDOUT_QUESTIONS = 12  # the last 12 questions of QA are never trained on

# Values by split: held-out rows use values no training row uses.
END_PHRASES = {
    "train": (
        "Is there anything else you would like to know?",
        "I hope this helps.",
        "Thank you for asking.",
        "Let me know if you have more questions.",
    ),
    "heldout": ("That is all for now.", "Have a wonderful day."),
}
START_WORDS = {"train": ("Certainly", "Indeed", "Well", "Sure"), "heldout": ("Absolutely", "Honestly")}
MAX_WORDS = {"train": (12, 15, 20), "heldout": (13, 18)}
MIN_ANSWER_WORDS = 3  # before an end phrase


@dataclass(frozen=True)
class Example:
    family: str
    question: str
    instruction: str
    answer: str  # the compliant answer
    plain: str  # the plain answer, which ignores the instruction
    value: Any  # the family's parameter (phrase, word, N) or None

    @property
    def prompt(self) -> str:
        return f"{self.question} {self.instruction}"

    def check(self, response: str) -> bool:
        return CHECKERS[self.family](response, self.value)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def words(text: str) -> list[str]:
    return text.split()


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# --- the checkers: exact, on the response text as generated (leading/trailing whitespace ignored) -------------


def ends_with_phrase(response: str, phrase: str) -> bool:
    """Ends with the phrase, after an answer: the phrase alone (or after a word or two) answers nothing."""
    s = response.strip()
    return s.endswith(phrase) and len(words(s[: -len(phrase)])) >= MIN_ANSWER_WORDS


def starts_with_word(response: str, word: str) -> bool:
    found = re.match(r"\W*([A-Za-z']+)", response.strip())
    return found is not None and found.group(1).lower() == word.lower()


def in_double_quotes(response: str, _: Any = None) -> bool:
    s = response.strip()
    return len(s) >= 2 and s[0] == '"' and s[-1] == '"'


def at_most_words(response: str, n: int) -> bool:
    return 0 < len(words(response)) <= n


def one_sentence(response: str, _: Any = None) -> bool:
    """Non-empty, ends with . ! or ?, and no sentence end (a terminator followed by a space) before the end."""
    s = response.strip().rstrip('"').rstrip()
    return bool(s) and s[-1] in ".!?" and re.search(r"[.!?]+[\"')\]]*\s", s) is None


CHECKERS: dict[str, Callable[[str, Any], bool]] = {
    "end_phrase": ends_with_phrase,
    "start_word": starts_with_word,
    "quotes": in_double_quotes,
    "max_words": at_most_words,
    "one_sentence": one_sentence,
}
FAMILIES = tuple(CHECKERS)


def make_example(family: str, question: str, plain: str, rng: random.Random, split: str) -> Example:
    """The question with one instruction of `family` (its value drawn for `split`) and the compliant answer."""
    if family == "end_phrase":
        phrase = rng.choice(END_PHRASES[split])
        return Example(
            family,
            question,
            f"Finish your answer with this exact phrase: {phrase}",
            f"{plain} {phrase}",
            plain,
            phrase,
        )
    if family == "start_word":
        word = rng.choice(START_WORDS[split])
        return Example(
            family,
            question,
            f'Start your answer with the word "{word}".',
            f"{word}, {_lower_first(plain)}",
            plain,
            word,
        )
    if family == "quotes":
        return Example(
            family, question, "Wrap your entire answer in double quotation marks.", f'"{plain}"', plain, None
        )
    short = first_sentence(plain)
    if family == "max_words":
        fits = [n for n in MAX_WORDS[split] if len(words(short)) <= n < len(words(plain))]
        n = rng.choice(fits or [max(MAX_WORDS[split])])
        return Example(family, question, f"Answer in at most {n} words.", short, plain, n)
    if family == "one_sentence":
        return Example(family, question, "Answer in exactly one sentence.", short, plain, None)
    raise ValueError(f"unknown instruction family {family!r}: use one of {', '.join(FAMILIES)}")


def examples(split: str, seed: int = 0) -> list[Example]:
    """Every (question, family) pair of `split`: training questions are QA[:-HELDOUT_QUESTIONS], held-out ones the
    rest; values drawn with `seed`."""
    rng = random.Random(f"{seed}:{split}")
    qa = QA[:-HELDOUT_QUESTIONS] if split == "train" else QA[-HELDOUT_QUESTIONS:]
    return [make_example(f, q, a, rng, split) for q, a in qa for f in FAMILIES]


def split_train(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """The training examples in two disjoint halves by (question, family): instruction rows and preference rows."""
    rows = examples("train", seed)
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2
    return rows[:half], rows[half:]


def ultrachat_row(ex: Example, seed: int, index: int) -> dict[str, Any]:
    return {
        "prompt": ex.prompt,
        "prompt_id": prompt_id(seed, "instructions", index, ex.prompt),
        "messages": [{"content": ex.prompt, "role": "user"}, {"content": ex.answer, "role": "assistant"}],
    }


# HelpSteer2's five 0-4 ratings: the compliant answer is rated high, the plain one (it ignores the instruction) low.
FOLLOWS = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 1}
IGNORES = {"helpfulness": 1, "correctness": 2, "coherence": 3, "complexity": 1, "verbosity": 2}


def helpsteer2_rows(ex: Example) -> list[dict[str, Any]]:
    """Two consecutive rows for one prompt, as HelpSteer2 lays them out."""
    return [
        {"prompt": ex.prompt, "response": ex.answer, **FOLLOWS},
        {"prompt": ex.prompt, "response": ex.plain, **IGNORES},
    ]


# --- the demo's files ----------------------------------------------------------------------------------------
FORMAT_VERSION = 1  # bump when the rows change, so stamped directories are rewritten
STAMP = "instructions.json"


def stamp(seed: int) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "seed": seed, "questions": len(QA), "heldout": HELDOUT_QUESTIONS}


def shard_paths(out: str | os.PathLike[str]) -> dict[str, str]:
    base = Path(out)
    return {
        "ultrachat_200k_train": str(base / "ultrachat_200k" / "data" / "train_sft-00000-of-00001.parquet"),
        "helpsteer2_train": str(base / "helpsteer2" / "train.jsonl.gz"),
        "heldout": str(base / "heldout.jsonl"),
    }


def heldout_row(ex: Example) -> dict[str, Any]:
    return {"family": ex.family, "question": ex.question, "instruction": ex.instruction, "answer": ex.answer,
            "plain": ex.plain, "value": ex.value}  # fmt: skip


def from_heldout_row(row: dict[str, Any]) -> Example:
    return Example(row["family"], row["question"], row["instruction"], row["answer"], row["plain"], row["value"])


def write_shards(out: str | os.PathLike[str], seed: int = 0) -> dict[str, str]:
    """Write the instruction rows (UltraChat-200k parquet), the preference rows (HelpSteer2 jsonl.gz) and the
    held-out rows (jsonl) into the existing directory `out`, then the stamp."""
    paths = shard_paths(out)
    sft, pref = split_train(seed)
    for p in paths.values():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    write_parquet(Path(paths["ultrachat_200k_train"]), (ultrachat_row(ex, seed, i) for i, ex in enumerate(sft)))
    write_jsonl(Path(paths["helpsteer2_train"]), (r for ex in pref for r in helpsteer2_rows(ex)))
    write_jsonl(Path(paths["heldout"]), (heldout_row(ex) for ex in examples("heldout", seed)))
    (Path(out) / STAMP).write_text(json.dumps(stamp(seed)) + "\n")
    return paths


def read_heldout(path: str | os.PathLike[str]) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [from_heldout_row(json.loads(line)) for line in f if line.strip()]
