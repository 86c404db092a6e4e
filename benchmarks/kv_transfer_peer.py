"""The two processes of ``tandem kv-bench``: a receiver that polls all the time and answers
commands between polls, and a sender that runs timed batches. Each is started by spawn, sets its
UCX environment through ``make_transport`` before UCX is touched, and talks to the bench over a Pipe.

Besides the protocol (KVReceiver / KVSender), both run the *raw* transfer the protocol is compared
with: the same bytes with the same backend's bare primitive, one contiguous piece per request and no
header, digest or ack (NIXL: one WRITE, completion seen by the sender; ucxx: one tag message).
"""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.kv_layout import KVLayout
from kv_transfer.base import idle
from kv_transfer.factory import make_transport
from kv_transfer.transport import Completed, KVDestination

TAG_RAW = 0x4B5654_10
TAG_RAW_ACK = 0x4B5654_11


def _quiet() -> None:
    """Worker output (NIXL's INFO lines, UCX warnings) goes to stderr: stdout carries --json."""
    os.dup2(2, 1)
    logging.getLogger("nixl_cu12").setLevel(logging.WARNING)
    os.environ.setdefault("UCX_NET_DEVICES", "lo")


def receiver_main(conn: Connection, backend: str, transport: str, layout: KVLayout, num_blocks: int) -> None:
    _quiet()
    kv = layout.allocate(num_blocks)  # (L, N, 2, H_kv, B, D), zeroed: pages touched before timing
    rx: Any = make_transport(backend, transport).receiver(kv)
    flat = rx.pool.flat
    done: dict[str, str] = {}
    raw_left, raw_size = 0, 0
    conn.send(("ready", rx.name))
    spins = 0
    while True:
        spins += 1
        idle(spins)
        if raw_left:
            got = _raw_receive(rx, backend, flat, raw_left, raw_size)
            raw_left -= got
            spins = 0 if got else spins
        else:
            for r in rx.poll():
                done[r.request_id] = "" if isinstance(r, Completed) else r.reason
                rx.release(r.request_id)
                spins = 0
        if not conn.poll(0):
            continue
        cmd, arg = conn.recv()
        spins = 0
        if cmd == "reserve":
            conn.send([rx.reserve(rid, ids, layout.num_layers, 60.0) for rid, ids in arg])
        elif cmd == "wait":
            end = time.monotonic() + 60.0
            while not all(rid in done for rid in arg) and time.monotonic() < end:
                spins += 1
                idle(spins)
                for r in rx.poll():
                    done[r.request_id] = "" if isinstance(r, Completed) else r.reason
                    rx.release(r.request_id)
                    spins = 0
            conn.send({rid: done.pop(rid, "not finished in 60 s") for rid in arg})
        elif cmd == "raw_expect":
            raw_left, raw_size = arg
            conn.send(rx.reserve("raw-probe", [0], layout.num_layers, 60.0))
            rx.release("raw-probe")
        elif cmd == "digest":
            conn.send(rx.pool.digest(rx.pool.regions(range(layout.num_layers), arg)))
        elif cmd == "digests":  # off: measure the protocol without integrity checks
            rx.require_digest = arg
            conn.send(arg)
        elif cmd == "stop":
            rx.close()
            conn.send("stopped")
            return


def _raw_receive(rx: Any, backend: str, flat: torch.Tensor, left: int, size: int) -> int:
    """Take raw transfers that have arrived and ack each; returns how many."""
    n = 0
    if backend == "nixl":
        for sender, msgs in rx.agent.get_new_notifs().items():
            for m in msgs:
                if m.startswith(b"RAW"):
                    if sender not in rx._senders:
                        continue
                    rx.agent.send_notif(sender, b"RAWACK")
                    n += 1
        return n
    probe = rx.w.probe(TAG_RAW)
    if probe is not None:
        off = (left - 1) * size
        rx.w.recv(probe, flat[off : off + size])
        (sender,) = rx.w.endpoints
        rx.w.send_small(sender, TAG_RAW_ACK, b"RAWACK")
        n = 1
    rx.w.progress()
    return n


def sender_main(conn: Connection, backend: str, transport: str, layout: KVLayout, num_blocks: int) -> None:
    _quiet()
    kv = layout.allocate(num_blocks)
    g = torch.Generator().manual_seed(0)
    kv.view(torch.uint8).copy_(
        torch.randint(0, 256, kv.view(torch.uint8).shape, generator=g, dtype=torch.uint8)
    )
    tx: Any = make_transport(backend, transport).sender(kv)
    conn.send(("ready", tx.name))
    while True:
        cmd, arg = conn.recv()
        if cmd == "send":
            conn.send(_send(tx, layout, *arg))
        elif cmd == "raw":
            conn.send(_raw(tx, backend, *arg))
        elif cmd == "digest":
            conn.send(tx.pool.digest(tx.pool.regions(range(layout.num_layers), arg)))
        elif cmd == "digests":
            tx.digests = arg
            conn.send(arg)
        elif cmd == "stop":
            tx.close()
            conn.send("stopped")
            return


def _send(
    tx: Any, layout: KVLayout, dests: list[KVDestination], srcs: list[list[int]], mode: str
) -> tuple[float, list[float], list[int]]:
    """Send a batch of concurrent requests; returns (wall s, per-request latency s, messages)."""
    t0 = time.perf_counter()
    if mode == "whole":
        for d, s in zip(dests, srcs, strict=True):
            tx.send_layer(d, 0, s, num_layers=layout.num_layers)
    else:
        for layer in range(layout.num_layers):
            for d, s in zip(dests, srcs, strict=True):
                tx.send_layer(d, layer, s)
    lat, msgs = [], []
    for d in dests:
        msgs.append(tx.finish(d, 60.0))
        lat.append(time.perf_counter() - t0)
    return time.perf_counter() - t0, lat, msgs


def _raw(tx: Any, backend: str, dest: KVDestination, size: int, count: int) -> tuple[float, list[float]]:
    """``count`` concurrent raw transfers of ``size`` contiguous bytes, each acked by the receiver
    (the least any transfer needs before the receiver may use the bytes); (wall s, latency s each)."""
    import numpy as np

    t0 = time.perf_counter()
    lat: list[float] = []
    p = tx.pool
    tx._connect(dest)
    if backend == "nixl":
        remote_name = tx._remotes[dest.receiver].name
        handles = []
        for c in range(count):
            local = np.array([(p.base_addr + c * size, size, 0)], dtype=np.uint64)
            remote = np.array([(dest.base_addr + c * size, size, 0)], dtype=np.uint64)
            descs = tx.agent.get_xfer_descs(local, "DRAM"), tx.agent.get_xfer_descs(remote, "DRAM")
            h = tx.agent.initialize_xfer("WRITE", *descs, remote_name, b"RAW%d" % c)
            if tx.agent.transfer(h, b"RAW%d" % c) == "ERR":
                raise RuntimeError("raw NIXL WRITE failed")
            handles.append(h)
        acks = spins = 0
        while acks < count:
            spins += 1
            idle(spins)  # as KVSender.finish does, so both wait alike
            for h in handles:  # NIXL sends a WRITE's notification when it sees the WRITE complete
                tx.agent.check_xfer_state(h)
            for msgs in tx.agent.get_new_notifs().values():
                for m in msgs:
                    if m == b"RAWACK":
                        acks += 1
                        lat.append(time.perf_counter() - t0)
        for h in handles:
            while tx.agent.check_xfer_state(h) == "PROC":
                pass
            tx.agent.release_xfer_handle(h)
    else:
        from kv_transfer.ucxx_backend import _array

        ep = tx.w.endpoints[dest.receiver]
        reqs = [
            ep.tag_send(_array(p.flat[c * size : (c + 1) * size]), tx.w.ucx.UCXXTag(TAG_RAW))
            for c in range(count)
        ]
        spins = 0
        while len(lat) < count:
            spins += 1
            idle(spins)
            tx.w.progress()
            if (probe := tx.w.probe(TAG_RAW_ACK)) is not None:
                tx.w.recv_small(probe)
                lat.append(time.perf_counter() - t0)
        for r in reqs:
            r.check_error()
    return time.perf_counter() - t0, lat
