"""Who may call the router's front doors, over what, and how often: API keys, TLS files, per-key
rate limits. Both front doors (the gRPC interceptor in router/server.py, the HTTP guard in
router/http/guard.py) ask one :class:`Guard`, so they agree on every refusal; each maps the
refusals to its own codes in its one mapping place (router/errors.py, router/http/errors.py).

::

    request --credential ("Bearer KEY": HTTP Authorization header, gRPC authorization metadata)-->
      Guard.admit(credential, peer, health=...)
        health check and allow_unauthenticated_health  -> admitted, no key, no rate limit
        KeyStore on and the key missing / unknown      -> Unauthenticated   (401 / UNAUTHENTICATED)
        the caller's bucket empty                      -> RateLimited       (429 / RESOURCE_EXHAUSTED)
      -> the caller's name: "key#<i>" (the i-th key loaded), or "peer:<address>" without keys

Keys are never kept, only their SHA-256 digests; a presented key's digest is compared with every
stored digest by ``hmac.compare_digest`` (no early exit: the time does not tell which or how many
matched). Nothing here logs a key, a digest or a credential. Keys come from a file (one per line,
``#`` comments, blank lines ignored) and/or an environment variable (comma-separated).

Rate limits are token buckets (``requests_per_s`` refill, ``burst`` capacity) per caller:
:class:`MemoryBuckets` in this process, or :class:`RedisBuckets` (one Lua script, atomic in Redis,
so several routers over one metadata store share each caller's budget). No gRPC, no HTTP here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from router.errors import RateLimited, Unauthenticated

__all__ = ["Guard", "KeyStore", "RateLimit", "RateLimited", "SecurityOptions", "TlsFiles", "Unauthenticated"]
BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A server's certificate chain and key (PEM); ``client_ca_file`` set: clients must present a
    certificate it signed (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None), each file read now."""
        cert, key = Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()
        return cert, key, Path(self.client_ca_file).read_bytes() if self.client_ca_file else None


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_s: float  # refill rate of each caller's bucket
    burst: int  # its capacity: requests allowed at once after a quiet spell


@dataclass(frozen=True, slots=True)
class SecurityOptions:
    """A server's security (deploy/config.py's ``router.security``); the default is open (loopback)."""

    api_keys_file: str | None = None
    api_keys_env: str | None = None
    tls: TlsFiles | None = None
    allow_unauthenticated_health: bool = False
    rate_limit: RateLimit | None = None
    redis_url: str | None = None  # set: buckets in this Redis (the metadata store), shared by routers
    redis_kwargs: dict[str, Any] = field(default_factory=dict)  # password, ssl_* (never logged)


class KeyStore:
    """SHA-256 digests of the accepted API keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(k.strip() for k in keys) if k]

    @classmethod
    def load(cls, keys_file: str | None = None, keys_env: str | None = None) -> KeyStore:
        """The keys of a file and/or an environment variable; a named source that is missing or
        holds no key is an error (a typo must not silently turn authentication off)."""
        keys: list[str] = []
        if keys_file:
            try:
                lines = Path(keys_file).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"api_keys_file {keys_file}: cannot read ({e.strerror or e})") from None
            found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not found:
                raise ValueError(f"api_keys_file {keys_file}: holds no key")
            keys += found
        if keys_env:
            value = os.environ.get(keys_env, "")
            found = [k.strip() for k in value.split(",") if k.strip()]
            if not found:
                raise ValueError(f"api_keys_env {keys_env}: the environment variable is unset or empty")
            keys += found
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:  # never the digests
        return f"KeyStore({len(self)} keys)"

    def match(self, key: str) -> int | None:
        """The index of the stored key equal to ``key``, else None; every digest is compared."""
        presented = _digest(key)
        found = None
        for i, d in enumerate(self._digests):
            if hmac.compare_digest(presented, d) and found is None:
                found = i
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer_token(credential: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` value (the scheme is case-insensitive)."""
    if not credential or credential[: len(BEARER)].lower() != BEARER:
        return None
    return credential[len(BEARER) :].strip() or None


class Buckets(Protocol):
    limit: RateLimit

    async def take(self, caller: str) -> float:
        """Take one request from ``caller``'s bucket: 0.0 if it had one, else the seconds until it will."""
        ...

    async def close(self) -> None: ...


class MemoryBuckets:
    """Token buckets in this process (one router)."""

    def __init__(self, limit: RateLimit, clock: Any = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    async def take(self, caller: str) -> float:
        rate, burst, now = self.limit.requests_per_s, float(self.limit.burst), self._clock()
        tokens, at = self._state.get(caller, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._state[caller] = (tokens, now)
        if len(self._state) > 100_000:  # callers without keys are peers: forget the full ones
            self._state = {c: s for c, s in self._state.items() if s[0] < burst}
        return wait

    async def close(self) -> None:
        self._state.clear()


# KEYS[1]: the caller's bucket (a hash: tokens, ts); ARGV: rate, burst. Redis's own clock (TIME),
# so routers on several machines agree; the bucket expires once it would be full again anyway.
_TAKE_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1]) or burst
local ts = tonumber(s[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every router over it: ``{ns}:ratelimit:{caller}``."""

    def __init__(self, limit: RateLimit, url: str, ns: str = "tandem", **redis_kwargs: Any) -> None:
        import redis.asyncio as aioredis

        self.limit = limit
        self._r = aioredis.Redis.from_url(url, decode_responses=True, **redis_kwargs)
        self._take = self._r.register_script(_TAKE_LUA)
        self._ns = ns

    async def take(self, caller: str) -> float:
        key = f"{self._ns}:ratelimit:{caller}"
        wait = await self._take(keys=[key], args=[repr(self.limit.requests_per_s), self.limit.burst])
        return float(wait)

    async def close(self) -> None:
        await self._r.aclose()


class Guard:
    """One server's admission by credential and rate; shared by its gRPC and HTTP front doors."""

    def __init__(
        self, keys: KeyStore, buckets: Buckets | None = None, *, allow_unauthenticated_health: bool = False
    ) -> None:
        self.keys = keys
        self.buckets = buckets
        self.allow_unauthenticated_health = allow_unauthenticated_health

    @classmethod
    def from_options(cls, opts: SecurityOptions) -> Guard:
        keys = KeyStore.load(opts.api_keys_file, opts.api_keys_env)
        buckets: Buckets | None = None
        if opts.rate_limit is not None:
            if opts.redis_url:
                buckets = RedisBuckets(opts.rate_limit, opts.redis_url, **opts.redis_kwargs)
            else:
                buckets = MemoryBuckets(opts.rate_limit)
        return cls(keys, buckets, allow_unauthenticated_health=opts.allow_unauthenticated_health)

    @property
    def open(self) -> bool:
        """Nothing to check: no keys, no rate limit."""
        return not self.keys.enabled and self.buckets is None

    async def admit(self, credential: str | None, peer: str = "", *, health: bool = False) -> str:
        """The caller's name, or Unauthenticated / RateLimited."""
        if health and self.allow_unauthenticated_health:
            return "health"
        caller = f"peer:{peer_host(peer)}"
        if self.keys.enabled:
            token = bearer_token(credential)
            if token is None:
                raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
            index = self.keys.match(token)
            if index is None:
                raise Unauthenticated("invalid API key")
            caller = f"key#{index}"
        if self.buckets is not None:
            wait = await self.buckets.take(caller)
            if wait > 0:
                lim = self.buckets.limit
                raise RateLimited(
                    f"rate limit: over {lim.requests_per_s:g} requests/s (burst {lim.burst}) for this "
                    f"{'API key' if caller.startswith('key#') else 'client'}; retry in {wait:.2f} s",
                    wait,
                )
        return caller

    async def close(self) -> None:
        if self.buckets is not None:
            await self.buckets.close()


def peer_host(peer: str) -> str:
    """The host of a gRPC peer (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``) or of an HTTP client address."""
    if peer.startswith(("ipv4:", "ipv6:")):
        peer = peer.split(":", 1)[1]
        host = peer.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a listener on this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
