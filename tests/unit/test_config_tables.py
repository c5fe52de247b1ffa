"""The small tables config validation checks against agree with the code that implements them, and validating a
config loads none of that code (no task, tracker or data-pipeline module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from uft_ray import tracker_names
from uft_ray.data.formats import FORMAT_KINDS, FORMATS
from uft_ray.data.normalize import FORMAT_FUNCTIONS
from uft_ray.tasks import countdown, generic, knights_knaves, math_answers
from uft_ray.tasks.names import FILE_TASKS, GENERATED_TASKS

ROOT = Path(__file__).resolve().parents[2]


def test_every_format_has_kinds_and_a_normalizer():
    assert list(FORMAT_KINDS) == list(FORMATS)
    assert list(FORMAT_FUNCTIONS) == list(FORMATS)


def test_task_names_are_the_task_modules_names():
    assert GENERATED_TASKS == (countdown.NAME, knights_knaves.NAME)
    assert FILE_TASKS == (math_answers.NAME,)
    assert sorted(generic.BUILTIN) == sorted(GENERATED_TASKS + FILE_TASKS)


def test_every_tracker_names_its_package():
    assert list(tracker_names.PACKAGES) == list(tracker_names.TRACKERS)


def test_validating_a_config_imports_no_task_tracker_or_pipeline_code():
    code = (
        "import sys\n"
        "from uft_ray.config import load_config, validate\n"
        "for path in ('jobs/configs/demo_tiny.yaml', 'jobs/configs/demo_hint_rft_tiny.yaml'):\n"
        "    cfg = load_config(path, ['logging.trackers=[tensorboard]'], check_paths=False)\n"
        "    validate(cfg, check_paths=True)  # the tracker package check too\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('uft_ray', 'ray', 'torch'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    config = {"uft_ray.config", *(f"uft_ray.config.{m}" for m in ("parsing", "paths", "schema", "validation"))}
    tables = {
        "uft_ray.data",
        "uft_ray.data.formats",
        "uft_ray.tasks",
        "uft_ray.tasks.names",
        "uft_ray.tracker_names",
        "uft_ray.model_store",
        "uft_ray.model_gguf",
    }  # a GGUF path's architecture check (a file header)
    # The method registry and each built-in method's own module (its config checks; its run's parts stay out).
    registry = {"uft_ray.methods", "uft_ray.console", "uft_ray.uft", "uft_ray.uft.method", "uft_ray.rft",
                "uft_ray.rft.method", "uft_ray.rft.backend"}  # fmt: skip
    assert set(r.stdout.split()) - {"uft_ray", "uft_ray.storage"} - config - tables - registry == set()
