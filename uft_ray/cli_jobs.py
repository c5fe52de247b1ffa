"""`uft-ray submit|status|logs|stop`: a config run as a Ray job on a cluster, and following it (`uft_ray.api`).

Every call goes through the job API at the dashboard address; a cluster that cannot be reached is exit 1,
a refused upload or a missing `--env` variable exit 2 (`uft_ray.cli_common`).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from uft_ray import api
from uft_ray.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, config_error, err
from uft_ray.config import ConfigError


def _cluster_call(fn) -> int:
    """Run a job-API call; a cluster that cannot be reached or refuses us is a failure (1), not a traceback."""
    try:
        return fn()
    except ConfigError as e:
        return config_error(e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if isinstance(e, ValueError):  # too-large upload, a missing --env variable, a URI working dir
            err(f"refused: {e}")
            return EXIT_USAGE
        err(f"{type(e).__name__}: {e}")
        return EXIT_FAILED


def _follow(handle: Any) -> int:
    try:
        for chunk in handle.follow():
            print(chunk, end="", flush=True)
    except KeyboardInterrupt:
        err(f"\nstopped following; job {handle.job_id} keeps running. `uft-ray stop {handle.job_id}` stops it.")
        return 130
    st = handle.wait(timeout=60)
    print(f"\njob {handle.job_id}: {st}")
    return EXIT_OK if st == "SUCCEEDED" else EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    def go() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            h = api.submit(
                args.config,
                address=args.address,
                working_dir=args.working_dir,
                overrides=args.overrides,
                env=args.env,
                runtime_env=args.runtime_env,
                excludes=args.exclude,
                includes=args.include,
                submission_id=args.submission_id,
                verbose=args.verbose,
            )
        for w in caught:
            if issubclass(w.category, UserWarning):
                err(f"warning: {w.message}")
        addr = f" --address {args.address}" if args.address else ""
        print(f"submitted job {h.job_id} to {h.address}")
        print(
            f"  uft-ray status {h.job_id}{addr}   uft-ray logs {h.job_id}{addr} --follow   uft-ray stop {h.job_id}{addr}"
        )
        if args.no_wait:
            return EXIT_OK
        return _follow(h)

    return _cluster_call(go)


def cmd_status(args: argparse.Namespace) -> int:
    def go() -> int:
        info = api.job(args.job_id, args.address).info()
        print(f"{args.job_id}: {info.status.value}")
        if info.message:
            print(f"  {info.message}")
        if info.entrypoint:
            print(f"  entrypoint: {info.entrypoint}")
        return EXIT_OK

    return _cluster_call(go)


def cmd_logs(args: argparse.Namespace) -> int:
    def go() -> int:
        h = api.job(args.job_id, args.address)
        if args.follow:
            return _follow(h)
        print(h.logs(), end="")
        return EXIT_OK

    return _cluster_call(go)


def cmd_stop(args: argparse.Namespace) -> int:
    def go() -> int:
        h = api.job(args.job_id, args.address)
        if not h.stop():
            print(f"{args.job_id}: not running ({h.status()})")
            return EXIT_OK
        st = h.wait(timeout=args.timeout) if args.wait else "stop requested"
        print(f"{args.job_id}: {st}")
        return EXIT_OK

    return _cluster_call(go)
