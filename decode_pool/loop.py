"""The decode worker's two threads: the step loop, which runs each forward pass *without* the worker's
lock, and the poll thread, which drives the KV receiver (digests, commits, acks) meanwhile.

::

    step loop   [lock: plan]──forward + sample (no lock)──[lock: finish, publish] [lock: plan] ...
    poll thread       [lock: poll] [lock: poll] [lock: poll] ...   (every ~0.5 ms while KV is coming)
    control calls       [lock: reserve]      [lock: cancel → deferred if in the running step]

A mixin of :class:`decode_pool.worker.DecodeWorker` (its state and its ``_poll`` / ``_admit`` /
``_publish`` are the worker's); kept apart so the worker's module holds the handoff, this one the
threads. Tests may drive it by hand instead: ``step`` (poll + one step) and ``poll``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.llm_engine import RequestOutput, StepPlan
from engine.parallel import RankGroupBroken

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from pool_runtime.rank_group import RankGroup

# How often the poll thread drives the receiver while KV is on its way: often enough that an ack
# costs a prefill worker well under a decode step, rarely enough not to take the interpreter from
# the forward pass (a poll is ~10-20 us of Python).
POLL_INTERVAL_S = 0.0005
IDLE_POLL_INTERVAL_S = 0.005  # with nothing reserved (~0.3% of a core)


class StepLoop:
    engine: LLMEngine
    ranks: RankGroup | None
    worker_id: str
    _cv: threading.Condition
    _threads: list[threading.Thread]
    _stop: bool
    _closed: bool
    _in_step: set[str]
    _deferred: set[str]
    _kv_wake: threading.Event
    _reserved: dict
    _parked: dict
    # the worker's (decode_pool/worker.py):
    _poll: Callable[[], bool]
    _admit: Callable[[], bool]
    _publish: Callable[[list[RequestOutput]], None]
    _fail_all: Callable[[str], None]

    # -- the loop ------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Poll the receiver and run one engine step; False when there was nothing to do."""
        with self._cv:
            self._poll()
            plan = self._begin()
        if plan is None:
            return False
        self._run_step(plan)
        return True

    def poll(self) -> bool:
        """Drive the receiver once (commits, acks, failures); True when something happened."""
        with self._cv:
            return self._poll()

    def start_loop(self) -> None:
        if not self._threads:
            for name, target in (("decode", self._run), ("decode-poll", self._run_poll)):
                t = threading.Thread(target=target, name=f"{name}-{self.worker_id}", daemon=True)
                t.start()
                self._threads.append(t)

    def _run(self) -> None:
        while not self._stop:
            with self._cv:
                try:
                    plan = self._begin()
                except Exception as e:
                    self._failed(e)
                    continue
                if plan is None:
                    self._cv.wait(0.005)  # idle: woken by submit_local / a join
                    continue
            self._run_step(plan)

    def _run_poll(self) -> None:
        """Drive the receiver: often while KV is on its way, and slowly but never not at all when
        none is — the transport's progress also sends what the receiver owes (a commit's ack, a
        failure's notice to a sender still writing), and without it those would wait for the
        next reservation while the prefill worker waits for them."""
        while not self._stop:
            with self._cv:
                waiting = bool(self._reserved) or bool(self._parked)
                busy = self._poll()
            if busy:
                continue
            if waiting:
                time.sleep(POLL_INTERVAL_S)
            else:
                self._kv_wake.wait(IDLE_POLL_INTERVAL_S)
                self._kv_wake.clear()

    def _begin(self) -> StepPlan | None:
        """Plan the next step (lock held): G2 requests join when G1 has room, then the engine plans."""
        if self._closed:
            return None
        self._admit()
        if not self.engine.has_unfinished():
            return None
        plan = self.engine.begin_step()
        if plan is not None:
            self._in_step = set(plan.request_ids)
        return plan

    def _run_step(self, plan: StepPlan) -> None:
        """The forward pass without the lock, then the step's bookkeeping and its chunks with it."""
        try:
            sampled = self.engine.execute_step(plan)
        except Exception as e:  # a bug or a device error: end what is in flight, keep serving
            with self._cv:
                self._in_step = set()
                self._failed(e)
            return
        with self._cv:
            outs = self.engine.finish_step(plan, sampled)
            self._in_step = set()
            for rid in self._deferred:
                self.engine.abort(rid)
            self._deferred.clear()
            self._publish(outs)
            self._cv.notify_all()

    def _failed(self, e: Exception) -> None:
        if isinstance(e, RankGroupBroken) and self.ranks is not None:
            self.ranks.fail(e)  # a rank is gone: no step can run again (the actor ends)
        self._fail_all(f"decode worker {self.worker_id} failed: {e!r}")
