"""Two (or more) spawned processes forming one tensor-parallel group, for the model-level TP tests:
each holds its rank of a ``TPGroup`` (gloo on CPU, NCCL on a GPU) and runs commands sent over a
Pipe, so one pair of processes (torch start-up is seconds) serves every checkpoint of a module.

Rank 0 runs a whole LLMEngine and publishes each step's inputs over a RankChannel; the other ranks
run them with a RankEngine — the same split the pools use, without Ray."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import traceback
from multiprocessing.connection import Connection
from typing import Any

_CTX = mp.get_context("spawn")
TIMEOUT_S = 300.0


def _logits(
    state: dict[str, Any], path: str, prompts: list[list[int]], dtype: str, tp: int = 0, ep: int = 1
) -> list[Any] | None:
    """Every position's logits of each prompt run alone through this rank's shard (rank 0 gets
    them); ``tp`` / ``ep``: what the ranks split (engine/tp_layout.Parallelism; tp 0: all ranks)."""
    import torch

    from engine.attention import AttentionMetadata
    from engine.model import load_model
    from engine.tp_layout import Parallelism

    device = state["device"]
    world = state["tp"].size
    parallel = Parallelism(world, tp or world, ep)
    model = load_model(path, dtype, device=device, tp=state["tp"], parallel=parallel)
    out = []
    for p in prompts:
        n = len(p)
        kv = model.kv_layout(16).allocate(-(-n // 16), device)
        meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 16)))], 16, device)
        ids = torch.tensor(p, device=device)
        hidden = model.forward(ids, torch.arange(n, device=device), kv, meta)
        logits = model.compute_logits(hidden)  # (n, V) on rank 0
        out.append(logits.cpu())
    return out if state["rank"] == 0 else None


def _generate(
    state: dict[str, Any], path: str, prompts: list[list[int]], max_new: int, engine_kw: dict
) -> Any:
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.rank_engine import RankEngine
    from engine.sampling_params import SamplingParams

    cfg = EngineConfig(model=path, device=state["device"], **engine_kw)
    chan = state["channel"]
    if state["rank"] != 0:
        follower = RankEngine(cfg, state["tp"])
        steps = 0
        while (inputs := chan.recv()) is not None:
            follower.run(inputs)
            steps += 1
        return steps
    engine = LLMEngine(cfg, tp=state["tp"])
    engine.runner.publish = chan.send
    try:
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_new))
        assert engine.block_manager.num_used_blocks == 0
        return [o.new_token_ids for o in outs]
    finally:
        chan.send(None)
        engine.close()


COMMANDS = {"logits": _logits, "generate": _generate}


def serve(conn: Connection, rank: int, size: int, init_method: str, device: str, backend: str | None) -> None:
    import torch

    from engine.parallel import RankChannel, TPGroup

    torch.set_num_threads(1)
    state: dict[str, Any] = {"rank": rank, "device": device}
    if rank == 0:
        chan = RankChannel.listen()
        conn.send((chan.address, chan.authkey))
        chan.accept(size - 1)
    else:
        address, key = conn.recv()
        chan = RankChannel.connect(address, key, rank)
    state["channel"] = chan
    if device == "cuda" and torch.cuda.device_count() >= size:
        device = state["device"] = f"cuda:{rank}"
    state["tp"] = TPGroup.init(rank, size, init_method, device, backend=backend)
    conn.send(("ok", "ready"))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        name, kwargs = msg
        try:
            conn.send(("ok", COMMANDS[name](state, **kwargs)))
        except Exception:
            conn.send(("err", traceback.format_exc()))
    state["tp"].close()
    chan.close()


class RankProcesses:
    """``size`` spawned ranks of one group; ``call(name, **kw)`` runs a command on all of them at
    once and returns rank 0's result. ``device`` "cuda": each rank on its own GPU when there are
    enough, else all on GPU 0 (then only with ``backend="gloo"``: NCCL refuses two ranks on one GPU)."""

    def __init__(self, size: int = 2, device: str = "cpu", backend: str | None = None) -> None:
        from engine.parallel import free_port

        init = f"tcp://127.0.0.1:{free_port()}"
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for rank in range(size):
            parent, child = _CTX.Pipe()
            proc = _CTX.Process(target=serve, args=(child, rank, size, init, device, backend), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        address = self._recv(self.conns[0])
        for c in self.conns[1:]:
            c.send(address)
        for c in self.conns:
            assert self._result(c) == "ready"

    @staticmethod
    def _recv(conn: Connection) -> Any:
        if not conn.poll(TIMEOUT_S):
            raise TimeoutError("a rank process did not answer")
        return conn.recv()

    def _result(self, conn: Connection) -> Any:
        status, value = self._recv(conn)
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, name: str, **kwargs: Any) -> Any:
        for c in self.conns:
            c.send((name, kwargs))
        results = [self._result(c) for c in self.conns]
        return results[0]

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(20)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, 9)
