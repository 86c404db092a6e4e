"""Redis secured: a real redis-server with ``--requirepass`` and one with TLS only (``--port 0
--tls-port``, client certificates required: Redis's default ``tls-auth-clients yes``). The metadata
store and the router's rate limit reach them through the YAML's ``metadata.password_env`` /
``metadata.tls`` (deploy/derive.py's ``redis_options``); without the password, in plaintext or
without a client certificate they are refused. Two routers over one Redis share each key's budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from deploy.config import parse_config
from deploy.derive import redis_options, server_options
from deploy.pools import make_store
from memory_tiers.metadata import BlockEvent, EventKind, Tier
from router.errors import RateLimited
from router.security import Guard, KeyStore, RateLimit, RedisBuckets
from router.server import TandemServer
from tests.certs import Pki, make_pki
from tests.integration.test_http_api import TextBackend
from tests.integration.test_security import KEY, OTHER_KEY, channel, generate, grpc_code
from tests.redis_server import redis_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PASSWORD = "tandem-redis-test-pw"
H = bytes([7]) * 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("redis-pki"))


@pytest.fixture
def password_redis() -> Iterator[str]:
    def ping(port: int) -> bool:
        return bool(redis.Redis(port=port, password=PASSWORD).ping())

    with redis_server(lambda port: ["--port", str(port), "--requirepass", PASSWORD], ping) as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def tls_redis(pki: Pki) -> Iterator[str]:
    def args(port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki.server_cert),
                "--tls-key-file", str(pki.server_key), "--tls-ca-cert-file", str(pki.ca)]  # fmt: skip

    def ping(port: int) -> bool:
        r = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(pki.ca), ssl_certfile=str(pki.client_cert),
                        ssl_keyfile=str(pki.client_key))  # fmt: skip
        return bool(r.ping())

    with redis_server(args, ping) as port:
        yield f"rediss://127.0.0.1:{port}/0"


def _roundtrip(store: Any) -> None:
    store.publish([BlockEvent(EventKind.STORED, "w1", Tier.G2, H)])
    assert store.find_blocks([H]) == [{"w1": Tier.G2}]
    store.close()


def test_store_with_a_password_from_the_environment(password_redis: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = parse_config({"metadata": {"store": password_redis, "password_env": "TANDEM_TEST_REDIS_PW"}})
    monkeypatch.setenv("TANDEM_TEST_REDIS_PW", PASSWORD)
    _roundtrip(make_store(cfg.metadata.store, **redis_options(cfg.metadata)))
    with pytest.raises(redis.AuthenticationError):
        make_store(password_redis).find_blocks([H])  # no password
    with pytest.raises(redis.AuthenticationError):
        make_store(password_redis, password="wrong").find_blocks([H])


def test_store_over_tls_with_a_client_certificate(tls_redis: str, pki: Pki) -> None:
    tls = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    cfg = parse_config({"metadata": {"store": tls_redis, "tls": tls}})
    _roundtrip(make_store(cfg.metadata.store, **redis_options(cfg.metadata)))
    plaintext = tls_redis.replace("rediss://", "redis://")
    with pytest.raises(redis.ConnectionError):
        make_store(plaintext).find_blocks([H])
    with pytest.raises(redis.ConnectionError):  # the server wants a client certificate
        make_store(tls_redis, ssl_ca_certs=str(pki.ca)).find_blocks([H])
    with pytest.raises(redis.ConnectionError):  # the client does not trust the server's CA
        make_store(
            tls_redis, **{**redis_options(cfg.metadata), "ssl_ca_certs": str(pki.other_ca)}
        ).find_blocks([H])


def test_rate_limit_buckets_over_tls_are_shared_by_guards(tls_redis: str, pki: Pki) -> None:
    kw = {
        "ssl_ca_certs": str(pki.ca),
        "ssl_certfile": str(pki.client_cert),
        "ssl_keyfile": str(pki.client_key),
    }

    async def main() -> None:
        keys = KeyStore([KEY, OTHER_KEY])
        a = Guard(keys, RedisBuckets(RateLimit(0.001, 3), tls_redis, **kw))
        b = Guard(keys, RedisBuckets(RateLimit(0.001, 3), tls_redis, **kw))
        try:
            assert await a.admit(f"Bearer {KEY}") == "key#0"
            assert await b.admit(f"Bearer {KEY}") == "key#0"
            await a.admit(f"Bearer {KEY}")
            for g in (a, b):  # three taken across both: the key's budget is spent everywhere
                with pytest.raises(RateLimited, match="rate limit: over 0.001 requests/s"):
                    await g.admit(f"Bearer {KEY}")
            assert await b.admit(f"Bearer {OTHER_KEY}") == "key#1"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_two_routers_over_one_redis_share_a_keys_budget(password_redis: str, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The whole path: YAML -> server_options -> two TandemServers whose guards keep their buckets
    in the password-protected metadata Redis."""
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    monkeypatch.setenv("TANDEM_TEST_REDIS_PW", PASSWORD)
    cfg = parse_config(
        {
            "metadata": {"store": password_redis, "password_env": "TANDEM_TEST_REDIS_PW"},
            "router": {
                "port": 0,
                "http": {"enabled": False},
                "security": {"api_keys_file": str(keys), "rate_limit": {"requests_per_s": 0.001, "burst": 2}},
            },
        }
    )

    async def main() -> None:
        servers = [
            TandemServer(TextBackend(), **server_options(cfg.router, metadata=cfg.metadata)) for _ in range(2)
        ]
        for s in servers:
            await s.start()
        try:
            for s in servers:
                async with channel(s.address, None) as ch:
                    assert len(await generate(ch, KEY, max_tokens=1)) == 1
            for s in servers:
                async with channel(s.address, None) as ch:
                    code, details = await grpc_code(generate(ch, KEY, max_tokens=1))
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("rate limit: ")
                    assert len(await generate(ch, OTHER_KEY, max_tokens=1)) == 1
        finally:
            for s in servers:
                await s.stop(0)
        r = redis.Redis.from_url(password_redis, password=PASSWORD)
        assert sorted(k.decode() for k in r.keys("tandem:ratelimit:*")) == [
            "tandem:ratelimit:key#0",
            "tandem:ratelimit:key#1",
        ]  # named by the key's index, never by the key
        r.close()

    asyncio.run(main())
