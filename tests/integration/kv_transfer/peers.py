"""A peer process for the KV transfer tests: holds a receiver or a sender and runs commands sent
over a multiprocessing Pipe, so one spawned process (torch + UCX start-up is seconds) serves many
test cases. Started with the "spawn" method: UCX must not be initialised before a fork."""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.kv_layout import KVLayout
from kv_transfer.factory import make_transport
from kv_transfer.protocol import KVTransferError
from kv_transfer.transport import Completed, HeadSlice, KVDestination


@dataclass
class State:
    backend: str
    transport: str
    layout: KVLayout | None = None
    kv: torch.Tensor | None = None
    rx: Any = None
    tx: Any = None
    results: dict[str, tuple[str, str]] = field(default_factory=dict)


def _pool(state: State, layout: dict[str, Any], num_blocks: int) -> torch.Tensor:
    state.layout = KVLayout(**layout)
    return state.layout.allocate(num_blocks)


def setup_receiver(
    state: State, layout: dict[str, Any], num_blocks: int, capacity_blocks: int | None = None
) -> str:
    if state.rx is not None:
        state.rx.close()
    state.kv = _pool(state, layout, num_blocks)
    state.rx = make_transport(state.backend, state.transport).receiver(state.kv, capacity_blocks)
    state.results.clear()
    return state.rx.name


def setup_sender(state: State, layout: dict[str, Any], num_blocks: int, seed: int) -> str:
    if state.tx is not None:
        state.tx.close()
    kv = _pool(state, layout, num_blocks)
    g = torch.Generator().manual_seed(seed)
    # random bytes, not random floats: every bit pattern (NaN payloads included) must survive
    kv.view(torch.uint8).copy_(
        torch.randint(0, 256, kv.view(torch.uint8).shape, generator=g, dtype=torch.uint8)
    )
    state.kv = kv
    state.tx = make_transport(state.backend, state.transport).sender(kv)
    return state.tx.name


def set_chunk_bytes(state: State, nbytes: int) -> int:
    """NIXL only: cut messages over ``nbytes`` into several WRITEs (one header each); returns the
    previous limit."""
    from kv_transfer import nixl_backend

    prev = nixl_backend.CHUNK_BYTES
    nixl_backend.CHUNK_BYTES = nbytes
    return prev


def reserve(
    state: State,
    request_id: str,
    block_ids: list[int],
    deadline_s: float,
    parts: tuple[tuple[int, int], ...] = (),
) -> KVDestination:
    assert state.layout is not None
    return state.rx.reserve(request_id, block_ids, state.layout.num_layers, deadline_s, parts)


def poll_until(state: State, request_ids: list[str], timeout_s: float) -> dict[str, tuple[str, str]]:
    """Poll until every request has a result (or timeout); returns {rid: (kind, reason)}."""
    end = time.monotonic() + timeout_s
    while True:
        for r in state.rx.poll():
            if isinstance(r, Completed):
                state.results[r.request_id] = ("completed", "")
            else:
                state.results[r.request_id] = ("failed", r.reason)
        if all(rid in state.results for rid in request_ids) or time.monotonic() > end:
            return {rid: state.results.get(rid, ("pending", "")) for rid in request_ids}
        time.sleep(0.0005)


def release(state: State, request_ids: list[str]) -> int:
    for rid in request_ids:
        state.rx.release(rid)
    return state.rx.num_reserved_blocks


def num_reserved(state: State) -> int:
    return state.rx.num_reserved_blocks


def read_blocks(state: State, block_ids: list[int]) -> bytes:
    assert state.kv is not None
    return bytes(state.kv[:, block_ids].contiguous().view(torch.uint8).numpy())


def send(
    state: State,
    dests: list[KVDestination],
    src: list[list[int]],
    mode: str = "layer",
    layers: list[int] | None = None,
    finish: bool = True,
    timeout_s: float = 20.0,
    corrupt: bool = False,
    chunk_blocks: int = 0,
    heads: list[tuple[int, int, int]] | None = None,
) -> list[tuple[str, Any]]:
    """Send each dests[i] the source blocks src[i], interleaving requests layer by layer
    (mode "layer"), or all layers in one message (mode "whole"); chunk_blocks > 0 cuts each
    layer into chunks of that many blocks, as a chunked prefill does. Returns per request
    ("ok", messages) or ("err", message)."""
    assert state.layout is not None
    tx = state.tx
    tx.corrupt_after_digest = corrupt
    num_layers = state.layout.num_layers
    out: list[tuple[str, Any]] = [("ok", 0)] * len(dests)
    try:
        if mode == "whole":
            for d, s in zip(dests, src, strict=True):
                tx.send_layer(d, 0, s, num_layers=num_layers)
        else:
            for layer in layers if layers is not None else range(num_layers):
                for i, (d, s) in enumerate(zip(dests, src, strict=True)):
                    step = chunk_blocks or len(s)
                    hs = HeadSlice(*heads[i]) if heads is not None else None
                    for off in range(0, len(s), step):
                        tx.send_layer(d, layer, s[off : off + step], block_offset=off, heads=hs)
    except KVTransferError as e:  # a failed send fails (and cleans up) its request at once
        return [("err", f"{type(e).__name__}: {e}")] * len(dests)
    finally:
        tx.corrupt_after_digest = False
    if not finish:
        for d in dests:
            tx.flush(d, timeout_s)
        return out
    for i, d in enumerate(dests):
        try:
            out[i] = ("ok", tx.finish(d, timeout_s))
        except KVTransferError as e:
            out[i] = ("err", f"{type(e).__name__}: {e}")
    return out


def num_in_flight(state: State) -> int:
    return state.tx.num_in_flight


def read_src(state: State, block_ids: list[int]) -> bytes:
    assert state.kv is not None
    return bytes(state.kv[:, block_ids].contiguous().view(torch.uint8).numpy())


def read_heads(state: State, block_ids: list[int], first: int, count: int) -> bytes:
    """Heads ``[first, first + count)`` of the blocks, all layers: (L, n, 2, count, B, D) bytes."""
    assert state.kv is not None
    return bytes(state.kv[:, block_ids, :, first : first + count].contiguous().view(torch.uint8).numpy())


def pid(state: State) -> int:
    return os.getpid()


def close(state: State) -> str:
    for side in (state.rx, state.tx):
        if side is not None:
            side.close()
            side.close()  # idempotent
    return "closed"


COMMANDS = {
    f.__name__: f
    for f in (
        setup_receiver,
        setup_sender,
        set_chunk_bytes,
        reserve,
        poll_until,
        release,
        num_reserved,
        read_blocks,
        send,
        num_in_flight,
        read_src,
        read_heads,
        pid,
        close,
    )
}


def serve(conn: Connection, backend: str, transport: str) -> None:
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = State(backend, transport)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, kwargs = msg
        try:
            conn.send(("ok", COMMANDS[name](state, **kwargs)))
        except Exception as e:
            conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
