"""Cluster time: this machine's wall clock, corrected to Redis's.

Times that cross processes (when a job was created or started, a heartbeat, a load request,
when a model expires) are compared by other machines, whose clocks may be minutes off. Every
process therefore stamps them with ``now()``, its own clock plus the offset to the clock of
the Redis server they all share, measured with Redis's TIME (half a round trip either way).
Durations measured inside one process keep using ``time.monotonic()``; liveness uses key
TTLs, which Redis alone judges.
"""

from __future__ import annotations

import time
from typing import Any

# Seconds to add to this machine's clock to read Redis's. A float is replaced atomically,
# so the heartbeat thread may update it while the event loop reads it.
_offset = 0.0
RESYNC_S = 10.0  # how often long-running processes measure it again


def now() -> float:
    """Seconds since the epoch by Redis's clock."""
    return time.time() + _offset


def now_ms() -> int:
    return int(now() * 1000)


def _settle(before: float, reply: Any, after: float) -> float:
    global _offset
    seconds, micros = (int(x) for x in reply)
    _offset = seconds + micros / 1e6 - (before + after) / 2
    return _offset


async def sync(redis: Any) -> float:
    """Measure the offset to ``redis``'s clock (an asyncio client); returns it."""
    before = time.time()
    reply = await redis.time()
    return _settle(before, reply, time.time())


def sync_blocking(client: Any) -> float:
    """The same, for a synchronous client (the heartbeat thread)."""
    before = time.time()
    reply = client.time()
    return _settle(before, reply, time.time())
