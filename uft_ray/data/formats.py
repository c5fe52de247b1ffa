"""The source formats `data.sources[].format` accepts, the row kinds each can produce, HelpSteer2's attributes.

Plain tables, no imports: config validation checks against them and the data plane implements them
(`uft_ray.data.normalize.FORMAT_FUNCTIONS` has one function per name here).
"""

from __future__ import annotations

FORMATS = (
    "ultrachat_200k",
    "ultrachat_raw",
    "helpsteer2",
    "helpsteer2_preference",
    "messages",
    "prompt_completion",
    "unpaired",
    "preference",
    "scored",
)
# Which row kinds each format can produce; the first is the default.
FORMAT_KINDS: dict[str, tuple[str, ...]] = {
    "ultrachat_200k": ("sft",),
    "ultrachat_raw": ("sft",),
    "helpsteer2": ("score", "binary", "pair"),
    "helpsteer2_preference": ("pair",),
    "messages": ("sft",),
    "prompt_completion": ("sft",),
    "unpaired": ("binary",),
    "preference": ("pair",),
    "scored": ("score",),
}
# The 0-4 ratings a HelpSteer2 row carries; the keys `score_weights` may name.
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
