"""Routing glue: the pools' load reports and the metadata store's block index -> a policy's decision.

Per request (``Router.route``)::

    prompt ids --engine.block_hash--> full-block hash chain (model fingerprint, block size)
    store.find_blocks(chain) --prefix_lengths--> {worker: leading blocks it holds}
    load reports (+ this router's own in-flight count) --> cost_model.Candidate per live worker
    policy(RoutingRequest, loads, ctx) --> RouteDecision (prefill worker | None, decode worker)

The block index: stores are recorded by the router (as SGLang's router does), evictions come from
the workers. ``commit`` records the prompt's full blocks as stored (G1) at the decode worker it
routed to, and at the prefill worker of a disaggregated route (both keep them in their prefix
cache); ``forget`` removes the blocks a worker's engine reports evicted (its BlockManager's
``on_evict``, drained by the pools backend). Between an eviction and its report an entry is stale;
the cost of a stale entry is one request priced as a hit that recomputes its prefix. With Redis the
index outlives a router restart.

Load between reports: a decode worker that runs a colocated prefill shares its steps with its
running batch, so its prefill rate is priced as ``rate / (1 + running)``, where ``running`` is the
larger of its report and the requests this router has routed there and not seen finish (reports lag
a burst of arrivals). Without that, equal-cost ties always went to the smallest worker id.

Pure: no torch, ray or grpc. Lifecycle: construct -> route / commit / release per request.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_hash import BlockHash, hash_blocks
from memory_tiers.metadata import BlockEvent, EventKind, MetadataStore, Tier, prefix_lengths
from pool_runtime.reports import WorkerLoad
from router.cost_model import Candidate, CostParams, RoutingRequest, tp_speedup
from router.policies import RouteDecision, RoutingContext, get_policy
from router.topology import Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """One request's routing: the decision and what it was computed from (for spans and tests)."""

    decision: RouteDecision
    block_hashes: list[BlockHash]
    cached_blocks: dict[str, int]  # worker -> leading prompt blocks the index says it holds
    policy: str


@dataclass(slots=True)
class Router:
    store: MetadataStore
    fingerprint: str
    params: CostParams
    topology: Topology = field(default_factory=Topology)
    policy: str = "cost_model"
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _in_flight: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        get_policy(self.policy)  # unknown names fail at construction, not on the first request

    @property
    def block_size(self) -> int:
        return self.params.block_size

    def in_flight(self, worker_id: str) -> int:
        return self._in_flight[worker_id]

    def policy_loads(self, reports: Sequence[WorkerLoad]) -> list[Candidate]:
        """The policy's view of each reporting worker (see the module docstring for ``running``)."""
        out = []
        for r in reports:
            running = max(r.running + r.waiting, self._in_flight[r.worker_id])
            rate = self.params.default_prefill_tokens_per_s * tp_speedup(r.tensor_parallel_size, self.params)
            if r.role == "decode":
                rate /= 1 + running
            out.append(
                Candidate(
                    worker_id=r.worker_id,
                    role=r.role,
                    queue_tokens=r.queue_tokens,
                    running_seqs=running,
                    free_blocks={"G1": r.free_blocks, "G2": r.g2_free_blocks},
                    prefill_tokens_per_s=rate,
                    tensor_parallel_size=r.tensor_parallel_size,
                )
            )
        return out

    def route(self, prompt_ids: Sequence[int], disaggregation: str, reports: Sequence[WorkerLoad]) -> Route:
        """Decide where a prompt goes. Raises policies.NoRouteError (no worker / no room)."""
        hashes = hash_blocks(prompt_ids, self.block_size, self.fingerprint)
        cached = prefix_lengths(self._find_blocks(hashes)) if hashes else {}
        req = RoutingRequest(len(prompt_ids), hashes, cached, disaggregation)
        ctx = RoutingContext(self.topology, self.params, turn=next(self._turn))
        decision = get_policy(self.policy)(req, self.policy_loads(reports), ctx)
        return Route(decision, hashes, cached, self.policy)

    def _find_blocks(self, hashes: Sequence[BlockHash]) -> list[dict[str, Tier]]:
        """Who holds each block; nobody when the store cannot answer (Redis down or restarting):
        the request is routed without prefix hints instead of failing (found by the chaos suite)."""
        try:
            return self.store.find_blocks(hashes)
        except Exception as e:
            log.warning("metadata store unavailable, routing without prefix hints: %s", e)
            return [{} for _ in hashes]

    def _publish(self, events: list[BlockEvent]) -> None:
        """Index events; lost when the store cannot take them (it recovers as blocks are stored again)."""
        try:
            self.store.publish(events)
        except Exception as e:
            log.warning("metadata store unavailable, %d block events not indexed: %s", len(events), e)

    def commit(self, route: Route) -> None:
        """The request is on its way: count it in flight and index its blocks at its workers."""
        d = route.decision
        self._in_flight[d.decode_worker] += 1
        holders = [d.decode_worker] + ([d.prefill_worker] if d.prefill_worker else [])
        events = [
            BlockEvent(EventKind.STORED, w, Tier.G1, h)
            for w in holders
            for i, h in enumerate(route.block_hashes)
            if route.cached_blocks.get(w, 0) <= i  # what it already holds is indexed already
        ]
        if events:
            self._publish(events)

    def forget(self, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        """``worker_id`` evicted these blocks: drop them from the index."""
        if hashes:
            self._publish([BlockEvent(EventKind.REMOVED, worker_id, Tier.G1, h) for h in hashes])

    def release(self, route: Route) -> None:
        """The request left its decode worker (finished, failed or cancelled)."""
        w = route.decision.decode_worker
        self._in_flight[w] -= 1
        if self._in_flight[w] <= 0:
            del self._in_flight[w]


def span_attributes(route: Route) -> dict[str, str | int | float | bool]:
    """The decision as OpenTelemetry attributes (``tandem.route.*``)."""
    d = route.decision
    return {
        "tandem.route.policy": route.policy,
        "tandem.route.prefill_worker": d.prefill_worker or "",
        "tandem.route.decode_worker": d.decode_worker,
        "tandem.route.disaggregate": d.disaggregate,
        "tandem.route.predicted_ttft_s": d.predicted_ttft_s,
        "tandem.route.cached_tokens": d.cached_tokens,
        "tandem.route.kv_bytes": d.kv_bytes,
        "tandem.route.prompt_blocks": len(route.block_hashes),
        "tandem.route.reason": d.reason,
    }
