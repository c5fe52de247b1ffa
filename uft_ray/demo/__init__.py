"""The demo's home: the embedded config, the tiny model, and sample shards in the real datasets' layouts.

    demo.yaml        the embedded default config (`uft-ray demo`; the same file as jobs/configs/demo.yaml)
    demo_hint_rft.yaml  `uft-ray demo --method hint_rft`: hint-guided RFT on generated Countdown (the same file
                     as jobs/configs/demo_hint_rft.yaml)
    tiny_model.py    a tiny random-init Qwen2 with a locally trained BPE tokenizer (no network)
    samples.py       UltraChat / HelpSteer2 / TRL-format sample shards in the published layouts

`ensure_demo_assets(root)` makes both under `root` (default `~/.cache/uft-ray/demo`), idempotently and safely
when several processes call it at once; `demo_overrides(root)` points the demo config at them. Tests use the
same assets; their malformed-row fixtures live under tests/, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_ROOT = "~/.cache/uft-ray/demo"
CONFIG = Path(__file__).resolve().parent / "demo.yaml"
CONFIGS = {"uft": CONFIG, "hint_rft": CONFIG.with_name("demo_hint_rft.yaml")}  # by `method`
# UltraChat conversations, HelpSteer2 prompts (two rows each), preference rows, rows per TRL format.
SAMPLE_COUNTS = {"n_ultrachat": 64, "n_helpsteer_prompts": 48, "n_preference": 32, "n_trl": 32}


def demo_config_text(method: str = "uft") -> str:
    """The embedded demo config of `method` (YAML text)."""
    # Beside this module rather than importlib.resources: that fails when an editable install left uft_ray
    # registered as a namespace package.
    if method not in CONFIGS:
        raise ValueError(f"demo method {method!r}: use one of {', '.join(CONFIGS)}")
    return CONFIGS[method].read_text()


def _samples_stamp_ok(out: Path, params: dict[str, int]) -> bool:
    from uft_ray.demo import samples

    try:
        found = json.loads((out / "uft_samples.json").read_text())
    except (OSError, ValueError):
        return False
    return found.get("format_version") == samples.SAMPLES_FORMAT_VERSION and found.get("params") == params


def _ensure_samples(out: Path, seed: int) -> None:
    from uft_ray.demo import samples

    params = samples.sample_params(**SAMPLE_COUNTS, seed=seed, scale=1)
    if _samples_stamp_ok(out, params):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        samples.write_samples(tmp, seed=seed, **SAMPLE_COUNTS)
        try:
            os.rename(tmp, out)  # atomic; fails when `out` exists
            return
        except OSError:
            pass
        if _samples_stamp_ok(out, params):  # another process won the race
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / "old")  # stale or different samples: swap them out
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_assets(root: str | os.PathLike[str] = DEMO_ROOT, *, seed: int = 0) -> dict[str, str]:
    """Make the sample data (`root/samples`) and the tiny model (`root/tiny-model`) if missing.

    Returns paths by name: `root`, `samples`, `model` and every `uft_ray.demo.samples.sample_paths` entry.
    """
    from uft_ray.demo import samples
    from uft_ray.demo.tiny_model import make_tiny_model

    base = Path(os.path.expanduser(os.fspath(root)))
    samples_dir, model_dir = base / "samples", base / "tiny-model"
    _ensure_samples(samples_dir, seed)
    make_tiny_model(model_dir, seed=seed)
    paths = {k: v for k, v in samples.sample_paths(samples_dir).items() if k != "root"}
    return {"root": str(base), "samples": str(samples_dir), "model": str(model_dir), **paths}


def demo_overrides(root: str | os.PathLike[str] | None = None, method: str = "uft") -> list[str]:
    """Make the demo assets under `root` (idempotent) and point the demo config of `method` at them (hint_rft
    generates its Countdown prompts: only the model)."""
    assets = ensure_demo_assets(root or DEMO_ROOT)
    if method == "hint_rft":
        return [f"model.path={assets['model']}"]
    return [
        f"model.path={assets['model']}",
        f"data.sources.0.path={assets['ultrachat_200k_train']}",
        f"data.sources.1.path={assets['helpsteer2_train']}",
    ]
