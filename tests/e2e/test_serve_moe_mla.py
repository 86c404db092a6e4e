"""The new families as a user runs them, one ``tandem`` subprocess per command:

- ``tandem serve --disaggregation always`` on a tiny DeepSeek-V3 (``tandem make-model --arch
  deepseek_v3``: MLA, a dense first layer, group-limited sigmoid routing, a shared expert) with an
  expert-parallel prefill pool (2 ranks): greedy output over gRPC equals transformers'
  ``DeepseekV3ForCausalLM`` token for token, the handoff moves MLA latent blocks (the KV bytes the
  model prices), and every block comes back.
- ``tandem generate --model`` on a Mixtral directory (a traceback before this work) equals
  transformers' ``MixtralForCausalLM``.
- A checkpoint the engine cannot run (an unsupported routing option), and an expert_parallel_size
  that does not divide the experts, are refused by every command that loads a model: one line
  naming the key or field, exit status 2, no traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request
from tests.e2e.conftest import RAY_ENV
from tests.e2e.test_cli import tandem
from tests.e2e.test_grpc_serve import ManagedServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog and keeps running"]
MAX_NEW = 8
BLOCK = 16


def _reference(path: Path, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # as ignore_eos: MAX_NEW tokens whatever they are
    with torch.inference_mode():
        return ref.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)[
            0, len(ids) :
        ].tolist()


def _make(tmp: Path, arch: str, home: Path) -> Path:
    out = tmp / arch
    r = tandem("make-model", "--out", str(out), "--preset", "tiny", "--arch", arch, "--seed", "4", home=home)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("serve-mla")
    return _make(tmp, "deepseek_v3", tmp)


def _yaml(path: Path, tmp: Path, prefill_ep: int, decode_ep: int = 1) -> Path:
    cfg = {
        "model": str(path),
        "engine": {"block_size": BLOCK},
        "pools": {
            "prefill": {"replicas": 1, "num_cpus": 0.25, "expert_parallel_size": prefill_ep},
            "decode": {"replicas": 1, "num_cpus": 0.25, "expert_parallel_size": decode_ep},
        },
        "tiers": {
            "dir": str(tmp / "tiers"),
            "g1": {"capacity": "16MiB"},
            "g2": {"capacity": "16MiB"},
            "g3": None,
        },
    }
    out = tmp / f"serve-ep{prefill_ep}-{decode_ep}.yaml"
    out.write_text(json.dumps(cfg))  # JSON is YAML
    return out


def test_serve_disaggregated_with_expert_parallel_prefill_equals_transformers(
    deepseek: Path, tmp_path: Path
) -> None:
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(deepseek)
    expected = {p: _reference(deepseek, tok.encode(p)) for p in PROMPTS}
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        server = ManagedServer(
            tmp_path / "serve.log",
            "--config",
            str(_yaml(deepseek, tmp_path, prefill_ep=2)),
            "--disaggregation",
            "always",
            "--grace",
            "1",
            ready_timeout=240,
        )
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:

        async def go() -> list[list[Any]]:
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = pb_grpc.TandemStub(ch)

                async def one(p: str) -> list[Any]:
                    call = stub.Generate(build_request(p, max_tokens=MAX_NEW, ignore_eos=True))
                    return [m async for m in call]

                return list(await asyncio.gather(*(one(p) for p in PROMPTS)))

        latent_block = ModelConfig.from_pretrained(deepseek).kv_layout(BLOCK).block_bytes
        for prompt, msgs in zip(PROMPTS, asyncio.run(go()), strict=True):
            assert [t for m in msgs for t in m.token_ids] == expected[prompt], prompt
            t, u = msgs[-1].timings, msgs[-1].usage
            assert (t.prefill_worker, t.decode_worker, t.disaggregated) == ("prefill-0", "decode-0", True)
            assert t.kv_bytes_moved == -(-u.prompt_tokens // BLOCK) * latent_block  # the latent, once
        from tests.e2e.test_serve_pools import _wait_all_idle

        assert "workers of several ranks keep their KV in G1 only" in server.log_path.read_text()  # EP2 ranks

        assert _wait_all_idle(server.address) == [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]
    finally:
        server.stop()


def test_generate_on_a_mixtral_directory_equals_transformers(tmp_path: Path) -> None:
    path = _make(tmp_path, "mixtral", tmp_path)
    from engine.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(path).encode(PROMPTS[1])
    r = tandem(
        "generate",
        "--model",
        str(path),
        PROMPTS[1],
        "--max-tokens",
        str(MAX_NEW),
        "--ignore-eos",
        "--json",
        home=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == _reference(path, ids)


def test_unsupported_checkpoints_and_splits_are_refused_by_every_command(
    deepseek: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in deepseek.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    raw = json.loads((deepseek / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(raw | {"topk_method": "greedy"}))
    launch_yaml = tmp_path / "launch.yaml"
    launch_yaml.write_text(json.dumps({"model": str(bad)}))
    commands = [
        ("generate", "--model", str(bad), "hi"),
        ("serve", "--model", str(bad), "--backend", "engine", "--port", "0", "--no-http"),
        ("serve", "--model", str(bad)),
        ("bench", "engine", "--model", str(bad)),
        ("launch", str(launch_yaml), "--address", "127.0.0.1:1"),
    ]
    for cmd in commands:
        r = tandem(*cmd, home=tmp_path)
        assert r.returncode == 2, (cmd, r.stderr[-2000:])
        assert "topk_method='greedy'" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])
    # 8 experts on 3 ranks: the field is named, before anything starts
    r = tandem("serve", "--config", str(_yaml(deepseek, tmp_path, 1, 3)), home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pools.decode.expert_parallel_size: expert_parallel_size 3 does not divide" in r.stderr, r.stderr
