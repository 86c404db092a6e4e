"""The device KV block pool of one engine: block ids, reference counts and the prefix cache.

Pure bookkeeping on integers (no torch): a block id indexes the per-layer KV pool tensors owned by
the model runner. A sequence owns a block table; block ``i`` holds its tokens
``[i * block_size, (i + 1) * block_size)``::

    tokens:      [ t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. .. ]
    block_table: [     7       |     2       |     5       ]
                   full, hashed  full, hashed  partial: no hash, never shared

Prefix cache: every block that is FULL of computed tokens gets the chained hash of ``block_hash``
(prompt and output tokens alike) and stays findable after its sequence is freed. A hit is confirmed
by comparing the block's token ids, not only its hash.

Block states and the deterministic order in which ids are handed out:

* in use: ``ref_count > 0`` (shared by every sequence whose prefix matches);
* free: ``ref_count == 0`` and no hash, in a deque: new blocks are popped from the LEFT, freed ones
  appended at the RIGHT;
* cached-free: ``ref_count == 0`` with a hash, kept in LRU order (least recently freed first).
  They count as free, but a new block is taken from them only when the free deque is empty: the
  LRU one is evicted, ``on_evict(hash, block_id)`` being called first while its KV is still intact
  (so a lower tier can offload it).

``free(seq)`` releases a table TAIL-FIRST, so a sequence's last blocks are evicted before its first
ones (a prefix is worthless without its head).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine.block_hash import BlockHash, hash_block
from engine.sequence import Sequence


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    # The tokens the hash stands for, to confirm a hit; None for a block registered without them.
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Hands out KV blocks to sequences and keeps full computed blocks reusable as a prefix cache.

    Lifecycle of one sequence: ``allocate_prompt`` (prefix hits only) → ``append_slots`` (per step,
    before the forward pass) → ``mark_computed`` (after it) → ... → ``free``.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        fingerprint: str,
        enable_prefix_caching: bool = True,
        on_evict: Callable[[BlockHash, int], None] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.enable_prefix_caching = enable_prefix_caching
        self.on_evict = on_evict
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[BlockHash, int] = {}
        # Chained hashes of each live sequence's full computed blocks, so mark_computed only
        # hashes the blocks that became full since its last call.
        self._seq_hashes: dict[str, list[BlockHash]] = {}

    # ---- occupancy ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free plus cached-but-unreferenced."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ``ref_count > 0``."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that carry a prefix hash (in use or cached-free)."""
        return len(self._hash_to_block)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def block_hash_of(self, block_id: int) -> BlockHash | None:
        return self._blocks[block_id].block_hash

    def block_hashes(self, request_id: str) -> list[BlockHash]:
        """Chained hashes of the sequence's full computed blocks (for offload or transfer)."""
        return list(self._seq_hashes.get(request_id, ()))

    # ---- prefix cache -------------------------------------------------------------------------

    def _match_prefix(self, token_ids: Seq[int], max_blocks: int) -> tuple[list[int], list[BlockHash]]:
        """Block ids and hashes of the longest cached prefix of full blocks, at most ``max_blocks``."""
        ids: list[int] = []
        hashes: list[BlockHash] = []
        if not self.enable_prefix_caching:
            return ids, hashes
        bs = self.block_size
        parent: BlockHash | None = None
        for i in range(min(max_blocks, len(token_ids) // bs)):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, chunk, self.fingerprint)
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            block = self._blocks[block_id]
            # The parent hashes were confirmed block by block, so this block's tokens confirm the
            # whole prefix up to here.
            if block.token_ids is not None and block.token_ids != chunk:
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def lookup_prefix(self, token_ids: Seq[int]) -> int:
        """Number of leading full blocks of ``token_ids`` in the cache (no cap; changes nothing)."""
        return len(self._match_prefix(token_ids, len(token_ids) // self.block_size)[0])

    def _max_hit_blocks(self, seq: Sequence) -> int:
        # At least one token must be left to compute: its logits sample the next token.
        return (seq.num_tokens - 1) // self.block_size

    def prefix_hit_tokens(self, seq: Sequence) -> int:
        """Tokens ``allocate_prompt`` would serve from the cache for ``seq`` (changes nothing)."""
        ids, _ = self._match_prefix(seq.all_token_ids, self._max_hit_blocks(seq))
        return len(ids) * self.block_size

    def register(self, block_id: int, block_hash: BlockHash, token_ids: Seq[int] | None = None) -> None:
        """Make ``block_id`` findable under ``block_hash`` (KV onboarded or received from elsewhere).

        ``token_ids`` (the block's tokens) lets later hits be confirmed; without them the hash
        alone is trusted. A hash already held by another block is ignored (that copy stays
        canonical). A free block becomes cached-free (most recently used).
        """
        if not self.enable_prefix_caching:
            return
        owner = self._hash_to_block.get(block_hash)
        if owner is not None and owner != block_id:
            return
        block = self._blocks[block_id]
        if block.block_hash is not None and block.block_hash != block_hash:
            del self._hash_to_block[block.block_hash]
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids) if token_ids is not None else None
        self._hash_to_block[block_hash] = block_id
        if block.ref_count == 0:
            if block_id in self._cached_free:
                self._cached_free.move_to_end(block_id)
            else:
                self._free.remove(block_id)
                self._cached_free[block_id] = None

    # ---- allocation ---------------------------------------------------------------------------

    def _evict_lru(self) -> int:
        """Drop the least recently used cached-free block from the cache (``on_evict`` first, while
        its KV is intact); returns its id, now hashless with ``ref_count == 0``."""
        block_id, _ = self._cached_free.popitem(last=False)
        block = self._blocks[block_id]
        assert block.block_hash is not None
        if self.on_evict is not None:
            self.on_evict(block.block_hash, block_id)
        del self._hash_to_block[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        return block_id

    def _take_free_block(self) -> int:
        block_id = self._free.popleft() if self._free else self._evict_lru()
        self._blocks[block_id].ref_count = 1
        return block_id

    def _blocks_needed(self, num_tokens_after: int, num_blocks_held: int) -> int:
        return max(0, -(-num_tokens_after // self.block_size) - num_blocks_held)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether ``allocate_prompt(seq)`` then ``append_slots(seq, num_new_tokens)`` would succeed
        for a sequence that holds no blocks yet (``num_new_tokens`` counted after the prefix hit)."""
        ids, _ = self._match_prefix(seq.all_token_ids, self._max_hit_blocks(seq))
        # Hit blocks that sit in the cached-free pool stop being allocatable once taken.
        free_after_hits = self.num_free_blocks - sum(1 for b in ids if self._blocks[b].ref_count == 0)
        need = self._blocks_needed(len(ids) * self.block_size + num_new_tokens, len(ids))
        return need <= free_after_hits

    def allocate_prompt(self, seq: Sequence) -> bool:
        """First scheduling of ``seq``: take its longest cached prefix of full blocks (ref++).

        Sets ``seq.block_table`` to the hit blocks and ``seq.num_cached_tokens`` and
        ``seq.num_computed_tokens`` to ``hits * block_size``; allocates nothing else. Returns False
        and changes nothing when, after taking the hits, no block would be left for the first
        token to compute (the sequence could not make progress).
        """
        if seq.block_table:
            raise ValueError(f"{seq.request_id} already holds blocks")
        ids, hashes = self._match_prefix(seq.all_token_ids, self._max_hit_blocks(seq))
        free_after_hits = self.num_free_blocks - sum(1 for b in ids if self._blocks[b].ref_count == 0)
        if free_after_hits < 1:
            return False
        for block_id in ids:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._cached_free[block_id]
            block.ref_count += 1
        seq.block_table = ids
        seq.num_cached_tokens = seq.num_computed_tokens = len(ids) * self.block_size
        if self.enable_prefix_caching:
            self._seq_hashes[seq.request_id] = hashes
        return True

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self._blocks_needed(seq.num_computed_tokens + num_new_tokens, len(seq.block_table))
        return need <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow ``seq.block_table`` so positions ``[num_computed_tokens, num_computed_tokens +
        num_new_tokens)`` have slots. Returns False and changes nothing when blocks are short."""
        need = self._blocks_needed(seq.num_computed_tokens + num_new_tokens, len(seq.block_table))
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def mark_computed(self, seq: Sequence, num_computed_tokens: int) -> None:
        """After a forward pass: register the hash of every block now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        bs = self.block_size
        num_full = min(num_computed_tokens // bs, len(seq.block_table))
        tokens = seq.all_token_ids
        for i in range(len(hashes), num_full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash_block(hashes[-1] if hashes else None, chunk, self.fingerprint)
            hashes.append(h)
            block = self._blocks[seq.block_table[i]]
            # A block computed twice (two equal prompts in flight) is not registered again: the
            # first copy stays canonical and this one returns to the plain free list when freed.
            if block.block_hash is None and h not in self._hash_to_block:
                block.block_hash = h
                block.token_ids = chunk
                self._hash_to_block[h] = block.block_id

    # ---- raw blocks, for KV that arrives from a lower tier ---------------------------------------

    def take_block(self) -> int | None:
        """One block with ``ref_count == 1`` and no hash (evicting the LRU cached block if needed),
        or None when every block is in use. Fill it, ``register`` it, then ``release_block`` it."""
        if not self.num_free_blocks:
            return None
        return self._take_free_block()

    def release_block(self, block_id: int) -> None:
        """ref-- on a block from ``take_block``: cached-free if it was registered, else free."""
        block = self._blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            if block.block_hash is not None:
                self._cached_free[block_id] = None
            else:
                self._free.append(block_id)

    def evict_cached(self, max_blocks: int | None = None) -> int:
        """Evict up to ``max_blocks`` cached-free blocks (all when None), LRU first, calling
        ``on_evict`` for each (so a lower tier can take them). Returns how many were evicted."""
        n = 0
        while self._cached_free and (max_blocks is None or n < max_blocks):
            self._free.append(self._evict_lru())
            n += 1
        return n

    def free(self, seq: Sequence) -> None:
        """ref-- on every block of ``seq`` (tail first); clears ``seq.block_table``.

        Blocks left unreferenced with a hash become cached-free (evictable, LRU); the rest go back
        to the right end of the free deque.
        """
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._cached_free[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        self._seq_hashes.pop(seq.request_id, None)
