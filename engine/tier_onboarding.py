"""Onboarding: bring a new request's cached prefix up from G2 (host) or G3 (disk) into G1 before the
request is scheduled, so its prefill starts after the cached part.

    prompt blocks:  [ h0 h1 h2 | h3 h4 h5 h6 | h7 .. ]
                      in G1      in G2 / G3    not cached: computed
                      (BlockManager prefix cache)
                                 │ take_block → tiers.onboard(h, id) → register(id, h, tokens)
                                 ▼ release_block: now cached-free in G1, found by allocate_prompt

G2 copies finish at once; G3 reads finish on the tier store's read threads, and the request waits
here, outside the scheduler, so running decodes never wait on the disk. A block that fails to
onboard (evicted meanwhile, corrupt file) ends the run: the rest of the prompt is recomputed.
The offload direction needs no code here: the BlockManager's ``on_evict`` hook is the store's.
``onboard_into`` serves the other way in: a handed-off prompt whose KV landed in G2 is copied into
G1 blocks the engine has already reserved for it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from engine.block_hash import BlockHash, hash_blocks
from engine.block_manager import BlockManager
from engine.sequence import Sequence
from engine.tiers import LowerTiers


@dataclass(slots=True)
class _Pending:
    seq: Sequence
    # (G1 block id, hash, block tokens, copy in flight), in prompt order
    blocks: list[tuple[int, BlockHash, list[int], Future[bool]]] = field(default_factory=list)
    aborted: bool = False


class TierOnboarder:
    def __init__(self, block_manager: BlockManager, store: LowerTiers) -> None:
        self.bm = block_manager
        self.store = store
        self._pending: dict[str, _Pending] = {}
        self.blocks_onboarded = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def begin(self, seq: Sequence) -> bool:
        """Start onboarding the part of ``seq``'s prefix that sits below G1. True when the request
        must wait for it (hand it to the scheduler once ``ready`` returns it)."""
        bs = self.bm.block_size
        tokens = seq.prompt_token_ids
        max_blocks = (len(tokens) - 1) // bs  # like allocate_prompt: one token is always computed
        in_g1 = min(self.bm.lookup_prefix(tokens), max_blocks)
        if in_g1 == max_blocks:
            return False
        hashes = hash_blocks(tokens[: max_blocks * bs], bs, self.bm.fingerprint)
        found = self.store.lookup(hashes[in_g1:])
        if not found:
            return False
        pending = _Pending(seq)
        for i in range(in_g1, in_g1 + len(found)):
            block_id = self.bm.take_block()
            if block_id is None:
                break
            future = self.store.onboard(hashes[i], block_id)
            pending.blocks.append((block_id, hashes[i], tokens[i * bs : (i + 1) * bs], future))
        if not pending.blocks:
            return False
        self._pending[seq.request_id] = pending
        return True

    def ready(self) -> list[Sequence]:
        """Requests whose onboarding has ended (blocks registered in G1), in arrival order."""
        done: list[Sequence] = []
        for request_id, pending in list(self._pending.items()):
            if not all(f.done() for *_, f in pending.blocks):
                continue
            del self._pending[request_id]
            chain_ok = not pending.aborted
            for block_id, h, block_tokens, future in pending.blocks:
                chain_ok = chain_ok and future.result()
                if chain_ok:  # a gap breaks the chain: later blocks would never be found
                    self.bm.register(block_id, h, block_tokens)
                    self.blocks_onboarded += 1
                self.bm.release_block(block_id)
            if not pending.aborted:
                done.append(pending.seq)
        return done

    def onboard_into(self, block_ids: Seq[int], hashes: Seq[BlockHash]) -> bool:
        """Copy ``hashes[i]`` into G1 block ``block_ids[i]``, blocks the caller already holds (a
        handed-off prompt that waited in G2 for G1 room: decode_pool/g2_landing.py), and wait for
        the copies: G2 ones end at once (the caller pinned them there); a G3 read would block the
        caller. Nothing is registered here: the caller's ``mark_computed`` does it. True when every
        block landed."""
        futures = [self.store.onboard(h, b) for b, h in zip(block_ids, hashes, strict=True)]
        ok = all([f.result() for f in futures])  # a list: every copy ends before we return
        if ok:
            self.blocks_onboarded += len(futures)
        return ok

    def abort(self, request_id: str) -> bool:
        """Forget a waiting request; its blocks return once their copies end (never while a read
        thread may still write into them)."""
        pending = self._pending.get(request_id)
        if pending is None:
            return False
        pending.aborted = True
        return True

    def wait(self, timeout: float) -> None:
        """Block until some copy ends (or ``timeout``): used when nothing else can run."""
        futures = [f for p in self._pending.values() for *_, f in p.blocks if not f.done()]
        if futures:
            wait(futures, timeout=timeout, return_when="FIRST_COMPLETED")
