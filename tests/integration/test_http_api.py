"""The OpenAI HTTP front door in-process over real HTTP on loopback (uvicorn), with a scripted backend:
the official ``openai`` SDK, the exact SSE framing (read raw with aiohttp), every error status with
the field it names, a failure mid-stream, disconnects reaching the backend, admission shared with
gRPC, /metrics, and the server's stop draining HTTP streams too.

The real ``tandem serve`` on the Ray pools is tests/e2e/test_http_serve.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.backend import BackendRequest, Chunk
from router.client import build_request
from router.errors import BackendUnavailable
from router.http.options import HttpOptions
from router.server import TandemServer
from tests.integration.test_router_servicer import ScriptedBackend, _until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class TextBackend(ScriptedBackend):
    """ScriptedBackend with a tokenizer's other half, logprobs, params recorded, and two more scripts:
    a prompt ending in token 5 makes every other chunk textless (a held-back character), one ending
    in 9 fails after two chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[BackendRequest] = []

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + super().tokenize(text)

    def tokenize_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.tokenize("|".join(f"{m['role']}:{m['content']}" for m in messages), False)

    def detokenize(self, token_ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t - 100}>" if t >= 100 else chr(t) for t in token_ids)

    async def generate(self, request: BackendRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        last, k = request.prompt_token_ids[-1], request.params.logprobs
        i = 0
        async for chunk in super().generate(request):
            if last == 9 and i == 2:
                raise BackendUnavailable("decode worker lost")
            if last == 5 and i % 2 == 0 and chunk.finish_reason is None:
                chunk.text = ""
            if k is not None:
                chunk.logprobs = [-0.5 * i]
                chunk.top_logprobs = [[(100 + i, -0.5 * i), (1, -3.0)][:k]]
            if chunk.stats is not None:
                chunk.stats.cached_tokens = 1
            i += 1
            yield chunk


@asynccontextmanager
async def running(**kw: Any) -> AsyncIterator[tuple[TandemServer, TextBackend, str]]:
    backend = TextBackend()
    server = TandemServer(backend, port=0, http=HttpOptions(port=0, max_request_bytes=4096), **kw)  # type: ignore[arg-type]
    await server.start()
    try:
        assert server.http_url is not None
        yield server, backend, server.http_url
    finally:
        await server.stop(0)


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def raw_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[str]:
    """The SSE body cut at blank lines, each event as its raw text (checked to be one data line)."""
    async with session.post(url, json=body) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = (await r.read()).decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, repr(e)
    return [e.removeprefix("data: ") for e in events]


def test_completions_and_chat_through_the_openai_sdk() -> None:
    async def main() -> None:
        async with running() as (_, backend, url):
            client = sdk(url)
            r = await client.completions.create(model="fake", prompt="abc", max_tokens=3, temperature=0)
            assert (r.object, r.model, r.id[:5]) == ("text_completion", "fake", "cmpl-")
            assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [(0, "<0><1><2>", "length")]
            assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 3)
            assert r.usage.total_tokens == 7 and r.usage.prompt_tokens_details.cached_tokens == 1
            assert backend.requests[-1].prompt_token_ids == [1, 97, 98, 99]
            assert backend.requests[-1].params.temperature == 0
            default = await client.completions.create(model="fake", prompt="abc")
            assert default.usage.completion_tokens == 16 and backend.requests[-1].params.temperature == 1.0

            c = await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2
            )
            assert (c.object, c.id[:9]) == ("chat.completion", "chatcmpl-")
            assert (c.choices[0].message.role, c.choices[0].message.content) == ("assistant", "<0><1>")
            assert backend.requests[-1].prompt_token_ids == backend.tokenize("user:hi", False)
            parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
            await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": parts}])
            assert backend.requests[-1].prompt_token_ids == backend.tokenize("user:h\ni", False)
            # chat without max_tokens: as many as the context (64) leaves, capped by the limit (32)
            assert backend.requests[-1].params.max_tokens == 32

            chunks = [
                ch
                async for ch in await client.chat.completions.create(
                    model="fake",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=3,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            ]
            deltas = [(ch.choices[0].delta.role, ch.choices[0].delta.content) for ch in chunks[:-1]]
            assert deltas == [("assistant", "<0>"), (None, "<1>"), (None, "<2>")]
            assert [ch.choices[0].finish_reason for ch in chunks[:-1]] == [None, None, "length"]
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
            assert all(ch.usage is None for ch in chunks[:-1])
            texts = [
                ch.choices[0].text
                async for ch in await client.completions.create(
                    model="fake", prompt=[6, 5], max_tokens=4, stream=True, stop=["never"]
                )
            ]
            # the textless chunks ride with the next one: no empty text events
            assert texts == ["<1>", "<3>"] and backend.requests[-1].prompt_token_ids == [6, 5]
            assert backend.requests[-1].params.stop == ["never"]

    asyncio.run(main())


def test_stream_framing_is_exact_and_usage_comes_when_asked() -> None:
    async def main() -> None:
        async with running() as (_, _, url), aiohttp.ClientSession() as s:
            body = {"prompt": "ab", "max_tokens": 2, "stream": True}
            plain = [json.loads(e) for e in (await raw_events(s, url + "/v1/completions", body))[:-1]]
            assert [list(e) for e in plain] == [["id", "object", "created", "model", "choices"]] * 2
            assert {e["object"] for e in plain} == {"text_completion"} and len({e["id"] for e in plain}) == 1
            assert [e["choices"] for e in plain] == [
                [{"index": 0, "text": "<0>", "logprobs": None, "finish_reason": None}],
                [{"index": 0, "text": "<1>", "logprobs": None, "finish_reason": "length"}],
            ]
            body = {"messages": [{"role": "u", "content": "x"}], "max_tokens": 3, "stream": True}
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
            events = [json.loads(e) for e in (await raw_events(s, url + "/v1/chat/completions", body))[:-1]]
            assert [e["object"] for e in events] == ["chat.completion.chunk"] * 4
            assert [e["choices"][0]["delta"] for e in events[:3]] == [
                {"role": "assistant", "content": "<0>"},
                {"content": "<1>"},
                {"content": "<2>"},
            ]
            prompt = len("u:x")
            assert [e["usage"]["completion_tokens"] for e in events[:3]] == [1, 2, 3]
            assert events[2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
            assert events[3]["choices"] == []
            assert events[3]["usage"] == {
                "prompt_tokens": prompt,
                "completion_tokens": 3,
                "total_tokens": prompt + 3,
                "prompt_tokens_details": {"cached_tokens": 1},
            }

    asyncio.run(main())


def test_logprobs_prompts_n_and_seeds() -> None:
    async def main() -> None:
        async with running() as (_, backend, url):
            client = sdk(url)
            r = await client.completions.create(model="fake", prompt=[1, 2], max_tokens=2, logprobs=1)
            lp = r.choices[0].logprobs
            assert lp.tokens == ["<0>", "<1>"] and lp.token_logprobs == [-0.0, -0.5]
            assert lp.top_logprobs == [{"<0>": -0.0}, {"<1>": -0.5}] and lp.text_offset == [0, 3]
            c = await client.chat.completions.create(
                model="fake",
                messages=[{"role": "u", "content": "x"}],
                max_tokens=1,
                logprobs=True,
                top_logprobs=2,
            )
            (entry,) = c.choices[0].logprobs.content
            assert (entry.token, entry.logprob, entry.bytes) == ("<0>", 0.0, list(b"<0>"))
            assert [(t.token, t.logprob) for t in entry.top_logprobs] == [("<0>", 0.0), ("\x01", -3.0)]
            streamed = [
                ch.choices[0]
                async for ch in await client.completions.create(
                    model="fake", prompt=[5], max_tokens=2, logprobs=0, stream=True
                )
            ]  # the textless first chunk's logprob rides with the second
            assert [(s.text, s.logprobs.tokens) for s in streamed] == [("<1>", ["<0>", "<1>"])]

            r = await client.completions.create(model="fake", prompt=["ab", "cd"], n=2, max_tokens=1, seed=7)
            assert [c.index for c in r.choices] == [0, 1, 2, 3]
            got = sorted((q.prompt_token_ids, q.params.seed) for q in backend.requests[-4:])
            assert got == [([1, 97, 98], 7), ([1, 97, 98], 8), ([1, 99, 100], 7), ([1, 99, 100], 8)]
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 4)
            r = await client.completions.create(model="fake", prompt=[[3, 4], [5]], max_tokens=1, best_of=1)
            assert [q.prompt_token_ids for q in backend.requests[-2:]] == [[3, 4], [5]]
            chunks = [
                ch
                async for ch in await client.completions.create(
                    model="fake", prompt="ab", n=3, max_tokens=2, stream=True
                )
            ]
            by_index: dict[int, str] = {}
            for ch in chunks:
                by_index[ch.choices[0].index] = by_index.get(ch.choices[0].index, "") + ch.choices[0].text
            assert by_index == {0: "<0><1>", 1: "<0><1>", 2: "<0><1>"}

    asyncio.run(main())


BAD: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 33}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 5000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 70}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1] * 40, "max_tokens": 30}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "u", "content": 3}]}, 400, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "u", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "u"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "u"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "u"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/nowhere", {}, 404, None),
]


def test_bad_inputs_get_their_codes_naming_the_field_while_another_stream_goes_on() -> None:
    async def main() -> None:
        async with running() as (server, backend, url), aiohttp.ClientSession() as s:
            backend.gate.clear()
            ongoing = await s.post(
                url + "/v1/completions", json={"prompt": "go", "max_tokens": 5, "stream": True}
            )
            first = await ongoing.content.readuntil(b"\n\n")
            assert b'"<0>"' in first
            for path, body, status, param in BAD:
                async with s.post(url + path, json=body) as r:
                    err = (await r.json())["error"]
                assert r.status == status, (body, err)
                assert set(err) == {"message", "type", "param", "code"}
                assert err["param"] == param, (body, err)
                if param is not None:
                    assert err["message"].startswith(param + ":"), err
            async with s.post(
                url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "mystery": 1}
            ) as r:
                assert r.status == 200  # unknown fields are ignored
            async with s.post(
                url + "/v1/completions", data=b"{not json", headers={"content-type": "application/json"}
            ) as r:
                assert r.status == 400
            async with s.post(url + "/v1/completions", json={"prompt": "x" * 5000}) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (413, "request_too_large")
            backend.gate.set()
            rest = (await ongoing.read()).decode()
            assert [json.loads(e[6:])["choices"][0]["text"] for e in rest.split("\n\n")[:-2]] == [
                "<1>",
                "<2>",
                "<3>",
                "<4>",
            ]
            assert backend.closed == [] and server.admission.in_flight == 0

    asyncio.run(main())


def test_overload_429_unavailable_503_and_a_failure_mid_stream() -> None:
    async def main() -> None:
        async with (
            running(max_concurrency=1, max_queue=0) as (server, backend, url),
            aiohttp.ClientSession() as s,
        ):
            backend.gate.clear()
            # the admission queue is the server's, shared by both front doors: gRPC holds the slot
            async with grpc.aio.insecure_channel(server.address) as ch:
                call = pb_grpc.TandemStub(ch).Generate(build_request("abc", max_tokens=3))
                await call.read()
                with pytest.raises(openai.RateLimitError) as e:
                    await sdk(url).completions.create(model="fake", prompt="x")
                assert e.value.response.headers["retry-after"] == "1"
                assert e.value.body["code"] == "server_overloaded"
                backend.gate.set()
                while await call.read() is not grpc.aio.EOF:
                    pass
            events = await raw_events(
                s, url + "/v1/completions", {"prompt": "\t", "stream": True, "max_tokens": 4}
            )
            assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["<0>", "<1>"]
            error = json.loads(events[2])["error"]
            assert (error["status"], error["code"], error["message"]) == (
                503,
                "backend_unavailable",
                "decode worker lost",
            )
            assert events[3] == "[DONE]"
            with pytest.raises(openai.APIError):  # the SDK turns the event into an exception
                async for _ in await sdk(url).completions.create(model="fake", prompt="\t", stream=True):
                    pass
            backend.alive = False
            with pytest.raises(openai.InternalServerError) as e:
                await sdk(url).completions.create(model="fake", prompt="x")
            assert e.value.status_code == 503
            async with s.get(url + "/health") as r:
                assert r.status == 503
            backend.alive = True
            async with s.get(url + "/health") as r:
                assert r.status == 200

    asyncio.run(main())


def test_a_client_that_disconnects_releases_its_request() -> None:
    async def main() -> None:
        async with running() as (server, backend, url):
            backend.gate.clear()
            for stream in (True, False):
                closed = len(backend.closed)
                async with aiohttp.ClientSession() as s:
                    body = {"prompt": "ab", "max_tokens": 5, "stream": stream}
                    task = asyncio.ensure_future(s.post(url + "/v1/completions", json=body))
                    await _until(lambda: server.admission.in_flight == 1)
                    if stream:
                        r = await task
                        await r.content.readuntil(b"\n\n")
                        r.close()
                    else:
                        task.cancel()
                released = lambda n=closed: len(backend.closed) == n + 1 and not server.admission.in_flight  # noqa: E731
                await _until(released)
                assert backend.closed[-1] == backend.requests[-1].request_id
                assert server.admission.in_flight == 0
            backend.gate.set()

    asyncio.run(main())


def test_models_health_tokenize_detokenize_and_metrics() -> None:
    async def main() -> None:
        async with running() as (server, _, url), aiohttp.ClientSession() as s:
            models = await sdk(url).models.list()
            (m,) = models.data
            assert (m.id, m.owned_by, m.root, m.max_model_len) == ("fake", "tandem", "fake", 64)
            async with s.post(url + "/tokenize", json={"prompt": "ab", "return_token_strs": True}) as r:
                assert await r.json() == {
                    "count": 3,
                    "max_model_len": 64,
                    "tokens": [1, 97, 98],
                    "token_strs": ["\x01", "a", "b"],
                }
            async with s.post(url + "/tokenize", json={"prompt": "ab", "add_special_tokens": False}) as r:
                assert (await r.json())["tokens"] == [97, 98]
            async with s.post(url + "/tokenize", json={"messages": [{"role": "u", "content": "x"}]}) as r:
                assert (await r.json())["count"] == 3
            async with s.post(url + "/detokenize", json={"tokens": [100, 101]}) as r:
                assert await r.json() == {"prompt": "<0><1>"}
            async with s.post(url + "/detokenize", json={"tokens": [1000]}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "tokens"
            await sdk(url).completions.create(model="fake", prompt="ab", max_tokens=3)
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            assert r.headers["content-type"].startswith("text/plain")
            values = _samples(text)
            assert values['tandem:prompt_tokens_total{model_name="fake"}'] == 3
            assert values['tandem:generation_tokens_total{model_name="fake"}'] == 3
            assert values['tandem:request_success_total{finished_reason="length",model_name="fake"}'] == 1
            assert values['tandem:time_to_first_token_seconds_count{model_name="fake"}'] == 1
            assert values['tandem:inter_token_latency_seconds_count{model_name="fake"}'] == 2
            assert values['tandem:prefix_cache_hits_total{worker="p0"}'] == 1
            assert values['tandem:router_request_overhead_seconds_count{front_door="http"}'] == 1
            assert values['tandem:num_requests_running{role="decode",worker="d0"}'] >= 1
            assert values["tandem:router_requests_in_flight"] == 0
            for family in (
                "e2e_request_latency_seconds",
                "request_queue_time_seconds",
                "kv_cache_usage_perc",
            ):
                assert f"# TYPE tandem:{family} " in text

    asyncio.run(main())


def test_stop_drains_http_streams_and_refuses_new_requests() -> None:
    async def main() -> None:
        backend = TextBackend()
        server = TandemServer(backend, port=0, http=HttpOptions(port=0))  # type: ignore[arg-type]
        await server.start()
        url = server.http_url
        async with aiohttp.ClientSession() as s:
            backend.gate.clear()
            r = await s.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 5, "stream": True})
            await r.content.readuntil(b"\n\n")
            await server.stop(grace=0.2)
            with pytest.raises(aiohttp.ClientError):  # cut after the grace period, never finished
                await r.read()
            assert backend.closed == [backend.requests[-1].request_id] and backend.backend_closed
            with pytest.raises(aiohttp.ClientError):
                await s.post(f"{url}/v1/completions", json={"prompt": "ab"})

    asyncio.run(main())


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
