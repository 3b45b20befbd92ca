"""A pub/sub connection that dies with "connection timed out" (its host cut off the network)
is reported and connected again, instead of stopping the process's event loop: redis-py
returns None at once for it, forever, as if the read had merely timed out.

Over real Redis; the connection's death is what the kernel reports for it (ETIMEDOUT on the
socket, set on its stream as asyncio's transport does). The multi-host link-cut test
(tests/multihost/test_faults.py) shows the same through a real network cut."""

from __future__ import annotations

import errno
import time

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from common.subscriptions import next_message

CHANNEL = "vllama-test:subscriptions"


async def _subscribed(redis_server):
    client = redis.asyncio.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL)
    message = await next_message(pubsub, 5)
    assert message and message["type"] == "subscribe"
    return client, pubsub


def _time_out(pubsub) -> None:
    pubsub.connection._reader.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))


async def test_a_timed_out_connection_raises_at_once_and_the_next_read_subscribes_again(redis_server):
    client, pubsub = await _subscribed(redis_server)
    try:
        _time_out(pubsub)
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="timed out"):
            await next_message(pubsub, 30)
        assert time.monotonic() - started < 15  # told, not left waiting for the timeout

        # The next read connects again; redis-py subscribes again, and messages flow.
        message = await next_message(pubsub, 10)
        assert message and message["type"] == "subscribe"
        await client.publish(CHANNEL, "after")
        message = await next_message(pubsub, 10)
        assert message and message["type"] == "message" and message["data"] == b"after"
    finally:
        await pubsub.aclose()
        await client.aclose()

