"""ModelRunner: one scheduled batch -> the flat tensors of a forward pass -> logits of the rows to sample.

For each scheduled entry (prefill chunks first, then decodes, as the scheduler orders them)::

    input_ids  [ seq0 tokens start..start+n | seq1 ... | dec0 | dec1 ... ]     (T,)
    positions  [ start .. start+n-1         | ...     | p0   | p1   ... ]     (T,)
    logits of the last token of every entry whose chunk reaches its sequence's end (``completes``)

It owns no state beyond the model and the KV tensor it was given; the engine owns both.

With tensor parallelism (engine/parallel.py) rank 0's runner hands each step's :class:`StepInputs`
to ``publish`` (the worker sends them to the other ranks) before its own forward; every other rank
runs the same inputs through ``run`` on its shard and KV pool, so all ranks execute the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.model import Model
from engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class StepInputs:
    """One forward's inputs as plain lists (picklable: rank 0 sends them to the other ranks)."""

    input_ids: list[int]  # (T,)
    positions: list[int]  # (T,)
    query_lens: list[int]  # (S,) prefill chunks first, then decodes
    seq_lens: list[int]  # (S,)
    block_tables: list[list[int]]  # (S, blocks)
    logits_rows: list[int]  # (R,) the rows whose logits are sampled


class ModelRunner:
    """Turns a SchedulerOutput into tensors, runs the model and returns logits of the completing rows.

    ``publish`` (rank 0 of a tensor-parallel worker): called with every step's inputs before the
    forward, to hand them to the other ranks."""

    def __init__(self, model: Model, kv_cache: torch.Tensor, block_size: int, device: str) -> None:
        self.model = model
        self.kv_cache = kv_cache  # (L, N, 2, H_kv, B, D)
        self.block_size = block_size
        self.device = device
        self.publish: Callable[[StepInputs], None] | None = None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Forward the batch; returns logits (R, V) float32 for the entries whose ``completes`` is set,
        in the order they appear in ``out.scheduled``. ``on_layer(i)`` runs as soon as layer ``i``'s
        K/V are in the cache (a prefill worker ships that layer while later ones compute)."""
        inputs = self.prepare(out)
        if self.publish is not None:
            self.publish(inputs)
        return self.run(inputs, on_layer)

    @staticmethod
    def prepare(out: SchedulerOutput) -> StepInputs:
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
        return StepInputs(input_ids, positions, query_lens, seq_lens, tables, logits_rows)

    @torch.inference_mode()
    def run(self, inputs: StepInputs, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """The forward of ``inputs``: logits (R, V) of its ``logits_rows`` (on ranks other than 0 of
        a tensor-parallel worker, an empty (R, 0): rank 0 gathers them)."""
        dev = self.device
        meta = AttentionMetadata.build(
            inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size, dev
        )
        ids = torch.tensor(inputs.input_ids, dtype=torch.int64, device=dev)  # (T,)
        pos = torch.tensor(inputs.positions, dtype=torch.int64, device=dev)  # (T,)
        hidden = self.model.forward(ids, pos, self.kv_cache, meta, on_layer)  # (T, hidden)
        rows = torch.tensor(inputs.logits_rows, dtype=torch.int64, device=dev)
        return self.model.compute_logits(hidden.index_select(0, rows))  # (R, V)
