"""``tandem launch FILE``: start (or update) Tandem's pools and router on a running Ray cluster.

Joins the cluster (``--address``, else the YAML's ``ray.address``, else ``RAY_ADDRESS``, else
``auto``), creates the named, detached actors of deploy/cluster.py and returns once the router
serves; they keep running after this command exits. Launching again with the same file changes
nothing; with a changed file it replaces what changed. Prints the router's gRPC address and the
URL of its OpenAI-compatible HTTP API (``router.http``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="deployment YAML (deploy/config.py's schema)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. HEAD:6379")
    p.add_argument("--port", type=int, default=None, help="router port (overrides router.port)")
    p.add_argument(
        "--http-port", type=int, default=None, help="OpenAI HTTP API port (overrides router.http.port)"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for new workers (and their nodes)"
    )


def run(args: argparse.Namespace) -> int:
    from deploy.config import ConfigError, load_config

    try:
        cfg = load_config(args.file)
        local = Path(cfg.model).expanduser()
        if local.exists():  # here too: refuse a checkpoint the engine cannot run before any Ray call
            from deploy.derive import check_model

            check_model(cfg, local)
    except ConfigError as e:
        print(f"tandem launch: {e}", file=sys.stderr)
        return 2
    from deploy.cluster import launch

    try:
        res = launch(
            cfg, address=args.address, port=args.port, http_port=args.http_port, timeout_s=args.timeout
        )
    except ConfigError as e:  # a pool's tensor_parallel_size does not split the model
        print(f"tandem launch: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"tandem launch: cannot reach the Ray cluster: {e}", file=sys.stderr)
        return 1
    except TimeoutError:  # ray's GetTimeoutError is one
        print(
            f"tandem launch: the workers or the router did not start within {args.timeout:.0f} s: does a node"
            " offer the resources / labels the pools ask for? `tandem status` shows what runs,"
            " `tandem stop` removes it",
            file=sys.stderr,
        )
        return 1
    print(f"created: {' '.join(res.created) or '-'}")
    print(f"kept:    {' '.join(res.kept) or '-'}")
    print(f"removed: {' '.join(res.removed) or '-'}")
    print(f"router:  {res.router_address}")
    print(f"http:    {res.http_url or '-'}")
    print(f'query:   tandem generate "Hello" --server {res.router_address}')
    return 0
