"""``normkit build``: compile the native CPU kernels ahead of time and print which backend serves each op.

The kernels are otherwise built on first use (one line on stderr while compiling); ``make demo`` and
``make test`` run this first so that no test or demo pays the build. Exit status 0 when built, 1 when they
cannot be built here (no compiler: normkit then runs its eager path, which computes the same results).
"""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args) -> int:
    from . import _native

    try:
        status = _native.build(force=args.force)
    except RuntimeError as exc:
        print(f"normkit build: {exc} (the eager path runs instead; it computes the same results)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        for key, value in status.items():
            if key != "ops" or value:  # the path each op took: none ran in this command
                print(f"{key}: {value}")
    return 0
