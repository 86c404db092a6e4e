"""``tandem fetch-model [smollm2]``: fetch the default model into the cache ahead of first use."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default="smollm2", choices=["smollm2"], help="the model to fetch")


def run(args: argparse.Namespace) -> int:
    from engine.smollm2 import FetchError, smollm2_path

    try:
        path = smollm2_path()
    except FetchError as e:
        print(f"tandem fetch-model: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
