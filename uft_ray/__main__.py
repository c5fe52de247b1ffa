"""`python -m uft_ray ...` is `uft-ray ...` (see uft_ray/cli.py)."""

import sys

from uft_ray.cli import main

sys.exit(main())
