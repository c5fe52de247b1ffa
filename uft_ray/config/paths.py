"""Filesystem predicates shared by parsing (path resolution) and validation (existence checks)."""

from __future__ import annotations

import glob
import os


def is_remote(path: str) -> bool:
    """An object-storage URI (s3://, gs://, ...): `uft_ray.storage.is_remote`."""
    # Imported on use, as config.py did before the split, so importing the config does not load storage.
    from uft_ray.storage import is_remote as _is_remote

    return _is_remote(path)


def path_exists(p: str) -> bool:
    """A local path that exists, or a glob that matches something (`~` expanded)."""
    p = os.path.expanduser(p)
    return os.path.exists(p) or bool(glob.glob(p))


def looks_local(p: str) -> bool:
    """A path that can only mean this filesystem (not a hub id): absolute, `~`, `./` or `../`."""
    return os.path.isabs(p) or p.startswith(("~", "./", "../"))
