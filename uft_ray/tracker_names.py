"""The experiment trackers `logging.trackers` accepts and the package each needs: no tracker import.

Config validation checks against these without loading `uft_ray.trackers` (which imports them on use), and
`uft_ray.trackers` takes its names from here, so neither imports the other.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

TRACKERS = ("wandb", "mlflow", "tensorboard")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}  # tracker -> module it imports
INSTALL = "pip install 'uft-ray[trackers]'"


def missing_packages(names: Sequence[str]) -> list[str]:
    """The trackers among `names` whose package is not importable here."""
    return [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
