"""`uft-ray tasks check PATH --task TASK [--rules paper|strict]`: read a task file as hint_rft would, score every
row's own reference answer (its `answer`, the text that follows the prompt) with the task's verifier, and print how
many rows got each reward and what was quarantined, with reasons. Exit 0 when every readable row scores 1.0, 1
otherwise (a row below 1.0, a row with no reference answer, or no row at all), 2 on bad usage."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from uft_ray.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, err
from uft_ray.data.sources import SourceError
from uft_ray.tasks.files import read_rows, verify
from uft_ray.tasks.names import FILE_TASKS, GENERATED_TASKS, REWARD_RULES

SHOWN = 5  # quarantined rows and failing rows listed one by one; the rest counted


def add_tasks_parser(p: argparse.ArgumentParser) -> None:
    """The `tasks` command's subcommands, under the parser `uft-ray tasks` has."""
    sub = p.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("check", help="score every row's own answer; exit 0 when all score 1.0",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    c.add_argument("path", metavar="PATH", help="a task file, directory or glob (parquet or JSON lines; s3:// too)")
    c.add_argument("--task", required=True, choices=GENERATED_TASKS + FILE_TASKS, help="the rows' task")
    c.add_argument("--rules", choices=REWARD_RULES, default="paper", help="reward rules (default: paper)")
    c.set_defaults(fn=cmd_tasks_check)


def _where(q: dict[str, Any]) -> str:
    at = [f"{k} {q[k]}" for k in ("file", "line", "index", "row_id") if q.get(k) is not None]
    return ", ".join(at) or f"{q.get('rows', 1)} rows"


def check(path: str, task: str, rules: str = "paper") -> tuple[Counter[float | None], list[dict[str, Any]], list]:
    """Each row's own-answer reward (None: no reference answer) counted, the quarantine, and the rows below 1.0."""
    quarantined: list[dict[str, Any]] = []
    rows = read_rows(path, task, quarantined=quarantined)
    rewards: Counter[float | None] = Counter()
    failing = []
    for row in rows:
        answer = row.get("answer")
        reward = verify(row, answer, rules) if isinstance(answer, str) else None
        rewards[reward] += 1
        if reward != 1.0:
            failing.append((row["row_id"], reward))
    return rewards, quarantined, failing


def cmd_tasks_check(args: argparse.Namespace) -> int:
    try:
        rewards, quarantined, failing = check(args.path, args.task, args.rules)
    except SourceError as e:  # the path names no file of a known type
        err(f"tasks check: {e}")
        return EXIT_USAGE
    n = sum(rewards.values())
    print(f"{args.path}: {n} rows of task {args.task}, each row's own answer scored under {args.rules} rules")
    for reward in sorted(rewards, key=lambda r: -1.0 if r is None else r, reverse=True):
        what = "no reference answer" if reward is None else f"reward {reward:.1f}"
        print(f"  {what}: {rewards[reward]}")
    for row_id, reward in failing[:SHOWN]:
        print(f"  {row_id}: {'no reference answer' if reward is None else f'reward {reward:.1f}'}")
    if len(failing) > SHOWN:
        print(f"  ... and {len(failing) - SHOWN} more below 1.0")
    by_reason = Counter()
    for q in quarantined:
        by_reason[q["reason"]] += int(q.get("rows", 1))
    print(f"quarantined: {sum(by_reason.values())}" + "".join(f"\n  {r}: {c}" for r, c in sorted(by_reason.items())))
    for q in quarantined[:SHOWN]:
        print(f"  {q['reason']} ({_where(q)}): {q.get('detail', '')}")
    if len(quarantined) > SHOWN:
        print(f"  ... and {len(quarantined) - SHOWN} more")
    ok = n > 0 and rewards[1.0] == n
    print("OK: every row's own answer scores 1.0" if ok else "FAILED: not every readable row scores 1.0")
    return EXIT_OK if ok else EXIT_FAILED
