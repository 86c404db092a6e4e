"""router/security.py's parts alone: the key store, bearer parsing, the in-process token bucket on a
scripted clock, the guard's decisions; the request limits of router/validation.py; the two front
doors' mappings of the refusals; the YAML sections; and no shipped code turning Ray's auth off."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest

from deploy.config import ConfigError, parse_config
from deploy.derive import check_security, redis_options, security_options, server_options
from router.errors import RateLimited, Unauthenticated, status_for
from router.http.errors import response_parts
from router.security import (
    Guard,
    KeyStore,
    MemoryBuckets,
    RateLimit,
    bearer_token,
    is_loopback,
    peer_host,
)
from router.validation import GenerateInput, ModelLimits, RequestLimits, ValidationError, check_request

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MODELS = {"m": ModelLimits("m", 128, 64, vocab_size=1000)}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# -- keys ----------------------------------------------------------------------------------------------
def test_key_store_matches_only_its_keys_and_never_shows_them(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "keys"
    f.write_text("# team A\nsk-alpha\n\n  sk-beta  \n")
    monkeypatch.setenv("TANDEM_TEST_KEYS", "sk-gamma, sk-alpha")
    ks = KeyStore.load(str(f), "TANDEM_TEST_KEYS")
    assert len(ks) == 3  # sk-alpha twice counts once
    assert (ks.match("sk-alpha"), ks.match("sk-beta"), ks.match("sk-gamma")) == (0, 1, 2)
    assert ks.match("sk-alph") is None and ks.match("") is None and ks.match("sk-alpha ") is None
    assert "sk-" not in repr(ks) and repr(ks) == "KeyStore(3 keys)"
    assert not any(b"sk-alpha" in d for d in ks._digests)  # digests, not keys


def test_key_sources_that_name_nothing_are_errors(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="api_keys_file .*holds no key"):
        KeyStore.load(str(empty))
    with pytest.raises(ValueError, match="api_keys_file .*cannot read"):
        KeyStore.load(str(tmp_path / "missing"))
    monkeypatch.delenv("TANDEM_NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match="api_keys_env TANDEM_NO_SUCH_VAR"):
        KeyStore.load(None, "TANDEM_NO_SUCH_VAR")
    assert not KeyStore.load().enabled


@pytest.mark.parametrize(
    ("value", "key"),
    [("Bearer sk-1", "sk-1"), ("bearer  sk-1 ", "sk-1"), ("BEARER sk-1", "sk-1"), ("sk-1", None),
     ("Basic c2stMQ==", None), ("Bearer ", None), (None, None), ("", None)],
)  # fmt: skip
def test_bearer_token(value: str | None, key: str | None) -> None:
    assert bearer_token(value) == key


def test_peer_hosts_and_loopback() -> None:
    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("10.0.0.2") == "10.0.0.2"
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.9", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.com")] == [False] * 4


# -- the token bucket ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_memory_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    b = MemoryBuckets(RateLimit(requests_per_s=2.0, burst=3), clock)
    assert [run(b.take("k")) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert run(b.take("k")) == pytest.approx(0.5)  # empty: one token in 1/2 s
    assert run(b.take("other")) == 0.0  # each caller has its own bucket
    clock.t += 0.5
    assert run(b.take("k")) == 0.0
    assert run(b.take("k")) == pytest.approx(0.5)
    clock.t += 60  # a long quiet spell refills to the burst, no further
    assert [run(b.take("k")) for _ in range(4)][-1] == pytest.approx(0.5)


# -- the guard -----------------------------------------------------------------------------------------
def test_guard_refuses_missing_and_wrong_keys_and_names_the_caller() -> None:
    guard = Guard(KeyStore(["sk-a", "sk-b"]))
    assert run(guard.admit("Bearer sk-b", "ipv4:127.0.0.1:1")) == "key#1"
    with pytest.raises(Unauthenticated, match="missing API key"):
        run(guard.admit(None))
    with pytest.raises(Unauthenticated, match="invalid API key") as e:
        run(guard.admit("Bearer sk-c"))
    assert "sk-c" not in str(e.value)
    with pytest.raises(Unauthenticated):
        run(guard.admit(None, health=True))  # health is open only when configured
    open_health = Guard(KeyStore(["sk-a"]), allow_unauthenticated_health=True)
    assert run(open_health.admit(None, health=True)) == "health"
    with pytest.raises(Unauthenticated):
        run(open_health.admit(None, health=False))


def test_guard_rate_limits_per_key_and_per_peer_without_keys() -> None:
    clock = Clock()
    keyed = Guard(KeyStore(["sk-a", "sk-b"]), MemoryBuckets(RateLimit(1.0, 2), clock))
    run(keyed.admit("Bearer sk-a"))
    run(keyed.admit("Bearer sk-a"))
    with pytest.raises(RateLimited, match=r"over 1 requests/s \(burst 2\) for this API key") as e:
        run(keyed.admit("Bearer sk-a"))
    assert e.value.retry_after_s == pytest.approx(1.0) and e.value.retry_after_header == "1"
    assert run(keyed.admit("Bearer sk-b")) == "key#1"  # another key, another bucket
    anon = Guard(KeyStore(), MemoryBuckets(RateLimit(0.5, 1), clock))
    assert not anon.open and Guard(KeyStore()).open
    assert run(anon.admit(None, "ipv4:10.0.0.1:1")) == "peer:10.0.0.1"
    with pytest.raises(RateLimited, match="for this client") as e:
        run(anon.admit(None, "ipv4:10.0.0.1:2"))  # the same host from another port
    assert e.value.retry_after_header == "2"
    run(anon.admit(None, "ipv4:10.0.0.2:1"))


def test_each_front_door_maps_refusals_to_its_codes() -> None:
    assert status_for(Unauthenticated("invalid API key")) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "invalid API key",
    )
    assert status_for(RateLimited("rate limit: x", 0.2))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, body, headers = response_parts(Unauthenticated("invalid API key"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body == {
        "error": {
            "message": "invalid API key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    status, body, headers = response_parts(RateLimited("rate limit: over", 2.2))
    assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "rate_limit_exceeded", "3")


# -- request limits ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inp", "field", "limit"),
    [
        (GenerateInput(prompt_text="x", n=33), "n", "max_n"),
        (GenerateInput(prompt_text="x", n=0), "n", "max_n"),
        (GenerateInput(prompt_text="x", stop=["a"] * 17), "sampling.stop", "max_stop_strings"),
        (GenerateInput(prompt_text="x", stop=["a" * 257]), "sampling.stop", "max_stop_length"),
        (GenerateInput(prompt_text="x", stop_token_ids=[1] * 65), "sampling.stop_token_ids", "max_stop_"),
        (GenerateInput(prompt_text="x", logprobs=21), "sampling.logprobs", "max_logprobs"),
        (
            GenerateInput(prompt_chat=[{"role": "u", "content": ""}] * 1025),
            "prompt.chat.messages",
            "max_chat_",
        ),
    ],
)
def test_default_limits_refuse_naming_field_and_limit(inp: GenerateInput, field: str, limit: str) -> None:
    with pytest.raises(ValidationError) as e:
        check_request(inp, MODELS)
    assert e.value.field == field and limit in str(e.value)


def test_limits_are_the_servers_and_cover_prompt_tokens() -> None:
    tight = RequestLimits(max_prompt_tokens=4, max_stop_strings=1, max_logprobs=2, max_n=2)
    check_request(GenerateInput(prompt_token_ids=[1, 2, 3, 4], stop=["s"], logprobs=2, n=2), MODELS, tight)
    with pytest.raises(ValidationError, match="max_prompt_tokens 4") as e:
        check_request(GenerateInput(prompt_token_ids=[1] * 5), MODELS, tight)
    assert e.value.field == "prompt.token_ids"
    with pytest.raises(ValidationError, match="max_logprobs"):
        check_request(GenerateInput(prompt_text="x", logprobs=3), MODELS, tight)
    from router.validation import check_prompt_length

    with pytest.raises(ValidationError, match="max_prompt_tokens 4") as e:
        check_prompt_length(5, 1, MODELS["m"], tight)  # a text prompt, after tokenizing
    assert e.value.field == "prompt"


# -- the YAML --------------------------------------------------------------------------------------------
def test_security_and_limits_sections(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    keys.write_text("sk-1\n")
    cfg = parse_config(
        {
            "metadata": {"store": "rediss://r.example:6380/0", "password_env": "TANDEM_TEST_REDIS_PW",
                         "tls": {"ca_file": "/ca.pem"}},
            "router": {
                "host": "0.0.0.0",
                "security": {
                    "api_keys_file": str(keys),
                    "tls": {"cert_file": "/s.pem", "key_file": "/s.key", "client_ca_file": "/ca.pem"},
                    "allow_unauthenticated_health": True,
                    "rate_limit": {"requests_per_s": 5, "burst": 20},
                },
                "limits": {"max_n": 4, "max_message_bytes": "1MiB"},
            },
        }
    )  # fmt: skip
    monkeypatch.setenv("TANDEM_TEST_REDIS_PW", "hunter2")
    opts = server_options(cfg.router, metadata=cfg.metadata)
    sec = opts["security"]
    assert sec.tls is not None and sec.tls.client_ca_file == "/ca.pem" and sec.allow_unauthenticated_health
    assert sec.rate_limit == RateLimit(5.0, 20) and sec.redis_url == "rediss://r.example:6380/0"
    assert sec.redis_kwargs == {"password": "hunter2", "ssl_ca_certs": "/ca.pem"}
    assert "hunter2" not in repr(cfg)  # the YAML names the variable, never the secret
    assert (opts["limits"].max_n, opts["max_message_bytes"]) == (4, 1 << 20)
    assert security_options(cfg.router).redis_url is None  # no Redis: the buckets are in-process
    with pytest.raises(ConfigError, match=r"router.security.tls: cannot read /s.pem"):
        check_security(cfg)
    monkeypatch.delenv("TANDEM_TEST_REDIS_PW")
    with pytest.raises(ConfigError, match="metadata.password_env: .*TANDEM_TEST_REDIS_PW is unset"):
        redis_options(cfg.metadata)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"router": {"security": {"tls": {"cert_file": "/c"}}}}, "router.security.tls.key_file"),
        ({"router": {"security": {"rate_limit": {"requests_per_s": 0}}}}, "requests_per_s"),
        ({"router": {"security": {"api_key": "sk-1"}}}, "router.security.api_key"),  # no secrets inline
        ({"router": {"limits": {"max_n": 0}}}, "router.limits.max_n"),
        ({"metadata": {"password_env": "X"}}, "for a redis:// store"),
        ({"metadata": {"store": "redis://h:1/0", "tls": {}}}, "tls needs a rediss:// store"),
        ({"metadata": {"store": "rediss://h:1/0", "tls": {"cert_file": "/c"}}}, "cert_file and key_file"),
    ],
)
def test_bad_security_config_names_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_the_default_is_open_on_loopback() -> None:
    cfg = parse_config({})
    sec = security_options(cfg.router, cfg.metadata)
    assert sec.tls is None and not Guard.from_options(sec).keys.enabled and sec.rate_limit is None
    assert is_loopback(cfg.router.host)


def test_no_shipped_code_turns_ray_auth_off() -> None:
    """Ray 2.60's token auth stays on outside tests: only tests/ may set RAY_AUTH_MODE."""
    offenders = []
    for pkg in ("engine", "kv_transfer", "memory_tiers", "pool_runtime", "prefill_pool", "decode_pool",
                "router", "deploy", "benchmarks", "proto"):  # fmt: skip
        for path in (ROOT / pkg).rglob("*"):
            if (
                path.suffix in (".py", ".yaml", ".yml", ".sh", ".toml")
                and "RAY_AUTH_MODE" in path.read_text()
            ):
                offenders.append(str(path.relative_to(ROOT)))
    for path in (ROOT / "Makefile",):
        if "RAY_AUTH_MODE" in path.read_text():
            offenders.append(path.name)
    assert offenders == []


def test_serve_flags_set_the_security_section(tmp_path: Path) -> None:
    import argparse

    from deploy.serve import add_arguments, resolve_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--api-key-file", "/k", "--tls-cert", "/c.pem", "--tls-key", "/k.pem",
                         "--tls-client-ca", "/ca.pem", "--api-key-env", "KEYS"])  # fmt: skip
    sec = resolve_config(args).router.security
    assert (str(sec.api_keys_file), sec.api_keys_env) == ("/k", "KEYS")
    assert sec.tls is not None and (str(sec.tls.cert_file), str(sec.tls.client_ca_file)) == (
        "/c.pem",
        "/ca.pem",
    )
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        resolve_config(p.parse_args(["--tls-cert", "/c.pem"]))
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        resolve_config(p.parse_args(["--tls-client-ca", "/ca.pem"]))
    assert resolve_config(p.parse_args([])).router.security.tls is None


def test_status_lists_what_the_router_listens_on() -> None:
    from deploy.status import ClusterStatus, format_table

    listeners = [
        {"name": "grpc", "address": "10.0.0.1:50051", "tls": True, "mtls": True, "api_keys": True},
        {"name": "http", "address": "10.0.0.1:8000", "tls": False, "mtls": False, "api_keys": False,
         "metrics": "/metrics"},
    ]  # fmt: skip
    text = format_table(ClusterStatus("tandem", router={"address": "10.0.0.1:50051", "listeners": listeners}))
    assert "listen grpc  10.0.0.1:50051  mTLS  api-keys" in text
    assert "listen http  10.0.0.1:8000  plaintext  no-keys  (+/metrics)" in text
