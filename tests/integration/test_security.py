"""Both front doors of a real TandemServer secured (router/security.py), in-process over real gRPC
and real HTTP(S) on loopback, with the scripted backend: TLS and mTLS handshakes (a client that
does not trust the server, or shows no or a stranger's certificate, is refused), API keys (missing
and wrong ones refused, right ones served: gRPC metadata and the openai SDK's bearer token), health
open only when configured, the per-key rate limit, message size and request limits, each with its
status: gRPC UNAUTHENTICATED / RESOURCE_EXHAUSTED / INVALID_ARGUMENT, HTTP 401 / 429 / 400 / 413.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx  # the openai SDK's own httpx (its http_client)
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import ClientSecurity, build_request, stream_generate
from router.http.options import HttpOptions
from router.security import RateLimit, SecurityOptions, TlsFiles
from router.server import TandemServer
from router.validation import RequestLimits
from tests.certs import Pki, make_pki
from tests.integration.test_http_api import TextBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
KEY, OTHER_KEY = "sk-tandem-test-1", "sk-tandem-test-2"
TIMEOUT = 30.0  # generous: only to turn a hang into a failure


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# test keys\n{KEY}\n{OTHER_KEY}\n")
    return str(path)


@asynccontextmanager
async def running(security: SecurityOptions, **kw: Any) -> AsyncIterator[TandemServer]:
    http = HttpOptions(port=0, max_request_bytes=4096)
    server = TandemServer(TextBackend(), port=0, http=http, security=security, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def tls(pki: Pki, mtls: bool = False) -> TlsFiles:
    return TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca) if mtls else None)


def channel(
    address: str, pki: Pki | None, ca: Path | None = None, cert: tuple[Path, Path] | None = None
) -> grpc.aio.Channel:
    """A channel to ``address``: plaintext without ``pki``, else TLS trusting ``ca`` (the test CA)."""
    if pki is None:
        return grpc.aio.insecure_channel(address)
    key, chain = (cert[1].read_bytes(), cert[0].read_bytes()) if cert else (None, None)
    creds = grpc.ssl_channel_credentials((ca or pki.ca).read_bytes(), key, chain)
    return grpc.aio.secure_channel(address, creds)


async def generate(ch: grpc.aio.Channel, key: str | None = None, **params: Any) -> list[pb.GenerateResponse]:
    md = (("authorization", f"Bearer {key}"),) if key is not None else None
    call = pb_grpc.TandemStub(ch).Generate(build_request("abc", **params), metadata=md, timeout=TIMEOUT)
    return [m async for m in call]


async def grpc_code(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value.code(), e.value.details() or ""


def client_ssl(pki: Pki, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca or pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def sdk(url: str, key: str, ctx: ssl.SSLContext | None = None) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(verify=ctx) if ctx is not None else None
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, http_client=http)


# -- gRPC ----------------------------------------------------------------------------------------------
def test_grpc_tls_handshake_and_api_keys(pki: Pki, keys_file: str) -> None:
    async def main() -> None:
        async with running(SecurityOptions(api_keys_file=keys_file, tls=tls(pki))) as server:
            addr = server.address
            async with channel(addr, pki) as ch:
                msgs = await generate(ch, KEY)
                assert [m.token_ids[0] for m in msgs] == [100, 101, 102, 103]
                assert len(await generate(ch, OTHER_KEY, max_tokens=1)) == 1
                code, details = await grpc_code(generate(ch))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                assert details == "missing API key: send 'authorization: Bearer <key>'"
                code, details = await grpc_code(generate(ch, "sk-wrong"))
                assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
                code, _ = await grpc_code(generate(ch, KEY.upper()))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                stub = pb_grpc.TandemStub(ch)
                code, _ = await grpc_code(stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT))
                assert code == grpc.StatusCode.UNAUTHENTICATED  # every method, not only Generate
                info = await stub.GetServerInfo(
                    pb.GetServerInfoRequest(), metadata=(("authorization", f"Bearer {KEY}"),), timeout=TIMEOUT
                )
                assert info.max_concurrency == 64
                health = health_pb2_grpc.HealthStub(ch)
                code, _ = await grpc_code(health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
                assert code == grpc.StatusCode.UNAUTHENTICATED  # health is not open unless configured
            # a plaintext client, and one that does not trust the server's CA: no handshake
            async with channel(addr, None) as ch:
                code, _ = await grpc_code(generate(ch, KEY))
                assert code == grpc.StatusCode.UNAVAILABLE
            async with channel(addr, pki, ca=pki.other_ca) as ch:
                code, _ = await grpc_code(generate(ch, KEY))
                assert code == grpc.StatusCode.UNAVAILABLE
            assert [ln["tls"] and ln["api_keys"] for ln in server.listeners()] == [True, True]
            assert server.http_url is not None and server.http_url.startswith("https://")

    asyncio.run(main())


def test_grpc_mtls_needs_a_client_certificate_from_the_ca(pki: Pki) -> None:
    async def main() -> None:
        async with running(SecurityOptions(tls=tls(pki, mtls=True))) as server:
            addr = server.address
            async with channel(addr, pki, cert=(pki.client_cert, pki.client_key)) as ch:
                assert len(await generate(ch, max_tokens=2)) == 2
            async with channel(addr, pki) as ch:  # no client certificate
                code, _ = await grpc_code(generate(ch))
                assert code == grpc.StatusCode.UNAVAILABLE
            async with channel(addr, pki, cert=(pki.other_client_cert, pki.other_client_key)) as ch:
                code, _ = await grpc_code(generate(ch))
                assert code == grpc.StatusCode.UNAVAILABLE
            assert server.listeners()[0]["mtls"] is True

    asyncio.run(main())


def test_grpc_open_health_rate_limit_and_bounds(keys_file: str) -> None:
    sec = SecurityOptions(
        api_keys_file=keys_file,
        allow_unauthenticated_health=True,
        rate_limit=RateLimit(requests_per_s=0.001, burst=2),  # no refill within the test
    )

    async def main() -> None:
        limits = RequestLimits(max_stop_strings=2)
        async with (
            running(sec, limits=limits, max_message_bytes=1024) as server,
            channel(server.address, None) as ch,
        ):
            health = health_pb2_grpc.HealthStub(ch)
            for _ in range(4):  # open, and outside the rate limit
                r = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            code, details = await grpc_code(generate(ch, KEY, logprobs=21))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("sampling.logprobs: ")
            assert "max_logprobs" in details
            code, details = await grpc_code(generate(ch, KEY, stop=["a", "b", "c"]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_stop_strings 2" in details
            # the burst of 2 is spent (refused requests count too): KEY is limited, the other key not
            code, details = await grpc_code(generate(ch, KEY))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("rate limit: ")
            assert len(await generate(ch, OTHER_KEY, max_tokens=1)) == 1
            big = pb_grpc.TandemStub(ch).Generate(
                build_request(list(range(600))), metadata=(("authorization", f"Bearer {OTHER_KEY}"),)
            )
            code, details = await grpc_code(_drain(big))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1024" in details
            code, _ = await grpc_code(generate(ch, "sk-wrong"))
            assert code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(main())


async def _drain(call: Any) -> list[Any]:
    return [m async for m in call]


def test_the_cli_client_reaches_a_secured_server(pki: Pki, keys_file: str) -> None:
    """router/client.py (``tandem generate --server``) with an API key and mTLS; without the key, refused."""

    async def main() -> None:
        async with running(SecurityOptions(api_keys_file=keys_file, tls=tls(pki, mtls=True))) as server:
            sec = ClientSecurity(KEY, True, str(pki.ca), str(pki.client_cert), str(pki.client_key))
            assert KEY not in repr(sec)

            def call(security: ClientSecurity) -> list[int]:
                out = stream_generate(server.address, "abc", max_tokens=3, timeout=TIMEOUT, security=security)
                return [t for m in out for t in m.token_ids]

            assert await asyncio.to_thread(call, sec) == [100, 101, 102]
            nokey = ClientSecurity(None, True, str(pki.ca), str(pki.client_cert), str(pki.client_key))
            with pytest.raises(grpc.RpcError) as e:
                await asyncio.to_thread(call, nokey)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]

    asyncio.run(main())


# -- HTTP ----------------------------------------------------------------------------------------------
def test_http_tls_handshake_and_api_keys_through_the_openai_sdk(pki: Pki, keys_file: str) -> None:
    async def main() -> None:
        async with running(SecurityOptions(api_keys_file=keys_file, tls=tls(pki))) as server:
            url = server.http_url
            assert url is not None and url.startswith("https://127.0.0.1:")
            r = await sdk(url, KEY, client_ssl(pki)).completions.create(
                model="fake", prompt="abc", max_tokens=3
            )
            assert r.choices[0].text == "<0><1><2>"
            c = await sdk(url, OTHER_KEY, client_ssl(pki)).chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert c.choices[0].message.content == "<0><1>"
            with pytest.raises(openai.AuthenticationError) as e:
                await sdk(url, "sk-wrong", client_ssl(pki)).completions.create(model="fake", prompt="abc")
            assert e.value.status_code == 401
            assert e.value.body == {
                "message": "invalid API key",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
            assert e.value.response.headers["www-authenticate"].startswith("Bearer")
            async with httpx.AsyncClient(verify=client_ssl(pki), timeout=TIMEOUT) as h:
                r0 = await h.post(url + "/v1/completions", json={"prompt": "abc"})  # no Authorization
                assert r0.status_code == 401 and r0.json()["error"]["message"].startswith("missing API key")
                for path in ("/health", "/v1/models", "/metrics"):
                    assert (await h.get(url + path)).status_code == 401, path
                ok = await h.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "fake"
                # a body over the limit from a keyed client: 413, not read
                big = await h.post(
                    url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b" " * 5000
                )
                assert big.status_code == 413
            # a client that does not trust the server's CA, and a plaintext one: no exchange
            with pytest.raises(openai.APIConnectionError):
                await sdk(url, KEY, client_ssl(pki, ca=pki.other_ca)).completions.create(
                    model="fake", prompt="a"
                )
            with pytest.raises(openai.APIConnectionError):
                await sdk(url.replace("https://", "http://"), KEY).completions.create(
                    model="fake", prompt="a"
                )

    asyncio.run(main())


def test_http_mtls_needs_a_client_certificate_from_the_ca(pki: Pki) -> None:
    async def main() -> None:
        async with running(SecurityOptions(tls=tls(pki, mtls=True))) as server:
            url = server.http_url
            assert url is not None
            good = client_ssl(pki, cert=(pki.client_cert, pki.client_key))
            r = await sdk(url, "unused", good).completions.create(model="fake", prompt="abc", max_tokens=2)
            assert r.choices[0].text == "<0><1>"
            for ctx in (client_ssl(pki), client_ssl(pki, cert=(pki.other_client_cert, pki.other_client_key))):
                with pytest.raises(openai.APIConnectionError):
                    await sdk(url, "unused", ctx).completions.create(model="fake", prompt="abc", max_tokens=2)

    asyncio.run(main())


def test_http_open_health_rate_limit_and_bounds(keys_file: str) -> None:
    sec = SecurityOptions(
        api_keys_file=keys_file, allow_unauthenticated_health=True, rate_limit=RateLimit(0.001, burst=3)
    )

    async def main() -> None:
        async with running(sec, limits=RequestLimits(max_n=2, max_stop_strings=1)) as server:
            url = server.http_url
            assert url is not None and url.startswith("http://")
            auth = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(timeout=TIMEOUT) as h:
                for _ in range(5):
                    assert (await h.get(url + "/health")).status_code == 200  # open, not rate limited
                r = await h.post(url + "/v1/completions", headers=auth, json={"prompt": "abc", "n": 3})
                assert r.status_code == 400 and r.json()["error"]["param"] == "n"
                assert "max_n" in r.json()["error"]["message"]
                chat = {"messages": [{"role": "u", "content": "x"}], "stop": ["a", "b"]}
                r = await h.post(url + "/v1/chat/completions", headers=auth, json=chat)
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
                assert "max_stop_strings 1" in r.json()["error"]["message"]
                r = await h.post(
                    url + "/v1/completions", headers=auth, json={"prompt": "abc", "max_tokens": 1}
                )
                assert r.status_code == 200
            limited = sdk(url, KEY)
            with pytest.raises(openai.RateLimitError) as e:  # the burst of 3 is spent
                await limited.completions.create(model="fake", prompt="abc")
            assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
            assert int(e.value.response.headers["retry-after"]) >= 1
            r2 = await sdk(url, OTHER_KEY).completions.create(model="fake", prompt="abc", max_tokens=1)
            assert r2.choices[0].text == "<0>"  # another key has its own bucket

    asyncio.run(main())


def test_both_front_doors_share_one_key_budget(keys_file: str) -> None:
    """One guard per server: a key's requests over gRPC and HTTP draw on the same bucket."""

    async def main() -> None:
        sec = SecurityOptions(api_keys_file=keys_file, rate_limit=RateLimit(0.001, burst=2))
        async with running(sec) as server:
            assert server.http_url is not None
            async with channel(server.address, None) as ch:
                assert len(await generate(ch, KEY, max_tokens=1)) == 1
            r = await sdk(server.http_url, KEY).completions.create(model="fake", prompt="abc", max_tokens=1)
            assert r.choices[0].text == "<0>"
            async with channel(server.address, None) as ch:
                code, _ = await grpc_code(generate(ch, KEY, max_tokens=1))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(openai.RateLimitError):
                await sdk(server.http_url, KEY).completions.create(model="fake", prompt="abc", max_tokens=1)

    asyncio.run(main())
