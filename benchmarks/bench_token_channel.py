"""``tandem bench token-channel``: how a decode worker's tokens should reach the router, measured.

A Ray actor stands in for a decode worker: a step loop that, every ``--step-ms``, produces one token
for each of N running requests (stamped with ``time.monotonic()``: one clock per host). The router
side (this process, asyncio) receives them three ways, and the table says, per way and N, how late
a token arrives (p50 / p99 from its step to the router) and what the router's process spends per
1,000 tokens (its CPU time: the event loop is the router's scarce resource)::

    stream     one Ray streaming generator per worker: one message per step with every request's
               tokens (what decode_pool/pool.py does)
    per-call   one Ray long-poll call per request, each returning that request's tokens since its
               last call (what the decode worker did before: ``DecodeHandle.take``)
    zmq        one ZeroMQ PUSH socket per worker to a PULL socket in the router, one message per
               step (vLLM's engine core does this); only when pyzmq is installed

The worker side pays too: the per-call way wakes one Ray call per request per step.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import threading
import time
from typing import Any

from benchmarks.serve_workload import percentile


class Producer:
    """The fake decode worker: a step loop producing (request, token, stamp) for N requests."""

    def __init__(self, n: int, step_s: float, steps: int) -> None:
        self.n, self.step_s, self.steps = n, step_s, steps
        self.cv = threading.Condition()
        self.box: list[tuple[int, int, float]] = []  # every request's tokens, for the stream / zmq
        self.per: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # per request, for per-call
        self.done = False
        self.zmq_addr: str | None = None

    def run(self, with_zmq: bool = False) -> None:
        threading.Thread(target=self._loop, args=(with_zmq,), daemon=True).start()

    def _loop(self, with_zmq: bool) -> None:
        sock: Any = None
        if with_zmq:
            import zmq

            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.connect(self.zmq_addr or "")
        for step in range(self.steps):
            time.sleep(self.step_s)
            now = time.monotonic()
            batch = [(r, step, now) for r in range(self.n)]
            if sock is not None:
                sock.send(pickle.dumps(batch))
                continue
            with self.cv:
                self.box += batch
                for r in range(self.n):
                    self.per[r].append((step, now))
                self.cv.notify_all()
        with self.cv:
            self.done = True
            self.cv.notify_all()
        if sock is not None:
            sock.send(pickle.dumps(None))

    def set_zmq(self, addr: str) -> None:
        self.zmq_addr = addr

    def stream(self) -> Any:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.box or self.done, 1.0)
                out, self.box = self.box, []
                done = self.done
            if out:
                yield out
            if done:
                return

    def take(self, r: int, timeout_s: float) -> tuple[list[tuple[int, float]], bool]:
        with self.cv:
            self.cv.wait_for(lambda: self.per[r] or self.done, timeout_s)
            out, self.per[r] = self.per[r], []
            return out, self.done and not out


async def _run(way: str, n: int, step_s: float, steps: int) -> dict[str, float]:
    import ray

    actor: Any = ray.remote(Producer).options(max_concurrency=n + 8, num_cpus=0).remote(n, step_s, steps)
    lat: list[float] = []
    cpu0 = time.process_time()
    if way == "stream":
        gen = actor.stream.options(num_returns="streaming").remote()
        actor.run.remote()
        async for ref in gen:
            now = time.monotonic()
            lat += [now - t for _, _, t in await ref]
    elif way == "per-call":
        actor.run.remote()

        async def one(r: int) -> None:
            while True:
                got, done = await actor.take.remote(r, 1.0)
                now = time.monotonic()
                lat.extend(now - t for _, t in got)
                if done:
                    return

        await asyncio.gather(*(one(r) for r in range(n)))
    else:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.PULL)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        await actor.set_zmq.remote(f"tcp://127.0.0.1:{port}")
        actor.run.remote(True)
        while (msg := pickle.loads(await sock.recv())) is not None:
            now = time.monotonic()
            lat += [now - t for _, _, t in msg]
        sock.close()
    cpu = time.process_time() - cpu0
    ray.kill(actor)
    return {
        "tokens": len(lat),
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "router_cpu_ms_per_1k_tokens": cpu / max(1, len(lat)) * 1e6,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default="16,64", help="requests running at once (comma-separated)")
    p.add_argument("--step-ms", type=float, default=20.0, help="the fake worker's step time")
    p.add_argument("--steps", type=int, default=250)


def run(args: argparse.Namespace) -> int:
    import ray

    from engine.kernels.native import describe_host

    try:
        import zmq  # noqa: F401

        ways = ["stream", "per-call", "zmq"]
    except ImportError:
        ways = ["stream", "per-call"]
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    rows = []
    try:
        for n in [int(x) for x in args.streams.split(",")]:
            for way in ways:
                r = asyncio.run(_run(way, n, args.step_ms / 1e3, args.steps))
                rows.append((way, n, r))
                print(f"  {way} N={n}: {r}", file=sys.stderr)
    finally:
        ray.shutdown()
    print(f"host: {describe_host()}")
    print(
        f"a fake worker stepping every {args.step_ms:g} ms, {args.steps} steps, a token per request per step"
    )
    print("| way | streams | tokens | latency p50 ms | p99 ms | router CPU ms / 1k tokens |")
    print("|---|---|---|---|---|---|")
    for way, n, r in rows:
        print(
            f"| {way} | {n} | {r['tokens']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['router_cpu_ms_per_1k_tokens']:.1f} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench token-channel", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
