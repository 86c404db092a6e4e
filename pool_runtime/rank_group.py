"""A tensor-parallel worker's ranks: rank 0 decides, every rank executes the same step.

A worker of TP = N is N processes. Rank 0 is the worker as its pool knows it (PrefillWorker /
DecodeWorker with the one block manager and scheduler); ranks 1..N-1 are followers
(pool_runtime/rank_follower.py) holding their model shard, their heads' KV pool and their own KV
sender or receiver. Rank 0 drives them with the messages below, over a :class:`RankChannel`
(engine/parallel.py); the model's all-reduces run over torch.distributed::

    rank 0                                    ranks 1..N-1
    engine.step -> runner.publish ──Step────▶ the same forward on their shard (collectives meet
                  (inputs, this step's sends)  inside it); prefill: each layer's own heads sent
    prefill: finish   ──Finish──▶ wait for the commits of the decode ranks it wrote to ──▶ answers
             cancel   ──Abandon─▶ flush and drop its writes                             ──▶ answers
    decode:  reserve  ──Reserve─▶ its receiver holds the same block ids under a lease   ──▶ dest
             start    ──Commit──▶ its part verified? then release the lease             ──▶ answers
             cancel   ──Release─▶ drop the lease                                        ──▶ answers

A Step has no answer (the next message's answers come after it, in order). Any failure of the
group — a rank died, a collective failed, an answer that does not come — is
:class:`~engine.parallel.RankGroupBroken`: rank 0 then ends its own process (its actor is
restarted by Ray, and builds a fresh group; the followers, owned by it, go with it), because a
group with a missing rank cannot run another step. Lifecycle: construct over a joined group ->
calls -> ``close`` (stops the followers; idempotent).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine.model_runner import StepInputs
from engine.parallel import RankChannel, RankGroupBroken, TPGroup
from kv_transfer.transport import KVDestination
from pool_runtime.handoff import KVGrant, PoolError

ANSWER_TIMEOUT_S = 120.0  # longer than any finish (ack timeout) a follower may be waiting in
T = TypeVar("T")


def rank_request_id(request_id: str, rank: int) -> str:
    """The id rank ``rank``'s receiver holds a request's lease under. Distinct per rank, so one
    prefill rank writing to several decode ranks keeps one outgoing request per destination."""
    return request_id if rank == 0 else f"{request_id}#r{rank}"


# -- the messages ----------------------------------------------------------------------------------
@dataclass(slots=True)
class SendPlan:
    """Blocks ``src_block_ids`` of one request go to its destinations from ``block_offset`` on."""

    request_id: str
    src_block_ids: list[int]
    block_offset: int


@dataclass(slots=True)
class Step:
    inputs: StepInputs
    sends: list[SendPlan] = field(default_factory=list)
    grants: dict[str, KVGrant] = field(default_factory=dict)  # first sight of a request's grant


@dataclass(slots=True)
class Finish:
    request_ids: list[str]
    timeout_s: float


@dataclass(slots=True)
class Abandon:
    request_id: str
    flush_timeout_s: float


@dataclass(slots=True)
class Reserve:
    request_id: str
    block_ids: list[int]
    num_layers: int
    lease_s: float
    parts: list[tuple[tuple[int, int], ...]]  # per rank (index 0: rank 0's, not used by followers)


@dataclass(slots=True)
class Commit:
    request_id: str


@dataclass(slots=True)
class Release:
    request_id: str


@dataclass(slots=True)
class Crash:
    """Test hook: the rank SIGKILLs itself after sending ``layer`` of ``request_id``."""

    rank: int
    request_id: str
    layer: int


@dataclass(slots=True)
class Stop:
    pass


@dataclass(slots=True)
class Answer:
    value: Any = None
    error: str = ""


# -- rank 0 ------------------------------------------------------------------------------------------
class RankGroup:
    """Rank 0's handle on its group. Thread-safe: one message (and its answers) at a time.

    ``on_broken`` runs once when the group breaks (``start_rank_group`` sets it to end the actor's
    process); by default the error is only raised to the caller."""

    def __init__(
        self,
        tp: TPGroup,
        channel: RankChannel,
        followers: Sequence[Any] = (),
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.tp = tp
        self.size = tp.size
        self.channel = channel
        self.followers = list(followers)  # opaque (Ray actor handles): kept alive with the group
        self.on_broken: Callable[[RankGroupBroken], None] | None = None
        self._on_close = on_close
        self._shared: dict[str, KVGrant] = {}  # the grant the followers have for each request
        self._lock = threading.RLock()
        self.broken: RankGroupBroken | None = None
        self._closed = False
        self._watch = threading.Thread(target=self._watchdog, name="rank-group-watchdog", daemon=True)
        self._watch.start()

    # -- messages
    def step(
        self, inputs: StepInputs, sends: Sequence[SendPlan] = (), grants: dict[str, KVGrant] | None = None
    ) -> None:
        """Publish one step (``runner.publish``); rank 0 runs its own forward right after."""
        new = {rid: g for rid, g in (grants or {}).items() if self._shared.get(rid) is not g}
        self._shared.update(new)
        self._send(Step(inputs, list(sends), new))

    def call(self, msg: Any, local: Callable[[], T]) -> tuple[T, list[Any]]:
        """Send ``msg``, run rank 0's own part (``local``) meanwhile, then collect the followers'
        answers. Raises the first follower's error (as PoolError) after all have answered."""
        with self._lock:
            self._send(msg)
            mine = local()
            answers: list[Answer] = self._gather()
        errors = [a.error for a in answers if a.error]
        if errors:
            raise PoolError(errors[0])
        return mine, [a.value for a in answers]

    def finish(
        self, request_ids: list[str], timeout_s: float, local: Callable[[], None] = lambda: None
    ) -> dict[str, tuple[str, int]]:
        """Every rank waits for the commits of the decode ranks it wrote to (rank 0's own part:
        ``local``); the other ranks' outcome per request: (first error or "", bytes they sent)."""
        for rid in request_ids:
            self._shared.pop(rid, None)
        _, answers = self.call(Finish(request_ids, timeout_s), local)
        out: dict[str, tuple[str, int]] = {rid: ("", 0) for rid in request_ids}
        for per_rank in answers:
            for rid, (error, nbytes) in per_rank.items():
                prev_error, prev_bytes = out[rid]
                out[rid] = (prev_error or error, prev_bytes + nbytes)
        return out

    def abandon(
        self, request_id: str, flush_timeout_s: float, local: Callable[[], None] = lambda: None
    ) -> None:
        """Every rank lets its posted writes of the request land, then drops them."""
        self._shared.pop(request_id, None)
        self.call(Abandon(request_id, flush_timeout_s), local)

    def reserve(
        self, msg: Reserve, local: Callable[[], KVDestination]
    ) -> tuple[KVDestination, list[KVDestination]]:
        return self.call(msg, local)

    def commit(self, request_id: str) -> list[bool]:
        return self.call(Commit(request_id), lambda: None)[1]

    def release(self, request_id: str) -> None:
        self.call(Release(request_id), lambda: None)

    def crash_after_layer(self, rank: int, request_id: str, layer: int) -> None:
        self.call(Crash(rank, request_id, layer), lambda: None)

    # -- plumbing
    def _send(self, msg: Any) -> None:
        with self._lock:
            self._check()
            try:
                self.channel.send(msg)
            except RankGroupBroken as e:
                self._broke(e)

    def _gather(self) -> list[Any]:
        try:
            return self.channel.gather(ANSWER_TIMEOUT_S)
        except RankGroupBroken as e:
            self._broke(e)
            raise  # unreachable: _broke raises

    def _check(self) -> None:
        if self.broken is not None:
            raise self.broken
        if self._closed:
            raise RankGroupBroken("the rank group is closed")

    def _broke(self, e: RankGroupBroken) -> None:
        first = self.broken is None
        self.broken = self.broken or e
        if first and self.on_broken is not None:
            self.on_broken(e)
        raise self.broken

    def fail(self, e: RankGroupBroken) -> None:
        """Mark the group broken from outside (a collective of the forward failed)."""
        with contextlib.suppress(RankGroupBroken):
            self._broke(e)

    def _watchdog(self) -> None:
        """Followers never speak unasked: a connection readable while no message is in flight
        is a follower that died (EOF). Noticed within a second, not at the next request."""
        while not self._closed and self.broken is None:
            if not self._lock.acquire(timeout=1.0):
                continue
            try:
                if self._closed:
                    return
                if self.channel.unasked():
                    with contextlib.suppress(RankGroupBroken):
                        self._broke(RankGroupBroken("a follower rank died (its connection closed)"))
                    return
            finally:
                self._lock.release()
            threading.Event().wait(1.0)

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            if self.broken is None:
                with contextlib.suppress(Exception):
                    self.channel.send(Stop())
            self._closed = True
            self.channel.close()
        self.tp.close()
        if self._on_close is not None:
            self._on_close()
