"""The one block-hash function of the cluster, used by the router, both pools and every tier.

A block holds ``block_size`` tokens. Only full blocks have a hash; the hash chains over the whole
prefix, so equal hashes mean equal prefixes (up to a 128-bit collision, which callers that hold the
tokens confirm by comparing them)::

    h_0 = H(ROOT,  fingerprint, tokens[0:B])
    h_i = H(h_{i-1}, fingerprint, tokens[i*B:(i+1)*B])

``fingerprint`` names the model (and KV dtype) so KV of two models never collide. Stable across
processes and machines: hashlib's blake2b, never Python's ``hash``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes
ROOT: BlockHash = b"\x00" * 16


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], fingerprint: str) -> BlockHash:
    """Hash one full block given its parent's hash (``None`` or ``ROOT`` for the first block)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else ROOT)
    h.update(fingerprint.encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def hash_blocks(
    token_ids: Sequence[int], block_size: int, fingerprint: str, parent: BlockHash | None = None
) -> list[BlockHash]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], fingerprint)
        hashes.append(parent)
    return hashes
