"""What every `uft-ray` command shares: its exit codes and how it reports a problem on stderr."""

from __future__ import annotations

import sys

from uft_ray.config import ConfigError

# 0 success; 1 the run or job failed (or the cluster could not be reached); 2 bad usage or config.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_error(e: ConfigError, where: str = "config") -> int:
    """One line per problem of an invalid config; the usage exit code."""
    err(f"{where} is invalid:")
    for m in e.messages:
        err(f"  - {m}")
    return EXIT_USAGE
