"""``tandem make-model``: a random-weight checkpoint with a real BPE tokenizer (engine/make_model.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from engine.make_model import ARCHS, DTYPES, PRESETS, make_model, param_shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument(
        "--quantize", default=None, choices=["fp8"], help="store the projections as block-scaled FP8 (e4m3)"
    )
    parser.add_argument(
        "--fp8-block",
        type=int,
        nargs=2,
        default=(128, 128),
        metavar=("ROWS", "COLS"),
        help="FP8 scale blocks",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a config field, e.g. --set num_hidden_layers=3 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value else int(value)
    if min(args.fp8_block) < 1:
        print(f"tandem make-model: --fp8-block must be positive, got {args.fp8_block}", file=sys.stderr)
        return 2
    out = make_model(
        args.out,
        args.preset,
        args.arch,
        args.seed,
        args.dtype,
        args.num_shards,
        overrides,
        quantization=args.quantize,
        fp8_block=tuple(args.fp8_block),
    )
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    n = sum(torch.Size(s).numel() for _, s in param_shapes(cfg))
    kind = (
        f"{args.dtype}, projections FP8 {args.fp8_block[0]}x{args.fp8_block[1]}"
        if args.quantize
        else args.dtype
    )
    print(f"wrote {cfg['architectures'][0]} ({n / 1e6:.2f}M params, {kind}) to {out}")
    return 0
