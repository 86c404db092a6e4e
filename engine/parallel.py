"""Tensor parallelism inside one worker: the rank group, its collectives, and each rank's weight shard.

A worker of ``tp`` ranks runs the Llama block Megatron-style, so each block costs two all-reduces::

    x (T, hidden), the same on every rank
      ├─ q/k/v   column-parallel: rank r computes its own heads     (T, H/tp*D), (T, H_kv/tp*D) x2
      ├─ attention over rank r's heads and its own paged KV pool
      ├─ o_proj  row-parallel: partial (T, hidden) from its heads ── all-reduce ──▶ x += sum
      ├─ gate/up column-parallel: its I/tp columns                  (T, I/tp) x2
      └─ down    row-parallel: partial (T, hidden)               ── all-reduce ──▶ x += sum

The embedding is **replicated**: a lookup costs no arithmetic, and a vocab-parallel one would add a
third all-reduce of (T, hidden) per step for a saving of ``V * hidden`` bytes per rank. The LM head
is **vocab-parallel**: each rank multiplies by its ``ceil(V / tp)`` rows (a real share of a step's
matmuls, and of memory for 100k+ vocabularies) and only the sampled rows' logits are gathered to
rank 0, which samples; a tied LM head slices the replicated embedding (a view, no copy). Every
logit is the same dot product as with one rank, but the hidden state it reads is not: a
row-parallel all-reduce adds ``tp`` partial sums where one rank runs one FMA chain, so results
differ from ``tp = 1`` in the last bits (tests/integration/test_tp_model.py measures by how much).
The all-reduce gives every rank the same floats, and each rank's matmuls stay batch invariant, so a
request's logits still do not depend on the batch it lands in.

Collectives are ``torch.distributed``: gloo on CPU, NCCL on GPU (the step's inputs travel on
a separate channel, :class:`RankChannel`, so an idle follower can wait for the next step forever).
Lifecycle: ``TPGroup.init`` (blocks until every rank joins) -> collectives -> ``close`` (idempotent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import secrets
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.mla import shard_mla
from engine.moe import shard_expert_columns, shard_experts
from engine.quant.weight import Weight
from engine.tp_layout import (
    check_expert_parallel,
    check_tensor_parallel,
    columns,
    experts_of,
    kv_heads,
    q_heads,
    vocab_rows,
    vocab_shard,
)
from engine.weights import LayerWeights, ModelWeights

COLLECTIVE_TIMEOUT_S = 300.0  # a peer that stalls longer than this inside a forward fails the group


class RankGroupBroken(RuntimeError):
    """A rank of the group died or stopped answering: the group cannot run another step."""


class TPGroup:
    """This process's rank in a tensor-parallel group of ``size`` ranks (one process per rank).
    ``distributed``: a torch.distributed process group exists (else every collective is a no-op)."""

    def __init__(
        self, rank: int, size: int, device: torch.device, distributed: bool = False, backend: str = ""
    ) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.distributed = distributed
        self.backend = backend
        self._closed = not distributed

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> TPGroup:
        """A group of one: no process group, every collective a no-op."""
        return cls(0, 1, torch.device(device))

    @classmethod
    def init(
        cls,
        rank: int,
        size: int,
        init_method: str,
        device: str | torch.device = "cpu",
        timeout_s: float = COLLECTIVE_TIMEOUT_S,
        backend: str | None = None,
    ) -> TPGroup:
        """Join the group at ``init_method`` (``tcp://host:port``, rank 0 listens); gloo for CPU
        tensors, NCCL for CUDA ones. Blocks until all ``size`` ranks have joined. ``backend``
        forces one (tests: gloo over CUDA tensors, or a real NCCL group of one rank)."""
        dev = torch.device(device)
        if size == 1 and backend is None:
            return cls.single(dev)
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
        return cls(rank, size, dev, distributed=True, backend=backend)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; every rank gets the same floats."""
        if self.distributed:
            self._collective(dist.all_reduce, t)
        return t

    def gather_columns(self, t: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' (R, n) pieces side by side, (R, size * n); None on the other ranks."""
        if not self.distributed:
            return t
        dev = t.device
        if self.backend == "gloo":  # gloo gathers CPU tensors only
            t = t.cpu()
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.rank == 0 else None
        self._collective(dist.gather, t.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=1).to(dev) if parts is not None else None

    def all_to_all(
        self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]
    ) -> None:
        """Rows ``in_splits[r]`` of ``inp`` go to rank r; ``out`` gets rank r's ``out_splits[r]``
        rows, in rank order (expert parallelism: engine/expert_parallel.py)."""
        self._collective(
            dist.all_to_all_single, out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits
        )

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape everywhere), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._collective(dist.all_gather, parts, t)
        return parts

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:  # a peer died (connection closed) or timed out
            raise RankGroupBroken(f"tensor-parallel rank {self.rank}/{self.size}: {e}") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RankChannel:
    """Rank 0's pickled messages to the other ranks of its group, and their answers, over local
    sockets (``multiprocessing.connection``, authenticated with a random key).

    Apart from torch.distributed on purpose: a follower waits for its next message with no
    timeout (an idle worker may wait for hours), and a dead peer shows at once as EOFError.
    Rank 0: ``RankChannel.listen()`` -> pass ``address`` / ``authkey`` to the followers ->
    ``accept(n)``; a follower: ``RankChannel.connect(address, authkey, rank)``."""

    def __init__(
        self, conns: dict[int, Connection], listener: Listener | None = None, authkey: bytes = b""
    ) -> None:
        self._conns = conns  # rank -> connection (rank 0: every follower; a follower: rank 0 as 0)
        self._listener = listener
        self.authkey = authkey

    @classmethod
    def listen(cls, host: str = "127.0.0.1") -> RankChannel:
        key = secrets.token_bytes(16)
        return cls({}, Listener((host, 0), authkey=key), key)

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.address
        return str(host), int(port)

    def accept(self, n: int) -> None:
        """Wait for ``n`` followers to connect (each says its rank first)."""
        assert self._listener is not None
        while len(self._conns) < n:
            conn = self._listener.accept()
            self._conns[int(conn.recv())] = conn

    @classmethod
    def connect(cls, address: tuple[str, int], authkey: bytes, rank: int) -> RankChannel:
        conn = Client((str(address[0]), int(address[1])), authkey=authkey)
        conn.send(rank)
        return cls({0: conn})

    def send(self, msg: Any) -> None:
        """Rank 0: the same message to every follower; a follower: its answer to rank 0."""
        try:
            for conn in self._conns.values():
                conn.send(msg)
        except (OSError, EOFError) as e:
            raise RankGroupBroken(f"a rank of the group is gone: {e}") from e

    def recv(self, timeout_s: float | None = None) -> Any:
        """A follower: rank 0's next message (waits forever by default)."""
        conn = self._conns[0]
        if timeout_s is not None and not conn.poll(timeout_s):
            raise RankGroupBroken(f"rank 0 sent nothing in {timeout_s:.0f} s")
        try:
            return conn.recv()
        except (OSError, EOFError) as e:
            raise RankGroupBroken(f"rank 0 is gone: {e}") from e

    def gather(self, timeout_s: float) -> list[Any]:
        """Rank 0: one answer from each follower, in rank order."""
        out = []
        for rank in sorted(self._conns):
            conn = self._conns[rank]
            try:
                if not conn.poll(timeout_s):
                    raise RankGroupBroken(f"rank {rank} did not answer in {timeout_s:.0f} s")
                out.append(conn.recv())
            except (OSError, EOFError) as e:
                raise RankGroupBroken(f"rank {rank} is gone: {e}") from e
        return out

    def unasked(self) -> bool:
        """Rank 0: whether a follower has sent something nobody asked for. Followers only answer,
        so with no message in flight this means a connection closed: a follower died."""
        conns = list(self._conns.values())
        return bool(conns) and bool(wait(conns, timeout=0))

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._conns.clear()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None


# -- weights ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ShardInfo:
    """What one rank holds of the model: its heads, KV heads and vocabulary rows."""

    rank: int
    size: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local KV heads (replicated ones count once)
    vocab_rows: range  # the LM head rows it computes
    vocab_shard: int  # every rank's logits are padded to this many columns for the gather


def shard_info(config: ModelConfig, rank: int, size: int, ep: int = 1) -> ShardInfo:
    """Rank ``rank``'s share of a model split over ``size`` tensor-parallel ranks (``ep``: how its
    experts are split, checked here too)."""
    c = config
    check_model_split(c, size, ep)
    return ShardInfo(
        rank,
        size,
        len(q_heads(c.num_heads, size, rank)),
        len(kv_heads(c.num_kv_heads, size, rank)),
        vocab_rows(c.vocab_size, size, rank),
        vocab_shard(c.vocab_size, size),
    )


def check_model_split(c: ModelConfig, tp: int, ep: int = 1) -> None:
    """Raise ValueError, naming the field, unless ``tp`` ranks split the heads and MLP widths and
    ``ep`` ranks the routed experts (engine/tp_layout.py)."""
    dense = c.moe is None or len(c.moe.sparse_layers) < c.num_layers
    check_tensor_parallel(tp, c.num_heads, c.num_kv_heads, c.intermediate_size if dense else None)
    if c.moe is None:
        if ep > 1:
            raise ValueError(f"expert_parallel_size {ep}: the model has no experts to split")
        return
    check_expert_parallel(ep, c.moe.num_experts)
    widths = [("moe_intermediate_size", c.moe.intermediate_size if ep == 1 else 0)]
    widths.append(("the shared expert's intermediate size", c.moe.shared_intermediate_size if ep == 1 else 0))
    for name, width in widths:
        if width % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide {name} {width}")


def shard_weights(
    weights: ModelWeights, config: ModelConfig, rank: int, size: int, ep: int = 1
) -> ModelWeights:
    """Rank ``rank``'s slices of the full (memory-mapped) weights, attention and dense MLPs over
    ``size`` ranks, routed experts over ``ep`` (engine/tp_layout.Parallelism: each 1 or the
    worker's ranks). Row slices of a weight are views; the row-parallel weights (o_proj, down_proj)
    are column slices and are copied contiguous (the packed matmul backends copy every weight
    anyway). The output-projection bias is kept on rank 0 only, so the all-reduce adds it once.
    With expert parallelism a MoE layer's shared expert is whole on every rank (its output is not
    all-reduced) and its routed experts are ``E / ep`` whole experts."""
    if ep > 1:
        held = experts_of(config.moe.num_experts if config.moe else 0, ep, rank)
        split = tuple(
            w if w.moe is None else dataclasses.replace(w, moe=shard_experts(w.moe, held))
            for w in weights.layers
        )
        weights = dataclasses.replace(weights, layers=split)
    if size == 1:
        return weights
    c = config
    d = c.head_dim
    qh, kvh = q_heads(c.num_heads, size, rank), kv_heads(c.num_kv_heads, size, rank)
    q_rows = slice(qh.start * d, qh.stop * d)
    kv_rows = slice(kvh.start * d, kvh.stop * d)
    mlp = columns(c.intermediate_size, size, rank)
    mlp_rows = slice(mlp.start, mlp.stop)

    def rows(t: Weight | None, s: slice) -> torch.Tensor | None:
        return None if t is None else dense(t)[s]

    def cols(t: Weight | None, s: slice) -> torch.Tensor | None:
        return None if t is None else dense(t)[:, s].contiguous()

    layers = []
    for w in weights.layers:
        moe = w.moe
        if moe is not None and ep == 1:  # every expert here: its columns split, as a dense MLP's
            moe = shard_expert_columns(moe, rank, size)
        layers.append(
            LayerWeights(
                input_norm=w.input_norm,
                q_proj=rows(w.q_proj, q_rows),
                k_proj=rows(w.k_proj, kv_rows),
                v_proj=rows(w.v_proj, kv_rows),
                q_bias=rows(w.q_bias, q_rows),
                k_bias=rows(w.k_bias, kv_rows),
                v_bias=rows(w.v_bias, kv_rows),
                o_proj=cols(w.o_proj, q_rows),
                o_bias=w.o_bias if rank == 0 else None,
                post_norm=w.post_norm,
                gate_proj=rows(w.gate_proj, mlp_rows),
                up_proj=rows(w.up_proj, mlp_rows),
                down_proj=cols(w.down_proj, mlp_rows),
                q_norm=w.q_norm,
                k_norm=w.k_norm,
                moe=moe,
                mla=None if w.mla is None or c.mla is None else shard_mla(w.mla, c.mla, qh, rank),
            )
        )
    info = shard_info(c, rank, size, ep)
    head = dense(weights.lm_head)[info.vocab_rows.start : info.vocab_rows.stop]  # (<= V/tp, hidden), a view
    if head.shape[0] < info.vocab_shard:  # the last rank: pad to the common width of the gather
        pad = head.new_zeros(info.vocab_shard - head.shape[0], head.shape[1])
        head = torch.cat([head, pad])
    return ModelWeights(embed=weights.embed, layers=tuple(layers), norm=weights.norm, lm_head=head)


def dense(w: Weight) -> torch.Tensor:
    """A weight to shard: quantized ones are dequantized before (engine/model.py), as a shard's column
    slice would cut their blocks."""
    assert isinstance(w, torch.Tensor), "dequantize quantized weights before sharding them"
    return w


def default_threads(tp: int) -> int:
    """Intra-op threads per rank when a worker's ranks share one machine's cores."""
    return max(1, (os.cpu_count() or 1) // tp)
