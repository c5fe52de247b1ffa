"""What a rerun of a run directory may change, decided before it writes anything.

A rerun with the same `output.storage_path` and `output.run_name` resumes what the run directory holds (Ray Train's
last committed checkpoint, or a finished run's adapter). It must train what `config.yaml` says the checkpoints were
trained with, so a rerun compares its resolved config with that file, field by field, before any work:

- `ALLOWED` fields may change: they say where and how fast a run goes, what it reports and how it recovers, never
  what it trains (resources, fault tolerance, evaluation cadence and benchmarks, trackers, locations).
- `EXTENDABLE` fields (`train.max_steps`, `train.epochs`) may grow: the run goes on past its old end when the new
  plan's first steps are the old plan (`uft_ray.runner.keep_plan` checks the prefix).
- Anything else that differs is refused (`ConfigError`, exit 2), listing every changed field as `old -> new` and
  how to start a new run instead. Nothing is written before the decision.

A run directory holds trained work when Ray Train committed a checkpoint there (its snapshot file, named by Ray
Train itself: `uft_ray.run_dir.checkpoint_snapshot_name`), when `checkpoint_*` folders are there, or when a final
adapter is. `checkpoint_*` folders without the snapshot are refused too: Ray Train would start over at step 0 and
the run would truncate its metrics, on top of checkpoints it cannot tell apart from a failed attempt's.
"""

from __future__ import annotations

from typing import Any

from uft_ray import storage
from uft_ray.config import Config, ConfigError
from uft_ray.run_dir import RunDir, checkpoint_snapshot_name

# Dotted fields (a section name covers the whole section) a rerun may change: they do not change what is trained.
ALLOWED: tuple[str, ...] = (
    "ray",  # where the cluster is and how big
    "logging",  # trackers
    "output.storage_path",  # where the run directory lives (a run moved elsewhere keeps its name)
    "train.max_failures",
    "train.on_nonfinite",  # a run stopped at a NaN may go on skipping such steps
    "train.max_nonfinite_in_a_row",
    "train.checkpoint_every",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "model.gradient_checkpointing",  # memory against time; the same gradients
    # the layout of a micro-batch (uft_ray.packing): the same rows and math, within fp32 rounding
    "train.packing",
    "train.share_prompts",
    "train.micro_batch_tokens",
    "reference.actors",
    "reference.cpus_per_actor",
    "reference.gpus_per_actor",
    "reference.cache_dir",  # the cache is keyed by what the values depend on, wherever it lives
    "rft.rollout.cpus_per_actor",
    "rft.rollout.gpus_per_actor",
    "rft.rollout.gpu_memory_utilization",
    "eval.every",
    "eval.max_rows",
    "eval.tasks",
    "eval.preset",
    "eval.include_path",
    "eval.limit",
    "eval.max_model_len",
    "eval.tensor_parallel_size",
)
# May grow (never shrink): the run trains on past its old end when the plan's prefix is unchanged.
EXTENDABLE: tuple[str, ...] = ("train.max_steps", "train.epochs")


def allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED)


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted field, old, new) for every field that differs, in config order. A field the old file lacks (added
    to the schema since) counts only when the new value is not its default; one the new config lacks is ignored."""
    defaults = Config().to_dict()
    out: list[tuple[str, Any, Any]] = []

    def default(key: str) -> Any:
        node: Any = defaults
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in b:
                sub = f"{key}.{k}" if key else str(k)
                if k not in a:
                    if b[k] != default(sub):
                        out.append((sub, None, b[k]))
                    continue
                walk(a[k], b[k], sub)
        elif a != b:
            out.append((key, a, b))

    walk(before, after, "")
    return out


_MISSING = object()


def _extends(key: str, old: Any, new: Any) -> bool:
    if key == "train.max_steps":  # None: every step of train.epochs
        return old is not None and (new is None or new >= old)
    return isinstance(old, int) and isinstance(new, int) and new >= old


def checkpoint_folders(run_dir: RunDir) -> list[str]:
    """The `checkpoint_*` folders under checkpoints/ (names only)."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem_for(run_dir.checkpoints)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    names = (i.path.rstrip("/").rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.Directory)
    return sorted(n for n in names if n.startswith("checkpoint_"))


def has_trained(run_dir: RunDir) -> bool:
    """Whether the run directory holds trained work a rerun would resume or hand back."""
    return (
        storage.is_file(run_dir.checkpoint_snapshot)
        or bool(checkpoint_folders(run_dir))
        or storage.exists(run_dir.adapter)
    )


def check_rerun(run_dir: RunDir, cfg: Config, previous: dict[str, Any] | None) -> bool:
    """Refuse (ConfigError) a rerun that would resume trained work with another config, or checkpoints Ray Train
    cannot resume; returns whether the run directory holds trained work. Reads only."""
    folders = checkpoint_folders(run_dir)
    snapshot = checkpoint_snapshot_name()
    if folders and not storage.is_file(run_dir.checkpoint_snapshot):
        shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise ConfigError(
            [
                f"{run_dir.checkpoints}: holds {shown} but not {snapshot}, Ray Train's record of which checkpoint "
                "it committed; without it the run would start over at step 0 on top of them. Restore the file, "
                f"remove {run_dir.checkpoints} to start over, or use a new output.run_name"
            ]
        )
    if not has_trained(run_dir):
        return False
    if previous is None:
        raise ConfigError(
            [
                f"{run_dir.path}: holds trained work but no config.yaml to say what trained it; use a new "
                "output.run_name, or remove the run directory to start over"
            ]
        )
    refused = [
        (k, old, new)
        for k, old, new in changes(previous, cfg.to_dict())
        if not allowed(k) and not (k in EXTENDABLE and _extends(k, old, new))
    ]
    if refused:
        raise ConfigError(
            [f"{k}: {old!r} -> {new!r} (the run's checkpoints were trained with {old!r})" for k, old, new in refused]
            + [
                f"{run_dir.path}: a rerun resumes this run, so it may change only what does not change what is "
                "trained (README: 'Reruns, resume and the run directory'). To train this config, start a new run: "
                f"output.run_name={cfg.output.run_name}-2 (any new name), or remove {run_dir.path} to start over"
            ]
        )
    return True
