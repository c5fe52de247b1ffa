"""Named evaluation protocols: which lm_eval tasks, at how many shots, and which of their numbers the paper reports.

`uft-paper` is the UNA/UFT authors' protocol (docs/design.md "Evaluation"): no chat template; the Open LLM
Leaderboard v2 tasks (lm_eval's `leaderboard_*`: ifeval 0-shot, bbh 3, mmlu_pro 5, musr 0, math_hard 4, gpqa 0)
and the v1 ones (truthfulqa 0, gsm8k 5, arc_challenge 25, hellaswag 10, winogrande 5, mmlu 5). Two numbers
are derived from several lm_eval metrics: ifeval as the mean of its four strict/loose accuracies, truthfulqa as
the mean of mc1 and mc2; they go into summary.json under `derived` (with or without a preset, wherever their
inputs are present), each with the metrics it averages.

Pure data: importable without lm_eval, torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PresetTask:
    task: str  # lm_eval task or group name
    num_fewshot: int
    headline: str | None = None  # the metric the paper reports, as lm_eval names it (`acc_norm,none`)


@dataclass(frozen=True)
class Derived:
    """A number the paper reports that lm_eval does not: the mean of `of` (`task/metric` each)."""

    name: str
    of: tuple[str, ...]


@dataclass(frozen=True)
class Preset:
    name: str
    tasks: tuple[PresetTask, ...]
    apply_chat_template: bool = False

    def task(self, name: str) -> PresetTask | None:
        return next((t for t in self.tasks if t.task == name), None)


_IFEVAL_METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)

# The ifeval / truthfulqa means apply wherever their inputs are present, with or without a preset.
DERIVED = (
    Derived("ifeval_mean", tuple(f"leaderboard_ifeval/{m},none" for m in _IFEVAL_METRICS)),
    Derived("truthfulqa_mean", ("truthfulqa_mc1/acc,none", "truthfulqa_mc2/acc,none")),
)

UFT_PAPER = Preset(
    name="uft-paper",
    tasks=(
        PresetTask("leaderboard_ifeval", 0, None),  # headline: derived ifeval_mean
        PresetTask("truthfulqa_mc1", 0, "acc,none"),  # with mc2: derived truthfulqa_mean
        PresetTask("truthfulqa_mc2", 0, "acc,none"),
        PresetTask("gsm8k", 5, "exact_match,strict-match"),
        PresetTask("leaderboard_bbh", 3, "acc_norm,none"),
        PresetTask("leaderboard_mmlu_pro", 5, "acc,none"),
        PresetTask("leaderboard_musr", 0, "acc_norm,none"),
        PresetTask("leaderboard_math_hard", 4, "exact_match,none"),
        PresetTask("leaderboard_gpqa", 0, "acc_norm,none"),  # gated: HF_TOKEN
        PresetTask("arc_challenge", 25, "acc_norm,none"),
        PresetTask("hellaswag", 10, "acc_norm,none"),
        PresetTask("winogrande", 5, "acc,none"),
        PresetTask("mmlu", 5, "acc,none"),
    ),
    apply_chat_template=False,
)

PRESETS = {p.name: p for p in (UFT_PAPER,)}

# Hub datasets behind an accepted licence: loading one needs HF_TOKEN from the environment (any task whose name
# starts with one of these).
GATED_PREFIXES = ("gpqa", "leaderboard_gpqa")
# Data beyond the task's dataset: ifeval's `number_sentences` check tokenizes with nltk's punkt_tab, a separate
# download that lm_eval attempts on import and that an offline machine does not have.
NLTK_NEEDS = {"ifeval": "punkt_tab", "leaderboard_ifeval": "punkt_tab"}


def is_gated(task: str) -> bool:
    return any(task == p or task.startswith(p + "_") for p in GATED_PREFIXES)


def nltk_needs(task: str) -> str | None:
    """The nltk resource `task` needs (`punkt_tab`), or None."""
    return next((r for p, r in NLTK_NEEDS.items() if task == p or task.startswith(p + "_")), None)
