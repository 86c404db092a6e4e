"""Drive in-process prefill and decode workers by hand (no threads): deterministic handoffs."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from weakref import WeakKeyDictionary

from decode_pool.worker import DecodeWorker
from engine.llm_engine import EngineConfig
from engine.sampling_params import SamplingParams
from memory_tiers.tier_store import TierConfig
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import FirstToken, TokenChunk, WorkRequest
from prefill_pool.worker import PrefillWorker


def worker_config(ckpt: Path, wid: str, *, host_kv_bytes: int = 0, **kw: object) -> WorkerConfig:
    """An in-process worker's config: blocks of 4 tokens, 64 of them, 8-token steps, G2 of
    ``host_kv_bytes`` (0: none); ``kw`` overrides fields of the worker or of its engine."""
    engine: dict[str, object] = dict(model=ckpt, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    worker: dict[str, object] = dict(worker_id=wid, kv_backend="inprocess")
    for k, v in kw.items():
        (engine if k in EngineConfig.__dataclass_fields__ else worker)[k] = v
    tiers = TierConfig(host_bytes=host_kv_bytes) if host_kv_bytes else None
    return WorkerConfig(EngineConfig(**engine), tiers=tiers, **worker)  # type: ignore[arg-type]


def work(rid: str, prompt: list[int], max_tokens: int = 12, seed: int = 1) -> WorkRequest:
    return WorkRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, seed=seed))


def prefill_all(p: PrefillWorker, futs: list[Future[FirstToken]], max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if all(f.done() for f in futs):
            return
        p.step()
    raise AssertionError("prefill did not finish")


# per decode worker: the chunks drained from its default channel, by request, not yet taken
_PENDING: WeakKeyDictionary[DecodeWorker, dict[str, list[TokenChunk]]] = WeakKeyDictionary()


def take(d: DecodeWorker, rid: str) -> list[TokenChunk]:
    """The chunks of ``rid`` the worker has put on its (default) channel since the last take."""
    pending = _PENDING.setdefault(d, {})
    for c in d.drain("", 0.0):
        pending.setdefault(c.request_id, []).append(c)
    return pending.pop(rid, [])


def start(d: DecodeWorker, rid: str, first: FirstToken) -> None:
    """``d.start``, with the first token queued as the request's first chunk, as the router streams
    it from the prefill worker (the decode worker does not send it again)."""
    d.start(rid, first)
    done = first.finish_reason is not None
    chunk = TokenChunk(rid, [first.token_id], finished=done, finish_reason=first.finish_reason)
    _PENDING.setdefault(d, {}).setdefault(rid, []).insert(0, chunk)


def decode_all(d: DecodeWorker, rids: list[str], max_steps: int = 1000) -> dict[str, list[TokenChunk]]:
    chunks: dict[str, list[TokenChunk]] = {r: [] for r in rids}
    done: set[str] = set()
    for _ in range(max_steps):
        for r in rids:
            if r not in done:
                got = take(d, r)
                chunks[r] += got
                if got and got[-1].finished:
                    done.add(r)
        if len(done) == len(rids):
            return chunks
        d.step()
    raise AssertionError(f"decode did not finish: {set(rids) - done}")


def handoff(p: PrefillWorker, d: DecodeWorker, reqs: list[WorkRequest]) -> dict[str, list[int]]:
    """Reserve, prefill and stream all requests together; returns each one's output tokens."""
    grants = [d.reserve(r) for r in reqs]
    futs = [p.submit(r, g) for r, g in zip(reqs, grants, strict=True)]
    prefill_all(p, futs)
    for r, f in zip(reqs, futs, strict=True):
        start(d, r.request_id, f.result())
    chunks = decode_all(d, [r.request_id for r in reqs])
    return {rid: [t for c in cs for t in c.token_ids] for rid, cs in chunks.items()}
