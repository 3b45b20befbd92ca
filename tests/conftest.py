from __future__ import annotations

import pytest

from cli.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free port, for the whole test session."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()
