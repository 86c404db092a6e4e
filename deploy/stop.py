"""``tandem stop``: drain the launched router, then kill it and every worker of the namespace.

In-flight streams get ``--grace`` seconds to finish; those still running then are cancelled and
their clients see the call end with an error status (never a silently truncated stream).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    p.add_argument("--namespace", default="tandem", help="the namespace tandem launch used")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight streams get to finish")


def run(args: argparse.Namespace) -> int:
    from deploy.cluster import stop

    try:
        stopped = stop(address=args.address, namespace=args.namespace, grace=args.grace)
    except ConnectionError as e:
        print(f"tandem stop: cannot reach the Ray cluster: {e}", file=sys.stderr)
        return 1
    none = f"nothing (no Tandem actors in namespace {args.namespace!r})"
    print(f"stopped: {' '.join(stopped) or none}")
    return 0
