"""Reading a Redis pub/sub connection without ever spinning on a dead one.

On Python 3.11 and later a socket's "connection timed out" (ETIMEDOUT: TCP_USER_TIMEOUT or
keepalive gave up on a host cut off the network) raises the same TimeoutError class that
asyncio's timeouts raise, and redis-py takes it for the read timeout its caller asked for:
``get_message(timeout=...)`` returns None at once, without disconnecting, and again on every
later call, never waiting on anything. A loop reading messages then never yields to the
event loop again, and the whole process stops: no heartbeat, no streams, no jobs taken, even
once the network is back. A None that comes long before the timeout is that case.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError


async def next_message(pubsub: PubSub, timeout: float) -> dict[str, Any] | None:
    """The next message on ``pubsub``, or None when none came within ``timeout`` seconds.
    Raises redis's ConnectionError for a connection that died, having closed it so that the
    next call connects again (and redis-py subscribes its channels again, which confirms each
    with a "subscribe" message)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    message = await pubsub.get_message(timeout=timeout)
    if message is None and loop.time() - started < timeout / 2:
        if pubsub.connection is not None:
            await pubsub.connection.disconnect()
        raise RedisConnectionError("the pub/sub connection timed out (its host was unreachable)")
    return message
