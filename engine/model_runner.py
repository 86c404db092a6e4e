"""ModelRunner: one scheduled batch -> the flat tensors of a forward pass -> logits of the rows to sample.

For each scheduled entry (prefill chunks first, then decodes, as the scheduler orders them)::

    input_ids  [ seq0 tokens start..start+n | seq1 ... | dec0 | dec1 ... ]     (T,)
    positions  [ start .. start+n-1         | ...     | p0   | p1   ... ]     (T,)
    logits of the last token of every entry whose chunk reaches its sequence's end (``completes``)

It owns no state beyond the model and the KV tensor it was given; the engine owns both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata
from engine.model import Model
from engine.scheduler import SchedulerOutput


class ModelRunner:
    """Turns a SchedulerOutput into tensors, runs the model and returns logits of the completing rows."""

    def __init__(self, model: Model, kv_cache: torch.Tensor, block_size: int, device: str) -> None:
        self.model = model
        self.kv_cache = kv_cache  # (L, N, 2, H_kv, B, D)
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Forward the batch; returns logits (R, V) float32 for the entries whose ``completes`` is set,
        in the order they appear in ``out.scheduled``. ``on_layer(i)`` runs as soon as layer ``i``'s
        K/V are in the cache (a prefill worker ships that layer while later ones compute)."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        for entry in out.scheduled:
            seq, n = entry.seq, entry.num_new_tokens
            start = seq.num_computed_tokens
            if n == 1:
                input_ids.append(seq.token_at(start))
            else:
                input_ids.extend(seq.all_token_ids[start : start + n])
            positions.extend(range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(seq.block_table)
            if entry.completes:
                logits_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)  # (T,)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)  # (T,)
        hidden = self.model.forward(ids, pos, self.kv_cache, meta, on_layer)  # (T, hidden)
        rows = torch.tensor(logits_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))  # (R, V)
