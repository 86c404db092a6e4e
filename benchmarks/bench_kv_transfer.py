"""``tandem kv-bench``: paged-KV transfer between two processes, NIXL and ucxx side by side.

In the spirit of ucx_perftest / nixlbench, but on KV shapes: a model preset fixes layers, KV heads,
head dim and dtype; block size and tokens per request fix the blocks per request. For each
(backend, transport) a receiver and a sender process are spawned; for each case the bench measures

- the protocol: reservations, per-layer (or whole-request) messages with digests, commit and ack;
- the raw transfer: the same bytes per request with the backend's bare primitive (kv_transfer_peer.py);
- the ceiling: a plain memory copy of the same bytes, in this run.

Receiver block ids are either ``contiguous`` (one descriptor per layer) or ``scattered`` (every
block its own run: one descriptor per block per layer) to show what descriptor count costs.
``--kv-dtypes`` repeats it for other KV caches: fp8_e4m3 / int8 rows (engine/kv_quant.py) move as
bytes with their scales, so a request moves half a bf16 request's bytes (plus 4 per row).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import numpy as np

from engine.kv_layout import KVLayout

PRESETS = {  # layers, KV heads, head dim, dtype (latent: MLA's one plane of kv_lora_rank + rope)
    "tiny": KVLayout(2, 2, 64, 16, "bfloat16"),
    "llama-3-8b": KVLayout(32, 8, 128, 16, "bfloat16"),
    "llama-3-70b": KVLayout(80, 8, 128, 16, "bfloat16"),
    "deepseek-v3-16b": KVLayout(27, 1, 512 + 64, 16, "bfloat16", latent=True),
    "deepseek-v3": KVLayout(61, 1, 512 + 64, 16, "bfloat16", latent=True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        nargs="+",
        choices=sorted(PRESETS),
        default=["llama-3-8b"],
        help="KV shapes, one set of rows each (deepseek-v3*: MLA latent blocks)",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--kv-dtypes",
        nargs="+",
        choices=["auto", "float32", "bfloat16", "fp8_e4m3", "int8"],
        default=["auto"],
        help="KV caches to move (auto: the preset's bf16); fp8_e4m3 / int8 rows carry their scales",
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="tokens per request")
    parser.add_argument("--modes", nargs="+", choices=["layer", "whole"], default=["layer", "whole"])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "scattered"], default=["contiguous"])
    parser.add_argument("--backends", nargs="+", choices=["nixl", "ucxx"], default=["nixl", "ucxx"])
    parser.add_argument("--transports", nargs="+", choices=["shm", "tcp", "auto"], default=["shm", "tcp"])
    parser.add_argument(
        "--digests",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="off: no integrity check (to cost it)",
    )
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--iters", type=int, default=8, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--calibration", metavar="FILE", help="write bandwidth per transport (JSON) for the router"
    )


def memcpy_gbps(nbytes: int, reps: int = 7) -> float:
    """Median GB/s of a plain copy of ``nbytes`` between two warm buffers."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class _Pair:
    """A receiver and a sender process for one (backend, transport)."""

    def __init__(self, backend: str, transport: str, layout: KVLayout, num_blocks: int) -> None:
        from benchmarks import kv_transfer_peer

        ctx = mp.get_context("spawn")  # UCX must not be initialised before a fork
        self.rx, rx_child = ctx.Pipe()
        self.tx, tx_child = ctx.Pipe()
        args = (backend, transport, layout, num_blocks)
        self.procs = [
            ctx.Process(target=kv_transfer_peer.receiver_main, args=(rx_child, *args), daemon=True),
            ctx.Process(target=kv_transfer_peer.sender_main, args=(tx_child, *args), daemon=True),
        ]
        for p in self.procs:
            p.start()
        self.call(self.rx, None)
        self.call(self.tx, None)

    def call(self, conn: Any, msg: Any, timeout_s: float = 120.0) -> Any:
        if msg is not None:
            conn.send(msg)
        if not conn.poll(timeout_s):
            raise TimeoutError(f"bench process gave no answer in {timeout_s} s")
        return conn.recv()

    def close(self) -> None:
        for conn in (self.rx, self.tx):
            with contextlib.suppress(Exception):
                self.call(conn, ("stop", None), 10.0)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _case(
    pair: _Pair,
    layout: KVLayout,
    nblocks: int,
    conc: int,
    mode: str,
    scattered: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    req_bytes = layout.num_layers * nblocks * layout.layer_block_bytes
    # receiver blocks: request c owns nblocks of them; scattered = every other block, reversed
    dsts = []
    for c in range(conc):
        ids = list(range(c * nblocks, (c + 1) * nblocks))
        dsts.append(ids[::2][::-1] + ids[1::2][::-1] if scattered else ids)
    srcs = [list(range(c * nblocks, (c + 1) * nblocks)) for c in range(conc)]
    lat: list[float] = []
    walls: list[float] = []
    raw_walls: list[float] = []
    ceilings: list[float] = []
    msgs = 0
    # protocol, raw and memcpy alternate within each iteration, so that all three see the same
    # load on a shared machine
    for it in range(args.warmup + args.iters):
        rids = [f"i{it}-c{c}" for c in range(conc)]
        dests = pair.call(pair.rx, ("reserve", list(zip(rids, dsts, strict=True))))
        wall, l_, m = pair.call(pair.tx, ("send", (dests, srcs, mode)))
        failed = {r: why for r, why in pair.call(pair.rx, ("wait", rids)).items() if why}
        if failed:
            raise RuntimeError(f"transfer failed: {failed}")
        dest = pair.call(pair.rx, ("raw_expect", (conc, req_bytes)))
        raw_wall, _ = pair.call(pair.tx, ("raw", (dest, req_bytes, conc)))
        if it >= args.warmup:
            walls.append(wall)
            raw_walls.append(raw_wall)
            lat += l_
            msgs = m[0]
            ceilings.append(memcpy_gbps(req_bytes, reps=3))
    # the last raw transfer overwrote the receiver's pool: check one fresh protocol transfer
    rids = ["verify"]
    dests = pair.call(pair.rx, ("reserve", [("verify", dsts[0])]))
    pair.call(pair.tx, ("send", (dests, srcs[:1], mode)))
    pair.call(pair.rx, ("wait", rids))
    if pair.call(pair.rx, ("digest", dsts[0])) != pair.call(pair.tx, ("digest", srcs[0])):
        raise RuntimeError("received bytes differ from the sent bytes")
    gbps = conc * req_bytes / statistics.median(walls) / 1e9
    raw = conc * req_bytes / statistics.median(raw_walls) / 1e9
    ceiling = statistics.median(ceilings)
    runs = nblocks if scattered else 1
    return {
        "layout": "scattered" if scattered else "contiguous",
        "mode": mode,
        "tokens": nblocks * layout.block_size,
        "bytes_per_request": req_bytes,
        "descriptors_per_request": layout.num_layers * runs,
        "messages_per_request": msgs,
        "concurrency": conc,
        "gbps": round(gbps, 3),
        "raw_gbps": round(raw, 3),
        "ceiling_gbps": round(ceiling, 3),
        "ratio_to_ceiling": round(gbps / ceiling, 3),
        "protocol_overhead": round(1 - gbps / raw, 3),
        "p50_ms": round(1e3 * _pct(lat, 0.5), 3),
        "p99_ms": round(1e3 * _pct(lat, 0.99), 3),
    }


def kv_layout(p: KVLayout, block_size: int, kv: str) -> KVLayout:
    """The preset's KV as ``kv`` holds it: a float dtype, or fp8_e4m3 / int8 codes and scales."""
    if kv in ("fp8_e4m3", "int8"):
        return dataclasses.replace(p, block_size=block_size, kv_dtype=kv)
    return dataclasses.replace(p, block_size=block_size, dtype=p.dtype if kv == "auto" else kv)


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for model in args.model:
        for kv in args.kv_dtypes:
            _run_layout(args, model, kv_layout(PRESETS[model], args.block_size, kv), rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
    if args.calibration:
        with open(args.calibration, "w") as f:
            json.dump(calibration(rows), f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


def _run_layout(args: argparse.Namespace, model: str, layout: KVLayout, rows: list[dict[str, Any]]) -> None:
    max_blocks = max(layout.blocks_for(t) for t in args.tokens)
    per_token = layout.num_layers * layout.layer_block_bytes // layout.block_size
    for backend in args.backends:
        for transport in args.transports:
            base = {"backend": backend, "transport": transport, "model": model}
            base |= {"kv_cache": layout.cache_dtype, "kv_bytes_per_token": per_token}
            try:
                pair = _Pair(backend, transport, layout, max_blocks * args.concurrency)
            except Exception as e:
                rows.append({**base, "error": f"{type(e).__name__}: {e}"})
                continue
            try:
                cases = [
                    (tokens, lay == "scattered", mode, dig == "on")
                    for tokens in args.tokens
                    for lay in args.layouts
                    for dig in args.digests
                    for mode in args.modes
                ]
                for tokens, scattered, mode, digests in cases:
                    nb = layout.blocks_for(tokens)
                    pair.call(pair.rx, ("digests", digests))
                    pair.call(pair.tx, ("digests", digests))
                    try:
                        row = _case(pair, layout, nb, args.concurrency, mode, scattered, args)
                        rows.append({**base, "digests": digests, **row})
                    except Exception as e:
                        rows.append(
                            {**base, "mode": mode, "tokens": tokens, "error": f"{type(e).__name__}: {e}"}
                        )
                    if not args.json:
                        print(_row(rows[-1]), file=sys.stderr, flush=True)
            finally:
                pair.close()


def calibration(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bandwidth per transport for the router's cost model: the default backend's best large-request
    protocol figure (NIXL if measured), in GB/s, with the per-request latency at that size."""
    out: dict[str, Any] = {}
    for r in rows:
        if "error" in r or not r["digests"]:
            continue
        cur = out.get(r["transport"])
        key = (r["backend"] == "nixl", r["bytes_per_request"], r["gbps"])
        if cur is None or key > cur["_key"]:
            out[r["transport"]] = {
                "_key": key,
                "backend": r["backend"],
                "gbps": r["gbps"],
                "bytes_per_request": r["bytes_per_request"],
                "p50_ms": r["p50_ms"],
            }
    for v in out.values():
        del v["_key"]
    return {"transports": out, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


_COLS = [
    ("model", "{}"),
    ("kv_cache", "{}"),
    ("kv_bytes_per_token", "{}"),
    ("backend", "{}"),
    ("transport", "{}"),
    ("mode", "{}"),
    ("layout", "{}"),
    ("digests", "{}"),
    ("tokens", "{}"),
    ("bytes_per_request", "{}"),
    ("descriptors_per_request", "{}"),
    ("messages_per_request", "{}"),
    ("gbps", "{:.2f}"),
    ("raw_gbps", "{:.2f}"),
    ("ceiling_gbps", "{:.2f}"),
    ("ratio_to_ceiling", "{:.2f}"),
    ("protocol_overhead", "{:+.2f}"),
    ("p50_ms", "{:.2f}"),
    ("p99_ms", "{:.2f}"),
]
_HEAD = [
    "model",
    "kv",
    "B/token",
    "backend",
    "tport",
    "mode",
    "layout",
    "digests",
    "tokens",
    "MiB/req",
    "desc",
    "msgs",
    "GB/s",
    "raw",
    "memcpy",
]
_HEAD += ["ratio", "overhd", "p50 ms", "p99 ms"]


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return (
            f"{r['backend']} {r['transport']} {r.get('mode', '')} {r.get('tokens', '')}: ERROR {r['error']}"
        )
    cells = []
    for key, fmt in _COLS:
        v = r[key] / 2**20 if key == "bytes_per_request" else r[key]
        cells.append(f"{v:.0f}" if key == "bytes_per_request" else fmt.format(v))
    return "  ".join(f"{c:>8}" for c in cells)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["  ".join(f"{h:>8}" for h in _HEAD)]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)
