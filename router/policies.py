"""Routing policies: pure functions from (request, worker loads, context) to a :class:`RouteDecision`.

Every policy has the signature of :data:`Policy` and shares the rules that are not a matter of taste:

- only workers that can decode (role decode|both) with KV room for the prompt are decode candidates;
  none at all -> :class:`NoRouteError` (``overloaded=False``: UNAVAILABLE), none with room ->
  ``overloaded=True`` (RESOURCE_EXHAUSTED);
- a disaggregated route pairs a prefill-capable worker with a *different* decode worker;
- ``never`` routes colocated, ``always`` disaggregated (or fails), ``auto`` is the policy's choice:
  the cost model prices both, the simple policies disaggregate whenever a prefill pool exists.

Candidates are visited in worker-id order, so equal inputs always give equal decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.cost_model import (
    Candidate,
    CostParams,
    Quote,
    RoutingRequest,
    blocks_needed,
    has_kv_room,
    price_colocated,
    price_disaggregated,
)
from router.topology import Topology

MODES = ("auto", "always", "never")


class NoRouteError(RuntimeError):
    """No route exists. ``overloaded``: decode workers exist but none has KV room right now."""

    def __init__(self, reason: str, *, overloaded: bool) -> None:
        super().__init__(reason)
        self.overloaded = overloaded


@dataclass(frozen=True, slots=True)
class RouteDecision:
    prefill_worker: str | None  # None: the decode worker prefills the prompt itself
    decode_worker: str
    disaggregate: bool
    predicted_ttft_s: float
    cached_tokens: int  # prompt tokens reused at the worker that prefills
    kv_bytes: int  # predicted KV bytes moved between the two workers
    reason: str


@dataclass(frozen=True, slots=True)
class RoutingContext:
    topology: Topology
    params: CostParams
    turn: int = 0  # round robin's position; the router increments it per request


Policy = Callable[[RoutingRequest, Sequence[Candidate], RoutingContext], RouteDecision]


def _mode(req: RoutingRequest) -> str:
    if req.disaggregation not in MODES:
        raise ValueError(f"disaggregation must be one of {MODES}, got {req.disaggregation!r}")
    return req.disaggregation


def decode_candidates(
    req: RoutingRequest, workers: Sequence[Candidate], params: CostParams
) -> list[Candidate]:
    decoders = sorted((w for w in workers if w.can_decode), key=lambda w: w.worker_id)
    if not decoders:
        raise NoRouteError("no live decode worker", overloaded=False)
    roomy = [w for w in decoders if has_kv_room(req, w, params)]
    if not roomy:
        need = min(blocks_needed(req, w, params) for w in decoders)
        raise NoRouteError(f"no decode worker has KV room for {need} blocks", overloaded=True)
    return roomy


def prefill_candidates(workers: Sequence[Candidate], decode_worker: str) -> list[Candidate]:
    return sorted(
        (w for w in workers if w.can_prefill and w.worker_id != decode_worker), key=lambda w: w.worker_id
    )


def _decision(q: Quote, reason: str) -> RouteDecision:
    return RouteDecision(
        prefill_worker=q.prefill_worker,
        decode_worker=q.decode_worker,
        disaggregate=q.disaggregated,
        predicted_ttft_s=q.ttft_s,
        cached_tokens=q.cached_tokens,
        kv_bytes=q.kv_bytes,
        reason=reason,
    )


def _simple_route(
    name: str,
    req: RoutingRequest,
    d: Candidate,
    workers: Sequence[Candidate],
    ctx: RoutingContext,
    pick: Callable[[list[Candidate]], Candidate],
) -> RouteDecision:
    mode = _mode(req)
    prefills = prefill_candidates(workers, d.worker_id)
    has_pool = any(w.role == "prefill" for w in workers)
    if mode == "always" and not prefills:
        raise NoRouteError(
            f"disaggregation=always but no prefill worker besides {d.worker_id}", overloaded=False
        )
    if mode == "never" or not prefills or (mode == "auto" and not has_pool):
        return _decision(price_colocated(req, d, ctx.params), f"{name}: colocated on {d.worker_id} ({mode})")
    p = pick(prefills)
    q = price_disaggregated(req, p, d, ctx.topology, ctx.params)
    return _decision(q, f"{name}: {p.worker_id} -> {d.worker_id} ({mode})")


def round_robin(req: RoutingRequest, workers: Sequence[Candidate], ctx: RoutingContext) -> RouteDecision:
    """The ``ctx.turn``-th decode candidate (and prefill candidate) in worker-id order, cycling."""
    decoders = decode_candidates(req, workers, ctx.params)
    d = decoders[ctx.turn % len(decoders)]
    return _simple_route("round_robin", req, d, workers, ctx, lambda ps: ps[ctx.turn % len(ps)])


def least_loaded(req: RoutingRequest, workers: Sequence[Candidate], ctx: RoutingContext) -> RouteDecision:
    """Decode: fewest running sequences, then fewest queued tokens; prefill: fewest queued tokens.

    Remaining ties go to the smallest worker id.
    """
    decoders = decode_candidates(req, workers, ctx.params)
    d = min(decoders, key=lambda w: (w.running_seqs, w.queue_tokens, w.worker_id))
    pick = lambda ps: min(ps, key=lambda w: (w.queue_tokens, w.running_seqs, w.worker_id))
    return _simple_route("least_loaded", req, d, workers, ctx, pick)


def all_quotes(req: RoutingRequest, workers: Sequence[Candidate], ctx: RoutingContext) -> list[Quote]:
    """Every route the request's mode allows, priced; colocated first, then pairs in id order."""
    mode = _mode(req)
    quotes: list[Quote] = []
    for d in decode_candidates(req, workers, ctx.params):
        if mode != "always":
            quotes.append(price_colocated(req, d, ctx.params))
        if mode != "never":
            for p in prefill_candidates(workers, d.worker_id):
                quotes.append(price_disaggregated(req, p, d, ctx.topology, ctx.params))
    return quotes


def cost_model(req: RoutingRequest, workers: Sequence[Candidate], ctx: RoutingContext) -> RouteDecision:
    """The cheapest predicted TTFT; on a tie colocated beats disaggregated (fewer moving parts)."""
    quotes = all_quotes(req, workers, ctx)
    if not quotes:
        raise NoRouteError(
            "disaggregation=always but no prefill worker besides the decode workers", overloaded=False
        )
    key = lambda q: (q.ttft_s, q.disaggregated, q.prefill_worker or "", q.decode_worker)
    best = min(quotes, key=key)
    rivals = [q for q in quotes if q.disaggregated != best.disaggregated]
    reason = f"cost_model: {_describe(best, ctx.topology)}"
    if rivals:
        other = "colocated" if best.disaggregated else "disaggregated"
        reason += f"; best {other} was {_describe(min(rivals, key=key), ctx.topology)}"
    return _decision(best, reason)


def _describe(q: Quote, topology: Topology) -> str:
    if q.prefill_worker is None:
        return f"colocated on {q.decode_worker}, ttft {q.ttft_s * 1e3:.3f} ms, {q.cached_tokens} cached"
    link = topology.link(q.prefill_worker, q.decode_worker)
    return (
        f"{q.prefill_worker} -> {q.decode_worker} over {link.value if link else 'none'}, "
        f"ttft {q.ttft_s * 1e3:.3f} ms, {q.cached_tokens} cached, {q.kv_bytes} KV bytes"
    )


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "cost_model": cost_model,
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]
