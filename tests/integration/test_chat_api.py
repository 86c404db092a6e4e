"""Chat messages and penalties through the real gRPC API (in-process TandemServer over an
EngineBackend, tiny checkpoints): a chat is the model's template rendered and tokenized exactly as
``Tokenizer.encode_chat`` (itself equal to transformers), penalties reach the sampler, and bad chats
or penalties are INVALID_ARGUMENT naming the field, while the server keeps serving."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from engine.make_model import make_model
from engine.sampling_params import SamplingParams
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request
from router.engine_backend import EngineBackend
from router.server import TandemServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "Once upon a time"},
]
REFUSING = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
)
REFUSING += "{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-api")
    plain = make_model(root / "plain", "tiny")
    refusing = root / "refusing"
    shutil.copytree(plain, refusing)
    (refusing / "chat_template.jinja").write_text(REFUSING)  # wins over tokenizer_config.json's
    bare = root / "bare"
    shutil.copytree(plain, bare)
    cfg = (bare / "tokenizer_config.json").read_text()
    import json

    data = json.loads(cfg)
    del data["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(data))
    return {"plain": plain, "refusing": refusing, "bare": bare}


def _serve(path: Path) -> tuple[TandemServer, EngineBackend]:
    backend = EngineBackend(EngineConfig(model=path, max_num_seqs=8), model_name=path.name)
    return TandemServer(backend, port=0), backend


async def _call(server: TandemServer, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        return [m async for m in pb_grpc.TandemStub(ch).Generate(req, timeout=30)]


def _run(path: Path, reqs: list[pb.GenerateRequest]) -> list[Any]:
    """Each request's responses, or its RpcError, from one server over ``path``."""

    async def main() -> list[Any]:
        server, _ = _serve(path)
        await server.start()
        out: list[Any] = []
        try:
            for r in reqs:
                try:
                    out.append(await _call(server, r))
                except grpc.aio.AioRpcError as e:
                    out.append(e)
        finally:
            await server.stop(0)
        return out

    return asyncio.run(main())


@pytest.fixture(scope="module")
def engine(checkpoints: dict[str, Path]) -> Iterator[LLMEngine]:
    e = LLMEngine(EngineConfig(model=checkpoints["plain"]))
    try:
        yield e
    finally:
        e.close()


def test_chat_and_penalties_equal_the_engine(checkpoints: dict[str, Path], engine: LLMEngine) -> None:
    assert engine.tokenizer is not None
    chat_ids = engine.tokenizer.encode_chat(CONV)
    no_gen_ids = engine.tokenizer.encode_chat(CONV, add_generation_prompt=False)
    assert chat_ids[0] == engine.tokenizer.bos_token_id and len(no_gen_ids) < len(chat_ids)
    penal = dict(
        repetition_penalty=8.0, frequency_penalty=2.0, presence_penalty=2.0
    )  # random logits are flat
    (want,) = engine.generate([chat_ids], SamplingParams(max_tokens=10, ignore_eos=True))
    (want_no_gen,) = engine.generate([no_gen_ids], SamplingParams(max_tokens=10, ignore_eos=True))
    # 24 tokens: long enough for the unpenalized greedy text to repeat itself
    (want_pen,) = engine.generate(
        ["Once upon a time"], SamplingParams(max_tokens=24, ignore_eos=True, **penal)
    )
    chat, no_gen, pen = _run(
        checkpoints["plain"],
        [
            build_request(messages=CONV, max_tokens=10, ignore_eos=True),
            build_request(messages=CONV, add_generation_prompt=False, max_tokens=10, ignore_eos=True),
            build_request("Once upon a time", max_tokens=24, ignore_eos=True, **penal),
        ],
    )
    assert [t for m in chat for t in m.token_ids] == want.new_token_ids
    assert chat[-1].usage.prompt_tokens == len(chat_ids)
    assert [t for m in no_gen for t in m.token_ids] == want_no_gen.new_token_ids
    assert no_gen[-1].usage.prompt_tokens == len(no_gen_ids)
    assert [t for m in pen for t in m.token_ids] == want_pen.new_token_ids
    (plain,) = engine.generate(["Once upon a time"], SamplingParams(max_tokens=24, ignore_eos=True))
    assert plain.new_token_ids != want_pen.new_token_ids  # the penalties did reach the sampler


@pytest.mark.parametrize(
    ("model", "kwargs", "needle"),
    [
        ("plain", dict(messages=[]), "prompt.chat.messages: is empty"),
        ("plain", dict(messages=[{"role": "", "content": "x"}]), "prompt.chat.messages[0].role: is empty"),
        ("plain", dict(prompt="hi", repetition_penalty=0.0), "sampling.repetition_penalty: must be > 0"),
        ("plain", dict(prompt="hi", frequency_penalty=3.0), "sampling.frequency_penalty: must be in [-2, 2]"),
        ("plain", dict(prompt="hi", presence_penalty=-2.5), "sampling.presence_penalty: must be in [-2, 2]"),
        ("bare", dict(messages=CONV), "prompt.chat: this model has no chat template"),
        (
            "refusing",
            dict(messages=[{"role": "tool", "content": "x"}]),
            "prompt.chat: the model's chat template refused the conversation: no tools here",
        ),
    ],
)
def test_bad_chats_and_penalties_are_invalid_argument(
    checkpoints: dict[str, Path], model: str, kwargs: dict[str, Any], needle: str
) -> None:
    bad, good = _run(
        checkpoints[model], [build_request(max_tokens=4, **kwargs), build_request("hi", max_tokens=4)]
    )
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (bad.details() or "")
    assert isinstance(good, list) and good[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED  # still serving
