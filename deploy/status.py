"""``tandem status``: the launched system's router, pools, workers, their nodes, load and tier occupancy.

Asks each named worker of the namespace (deploy/cluster.py) for its node and load directly, so it
answers even while the router is down; a worker that does not answer within a few seconds shows as
``unreachable`` (dead, restarting, or its node lost). The router's lines say what it listens on
(gRPC, HTTP with /metrics), each with TLS / mTLS and whether API keys are required.
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

ANSWER_TIMEOUT_S = 10.0


@dataclass(slots=True)
class WorkerStatus:
    name: str
    role: str
    state: str  # "alive" | "unreachable"
    node_id: str = ""
    node: str = ""  # the node's tandem/node label, else its IP
    running: int = 0
    waiting: int = 0
    queue_tokens: int = 0
    used_blocks: int = 0  # G1
    total_blocks: int = 0
    g2_used_blocks: int = 0
    g2_blocks: int = 0  # capacity; 0: no G2
    g3_used_bytes: int = 0
    g3_bytes: int = 0  # capacity; 0: no G3
    tensor_parallel_size: int = 1  # ranks (processes) per worker


@dataclass(slots=True)
class ClusterStatus:
    namespace: str
    router: dict[str, Any] = field(default_factory=dict)  # empty: no router launched
    workers: list[WorkerStatus] = field(default_factory=list)


def collect(namespace: str) -> ClusterStatus:
    """Ask the router and every worker of ``namespace`` (this process must be connected to Ray)."""
    import ray

    from deploy.cluster import ROUTER, WORKER_NAME, named_actors

    st = ClusterStatus(namespace)
    for name in named_actors(namespace):
        actor: Any = ray.get_actor(name, namespace=namespace)
        if name == ROUTER:
            try:
                st.router = ray.get(actor.info.remote(), timeout=ANSWER_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001  (shown, not raised: status must always answer)
                st.router = {"address": "", "serving": False, "error": type(e).__name__}
            continue
        m = WORKER_NAME.match(name)
        if not m:
            continue
        w = WorkerStatus(name, m.group(1), "unreachable")
        try:
            answers: list[Any] = ray.get(
                [actor.node_id.remote(), actor.node_name.remote(), actor.load.remote(), actor.tiers.remote()],
                timeout=ANSWER_TIMEOUT_S,
            )
        except Exception:  # noqa: BLE001
            st.workers.append(w)
            continue
        node_id, node, load, tiers = answers
        w.state, w.node_id, w.node = "alive", node_id, node
        w.running, w.waiting, w.queue_tokens = load.running, load.waiting, load.queue_tokens
        w.used_blocks, w.total_blocks = load.used_blocks, load.total_blocks
        w.tensor_parallel_size = load.tensor_parallel_size
        w.g2_used_blocks, w.g2_blocks, w.g3_used_bytes, w.g3_bytes = tiers
        st.workers.append(w)
    st.workers.sort(key=lambda w: (w.role != "prefill", int(w.name.rsplit("-", 1)[1])))
    return st


def format_listeners(listeners: list[dict[str, Any]]) -> list[str]:
    """One line per socket the router listens on: what, where, and how it is protected. The
    workers open no listening socket of Tandem's own: NIXL's agents run without a listen thread
    (metadata travels through Ray), UCX's transports use the devices UCX_NET_DEVICES names
    (``lo`` by default, deploy/pools.py), tensor-parallel ranks meet on 127.0.0.1."""
    out = []
    for ln in listeners:
        guard = "mTLS" if ln.get("mtls") else ("TLS" if ln.get("tls") else "plaintext")
        keys = "api-keys" if ln.get("api_keys") else "no-keys"
        extra = f"  (+{ln['metrics']})" if ln.get("metrics") else ""
        out.append(f"  listen {ln.get('name', '?'):<5} {ln.get('address', '-')}  {guard}  {keys}{extra}")
    return out


def format_table(st: ClusterStatus) -> str:
    if st.router:
        r = st.router
        head = (
            f"router   {r.get('address') or '-'}  http={r.get('http_url') or '-'}  serving={r.get('serving')}"
        )
        head += f"  in_flight={r.get('in_flight', '-')}"
        head += f"  policy={r.get('policy', '-')}  node={str(r.get('node_id', ''))[:12]}"
        for line in format_listeners(r.get("listeners", [])):
            head += "\n" + line
    else:
        head = f"router   not launched in namespace {st.namespace!r}"
    cols = (
        "POOL",
        "WORKER",
        "NODE",
        "NODE_ID",
        "STATE",
        "RUNNING",
        "WAITING",
        "QUEUE_TOK",
        "G1_BLOCKS",
        "G1_USE",
        "G2_BLOCKS",
        "G3_MIB",
        "TP",
    )
    rows = [cols]
    for w in st.workers:
        use = f"{100.0 * w.used_blocks / w.total_blocks:.1f}%" if w.total_blocks else "-"
        g2 = f"{w.g2_used_blocks}/{w.g2_blocks}" if w.g2_blocks else "-"
        g3 = f"{w.g3_used_bytes / 2**20:.1f}/{w.g3_bytes / 2**20:.0f}" if w.g3_bytes else "-"
        rows.append(
            (w.role, w.name, w.node or "-", w.node_id[:12] or "-", w.state, str(w.running), str(w.waiting),
             str(w.queue_tokens), f"{w.used_blocks}/{w.total_blocks}", use, g2, g3,
             str(w.tensor_parallel_size))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head, ""] + [
        "  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    p.add_argument("--namespace", default="tandem", help="the namespace tandem launch used")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from deploy.cluster import connect

    try:
        connect(args.address, args.namespace)
    except ConnectionError as e:
        print(f"tandem status: cannot reach the Ray cluster: {e}", file=sys.stderr)
        return 1
    st = collect(args.namespace)
    print(json.dumps(asdict(st), indent=1) if args.json else format_table(st))
    return 0 if st.router or st.workers else 3
