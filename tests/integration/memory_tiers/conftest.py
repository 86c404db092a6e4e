"""Fixtures for memory_tiers integration tests: a real redis-server on a free port, always killed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import redis_server


@pytest.fixture
def redis_url() -> Iterator[str]:
    """Start ``redis-server`` (no persistence) in its own process group; yield its URL; kill it."""
    import redis

    def ping(port: int) -> bool:
        with redis.Redis(host="127.0.0.1", port=port) as client:
            return bool(client.ping())

    with redis_server(lambda port: ["--port", str(port)], ping) as port:
        yield f"redis://127.0.0.1:{port}/0"
