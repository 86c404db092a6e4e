"""The chaos suite's shared parts: one set of Ray workers per session (two prefill, two decode, on the
tiny checkpoint, restarted by Ray when killed), the in-process engine's greedy reference, and the
figures printed (and written to $TANDEM_CHAOS_FIGURES) at the end of the run."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import harness
from tests.ray_fixture import ray_cluster, running_pools  # noqa: F401  (fixture)

LONG_NEW = 240  # the victim streams of the kill cases: long enough to be caught mid-stream


@pytest.fixture(scope="session")
def workers(checkpoint: Path, ray_cluster: None) -> Iterator[tuple[list, list]]:  # noqa: F811
    from engine.llm_engine import EngineConfig
    from pool_runtime.actors import PoolSpec
    from pool_runtime.config import WorkerConfig

    # 8-token prefill steps: a 4-block prompt takes several steps, so "during prefill" and "during
    # the transfer" are real stages; 20 s for the decode side's commit ack
    cfg = WorkerConfig(
        EngineConfig(model=checkpoint, block_size=harness.BLOCK, num_blocks=256, max_num_batched_tokens=32),
        kv_backend="nixl",
        ack_timeout_s=20,
    )
    spec = PoolSpec(replicas=2, num_cpus=0.25, max_restarts=-1)
    with running_pools(cfg, spec, decode_spec=dataclasses.replace(spec)) as pools:
        yield pools


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> dict[str, list[int]]:
    """Greedy ids of the in-process engine, each prompt alone: MAX_NEW tokens, and LONG_NEW under
    the key ``"long:" + prompt``."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=checkpoint))
    try:
        out = {}
        for p in harness.PROMPTS:
            for key, n in ((p, harness.MAX_NEW), ("long:" + p, LONG_NEW)):
                out[key] = engine.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[
                    0
                ].new_token_ids
        return out
    finally:
        engine.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    harness.write_figures()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.RECORDED:
        terminalreporter.section("chaos figures")
        for f in harness.RECORDED:
            terminalreporter.write_line(
                f"{f.case}: {f.injected}; requests {f.requests}, held {f.streams_held}, faults {f.faults}, "
                f"survived {f.survived}, outcome {f.outcome}, blocks leaked {f.blocks_leaked}, "
                f"{f.wall_s:.1f} s"
            )
